"""What the VM is and how to move it: machine specs parsed and validated, and the
parameters of a migration.

Runs in: every process (coordinators, workers, device models read specs). Imports only
errors: configuration is plain typed data, with no knowledge of devices or the runtime.
"""
