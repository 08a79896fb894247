"""The QMP control socket: framing, negotiation, and the commands a migration controller
(libvirt, ``qemu.qmp`` scripts) drives a devstate VM with.

Runs in: the ``devstate vm --qmp`` process, on uvloop. May import migration and everything
below it; never cli.
"""
