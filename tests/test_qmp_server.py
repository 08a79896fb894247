"""The QMP wire protocol server: the real qemu.qmp client, protocol details on a raw socket,
and fuzzing of its input.

Every server here serves a toy command table (:class:`Toy`); the migration commands are
tested elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import example, given, settings
from hypothesis import strategies as st
from qemu.qmp import EventListener, ExecuteError, QMPClient

from devstate.errors import DevstateError
from devstate.qmp.commands import Command, Param, QmpError
from devstate.qmp.json_stream import MAX_PENDING_CHARS, BadInput, JsonStream
from devstate.qmp.server import QmpServer

REPLY_TIMEOUT_S = 5.0
SLOW_S = 0.5


class Toy:
    """A command table with one command per behaviour worth testing, and what it observed."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.slow_finished = False

    async def echo(self, args: dict[str, Any]) -> Any:
        return {"text": args["text"]}

    async def add(self, args: dict[str, Any]) -> Any:
        return args["a"] + args.get("b", 0)

    async def nothing(self, args: dict[str, Any]) -> Any:
        return None

    async def slow(self, args: dict[str, Any]) -> Any:
        self.slow_started.set()
        await asyncio.sleep(SLOW_S)
        self.slow_finished = True
        return "slept"

    async def boom(self, args: dict[str, Any]) -> Any:
        raise ValueError("kaput")

    async def fail(self, args: dict[str, Any]) -> Any:
        raise QmpError("GenericError", "nope")

    async def refuse(self, args: dict[str, Any]) -> Any:
        raise DevstateError("refused: not now")

    async def opaque(self, args: dict[str, Any]) -> Any:
        return {"value": object()}

    def commands(self) -> list[Command]:
        return [
            Command("echo", self.echo, (Param("text", str),)),
            Command("add", self.add, (Param("a", int), Param("b", (int, float), False))),
            Command("nothing", self.nothing),
            Command("slow", self.slow),
            Command("boom", self.boom),
            Command("fail", self.fail),
            Command("refuse", self.refuse),
            Command("opaque", self.opaque),
        ]


class RawClient:
    """A client on a plain socket: sends bytes, reads CRLF-terminated JSON objects."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: Path, *, negotiate: bool = True,
                      limit: int = 4 << 20) -> RawClient:
        # The StreamReader reads ahead up to twice ``limit``; the default fits an echo of
        # half a megabyte in one line.
        client = cls(*await asyncio.open_unix_connection(str(path), limit=limit))
        client.greeting = await client.recv()
        if negotiate:
            assert await client.call({"execute": "qmp_capabilities"}) == {"return": {}}
        return client

    async def send(self, data: bytes | dict[str, Any]) -> None:
        self.writer.write(json.dumps(data).encode() if isinstance(data, dict) else data)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT_S)
        assert line.endswith(b"\r\n"), line
        message: dict[str, Any] = json.loads(line)
        return message

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.send(request)
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        # The server may have dropped the connection first.
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = REPLY_TIMEOUT_S) -> None:
    """Poll until ``predicate()`` holds (session counts change in protocol callbacks)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["uvloop", "asyncio"])
def any_loop(request: pytest.FixtureRequest) -> Runner:
    """Run a coroutine on uvloop, then on the default asyncio loop: the server must work on both."""
    return uvloop.run if request.param == "uvloop" else asyncio.run


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "qmp.sock"


async def serve(path: Path, toy: Toy | None = None, **kwargs: Any) -> QmpServer:
    server = QmpServer((toy or Toy()).commands(), **kwargs)
    await server.start(path)
    return server


# --- (a) the real qemu.qmp client -------------------------------------------------------

