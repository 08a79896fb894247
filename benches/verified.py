"""Local migrations for the benches, every one verified.

Every bench that migrates goes through :func:`migrate_verified`: digests compared on both
sides, and the report must say so (``report.verified``), so no figure comes from a
migration whose result was not checked. The comparison runs after the destination's
RESUMED (:meth:`devstate.migration.source.Outgoing._finish`), so it is not part of any
downtime figure; it is part of a bench's wall-clock time, which no figure quotes.
"""

from __future__ import annotations

import uvloop

from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig
from devstate.migration.local import migrate_locally
from devstate.planning.cost import CostHistory
from devstate.report.migration import MigrationReport


def migrate_verified(spec: MachineConfig, params: MigrationParams, *,
                     dest_params: MigrationParams | None = None,
                     history: CostHistory | None = None) -> MigrationReport:
    """One migration of ``spec`` to a local destination process, digests compared; fails
    (AssertionError) unless every device verified. ``history``: the cost constants the
    estimate starts from, and learns into (see :func:`migrate_locally`)."""
    report = uvloop.run(migrate_locally(spec, params, dest_params=dest_params,
                                        compare_digests=True, history=history))
    if report.guest is not None:  # a live guest: it must have gone on running
        assert report.guest.continued, f"{spec.name}: the guest did not continue: " \
                                       f"{report.guest.why}"
    unverified = [d.id for d in report.devices if not d.verified]
    assert report.verified, f"{spec.name}: not verified (digests compared: " \
                            f"{report.digests_compared}; differ: {unverified})"
    return report
