"""scripts/breaks.py, the deliberate-break check: every break still applies to the source.

Running the breaks is a tool (docs/reliability.md), not part of the suite; what the suite
keeps is that no patch has gone stale, so the table can always be re-made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import breaks  # noqa: E402


def test_every_break_patches_text_that_is_in_the_source_exactly_once() -> None:
    assert len(breaks.BREAKS) >= 11
    assert {b.name: breaks.stale(REPO, b) for b in breaks.BREAKS if breaks.stale(REPO, b)} == {}


def test_the_script_lists_its_breaks() -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "breaks.py"), "--list"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "verified-ignores-digests:" in done.stdout
