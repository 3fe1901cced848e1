"""Where a server listens: addresses as users write them, stale and live socket files,
socket activation's variables, the default control socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from blockfuse.cli import parse_args
from blockfuse.cli.serve import control_path
from blockfuse.nbd.haggling import TLSPolicy
from blockfuse.serve.listen import (
    Address,
    ListenError,
    activated_fds,
    clear_stale_socket,
    listen,
    parse_address,
    tls_warning,
)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("./vm1.sock", Address(path="./vm1.sock")),
        ("unix:vm1.sock", Address(path="vm1.sock")),
        ("/run/nbd.sock", Address(path="/run/nbd.sock")),
        ("127.0.0.1:10809", Address(host="127.0.0.1", port=10809)),
        ("[::1]:10810", Address(host="::1", port=10810)),
        (":10811", Address(port=10811)),
        ("10812", Address(port=10812)),
        ("0.0.0.0:0", Address(host="0.0.0.0", port=0)),
    ],
)
def test_addresses_as_users_write_them(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["nonsense", "host:port", ":99999", "unix:", "1.2.3.4:"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_uris_and_the_tls_warning() -> None:
    assert (
        Address(path="/run/a b.sock").uri("my disk")
        == "nbd+unix:///my%20disk?socket=/run/a%20b.sock"
    )
    assert Address(host="::1", port=5).uri("d") == "nbd://[::1]:5/d"
    assert tls_warning(Address(port=1)) is None and tls_warning(Address(path="x")) is None
    assert tls_warning(Address(host="localhost")) is None
    warning = tls_warning(Address(host="0.0.0.0", port=10809))
    assert warning is not None and "0.0.0.0:10809 without TLS" in warning
    assert "--tls=require --tls-certificates DIR" in warning


def test_tls_uris_and_the_warning_with_tls() -> None:
    assert Address(path="/run/n.sock").uri("d", tls=True) == "nbds+unix:///d?socket=/run/n.sock"
    assert Address(host="10.0.0.5", port=5).uri("d", tls=True) == "nbds://10.0.0.5:5/d"
    far = Address(host="0.0.0.0", port=10809)
    assert tls_warning(far, TLSPolicy.REQUIRE) is None
    warning = tls_warning(far, TLSPolicy.ON)
    assert warning is not None and "with TLS optional (--tls=on)" in warning
    assert "served in plaintext" in warning and "\n" not in warning
    assert tls_warning(Address(path="x"), TLSPolicy.ON) is None


def test_stale_live_and_foreign_socket_paths(short_tmp: Path) -> None:
    stale = short_tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, nobody listens: what a server that died leaves
    clear_stale_socket(str(stale))
    assert not stale.exists()
    live = short_tmp / "live.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(live))
        server.listen(1)
        with pytest.raises(ListenError, match="in use by another server"):
            clear_stale_socket(str(live))
    (short_tmp / "file").write_text("x")
    with pytest.raises(ListenError, match="not a socket"):
        clear_stale_socket(str(short_tmp / "file"))


async def test_listening_leaves_nothing_behind_when_one_address_fails(short_tmp: Path) -> None:
    (short_tmp / "taken").write_text("x")
    with pytest.raises(ListenError):
        await listen(
            [Address(path=str(short_tmp / "ok.sock")), Address(path=str(short_tmp / "taken"))]
        )
    assert sorted(os.listdir(short_tmp)) == ["taken"]
    listening = await listen([Address(path=str(short_tmp / "s.sock")), Address(port=0)])
    assert listening.addresses[1].port != 0  # the port the system picked
    await listening.aclose()
    assert not (short_tmp / "s.sock").exists()


def test_socket_activation_is_only_for_this_process() -> None:
    me = str(os.getpid())
    assert activated_fds({"LISTEN_PID": me, "LISTEN_FDS": "2"}) == [3, 4]
    assert activated_fds({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
    assert activated_fds({"LISTEN_FDS": "1"}) == [] and activated_fds({}) == []
    assert activated_fds({"LISTEN_PID": me, "LISTEN_FDS": "zero"}) == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--socket", "vm1.sock"], "vm1.ctl"),
        (["--socket", "/run/x"], "/run/x.ctl"),
        (["--socket", "a.ctl"], "a.ctl.ctl"),
        (["--socket", "a.sock", "--control", "c"], "c"),
        (["--listen", ":1"], None),
    ],
)
def test_the_control_socket_sits_next_to_the_first_socket(
    argv: list[str], expected: str | None
) -> None:
    assert control_path(parse_args(["serve", *argv])) == expected
