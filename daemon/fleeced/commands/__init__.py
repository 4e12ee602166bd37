"""The control commands, one module per area, each a mixin on
:class:`fleeced.core.DaemonCore` (its methods use the daemon's registry
directly); :class:`fleeced.daemon.Daemon` puts them together.

Areas: :mod:`.disks` (disk-add, disk-remove), :mod:`.fleecing`
(fleece-start, fleece-stop), :mod:`.bitmaps` (bitmap-*), :mod:`.vms`
(vm-attach, vm-detach), :mod:`.queries` (query-*), :mod:`.inject`
(the x-inject-* test hooks).
"""
