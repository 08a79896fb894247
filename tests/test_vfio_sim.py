"""The vfio-sim backend with real device-model processes, on asyncio and on uvloop.

Each test drives VfioSimDevice objects (the worker side) against their model processes
through the real control and data sockets, and checks outcomes: digests, errnos, device
states, timings that only concurrency can explain, and that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import psutil
import pytest
import uvloop

from devstate.config.spec import Backend, DeviceSpec, Shape, VfioSpec
from devstate.devices.vfio.sim import VfioSimDevice
from devstate.devices.vfio.state import CHUNK_BYTES, digest_of, stream_bytes
from devstate.devices.vfio.uapi import PrecopyInfo, VfioState
from devstate.errors import DeviceError
from tests.conftest import our_children

MiB = 1 << 20
FAST = 1 << 40  # bytes/s: no pacing to speak of
# The documented stream format: record sizes around the chunk bytes.
HEADER_RECORD = 4 + 40
CHUNK_RECORD = 4 + 16 + CHUNK_BYTES
END_RECORD = 4 + 8 + 16

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Every test runs on both kinds of event loop a worker may use."""
    return str(request.param)


@pytest.fixture
def run(loop_kind: str) -> Runner:
    """Run a coroutine on a fresh loop of the test's kind."""
    return asyncio.run if loop_kind == "asyncio" else uvloop.run


@pytest.fixture(autouse=True)
def nothing_left_behind(run: Runner) -> Any:
    """Every test must end with no model process and no extra fd."""
    run(asyncio.sleep(0))  # uvloop opens a pipe for its process once: not ours to count
    me = psutil.Process()
    gc.collect()  # an earlier test's garbage must not close fds during this one
    fds = me.num_fds()
    yield
    gc.collect()
    assert our_children() == []
    assert me.num_fds() <= fds


def device(name: str = "nic0", size: int = 8 * MiB, seed: int = 1, incoming: bool = False,
           **fields: Any) -> VfioSimDevice:
    fields.setdefault("read_bandwidth", FAST)
    fields.setdefault("write_bandwidth", FAST)
    vfio = VfioSpec(name=name, size=size, **fields)
    spec = DeviceSpec(0, f"vfio/{name}", Backend.VFIO_SIM, Shape.STREAM, 1, size, vfio=vfio)
    return VfioSimDevice(spec, seed, incoming=incoming)


@contextlib.asynccontextmanager
async def opened(*devices: VfioSimDevice) -> AsyncIterator[None]:
    try:
        for dev in devices:
            await dev.open()
        yield
    finally:
        for dev in devices:
            await dev.close()


async def save(dev: VfioSimDevice) -> bytes:
    """The device's whole save stream, through a STOP_COPY session."""
    out = bytearray()
    buf = memoryview(bytearray(MiB))
    await dev.save_begin()
    while n := await dev.save_read(buf):
        out += buf[:n]
    await dev.save_end()
    return bytes(out)


async def write(dev: VfioSimDevice, stream: bytes) -> None:
    """Write ``stream`` in odd-sized pieces: the device must not care about segmentation."""
    view = memoryview(stream)
    for start in range(0, len(view), 777_777):
        await dev.load_write(view[start:start + 777_777])


async def load(dev: VfioSimDevice, stream: bytes) -> None:
    await dev.load_begin()
    await write(dev, stream)
    await dev.load_end()


def data_inode(dev: VfioSimDevice) -> int:
    assert dev._data is not None
    return os.fstat(dev._data.fileno()).st_ino


# ---------------------------------------------------------------- save and load


