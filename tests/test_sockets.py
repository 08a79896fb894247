"""Addresses as people write them, and a Unix socket another process still listens on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from devstate.errors import ChannelError
from devstate.net.transport import Address, parse_uri, refuse_live_socket


@pytest.mark.parametrize(("uri", "address"), [
    ("tcp://dest.example:4444", Address("tcp", host="dest.example", port=4444)),
    ("tcp://[::1]:4444", Address("tcp", host="::1", port=4444)),
    ("unix:///run/in.sock", Address("unix", path="/run/in.sock")),
    ("tcp:dest.example:4444", Address("tcp", host="dest.example", port=4444)),
])
def test_url_forms_mean_what_qemus_forms_mean(uri: str, address: Address) -> None:
    """``tcp://host:port`` once read as host ``//host``, a misleading lookup error."""
    assert parse_uri(uri) == address


def test_a_live_socket_is_refused_a_stale_one_is_not(tmp_path: Path) -> None:
    path = str(tmp_path / "qmp.sock")
    refuse_live_socket(path)  # nothing there
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    with pytest.raises(ChannelError, match="another process is listening on it"):
        refuse_live_socket(path)
    live.close()  # the file stays, nobody listens: stale, free to replace
    refuse_live_socket(path)
