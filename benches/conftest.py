"""Benchmarks: variants run side by side in one run, ratios reported in extra_info.

The machine is shared and noisy, so absolute numbers mean little across runs; each group
measures its baseline in the same run and reports the ratio.
"""

from __future__ import annotations

from typing import Any

import pytest

_RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="session")
def results() -> dict[str, dict[str, float]]:
    """Per-group figures shared between the benchmarks of one run (for ratios)."""
    return _RESULTS


def median_s(benchmark: Any) -> float | None:
    """The benchmark's median in seconds, or None when benchmarks are disabled."""
    stats = getattr(benchmark, "stats", None)
    if stats is None or not getattr(stats, "stats", None):
        return None
    return float(stats.stats.median)
