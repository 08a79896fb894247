"""The process pool: workers that own devices, the jobs the coordinator sends them, and the
save and load of each device through the arena and the data channels.

Runs in: the coordinator (``pool``) and the worker processes (everything else). May import
devices, planning, net, config, protocol, arena, lifecycle and errors; never migration,
qmp or cli.
"""
