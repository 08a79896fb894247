"""One migration from end to end: the source and destination coordinators, the two-phase
commit between them, the downtime deadline, and a one-host migration with the destination
as a child process.

Runs in: coordinator processes, on uvloop. May import worker, devices, planning, net,
config, protocol, arena, report, lifecycle and errors; never qmp or cli.
"""
