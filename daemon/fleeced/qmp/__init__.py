"""Talking to running QEMU VMs: QMP (``qemu.qmp``) and the guest agent.

:mod:`fleeced.qmp.monitor` wraps one QMP connection with a timeout on every
step; :mod:`fleeced.qmp.attach` redirects a VM's disk through the daemon and
back; :mod:`fleeced.qmp.agent` freezes and thaws guest filesystems.
"""
