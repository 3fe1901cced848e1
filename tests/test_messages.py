"""Messages a new user met (issue 17): each says what is wrong and what to do, in one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blockfuse.cli import main
from blockfuse.devices.memory import MemoryDevice
from blockfuse.errors import RequestFailed
from blockfuse.nbd.uri import BadURI, parse_uri
from blockfuse.spec import SpecError, compile_spec

SCHEMES = "blockfuse speaks nbd://, nbds://, nbd+unix://, nbds+unix://"


def spec_error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        compile_spec(text)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("./a,b.img", "unexpected ','"),
        ("./a(1).img", "unexpected '('"),
        ("/x/disk),1", "unexpected ')'"),
    ],
)
def test_an_unquoted_path_with_commas_or_parentheses_is_told_to_quote(
    text: str, problem: str
) -> None:
    message = spec_error(text)
    assert problem in message
    assert f"""quote a path that holds ',' or parentheses: file("{text}")""" in message


def test_a_path_cut_at_its_comma_inside_a_call_is_told_to_quote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("a,b.img").write_bytes(bytes(4096))
    for spec in ("file(a,b.img)", "sparse(a,b.img)", "file(a,b.img, ro=true)"):
        message = spec_error(spec)
        assert """quote a path that holds ',' or parentheses: "a,b.img\"""" in message, message


@pytest.mark.parametrize("text", ["http://x/y", "https://h/disk.img", "nbd(http://x/y)"])
def test_a_uri_of_another_scheme_is_named(text: str) -> None:
    scheme = text.removeprefix("nbd(").split(":")[0]
    assert f"unsupported URI scheme '{scheme}' ({SCHEMES})" in spec_error(text)


def test_ls_names_the_scheme_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "http://x/y"]) != 0
    assert f"unsupported URI scheme 'http' ({SCHEMES})" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("nbd://127.0.0.1:abc/", "bad port 'abc' (use a number from 1 to 65535)"),
        ("nbd://127.0.0.1:99999/", "bad port '99999' (use a number from 1 to 65535)"),
        ("nbd://127.0.0.1:0/", "bad port 0 (leave the port out for 10809)"),
    ],
)
def test_a_bad_port_is_said_in_our_words(uri: str, message: str) -> None:
    with pytest.raises(BadURI) as info:
        parse_uri(uri)
    assert str(info.value) == message
    assert "cast" not in spec_error(uri) and "range 0-65535" not in spec_error(uri)


def test_a_memory_device_too_large_to_map_says_how_much_and_why() -> None:
    with pytest.raises(ValueError) as info:
        MemoryDevice(1 << 50)
    message = str(info.value)
    assert "mem(1P) keeps its data in RAM" in message
    assert "cannot map 1024 TiB" in message and "sparse(PATH, size=1P)" in message


async def test_growing_a_memory_device_beyond_what_maps_fails_cleanly() -> None:
    device = MemoryDevice(1 << 20)
    await device.write(0, [b"x" * 512])
    with pytest.raises(RequestFailed) as info:
        await device.resize((1 << 50) // 512)
    assert info.value.errno == errno.ENOMEM
    assert "keeps its data in RAM" in str(info.value)
    assert (await device.get_info()).size_bytes == 1 << 20
    assert device.data[:512] == b"x" * 512


def test_mem_too_large_for_the_mount_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["mount", "mnt", "-d", "ram=mem(1P)"]) == 1
    err = capsys.readouterr().err
    assert "cannot open device ram=mem(1P): mem(1P) keeps its data in RAM" in err
    assert len(err.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_a_scratch_device_smaller_than_a_unit_points_at_scratch_unit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["mount", "mnt", "--scratch", "t=mem(100K)"]) == 1
    err = capsys.readouterr().err
    assert "smaller than one 1 MiB unit" in err
    assert "--scratch-unit 4K" in err, err


def test_umount_of_a_tmpfs_reads_right(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess

    target = tmp_path / "t"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], check=True, timeout=10)
    try:
        assert main(["umount", str(target)]) == 1
    finally:
        subprocess.run(["umount", str(target)], check=False, timeout=10)
    err = capsys.readouterr().err
    assert f"{target} is a mount of type tmpfs, not blockfuse's; leaving it alone" in err
