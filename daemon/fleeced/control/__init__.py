"""Control plane: the QMP-wire-protocol control socket and its argument checks."""