def test_a_64mib_device_saved_on_one_model_loads_into_another(run: Runner) -> None:
    async def main() -> None:
        src, dst = device(size=64 * MiB), device(size=64 * MiB, incoming=True)
        async with opened(src, dst):
            before = await dst.digest()
            assert before == digest_of(bytes(64 * MiB))  # blank until loaded
            await src.save_begin()
            await dst.load_begin()
            buf = memoryview(bytearray(MiB))
            while n := await src.save_read(buf):
                await dst.load_write(buf[:n])
            await src.save_end()
            await dst.load_end()
            assert (src.state, dst.state) == (VfioState.STOP, VfioState.STOP)
            assert await dst.digest() == await src.digest() != before
            await dst.resume()
            assert dst.state is VfioState.RUNNING

    run(main())


def test_stream_length_matches_the_data_size_estimate_and_the_format(run: Runner) -> None:
    async def main() -> None:
        size = 5 * MiB + 12345  # a partial last chunk
        dev = device(size=size)
        async with opened(dev):
            estimate = await dev.data_size()
            stream = await save(dev)
        assert len(stream) == estimate == stream_bytes(size)
        assert len(stream) == HEADER_RECORD + 5 * CHUNK_RECORD + 4 + 16 + 12345 + END_RECORD

    run(main())


def test_a_load_adopts_the_streams_seed(run: Runner) -> None:
    async def main() -> None:
        src, dst = device(seed=1), device(seed=2)  # both running, with different states
        async with opened(src, dst):
            assert await dst.digest() != await src.digest()
            await load(dst, await save(src))
            assert await dst.digest() == await src.digest()

    run(main())


def test_a_blank_device_saves_and_loads_as_blank(run: Runner) -> None:
    async def main() -> None:
        size = 3 * MiB + 5
        blank, dst = device(size=size, incoming=True), device(size=size)
        async with opened(blank, dst):
            await load(dst, await save(blank))
            assert await dst.digest() == digest_of(bytes(size))

    run(main())


def test_each_session_gets_a_new_data_fd_and_streams_from_the_start(run: Runner) -> None:
    async def main() -> None:
        dev = device()
        async with opened(dev):
            await dev.save_begin()
            first_fd = data_inode(dev)
            await dev.save_end()
            await dev.save_begin()
            assert data_inode(dev) != first_fd
            await dev.save_end()
            assert await save(dev) == await save(dev)

    run(main())


def test_control_requests_are_answered_while_a_stream_flows(run: Runner) -> None:
    async def main() -> None:
        dev = device(size=32 * MiB, read_bandwidth=64 * MiB)  # a 0.5 s stream
        flowing = asyncio.Event()

        async def read_all() -> None:
            buf = memoryview(bytearray(MiB))
            while await dev.save_read(buf):
                flowing.set()

        async with opened(dev):
            await dev.save_begin()
            reader = asyncio.create_task(read_all())
            await flowing.wait()
            started = time.monotonic()
            remaining = await dev.data_size()
            answered = time.monotonic() - started
            assert not reader.done()
            assert 0 < remaining < stream_bytes(32 * MiB)
            assert answered < 0.1
            await reader
            await dev.save_end()

    run(main())


def test_saving_and_loading_run_at_the_device_bandwidths(run: Runner) -> None:
    async def main() -> None:
        src = device(size=8 * MiB, read_bandwidth=64 * MiB)
        dst = device(size=8 * MiB, seed=2, write_bandwidth=32 * MiB)
        async with opened(src, dst):
            started = time.monotonic()
            stream = await save(src)
            saved = time.monotonic() - started
            started = time.monotonic()
            await load(dst, stream)
            loaded = time.monotonic() - started
        assert 0.125 * 0.9 < saved < 0.125 * 3
        assert 0.25 * 0.9 < loaded < 0.25 * 3

    run(main())


# ---------------------------------------------------------------- bad streams


