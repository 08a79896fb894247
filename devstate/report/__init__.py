"""What a migration reports: per-device timings, downtime against the estimate, the
timeline picture, and the live progress line.

Runs in: coordinators and the ``devstate`` command. Imports only errors, lifecycle and phase
(and plotting or terminal libraries): a report is data about a migration, not part of one.
"""
