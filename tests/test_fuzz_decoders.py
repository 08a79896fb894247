"""A bounded coverage-guided run (atheris) of every decoder of untrusted input: no input
may make one raise anything but the error it documents (scripts/fuzz_decoders.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hostile_specs import HOSTILE

# coverage-guided fuzzing, a few seconds per decoder
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_decoders.py"
RUNS = 30_000  # per target: about a second each here


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (pip install -e '.[dev]' installs it)")
@pytest.mark.parametrize("target", ["packet", "hello", "control", "qmp", "spec"])
def test_decoder_survives_coverage_guided_inputs(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # libFuzzer adds what it finds: not in the source tree
    corpus.mkdir()
    if target == "spec":  # the hostile specs of issue 18 as seeds (JSON: the target's)
        for name, (content, _) in HOSTILE.items():
            if name.endswith(".json"):
                (corpus / name).write_text(content)
    done = subprocess.run([sys.executable, str(SCRIPT), target, str(corpus), f"-runs={RUNS}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {RUNS} runs" in done.stderr
