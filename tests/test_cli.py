"""The devstate command as a user runs it: demo, migrate, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def devstate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devstate", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_demo_json_reports_both_modes_on_the_default_machine() -> None:
    done = devstate("demo", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for mode in ("sequential", "concurrent"):
        assert out[mode]["downtime_ms"] > 0
        devices = out[mode]["devices"]
        assert len(devices) == 516
        assert all({"id", "bytes", "verified"} <= d.keys() and d["verified"] for d in devices)
    assert out["sequential"]["workers"] == 1
    assert out["speedup"] > 1.0


def test_migrate_prints_a_table_or_json() -> None:
    spec = str(EXAMPLES / "one-nic-32mib.toml")
    table = devstate("migrate", "--spec", spec, "--sequential")
    assert table.returncode == 0, table.stderr
    assert "sequential: 1 worker(s)" in table.stdout and "vfio/nic0" in table.stdout
    assert "verified bit-exact" in table.stdout
    as_json = devstate("migrate", "--spec", spec, "--json", "--workers", "2")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["mode"] == "concurrent" and report["workers"] == 2
    assert [d["id"] for d in report["devices"]] == ["vfio/nic0"]
    assert report["devices"][0]["verified"] is True


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[devices]]\nname = "x"\nsize = 0\n')
    done = devstate("migrate", "--spec", str(bad))
    assert done.returncode == 1
    assert done.stderr.strip() == "devstate: error: devices[0].size: must be > 0"
    assert "Traceback" not in done.stderr
    usage = devstate("migrate", "--spec", str(bad), "--workers", "0")
    assert usage.returncode == 2 and "must be at least 1" in usage.stderr
