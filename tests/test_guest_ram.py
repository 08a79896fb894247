"""Guest RAM (devstate.devices.kvm.ram): a memfd, mapped shared and pre-faulted, that the
coordinator creates and every worker attaches to; what one mapping writes, every other one
reads, in this process or another.

Pre-faulting is read from the kernel: ``RssShmem`` in ``/proc/self/status`` counts the
shared-memory pages this process has mapped, so it grows by the whole size at a map that
faulted every page in, and by nothing at one that left them for the first touch.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from devstate.devices.kvm.ram import PAGE_BYTES, GuestRam, data_pages, log_bytes
from devstate.errors import DeviceError, SpecError

MIB = 1 << 20


def rss_shmem_bytes() -> int:
    """Shared-memory pages mapped by this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


def test_create_gives_zeroed_writable_ram_of_the_size() -> None:
    with GuestRam.create(4 * MIB, "test-guest-ram") as ram:
        assert ram.size == len(ram.view) == 4 * MIB
        assert os.fstat(ram.fd).st_size == 4 * MIB + log_bytes(4 * MIB)  # and its logs
        assert len(ram.dirty) * 64 == 4 * MIB // PAGE_BYTES and not ram.dirty.any()
        assert not any(ram.view[::PAGE_BYTES])
        ram.view[123:126] = b"abc"
        assert bytes(ram.view[123:126]) == b"abc"
        assert "memfd:test-guest-ram" in os.readlink(f"/proc/self/fd/{ram.fd}")


def test_address_is_where_the_view_lives() -> None:
    """KVM is given ``address``: the bytes there must be the view's."""
    with GuestRam.create(2 * MIB, "address") as ram:
        ram.view[MIB:MIB + 4] = b"kvm!"
        assert ctypes.string_at(ram.address + MIB, 4) == b"kvm!"


def test_ram_stays_a_hole_until_written_and_data_pages_finds_what_was() -> None:
    """No page of RAM is faulted in by mapping it (only the dirty log's are): a page costs
    memory once something writes it, and data_pages finds those without reading a hole."""
    def allocated(ram: GuestRam) -> int:
        return os.fstat(ram.fd).st_blocks * 512

    start = rss_shmem_bytes()
    log = log_bytes(64 * MIB)
    with GuestRam.create(64 * MIB, "holes") as ram:
        assert allocated(ram) == log
        with GuestRam.attach(ram.fd, ram.size) as other:
            assert allocated(ram) == log and rss_shmem_bytes() - start <= 2 * log
            other.view[5 * PAGE_BYTES] = 1
            ram.view[40 * PAGE_BYTES + 7] = 2
            assert allocated(ram) == log + 2 * PAGE_BYTES
            assert np.flatnonzero(data_pages(ram, 0, 64 * MIB)).tolist() == [5, 40]
            assert np.flatnonzero(data_pages(ram, 32 * PAGE_BYTES, 16 * PAGE_BYTES)).tolist() \
                == [8]
            assert not data_pages(ram, 64 * PAGE_BYTES, 64 * PAGE_BYTES).any()
            assert allocated(ram) == log + 2 * PAGE_BYTES  # nothing read into being


def test_attach_shares_the_pages_both_ways() -> None:
    with GuestRam.create(MIB, "shared") as ram, GuestRam.attach(ram.fd, ram.size) as other:
        ram.view[0:5] = b"hello"
        assert bytes(other.view[0:5]) == b"hello"
        other.view[MIB - 3:] = b"end"
        assert bytes(ram.view[MIB - 3:]) == b"end"


def test_attach_keeps_the_ram_after_the_caller_closes_its_fd() -> None:
    with GuestRam.create(MIB, "dup") as ram:
        ram.view[7] = 42
        passed = os.dup(ram.fd)  # what a worker gets over SCM_RIGHTS
        other = GuestRam.attach(passed, ram.size)
        os.close(passed)
        ram.close()
        with other:
            assert other.view[7] == 42
            other.view[8] = 43
            assert os.fstat(other.fd).st_size == MIB + log_bytes(MIB)


def test_another_process_attaches_and_writes() -> None:
    """Pool workers map the coordinator's memfd: their writes land in the same pages."""
    with GuestRam.create(2 * MIB, "cross-process") as ram:
        child = textwrap.dedent(f"""
            from devstate.devices.kvm.ram import GuestRam
            with GuestRam.attach({ram.fd}, {ram.size}) as ram:
                assert bytes(ram.view[:6]) == b"parent"
                ram.view[{MIB}:{MIB} + 5] = b"child"
        """)
        ram.view[:6] = b"parent"
        subprocess.run([sys.executable, "-c", child], check=True, pass_fds=(ram.fd,),
                       timeout=60)
        assert bytes(ram.view[MIB:MIB + 5]) == b"child"


@pytest.mark.parametrize("size", [0, -PAGE_BYTES, PAGE_BYTES + 1, 3 * PAGE_BYTES // 2])
def test_sizes_that_are_not_whole_pages_are_refused(size: int) -> None:
    with pytest.raises(SpecError, match=r"ram\.size: .* not a positive multiple of the"):
        GuestRam.create(size, "bad")
    with GuestRam.create(PAGE_BYTES, "good") as ram, \
            pytest.raises(SpecError, match=r"ram\.size"):
        GuestRam.attach(ram.fd, size)


def test_attach_with_the_wrong_size_names_both() -> None:
    with GuestRam.create(MIB, "size") as ram, \
            pytest.raises(DeviceError, match=rf"holds {MIB + log_bytes(MIB)} B, expected "
                                             rf"{2 * MIB} B and its logs"):
        GuestRam.attach(ram.fd, 2 * MIB)


def test_attach_to_a_closed_fd_is_a_device_error() -> None:
    fd = os.memfd_create("gone")
    os.close(fd)
    with pytest.raises(DeviceError, match=rf"guest-ram: attach fd {fd}: Bad file descriptor"):
        GuestRam.attach(fd, MIB)


def test_close_is_idempotent_and_refuses_later_use() -> None:
    ram = GuestRam.create(MIB, "closed")
    fd = ram.fd
    ram.close()
    ram.close()
    assert ram.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(DeviceError, match="the RAM was closed"):
        _ = ram.view
    with pytest.raises(DeviceError, match="the RAM was closed"):
        _ = ram.address


def test_a_view_still_held_keeps_the_pages_mapped_after_close() -> None:
    """close() cannot unmap under a live slice (it would read freed memory): the fd closes,
    the mapping goes with the last view."""
    ram = GuestRam.create(MIB, "held")
    part = ram.view[PAGE_BYTES:2 * PAGE_BYTES]
    part[0] = 9
    ram.close()
    assert ram.fd == -1
    assert part[0] == 9
    part.release()
