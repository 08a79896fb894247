"""The shared-memory arena: one pre-faulted segment per side, cut into slots per worker.

Runs in: the coordinator (creates and unlinks it) and every worker (attaches, owns its own
partition). Imports only errors.
"""
