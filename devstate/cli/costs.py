"""``devstate costs show|reset``: the cost model this host has learned (docs/costs.md).

Every run that does not say ``--costs PATH`` or ``--no-learn`` reads and refines one file per
host and user; this shows what is in it, or forgets it so that the next run starts from
the defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from devstate.planning.cost import CostHistory, HostCosts


def history(args: argparse.Namespace) -> CostHistory:
    """The cost model the flags name: ``--costs PATH`` (or the default), learning unless
    ``--no-learn``."""
    path = Path(args.costs) if args.costs else None
    return CostHistory(path, learn=not getattr(args, "no_learn", False))


async def costs_command(args: argparse.Namespace) -> int:
    """``devstate costs``."""
    costs = history(args)
    if args.action == "reset":
        removed = costs.reset()
        print(f"devstate: {'removed' if removed else 'nothing to remove at'} {costs.path}; "
              "the next run starts from the defaults")
        return 0
    host = costs.load()
    stored = costs.path.exists()
    if args.json:
        out = {"path": str(costs.path), "stored": stored, **_constants(host)}
        print(json.dumps(out, indent=1))
        return 0
    print(f"{costs.path}: {'learned from earlier runs' if stored else 'none yet (defaults)'}")
    for name, value in _constants(host).items():
        print(f"  {name:<20} {value}")
    return 0


def _constants(host: HostCosts) -> dict[str, object]:
    """What the model holds, as plain data (the runs counted, not listed)."""
    out = host.to_json()
    out["runs"] = len(host.runs)
    return out
