"""A running guest moves: its vCPUs execute devstate's guest program in guest RAM until the
stop, RAM and vCPU state move through the pool, and the destination checks from the
guest's own RAM that every vCPU went on from where it stopped.

What the guest checks (its registers, its checksum blocks) and what the host reads back
are the guest program's (devstate.devices.kvm.guest); these tests judge the migration by
that, and break it on purpose in flight: a register changed after its record was verified,
a page of the guest's RAM changed before its packet's checksum was taken. Neither breaks a
transport check; both must make the report say the guest did not continue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from pathlib import Path

import pytest

from devstate.cli import kvm_usable
from devstate.config.params import MigrationParams
from devstate.config.spec import MachineConfig, parse_spec
from devstate.devices.kvm.guest import GuestLayout
from devstate.devices.kvm.guest_view import GuestView
from devstate.devices.kvm.ram import GuestRam
from devstate.errors import MigrationFailed
from devstate.migration.local import migrate_locally
from devstate.migration.source import SourceVM
from devstate.report.migration import format_table
from tests.test_cli import devstate
from tests.test_live_ram import TICKS_S, _paused
from tests.test_qmp_faults import _vm_pid

USABLE, WHY = kvm_usable()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"needs KVM: {WHY}")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _live(vcpus: int, ram: str = "32MiB", **extra: object) -> MachineConfig:
    return parse_spec({"seed": 19, "vcpus": {"count": vcpus, "backend": "kvm"},
                       "ram": {"size": ram}, **extra})


def test_a_running_guest_moves_and_continues(run) -> None:
    spec = _live(16, devices=[{"name": "nic0", "size": "4MiB"}])
    report = run(migrate_locally(spec, MigrationParams(workers=2)))
    assert report.guest is not None
    assert report.guest.continued, report.guest.why
    assert report.guest.vcpus_running == 16 and report.guest.ram_bytes == 32 << 20
    # Downtime ends at the release of the destination's last vCPU, which RESUMED follows.
    assert report.resumed_seen_ms is not None
    assert 0 < report.downtime_ms <= report.resumed_seen_ms
    ram = [d for d in report.devices if d.id.startswith("ram/")]
    # One range; what the guest never touched crossed as zero extents (headers alone).
    assert [d.id for d in ram] == ["ram/0"] and 0 < ram[0].bytes < 32 << 20
    # RAM and the VFIO device by digest (RAM's taken on the destination before it ran);
    # vCPUs and VM-level state by the guest going on.
    assert report.verified and all(d.verified for d in report.devices)
    assert "continued" in format_table([report])


def test_a_guest_with_a_long_tick_is_given_two_of_them_to_show_it_continued(run) -> None:
    # Halted at the stop, a vCPU goes on at its next tick: a look after 0.25 s would find
    # most counters where they stopped.
    spec = parse_spec({"seed": 19, "vcpus": {"count": 4, "backend": "kvm"},
                       "ram": {"size": "4MiB", "tick_ms": 1000}})
    report = run(migrate_locally(spec, MigrationParams()))
    assert report.guest is not None and report.guest.continued, report.guest.why
    assert report.guest.ran_ms >= 2000


def test_a_register_changed_in_flight_stops_the_guest_continuing(run) -> None:
    """RBP of one vCPU (the first of the first batch put) changes after its record's
    checksum was verified, to a value KVM takes: the put and the transport pass; the guest
    program on that vCPU sees its register go wrong, the other seven go on."""
    spec = _live(8)
    report = run(migrate_locally(spec, MigrationParams(workers=2), dest_params=MigrationParams(
        workers=2, fault="record-put:alter")))
    assert report.guest is not None and not report.guest.continued
    assert report.guest.vcpus_running == 7
    assert re.match(r"cpu/\d failure code 1 \(general register RBP", report.guest.why), \
        report.guest.why
    assert not report.verified
    assert "DID NOT continue" in format_table([report])


def test_a_guest_page_changed_in_flight_stops_the_guest_continuing(run) -> None:
    """A word of cpu/0's checksum block flips before its packet's checksum is taken: every
    packet and END are valid and the page lands as sent; the guest's checksum fails.

    The fault strikes the stop's first chunk of guest RAM, which holds cpu/0's page only
    if cpu/0 wrote it after precopy's last round: the guest runs three of its ticks
    between that round and the stop (``before_stop``), so it has, however short the
    rounds were."""
    spec = _live(8)
    assert spec.ram is not None and spec.ram.tick_ms * 3 <= TICKS_S * 1e3
    report = run(_paused(spec, MigrationParams(workers=2, fault="get:alter"),
                         dest_params=MigrationParams(workers=2)))
    assert report.guest is not None and not report.guest.continued
    assert "cpu/0" in report.guest.why and "checksum" in report.guest.why
    # The source's RAM digest is of its own (unchanged) RAM: ram/0 is not verified either.
    assert not next(d for d in report.devices if d.id == "ram/0").verified


@pytest.mark.parametrize("fault", ["record-put:kill-worker", "resume:kill-worker"])
def test_a_failed_migration_leaves_the_source_guest_running(run, fault: str) -> None:
    """The destination's worker dies mid-load (before COMMIT), or as it resumes after COMMIT
    (its guest's threads woken already: the destination stops what is left and says
    nothing runs there): the source resumes its guest, whose counters then advance past
    where they stopped."""
    spec = _live(8)

    async def scenario() -> None:
        async with SourceVM(spec, MigrationParams(workers=2)) as source:
            memory = source.memory
            assert memory is not None
            with pytest.raises(MigrationFailed):
                from devstate.migration.local import destination
                async with destination(spec, MigrationParams(workers=2, fault=fault)) as dest:
                    await source.migrate(dest.address)
            stopped = memory.counters()
            await asyncio.sleep(0.3)
            view = GuestView(memory.ram.view, memory.layout)
            assert (view.counters() > stopped).all()
            assert not view.failures()
            assert source.running
    run(scenario())


@pytest.mark.slow  # 288 running vCPUs and 1 GiB of RAM, both sides on this host
def test_288_running_vcpus_and_1_gib_migrate_with_the_example_spec() -> None:
    done = devstate("migrate", "--spec", str(EXAMPLES / "live-288.toml"), "--json",
                    timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["guest"]["continued"], report["guest"]["why"]
    assert report["guest"]["vcpus_running"] == 288
    assert report["guest"]["ram_bytes"] == 1 << 30
    assert report["verified"]


def _guest_ram_of(qmp: Path, size: int) -> GuestRam:
    """The guest RAM of the ``devstate vm`` serving ``qmp``, mapped here through its
    memfd's /proc/PID/fd entry (any process of the same user may open a memfd so)."""
    pid = _vm_pid(qmp)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if "memfd:devstate-" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                opened = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
                try:
                    return GuestRam.attach(opened, size)
                finally:
                    os.close(opened)
    raise AssertionError(f"the devstate vm serving {qmp} has no guest RAM")