def test_a_corrupted_byte_fails_load_end_and_leaves_the_device_in_error(run: Runner) -> None:
    async def main() -> None:
        src, dst = device(seed=1), device(seed=2)
        async with opened(src, dst):
            stream = bytearray(await save(src))
            stream[HEADER_RECORD + 5 * CHUNK_RECORD + 20 + 4242] ^= 0x01
            before = await dst.digest()
            with pytest.raises(DeviceError) as info:
                await load(dst, bytes(stream))
            assert info.value.errno == errno.EINVAL
            assert ("load_end: RESUMING -> STOP refused: chunk 5 (generation 0) differs "
                    "from the device's content") in str(info.value)
            assert dst.state is VfioState.ERROR
            with pytest.raises(DeviceError, match="only a reset recovers"):
                await dst.load_begin()
            await dst.reset()
            assert dst.state is VfioState.RUNNING
            assert await dst.digest() == before  # a failed load adopts nothing
            await load(dst, await save(src))
            assert await dst.digest() == await src.digest()

    run(main())


@pytest.mark.parametrize(("cut", "reason"), [
    (lambda s: s[:-10], "stream truncated inside a record"),
    (lambda s: s[:HEADER_RECORD + 6 * CHUNK_RECORD], "stream incomplete (chunk 6 missing, 2 "),
    (lambda s: s[:HEADER_RECORD + 3 * CHUNK_RECORD] + s[HEADER_RECORD + 4 * CHUNK_RECORD:],
     "stream incomplete (chunk 3 missing)"),
    (lambda s: s[:-END_RECORD], "stream incomplete (no end record)"),
    (lambda s: b"", "stream incomplete (no header record)"),
    (lambda s: s + s[:HEADER_RECORD], "bytes after the end record"),
], ids=["mid-record", "tail", "one-chunk", "no-end", "empty", "trailing"])
def test_an_incomplete_stream_fails_load_end(run: Runner, cut: Callable[[bytes], bytes],
                                             reason: str) -> None:
    async def main() -> None:
        src, dst = device(), device(seed=2)
        async with opened(src, dst):
            with pytest.raises(DeviceError) as info:
                await load(dst, cut(await save(src)))
            assert info.value.errno == errno.EINVAL
            assert reason in str(info.value)
            assert dst.state is VfioState.ERROR

    run(main())


def test_a_stream_from_a_device_of_another_size_is_rejected(run: Runner) -> None:
    async def main() -> None:
        small, large = device(size=8 * MiB), device(size=16 * MiB, seed=2)
        async with opened(small, large):
            with pytest.raises(DeviceError, match="stream is from a device of 8388608 bytes; "
                                                  "this one has 16777216"):
                await load(large, await save(small))

    run(main())


def test_a_stream_from_another_device_is_rejected(run: Runner) -> None:
    async def main() -> None:
        nic, gpu = device("nic0"), device("gpu0", seed=2)
        async with opened(nic, gpu):
            with pytest.raises(DeviceError, match="stream is from another device"):
                await load(gpu, await save(nic))

    run(main())


# ---------------------------------------------------------------- concurrency and faults


def test_firmware_latency_of_one_device_does_not_delay_another(run: Runner) -> None:
    async def main() -> None:
        src = device()
        slow = device(incoming=True, firmware_latency_ms=300)
        fast = device(incoming=True)
        async with opened(src, slow, fast):
            stream = await save(src)
            for dev in (slow, fast):
                await dev.load_begin()
                await write(dev, stream)
            started = time.monotonic()
            slow_end = asyncio.create_task(slow.load_end())
            fast_end = asyncio.create_task(fast.load_end())
            done, _ = await asyncio.wait([slow_end, fast_end],
                                         return_when=asyncio.FIRST_COMPLETED)
            assert done == {fast_end}
            assert time.monotonic() - started < 0.3
            await slow_end
            assert time.monotonic() - started >= 0.3
            assert await slow.digest() == await fast.digest() == await src.digest()

    run(main())


