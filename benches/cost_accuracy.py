"""The cost model against measured downtime: calibrate on some scenarios, measure others.

A scenario is a machine and the parameters it migrates with (the data channel count is a
parameter, not part of the machine). :func:`calibrate` teaches a :class:`CostHistory` the
way a host running devstate teaches its own: by earlier verified runs, each refining the
stored constants. :func:`measure` then runs every scenario ``rounds`` times with the
constants fixed (``learn`` off), round-robin so that the host's drift hits every scenario
alike, and compares the median downtime with the median estimate made before each stop.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from benches.verified import migrate_verified
from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig, load_spec
from devstate.planning.cost import CostHistory

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


@dataclass(frozen=True, slots=True)
class Scenario:
    """A machine and how it migrates (``dest_params``: the destination's, if not its
    defaults)."""

    name: str
    spec: MachineConfig
    params: MigrationParams
    dest_params: MigrationParams | None = None


def scenario(path: str, channels: int | None = None) -> Scenario:
    """The spec at ``path`` (relative to benches/scenarios, without .toml) over
    ``channels`` data channels (None: one per worker)."""
    spec = load_spec(SCENARIOS / f"{path}.toml")
    suffix = f" ({channels} ch)" if channels else ""
    return Scenario(spec.name + suffix, spec, MigrationParams(channels=channels))


@dataclass(frozen=True, slots=True)
class Accuracy:
    """One scenario's median estimate and median measured downtime (ms), and the term the
    estimate named critical."""

    name: str
    expected_ms: float
    measured_ms: float
    critical: str

    @property
    def error(self) -> float:
        """Measured over expected, minus one: negative when the estimate was too high."""
        return self.measured_ms / self.expected_ms - 1

    def to_json(self) -> dict[str, object]:
        """The figures as a bench's extra_info keeps them."""
        return {"expected_ms": round(self.expected_ms, 1),
                "measured_ms": round(self.measured_ms, 1),
                "error": round(self.error, 3), "critical": self.critical}


def calibrate(history: CostHistory, scenarios: list[Scenario], passes: int) -> None:
    """Refine ``history`` (which must learn) by ``passes`` runs of every scenario."""
    assert history.learn
    for _ in range(passes):
        for s in scenarios:
            migrate_verified(s.spec, s.params, dest_params=s.dest_params, history=history)


def measure(history: CostHistory, scenarios: list[Scenario], rounds: int) -> list[Accuracy]:
    """Every scenario ``rounds`` times, round-robin, with ``history``'s constants as they
    are (nothing learned); the medians."""
    fixed = CostHistory(history.path, learn=False)
    runs: dict[str, list[tuple[float, float, str]]] = {s.name: [] for s in scenarios}
    for _ in range(rounds):
        for s in scenarios:
            report = migrate_verified(s.spec, s.params, dest_params=s.dest_params,
                                      history=fixed)
            # The critical path names the largest terms, "; "-separated: the first decides.
            critical = report.critical_path.split("; ")[0]
            runs[s.name].append((report.expected_ms, report.downtime_ms, critical))
    return [Accuracy(name, statistics.median(e for e, _, _ in seen),
                     statistics.median(m for _, m, _ in seen), seen[-1][2])
            for name, seen in runs.items()]


def summary(rows: list[Accuracy]) -> dict[str, float]:
    """Median and largest absolute error of ``rows``."""
    errors = [abs(r.error) for r in rows]
    return {"median_abs_error": round(statistics.median(errors), 3),
            "max_abs_error": round(max(errors), 3)}


def table(sets: dict[str, list[Accuracy]]) -> str:
    """The rows as the markdown table of docs/benchmarks.md."""
    lines = ["| set | scenario | expected | measured | error | critical term |",
             "| --- | --- | --- | --- | --- | --- |"]
    for which, rows in sets.items():
        lines += [f"| {which} | {r.name} | {r.expected_ms:.1f} ms | {r.measured_ms:.1f} ms "
                  f"| {r.error:+.1%} | {r.critical} |" for r in rows]
    return "\n".join(lines)
