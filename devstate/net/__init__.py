"""Byte transports between the two sides: Unix, TCP and TLS sockets, channel hellos and
control exchanges over them, fd passing, routing of packets to channels, bandwidth shaping.

Runs in: coordinators (main channel) and workers (data channels). May import protocol,
config, arena, errors and lifecycle; never devices, workers or migrations.
"""