def test_qmp_stop_and_cont_really_pause_and_resume_the_guest(run, tmp_path: Path) -> None:
    """``devstate vm --qmp`` runs the guest: its counters advance while query-status says
    running, stand still after ``stop`` (status paused), and advance again after ``cont``."""
    from tests.test_qmp_migration import client, vm_process

    spec = _live(8)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    qmp_path = tmp_path / "vm.qmp"

    async def counters_over(view: GuestView, seconds: float) -> tuple[object, object]:
        before = view.counters()
        await asyncio.sleep(seconds)
        return before, view.counters()

    async def scenario() -> None:
        async with vm_process(spec_path, qmp_path) as path, client(path, "test") as qmp:
            with _guest_ram_of(qmp_path, 32 << 20) as ram:
                view = GuestView(ram.view, GuestLayout.of(8, 32 << 20))
                assert (await qmp.execute("query-status"))["status"] == "running"
                before, after = await counters_over(view, 0.3)
                assert (after > before).all()
                await qmp.execute("stop")
                assert (await qmp.execute("query-status"))["status"] == "paused"
                before, after = await counters_over(view, 0.3)
                assert (after == before).all()
                await qmp.execute("cont")
                assert (await qmp.execute("query-status"))["status"] == "running"
                before, after = await counters_over(view, 0.3)
                assert (after > before).all() and not view.failures()
                del view
            await qmp.execute("quit")
    run(scenario())


def test_a_cancelled_migration_leaves_the_source_guest_running(run, tmp_path: Path) -> None:
    """``migrate_cancel`` over QMP during stop-and-copy (a slow device keeps it going):
    the source says running again, and its guest's counters, read from its RAM, advance
    from where they stood while it was stopped, with no failure code."""
    from qemu.qmp import EventListener

    from tests.test_qmp_migration import _statuses, client, vm_process

    spec = _live(8, devices=[{"name": "nic", "size": "24MiB", "write_bandwidth": "16MiB/s"}])
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    incoming = tmp_path / "incoming.sock"
    src_qmp = tmp_path / "src.qmp"

    async def scenario() -> None:
        async with vm_process(spec_path, src_qmp) as src_path, \
                vm_process(spec_path, tmp_path / "dst.qmp", "--incoming",
                           f"unix:{incoming}", exit_code=1):
            with _guest_ram_of(src_qmp, 32 << 20) as ram:
                view = GuestView(ram.view, GuestLayout.of(8, 32 << 20))
                async with client(src_path, "source") as src:
                    await src.execute("migrate-set-capabilities", {"capabilities": [
                        {"capability": "events", "state": True}]})
                    await src.execute("migrate-set-parameters", {"downtime-limit": 60_000})
                    listener = EventListener(("MIGRATION",))
                    with src.listen(listener):
                        await src.execute("migrate", {"uri": f"unix:{incoming}"})
                        await _statuses(listener, ("device",))
                        await asyncio.sleep(0.2)
                        stopped = view.counters()
                        await asyncio.sleep(0.2)
                        assert (view.counters() == stopped).all()  # stopped for the copy
                        await src.execute("migrate_cancel")
                        seen = await _statuses(listener, ("cancelled", "completed", "failed"))
                    assert seen[-1] == "cancelled", seen
                    assert (await src.execute("query-status"))["status"] == "running"
                    await asyncio.sleep(0.3)
                    assert (view.counters() > stopped).all() and not view.failures()
                    del view
                    await src.execute("quit")
    run(scenario())


def test_guest_ram_beyond_what_the_host_has_is_refused_in_one_line(tmp_path: Path) -> None:
    """A spec asking for more RAM than the host has available is refused before any of it
    is faulted in (else the kernel's OOM killer would pick some process of the host)."""
    import psutil

    if psutil.virtual_memory().available > 120 << 30:
        pytest.skip("this host has more than 120 GiB available: 2 x 64 GiB of RAM would fit")
    spec = _live(4, ram="64GiB")
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(spec.to_dict()))
    done = devstate("migrate", "--spec", str(path), timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "ram.size: 128.0 GiB of guest RAM (2 sides on this host) does not fit" \
        in done.stderr