def test_killing_the_model_mid_load_fails_the_next_call_within_a_second(run: Runner) -> None:
    async def main() -> None:
        src, dst = device(size=64 * MiB), device(size=64 * MiB, incoming=True)
        async with opened(src, dst):
            stream = await save(src)
            await dst.load_begin()
            await dst.load_write(memoryview(stream)[:len(stream) // 2])
            assert dst.pid is not None
            os.kill(dst.pid, signal.SIGKILL)
            async with asyncio.timeout(1):
                with pytest.raises(DeviceError):
                    await write(dst, stream[len(stream) // 2:])
                    await dst.load_end()
                with pytest.raises(DeviceError, match="the device model"):
                    await dst.digest()

    run(main())


async def _load_end_in_firmware(src: VfioSimDevice, dst: VfioSimDevice) -> asyncio.Task[None]:
    """Load ``src``'s state into ``dst`` and start its load_end: a minute of firmware."""
    await dst.load_begin()
    await write(dst, await save(src))
    pending = asyncio.create_task(dst.load_end())
    await asyncio.sleep(0)  # let it send its request
    return pending


def test_killing_the_model_fails_a_pending_load_end_within_a_second(run: Runner) -> None:
    async def main() -> None:
        src, dst = device(), device(incoming=True, firmware_latency_ms=60_000)
        async with opened(src, dst):
            pending = await _load_end_in_firmware(src, dst)
            assert dst.pid is not None
            os.kill(dst.pid, signal.SIGKILL)
            async with asyncio.timeout(1):
                with pytest.raises(DeviceError) as info:
                    await pending
            assert info.value.errno == errno.ENODEV
            assert "load_end: the device model" in str(info.value)

    run(main())


def test_close_during_a_firmware_latency_kills_the_model_promptly(run: Runner) -> None:
    async def main() -> None:
        src, dst = device(), device(incoming=True, firmware_latency_ms=60_000)
        async with opened(src, dst):
            pending = await _load_end_in_firmware(src, dst)
            async with asyncio.timeout(3):
                await dst.close()
                with pytest.raises(DeviceError):
                    await pending

    run(main())


# ---------------------------------------------------------------- precopy and the FSM


def test_precopy_streams_the_initial_bytes_then_enomsg_then_the_rest(run: Runner) -> None:
    async def main() -> None:
        src, dst = device(precopy=True), device(precopy=True, incoming=True)
        async with opened(src, dst):
            await src.precopy_begin()
            assert (await src.precopy_info()).initial_bytes > 0
            fd = data_inode(src)
            stream = bytearray()
            buf = memoryview(bytearray(MiB))
            with pytest.raises(OSError) as info:
                while True:
                    stream += buf[:await src.precopy_read(buf)]
            assert info.value.errno == errno.ENOMSG
            assert len(stream) == stream_bytes(8 * MiB) - END_RECORD
            assert await src.precopy_info() == PrecopyInfo(0, 0)
            assert await src.data_size() == END_RECORD
            await src.save_begin()  # PRE_COPY -> PRE_COPY_P2P -> STOP_COPY, same session
            assert data_inode(src) == fd
            while n := await src.save_read(buf):
                stream += buf[:n]
            await src.save_end()
            await load(dst, bytes(stream))
            assert await dst.digest() == await src.digest()

    run(main())


def test_dirtied_chunks_are_sent_again_and_the_load_has_the_final_state(run: Runner) -> None:
    """A device dirtying 64 MiB/s while in PRE_COPY: once its initial bytes are read, the
    chunks it rewrote come again as dirty bytes, and a load of everything it streamed (the
    re-sends included, out of order) ends equal to its state at the stop."""
    async def main() -> None:
        src = device(size=16 * MiB, precopy=True, dirty_rate=64 * MiB)
        dst = device(size=16 * MiB, precopy=True, dirty_rate=64 * MiB, incoming=True)
        async with opened(src, dst):
            before = await src.digest()
            await src.precopy_begin()
            stream = bytearray()
            buf = memoryview(bytearray(MiB))
            with contextlib.suppress(OSError):
                while True:
                    stream += buf[:await src.precopy_read(buf)]
            await asyncio.sleep(0.1)  # ~6 MiB rewritten meanwhile
            info = await src.precopy_info()
            assert info.dirty_bytes >= 2 * MiB and info.initial_bytes == 0
            initial = len(stream)
            with contextlib.suppress(OSError):
                while True:
                    stream += buf[:await src.precopy_read(buf)]
            assert len(stream) - initial >= 2 * MiB  # the re-sends
            await src.save_begin()
            while n := await src.save_read(buf):
                stream += buf[:n]
            await src.save_end()
            after = await src.digest()
            assert after != before  # the running device changed its state
            await load(dst, bytes(stream))
            assert await dst.digest() == after

    run(main())


def test_refused_transitions_name_the_operation_and_keep_the_state(run: Runner) -> None:
    async def main() -> None:
        dev = device()  # no precopy
        async with opened(dev):
            with pytest.raises(DeviceError) as info:
                await dev.precopy_begin()
            assert info.value.errno == errno.EINVAL
            assert str(info.value) == (
                "vfio/nic0: precopy_begin: RUNNING -> PRE_COPY refused: PRE_COPY needs "
                "migration feature(s) PRE_COPY the device does not have")
            assert dev.state is VfioState.RUNNING
            with pytest.raises(DeviceError, match="precopy_info: no precopy info in RUNNING"):
                await dev.precopy_info()
            with pytest.raises(DeviceError, match="save_read: no data session is open"):
                await dev.save_read(memoryview(bytearray(16)))

    run(main())


def test_resume_walks_back_to_running_from_a_save_in_progress(run: Runner) -> None:
    async def main() -> None:
        dev = device()
        async with opened(dev):
            await dev.save_begin()
            assert dev.state is VfioState.STOP_COPY
            with pytest.raises(DeviceError, match="save_read: the buffer to read into is empty"):
                await dev.save_read(memoryview(bytearray(0)))
            await dev.resume()  # STOP_COPY -> STOP -> RUNNING_P2P -> RUNNING
            assert dev.state is VfioState.RUNNING
            with pytest.raises(DeviceError, match="no data session"):
                await dev.save_read(memoryview(bytearray(16)))

    run(main())


def test_a_cancelled_call_leaves_its_reply_to_be_skipped(run: Runner) -> None:
    async def main() -> None:
        src, dst = device(), device(incoming=True, firmware_latency_ms=200)
        async with opened(src, dst):
            await dst.load_begin()
            await write(dst, await save(src))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await dst.load_end()
            # The model finished the load anyway; the next call skips the stale reply.
            assert await dst.digest() == await src.digest()
            assert dst.state is VfioState.STOP

    run(main())


def test_open_and_close_are_idempotent(run: Runner) -> None:
    async def main() -> None:
        dev = device()
        await dev.close()  # never opened
        await dev.open()
        pid = dev.pid
        await dev.open()
        assert dev.pid == pid
        await dev.close()
        await dev.close()
        assert dev.pid is None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        with pytest.raises(DeviceError, match="digest: the device is not open"):
            await dev.digest()

    run(main())


OWNER_SCRIPT = """
import asyncio, sys, {loop}
from devstate.devices.vfio.sim import VfioSimDevice
from devstate.config.spec import Backend, DeviceSpec, Shape, VfioSpec

async def main():
    vfio = VfioSpec(name="nic0", size=1 << 20)
    dev = VfioSimDevice(DeviceSpec(0, "vfio/nic0", Backend.VFIO_SIM, Shape.STREAM, 1,
                                   1 << 20, vfio=vfio), 1)
    await dev.open()
    print(dev.pid, flush=True)
    await asyncio.Event().wait()

{loop}.run(main())
"""


def test_a_model_dies_with_its_owner(loop_kind: str) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT.format(loop=loop_kind)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        model = psutil.Process(int(owner.stdout.readline()))
        owner.kill()
    finally:
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    # The model is not our child: poll until it is gone (or a zombie nobody reaps here).
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            if model.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    else:
        model.kill()
        pytest.fail("the model outlived its owner by 2 s")