def test_qemu_qmp_client_executes_commands(any_loop: Runner, sock_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with await serve(sock_path) as server:
            qmp = QMPClient("devstate-test")
            await qmp.connect(str(sock_path))
            assert qmp.greeting.QMP.capabilities == ["oob"]
            assert await qmp.execute("echo", {"text": "hi"}) == {"text": "hi"}
            assert await qmp.execute("nothing") == {}
            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert names == {"echo", "add", "nothing", "slow", "boom", "fail", "refuse",
                             "opaque", "qmp_capabilities", "query-commands", "query-version",
                             "query-qmp-schema"}
            for command, args, error_class, desc in [
                ("no-such", None, "CommandNotFound", "The command no-such has not been found"),
                ("echo", None, "GenericError", "Parameter 'text' is missing"),
                ("echo", {"text": "x", "y": 1}, "GenericError", "Parameter 'y' is unexpected"),
                ("fail", None, "GenericError", "nope"),
                ("boom", None, "GenericError", "internal error: ValueError: kaput"),
            ]:
                with pytest.raises(ExecuteError) as info:
                    await qmp.execute(command, args)
                assert info.value.error_class == error_class
                assert str(info.value) == desc
            # The session outlives its errors, and so does the server.
            assert await qmp.execute("add", {"a": 2, "b": 0.5}) == 2.5
            assert server.sessions == 1
            await qmp.disconnect()
            await wait_for(lambda: server.sessions == 0)

    with caplog.at_level(logging.ERROR, logger="devstate.qmp"):
        any_loop(main())
    assert any("boom" in r.getMessage() and r.exc_info for r in caplog.records)


def test_qemu_qmp_client_receives_events(any_loop: Runner, sock_path: Path) -> None:
    async def main() -> None:
        async with await serve(sock_path) as server:
            qmp = QMPClient("devstate-test")
            await qmp.connect(str(sock_path))
            listener = EventListener(("MIGRATION",))
            with qmp.listen(listener):
                server.emit("MIGRATION_PASS", {"pass": 1})  # filtered out by the listener
                server.emit("MIGRATION", {"status": "active"})
                server.emit("MIGRATION")
                first = await asyncio.wait_for(listener.get(), REPLY_TIMEOUT_S)
                second = await asyncio.wait_for(listener.get(), REPLY_TIMEOUT_S)
            assert first["data"] == {"status": "active"}
            assert second["data"] == {}
            assert abs(first["timestamp"]["seconds"] - time.time()) < 60
            assert 0 <= first["timestamp"]["microseconds"] < 1_000_000
            await qmp.disconnect()

    any_loop(main())


# --- (b) protocol details on a raw socket -----------------------------------------------

def test_greeting_and_line_format(any_loop: Runner, sock_path: Path) -> None:
    async def main() -> None:
        async with await serve(sock_path, version=(7, 2, 1), package="v7.2.1-devstate"):
            reader, writer = await asyncio.open_unix_connection(str(sock_path))
            line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT_S)
            assert line.endswith(b"}\r\n")
            assert json.loads(line) == {"QMP": {
                "version": {"qemu": {"micro": 1, "minor": 2, "major": 7},
                            "package": "v7.2.1-devstate"},
                "capabilities": ["oob"]}}
            writer.close()

    any_loop(main())


def test_negotiation_mode(run: Runner, sock_path: Path) -> None:
    async def main() -> None:
        async with await serve(sock_path) as server:
            client = await RawClient.connect(sock_path, negotiate=False)
            server.emit("EARLY")  # not delivered: the client has not negotiated
            for name in ("query-commands", "no-such"):
                assert await client.call({"execute": name, "id": 1}) == {"error": {
                    "class": "CommandNotFound",
                    "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                    "id": 1}
            reply = await client.call({"execute": "qmp_capabilities",
                                       "arguments": {"enable": ["oob", "x"]}})
            assert reply == {"error": {"class": "GenericError", "desc":
                                       "Parameter 'enable[1]' does not accept value 'x'"}}
            assert await client.call({"execute": "qmp_capabilities",
                                      "arguments": {"enable": ["oob"]}}) == {"return": {}}
            assert await client.call({"execute": "qmp_capabilities", "id": "again"}) == {
                "error": {"class": "CommandNotFound", "desc":
                          "Capabilities negotiation is already complete, command ignored"},
                "id": "again"}
            server.emit("LATE", {"n": 1})
            event = await client.recv()
            assert (event["event"], event["data"]) == ("LATE", {"n": 1})
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
            await client.close()

    run(main())


def test_concatenated_requests(run: Runner, sock_path: Path) -> None:
    async def main() -> None:
        async with await serve(sock_path):
            client = await RawClient.connect(sock_path, negotiate=False)
            # One write, no newline anywhere (as qemu.qmp sends), then mixed whitespace.
            await client.send(b'{"execute":"qmp_capabilities"}{"execute":"echo","arguments":'
                              b'{"text":"a"},"id":"x1"}{"execute":"add","arguments":{"a":1}}'
                              b' \r\n\t {"execute":"nothing","id":3}\n\n')
            assert await client.recv() == {"return": {}}
            assert await client.recv() == {"return": {"text": "a"}, "id": "x1"}
            assert await client.recv() == {"return": 1}
            assert await client.recv() == {"return": {}, "id": 3}
            await client.close()

    run(main())


@pytest.mark.parametrize("request_id", ["x", "", 7, -1.5, None, True, [1, "2"],
                                        {"a": {"b": [None]}}, "\u00e9\U0001f600"])
def test_ids_are_echoed_verbatim(run: Runner, sock_path: Path, request_id: Any) -> None:
    async def main() -> None:
        async with await serve(sock_path):
            client = await RawClient.connect(sock_path)
            for request in ({"execute": "nothing"}, {"execute": "no-such"},
                            {"execute": "echo", "arguments": {}}, {"exec": "nothing"}):
                reply = await client.call({**request, "id": request_id})
                assert "id" in reply and reply["id"] == request_id
                assert type(reply["id"]) is type(request_id)
            await client.close()

    run(main())


@pytest.mark.parametrize(("request_", "desc"), [
    ([1, 2], "QMP input must be a JSON object"),
    ("execute", "QMP input must be a JSON object"),
    ({"arguments": {}}, "QMP input lacks member 'execute'"),
    ({"execute": 5}, "QMP input member 'execute' must be a string"),
    ({"exec-oob": None}, "QMP input member 'exec-oob' is unexpected"),
    ({"execute": "nothing", "arguments": [1]}, "QMP input member 'arguments' must be an object"),
    ({"execute": "nothing", "argument": {}}, "QMP input member 'argument' is unexpected"),
    ({"execute": "nothing", "exec-oob": "nothing"}, "QMP input member 'exec-oob' is unexpected"),
    ({"execute": "echo"}, "Parameter 'text' is missing"),
    ({"execute": "echo", "arguments": {"text": 1}},
     "Invalid parameter type for 'text', expected: string"),
    ({"execute": "echo", "arguments": {"text": "a", "more": 1}}, "Parameter 'more' is unexpected"),
    ({"execute": "add", "arguments": {"a": True}},
     "Invalid parameter type for 'a', expected: integer"),
    ({"execute": "add", "arguments": {"a": 1.0}},
     "Invalid parameter type for 'a', expected: integer"),
    ({"execute": "add", "arguments": {"a": 1, "b": "2"}},
     "Invalid parameter type for 'b', expected: number"),
    ({"execute": "refuse"}, "refused: not now"),
    ({"execute": "opaque"}, "internal error: TypeError: Object of type object is not JSON "
                            "serializable"),
])
def test_bad_requests_get_generic_errors(run: Runner, sock_path: Path, request_: Any,
                                         desc: str) -> None:
    async def main() -> None:
        async with await serve(sock_path):
            client = await RawClient.connect(sock_path)
            await client.send(json.dumps(request_).encode())
            assert await client.recv() == {"error": {"class": "GenericError", "desc": desc}}
            # The session still serves.
            assert await client.call({"execute": "add", "arguments": {"a": 1, "b": 2},
                                      "id": "ok"}) == {"return": 3, "id": "ok"}
            await client.close()

    run(main())


def test_exec_oob_needs_the_oob_capability_and_no_command_allows_it(
        run: Runner, sock_path: Path) -> None:
    """As QEMU's qmp-dispatch: without oob negotiated, exec-oob is an unexpected member;
    with it, a command that is not OOB-capable (none here is) is refused, not run."""
    async def main() -> None:
        async with await serve(sock_path, toy := Toy()):
            plain = await RawClient.connect(sock_path)
            assert await plain.call({"exec-oob": "nothing", "id": 1}) == {"error": {
                "class": "GenericError",
                "desc": "QMP input member 'exec-oob' is unexpected"}, "id": 1}
            oob = await RawClient.connect(sock_path, negotiate=False)
            assert await oob.call({"execute": "qmp_capabilities",
                                   "arguments": {"enable": ["oob"]}}) == {"return": {}}
            for request, desc in (
                    ({"exec-oob": "slow", "id": 2}, "The command slow does not support OOB"),
                    ({"exec-oob": 5, "id": 3}, "QMP input member 'exec-oob' must be a string"),
                    ({"execute": "nothing", "exec-oob": "nothing", "id": 4},
                     "QMP input member 'exec-oob' clashes with 'execute'")):
                assert await oob.call(request) == {
                    "error": {"class": "GenericError", "desc": desc}, "id": request["id"]}
            assert not toy.slow_started.is_set()
            await plain.close()
            await oob.close()

    run(main())


def test_query_version_and_schema(run: Runner, sock_path: Path) -> None:
    """query-version repeats the greeting's version; query-qmp-schema lists every command
    and event with argument types that say which members are optional."""
    async def main() -> None:
        events = {"THING": (Param("n", int),)}
        async with await serve(sock_path, version=(9, 1, 0), package="p", events=events):
            qmp = QMPClient("devstate-test")
            await qmp.connect(str(sock_path))
            version = await qmp.execute("query-version")
            schema = {i["name"]: i for i in await qmp.execute("query-qmp-schema")}
            await qmp.disconnect()
        assert version == {"qemu": {"major": 9, "minor": 1, "micro": 0}, "package": "p"}
        assert schema["add"]["meta-type"] == "command"
        assert schema[schema["add"]["arg-type"]]["members"] == [
            {"name": "a", "type": "int"}, {"name": "b", "type": "number", "default": None}]
        assert schema["THING"]["meta-type"] == "event"
        assert schema[schema["THING"]["arg-type"]]["members"] == [{"name": "n", "type": "int"}]
        assert {"query-version", "query-qmp-schema", "qmp_capabilities"} <= set(schema)

    run(main())


def test_command_table_may_replace_builtins(run: Runner, sock_path: Path) -> None:
    async def mine(args: dict[str, Any]) -> Any:
        return ["mine"]

    async def main() -> None:
        async with QmpServer([Command("query-commands", mine)]) as server:
            await server.start(sock_path)
            client = await RawClient.connect(sock_path)  # the built-in qmp_capabilities
            assert await client.call({"execute": "query-commands"}) == {"return": ["mine"]}
            await client.close()

    run(main())
    with pytest.raises(ValueError, match="twice"):
        QmpServer([Command("x", mine), Command("x", mine)])


def test_socket_file_lifecycle(run: Runner, sock_path: Path) -> None:
    async def main() -> None:
        # A stale socket file, as a crashed process leaves it, is replaced.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(sock_path))
        stale.close()
        server = await serve(sock_path)
        mode = os.stat(sock_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        client = await RawClient.connect(sock_path)
        await server.close()
        assert not sock_path.exists()
        assert server.sessions == 0
        assert await asyncio.wait_for(client.reader.read(), REPLY_TIMEOUT_S) == b""
        await server.close()  # idempotent
        with pytest.raises(RuntimeError):
            await server.start(sock_path)
        # A path that is not a socket is left alone.
        sock_path.write_text("not a socket")
        with pytest.raises(OSError):
            await serve(sock_path)
        assert sock_path.read_text() == "not a socket"

    run(main())


@pytest.mark.parametrize(("garbage", "errors"), [
    (b'{"execute": x}', 1),
    (b'{"a" 1}', 1),
    (b'{"execute":"echo",}', 1),
    (b']]]', 1),
    (b'\xff\xfe', 1),
    (b'{"execute":"echo","arguments":{"text":"\xc3"}}', 1),  # invalid UTF-8 in a string
    (b'{"execute":"echo","arguments":{"text":"line\nbreak"}}', 1),  # raw control character
    (b'{"execute":"nothing","id":NaN}', 1),
    (b'{"execute":"nothing","id":1e999}', 1),
    (b'[' * 300 + b']' * 300, 1),  # deeper than MAX_NESTING
    (b'{"a": {"b": 1}, x}', 1),  # resumes at the error, not at the "{" nested before it
    # A "{" after the error is where the scan resumes: it costs two more errors (an object
    # without "execute", then the stray "}"), never the good request that follows.
    (b'{"a": x, "b": {"c": 1}}', 3),
])
def test_malformed_json_gets_idless_error_and_session_recovers(
        run: Runner, sock_path: Path, garbage: bytes, errors: int) -> None:
    async def main() -> None:
        async with await serve(sock_path):
            client = await RawClient.connect(sock_path)
            await client.send(garbage + b'{"execute":"echo","arguments":{"text":"ok"},"id":"ok"}')
            replies = [await client.recv() for _ in range(errors + 1)]
            assert replies[-1] == {"return": {"text": "ok"}, "id": "ok"}
            assert all("id" not in r and r["error"]["class"] == "GenericError"
                       for r in replies[:-1])
            assert replies[0]["error"]["desc"].startswith("JSON parse error, ")
            await client.close()

    run(main())


def test_input_split_anywhere_is_reassembled(run: Runner, sock_path: Path) -> None:
    async def main() -> None:
        async with await serve(sock_path):
            client = await RawClient.connect(sock_path)
            data = ('{"execute": "add", "arguments": {"a": 12, "b": -1.5e1}, "id": "\u00e9"}'
                    .encode())
            for i in range(len(data)):  # one byte a write, each read on its own
                await client.send(data[i:i + 1])
                await asyncio.sleep(0.001)
            assert await client.recv() == {"return": -3.0, "id": "\u00e9"}
            await client.close()

    run(main())


def test_oversize_input_is_reported_and_discarded(run: Runner, sock_path: Path) -> None:
    async def main() -> None:
        async with await serve(sock_path) as server:
            client = await RawClient.connect(sock_path)
            big = "y" * (MAX_PENDING_CHARS // 2)  # a large request under the cap is fine
            reply = await client.call({"execute": "echo", "arguments": {"text": big}})
            assert reply == {"return": {"text": big}}
            await client.send(b'{"execute":"echo","arguments":{"text":"'
                              + b"x" * (MAX_PENDING_CHARS + 100))
            error = await client.recv()
            assert "id" not in error and "more than" in error["error"]["desc"]
            # The rest of the runaway request is discarded up to the next object.
            await client.send(b'x' * 1000 + b'"}}{"execute":"nothing","id":"ok"}')
            assert await client.recv() == {"return": {}, "id": "ok"}
            assert server.sessions == 1
            await client.close()

    run(main())


@pytest.mark.parametrize("ending", ["the client leaves", "the server closes"])
def test_a_running_command_outlives_its_session(run: Runner, sock_path: Path,
                                                ending: str) -> None:
    async def main() -> None:
        toy = Toy()
        async with await serve(sock_path, toy) as server:
            client = await RawClient.connect(sock_path)
            await client.send({"execute": "slow", "id": 1})
            await asyncio.wait_for(toy.slow_started.wait(), REPLY_TIMEOUT_S)
            if ending == "the client leaves":
                await client.close()
                await wait_for(lambda: server.sessions == 0)
                assert not toy.slow_finished  # the session is gone, its command still runs
        assert server.sessions == 0 and not sock_path.exists()
        await wait_for(lambda: toy.slow_finished)
        if ending == "the server closes":
            await client.close()

    run(main())


def test_commands_run_in_order_per_session_and_independently_across(
        run: Runner, sock_path: Path) -> None:
    async def main() -> None:
        toy = Toy()
        async with await serve(sock_path, toy):
            busy = await RawClient.connect(sock_path)
            other = await RawClient.connect(sock_path)
            await busy.send(b'{"execute":"slow","id":1}{"execute":"nothing","id":2}')
            await asyncio.wait_for(toy.slow_started.wait(), REPLY_TIMEOUT_S)
            # Another session is not held up by the slow command...
            assert await other.call({"execute": "nothing", "id": "o"}) == {"return": {},
                                                                           "id": "o"}
            assert not toy.slow_finished
            # ...but the busy session's next command waits for it, and replies keep order.
            assert await busy.recv() == {"return": "slept", "id": 1}
            assert await busy.recv() == {"return": {}, "id": 2}
            await busy.close()
            await other.close()

    run(main())


def test_emit_never_waits_for_a_client_that_does_not_read(run: Runner, sock_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    async def main() -> None:
        async with await serve(sock_path) as server:
            stuck = await RawClient.connect(sock_path, limit=1 << 10)  # soon stops reading
            reading = await RawClient.connect(sock_path)
            got = []

            async def drain() -> None:
                while True:
                    got.append(await reading.recv())

            drainer = asyncio.create_task(drain())
            payload = {"blob": "z" * (64 << 10)}
            start = time.monotonic()
            for _ in range(100):  # 6.4 MiB: past the socket buffer and the write bound
                server.emit("BIG", payload)
                await asyncio.sleep(0)
            assert time.monotonic() - start < 2.0
            await wait_for(lambda: server.sessions == 1)  # the stuck client was dropped
            await wait_for(lambda: len(got) == 100)
            server.emit("AFTER")  # a dropped client is no reason to fail
            drainer.cancel()
            await stuck.close()
            await reading.close()

    with caplog.at_level(logging.WARNING, logger="devstate.qmp"):
        run(main())
    assert any("does not read" in r.getMessage() for r in caplog.records)


def test_pipelining_client_is_held_back_not_buffered(run: Runner, sock_path: Path) -> None:
    async def main() -> None:
        toy = Toy()
        async with await serve(sock_path, toy) as server:
            client = await RawClient.connect(sock_path)
            await client.send({"execute": "slow"})
            await asyncio.wait_for(toy.slow_started.wait(), REPLY_TIMEOUT_S)
            request = json.dumps({"execute": "echo", "arguments": {"text": "p" * 200}})
            count = (4 << 20) // len(request)
            flood = asyncio.create_task(client.send(request.encode() * count))
            await asyncio.sleep(SLOW_S / 2)
            # White-box: while the slow command runs, the server stopped reading after a
            # few queued requests (one read's worth), leaving the rest in the socket.
            (session,) = server._sessions
            assert session._queue.qsize() < count // 4
            assert not flood.done()
            flood.cancel()
            client.writer.transport.abort()  # close() would wait to flush the flood

    run(main())


# --- (c) properties ---------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers()
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)
JSON_OBJECTS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4)
SEPARATORS = st.text(alphabet=" \t\r\n", max_size=2)


@settings(max_examples=300, deadline=None, database=None)
@example(texts=[(123, "", True), (-1.5e-07, "", True), (True, "", True)], cuts=[1, 6, 9, 14])
@given(texts=st.lists(st.tuples(JSON_OBJECTS | JSON_VALUES, SEPARATORS, st.booleans()),
                      max_size=5),
       cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_stream_reassembles_values_however_split(
        texts: list[tuple[Any, str, bool]], cuts: list[int]) -> None:
    """No split point makes a valid text look malformed, or ends a number early."""
    data = b""
    for value, sep, is_ascii in texts:
        # Only whitespace can end a top-level number or literal: "1" "2" would be "12".
        if not isinstance(value, dict | list | str):
            sep = sep or " "
        data += json.dumps(value, ensure_ascii=is_ascii).encode("utf-8", "surrogatepass")
        data += sep.encode()
    # Lone surrogates from text() are invalid UTF-8 once encoded raw: those must fail.
    has_bad_utf8 = [not is_ascii and _has_surrogate(value) for value, _, is_ascii in texts]
    stream = JsonStream()
    items: list[Any] = []
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        items += stream.feed(data[lo:hi])
    assert len(items) == len(texts)
    for item, (value, _, _), bad in zip(items, texts, has_bad_utf8, strict=True):
        if bad:
            assert isinstance(item, BadInput)
        else:
            assert item == value and type(item) is type(value)


def _has_surrogate(value: Any) -> bool:
    text = json.dumps(value, ensure_ascii=False)
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@settings(max_examples=300, deadline=None, database=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=6))
def test_stream_takes_any_bytes(chunks: list[bytes]) -> None:
    stream = JsonStream()
    for chunk in chunks:
        for item in stream.feed(chunk):
            assert isinstance(item, dict | list | str | int | float | bool | BadInput) or (
                item is None)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One server on a loop of its own, kept across hypothesis examples (each runs on it)."""
    loop = uvloop.new_event_loop()
    path = tmp_path_factory.mktemp("qmp") / "fuzz.sock"
    server = loop.run_until_complete(serve(path))
    yield loop, server, path
    loop.run_until_complete(server.close())
    loop.close()


REQUEST_KEYS = st.sampled_from(["execute", "exec-oob", "arguments", "id", "text"]) | st.text(
    max_size=4)
COMMAND_NAMES = st.sampled_from(["echo", "add", "nothing", "fail", "refuse", "query-commands",
                                 "qmp_capabilities", "no-such"]) | st.text(max_size=6)
REQUESTS = st.fixed_dictionaries(
    {"execute": COMMAND_NAMES},
    optional={"arguments": st.dictionaries(st.sampled_from(["text", "a", "b"]) | st.text(
        max_size=3), JSON_VALUES, max_size=3), "id": JSON_VALUES}) | st.dictionaries(
    REQUEST_KEYS, JSON_VALUES, max_size=4)
PAYLOADS = (st.binary(max_size=300).map(lambda b: ("bytes", b))
            | (REQUESTS | JSON_VALUES).map(lambda v: ("value", v)))


@settings(max_examples=150, deadline=None, database=None)
@given(payload=PAYLOADS, negotiate=st.booleans())
def test_server_survives_any_input(shared_server: Any, payload: tuple[str, Any],
                                   negotiate: bool) -> None:
    loop, server, path = shared_server
    kind, value = payload
    data = value if kind == "bytes" else json.dumps(value).encode()

    async def one_example() -> None:
        client = await RawClient.connect(path, negotiate=negotiate)
        if kind == "value":  # one JSON text (a space ends a number): one reply, with its id
            await client.send(data + b" ")
            reply = await client.recv()
            assert "return" in reply or "error" in reply
            if isinstance(value, dict) and "id" in value:
                assert reply["id"] == value["id"]
        else:  # any bytes, then gone: whatever was started runs, its replies are dropped
            await client.send(data)
        await client.close()
        fresh = await RawClient.connect(path)
        reply = await fresh.call({"execute": "query-commands", "id": "ok"})
        assert reply["id"] == "ok" and {"name": "echo"} in reply["return"]
        await fresh.close()
        await wait_for(lambda: server.sessions == 0)

    loop.run_until_complete(one_example())


def test_a_burst_of_non_blocking_clients_is_queued_not_refused(run: Runner,
                                                               sock_path: Path) -> None:
    """64 non-blocking connects before the server's loop can accept any: a unix connect
    to a full backlog fails at once (EAGAIN), so the backlog must hold the whole burst."""
    async def main() -> None:
        async with await serve(sock_path):
            clients = [socket.socket(socket.AF_UNIX) for _ in range(64)]
            try:
                for client in clients:  # no await in between: nothing is accepted yet
                    client.setblocking(False)
                    assert client.connect_ex(str(sock_path)) == 0
                for client in clients:
                    reader, writer = await asyncio.open_unix_connection(sock=client)
                    line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT_S)
                    assert b'"QMP"' in line
                    writer.close()
            finally:
                for client in clients:
                    client.close()

    run(main())
