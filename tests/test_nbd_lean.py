"""The core's lean entry for a lone reply (``receive_header``): the same events and the
same refusals as ``receive_data``, whatever the bytes and wherever they are split."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockfuse.errors import ProtocolError
from blockfuse.nbd import constants as c
from blockfuse.nbd.events import NEED_DATA, Done, ExportInfo, Negotiated, ReadData
from blockfuse.nbd.transmission import ClientTransmission

from .nbdpair import FULL_FLAGS


def negotiated(structured: bool = True) -> Negotiated:
    export = ExportInfo("d", 1 << 20, FULL_FLAGS)
    return Negotiated(export, structured, {c.BASE_ALLOCATION: 1})


def chunk(cookie: int, ctype: int, payload: bytes, flags: int = c.REPLY_FLAG_DONE) -> bytes:
    header = c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, flags, ctype, cookie, len(payload))
    return header + payload


def data_chunk(cookie: int, offset: int, data: bytes, flags: int = c.REPLY_FLAG_DONE) -> bytes:
    return chunk(cookie, c.Chunk.OFFSET_DATA, c.U64.pack(offset) + data, flags)


def simple(cookie: int, error: int = 0) -> bytes:
    return c.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)


def outcome(tx: ClientTransmission, feed: list[bytes], lean: int | None) -> list[object]:
    """What ``tx`` makes of ``feed`` (pieces in order); the first through
    ``receive_header`` when ``lean`` is set.  Data is joined per contiguous run, so
    only what was said counts, not how it was cut."""
    out: list[object] = []
    try:
        for i, piece in enumerate(feed):
            if not piece:
                continue  # b"" is the end of the connection: not what is meant here
            if i == lean:
                tx.receive_header(piece)
            else:
                tx.receive_data(piece)
            while (event := tx.next_event()) is not NEED_DATA:
                if not isinstance(event, ReadData):
                    out.append(event)
                elif follows(out[-1] if out else None, event):
                    out[-1][2] += bytes(event.data)  # type: ignore[index]
                else:
                    out.append([event.cookie, event.offset, bytes(event.data)])
    except ProtocolError as exc:
        out.append(("refused", str(exc)))
    return out


def follows(last: object, event: ReadData) -> bool:
    """``event`` continues the run of data ``last`` (``[cookie, offset, bytes]``)."""
    if not isinstance(last, list):
        return False
    cookie, offset, data = last
    return bool(cookie == event.cookie and offset + len(data) == event.offset)


def in_flight(structured: bool) -> ClientTransmission:
    tx = ClientTransmission(negotiated(structured))
    tx.request(c.Cmd.READ, 4096, 1024)  # cookie 1
    tx.request(c.Cmd.FLUSH)  # cookie 2
    tx.request(c.Cmd.READ, 0, 512)  # cookie 3
    return tx


@pytest.mark.parametrize("structured", [True, False])
def test_a_lone_read_reply_header_is_parsed_in_place(structured: bool) -> None:
    tx = ClientTransmission(negotiated(structured))
    cookie, _ = tx.request(c.Cmd.READ, 4096, 1024)
    assert tx.at_rest
    size = tx.header_size(c.Cmd.READ)
    reply = data_chunk(cookie, 4096, bytes(1024)) if structured else simple(cookie)
    assert size == len(reply) - (1024 if structured else 0) == (28 if structured else 16)
    tx.receive_header(reply[:size])
    assert tx.payload_target() == (cookie, 4096, 1024)
    tx.payload_received(1024)
    assert tx.next_event() == Done(cookie)
    assert tx.next_event() is NEED_DATA and tx.at_rest and tx.in_flight == 0


@pytest.mark.parametrize(
    "reply",
    [simple(1), chunk(1, c.Chunk.NONE, b""), simple(1, errno.ENOSPC)],
    ids=["simple", "none-chunk", "error"],
)
def test_a_lone_reply_without_payload_is_done_at_once(reply: bytes) -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.FLUSH)
    tx.receive_header(reply)
    error = errno.ENOSPC if reply == simple(1, errno.ENOSPC) else 0
    assert tx.next_event() == Done(cookie, error)
    assert tx.at_rest


def test_an_error_chunk_is_fed_on() -> None:
    tx = ClientTransmission(negotiated())
    cookie, _ = tx.request(c.Cmd.READ, 0, 512)
    reply = chunk(cookie, c.Chunk.ERROR, c.ERROR_HEADER.pack(errno.EIO, 2) + b"no")
    tx.receive_header(reply[:28])
    tx.receive_data(reply[28:])
    assert tx.next_event() == Done(cookie, errno.EIO, "no")


HOSTILE = [
    (c.SIMPLE_REPLY.pack(0x12345678, 0, 1), "unknown magic"),
    (simple(99), "unknown cookie"),
    (c.CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, 1, 1, 1, 1 << 31) + bytes(8), "invalid chunk"),
    (data_chunk(1, 8192, bytes(512)), "outside the request"),
    (data_chunk(1, 4096, bytes(512)), "ended after 512 of 1024"),
    (data_chunk(1, 4096, bytes(2048)), "invalid chunk type 1 of 2056 bytes"),
    (chunk(1, 77, bytes(8)), "unknown non-error chunk type"),
    (chunk(2, c.Chunk.NONE, b"", 0), "invalid chunk"),
    (chunk(2, c.Chunk.OFFSET_DATA, bytes(8) + b"x"), "invalid chunk type 1 of 9 bytes for FLUSH"),
]


@pytest.mark.parametrize(("reply", "match"), HOSTILE)
def test_hostile_replies_are_refused_the_same_way(reply: bytes, match: str) -> None:
    head = len(reply) if len(reply) < 28 else 28
    lean = outcome(in_flight(True), [reply[:head], reply[head:]], lean=0)
    assert lean == outcome(in_flight(True), [reply], lean=None)
    assert lean[-1][0] == "refused" and match in lean[-1][1]  # type: ignore[index]
    tx = in_flight(True)
    with pytest.raises(ProtocolError):
        outcome_or_raise(tx, reply[:head], reply[head:])
    with pytest.raises(ProtocolError):
        tx.next_event()


def outcome_or_raise(tx: ClientTransmission, head: bytes, rest: bytes) -> None:
    tx.receive_header(head)
    tx.receive_data(rest)
    while tx.next_event() is not NEED_DATA:
        pass


PIECES = st.sampled_from(
    [
        simple(1),
        simple(2),
        simple(3, errno.EIO),
        simple(7),
        data_chunk(1, 4096, b"a" * 1024),
        data_chunk(1, 4096, b"b" * 512, 0),
        data_chunk(1, 4608, b"c" * 512),
        data_chunk(3, 0, b"d" * 512),
        chunk(2, c.Chunk.NONE, b""),
        chunk(1, c.Chunk.OFFSET_HOLE, c.HOLE.pack(4096, 1024)),
        chunk(3, c.Chunk.ERROR, c.ERROR_HEADER.pack(errno.EIO, 1) + b"x"),
        b"x" * 1024,
    ]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=5), st.integers(1, 60), st.booleans())
def test_receive_header_says_what_receive_data_says(
    pieces: list[bytes], cut: int, structured: bool
) -> None:
    """Any replies, the first ``cut`` bytes given to ``receive_header`` (never none: as
    for ``receive_data``, ``b""`` is the end of the connection) or to ``receive_data``."""
    stream = b"".join(pieces)
    split = [stream[:cut], stream[cut:]]
    generic = outcome(in_flight(structured), split, lean=None)
    assert outcome(in_flight(structured), split, lean=0) == generic


# --- receive_whole: a whole reply at once, or nothing changed -----------------------------

WHOLE = st.sampled_from(
    [
        (1, data_chunk(1, 4096, b"a" * 1024)),  # the whole READ in one chunk: taken
        (1, data_chunk(1, 4096, b"a" * 1024, 0)),  # no DONE: not whole
        (1, data_chunk(1, 4608, b"a" * 512)),  # not from the start
        (1, data_chunk(1, 4096, b"a" * 512)),  # short
        (1, data_chunk(3, 0, b"d" * 512)),  # another call's
        (1, simple(1) + b"s" * 1024),  # simple, with the data: taken
        (1, simple(1, errno.EIO)),  # an error: taken
        (1, chunk(1, c.Chunk.NONE, b"")),  # a READ ended with no data: refused later
        (1, chunk(1, c.Chunk.ERROR, c.ERROR_HEADER.pack(errno.EIO, 1) + b"x")),
        (1, chunk(1, c.Chunk.OFFSET_HOLE, c.HOLE.pack(4096, 1024))),
        (2, simple(2)),  # FLUSH: taken
        (2, chunk(2, c.Chunk.NONE, b"")),  # taken
        (2, chunk(2, c.Chunk.NONE, b"", 0)),  # no DONE: refused later
        (2, simple(3)),  # another cookie
        (4, chunk(4, c.Chunk.NONE, b"")),  # BLOCK_STATUS needs its status chunk
        (4, simple(4)),  # a BLOCK_STATUS's simple reply
        (1, c.SIMPLE_REPLY.pack(0x12345678, 0, 1)),
    ]
)


@settings(max_examples=400, deadline=None)
@given(WHOLE, st.booleans(), st.integers(0, 4))
def test_receive_whole_takes_a_whole_reply_or_nothing(
    case: tuple[int, bytes], structured: bool, short: int
) -> None:
    """What ``receive_whole`` takes, ``receive_data`` reads as that one reply and its data;
    what it leaves, it leaves untouched."""
    cookie, reply = case
    size = ClientTransmission(negotiated(structured)).header_size(c.Cmd.READ)
    head = 16 if reply[:4] == c.U32.pack(c.SIMPLE_REPLY_MAGIC) else min(len(reply), size)
    if cookie != 1:
        head = 16 if reply[:4] == c.U32.pack(c.SIMPLE_REPLY_MAGIC) else 20
    data = len(reply) - head - short if len(reply) - head >= short else len(reply) - head

    tx = in_flight(structured)
    tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)  # cookie 4
    done = tx.receive_whole(reply[:head], cookie, data)
    generic = in_flight(structured)
    generic.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    said = outcome(generic, [reply[: head + data]], lean=None)
    if done is None:
        assert tx.at_rest and tx.in_flight == 4
        assert outcome(tx, [reply[: head + data]], lean=None) == said
    else:
        assert tx.in_flight == 3 and tx.at_rest and tx.next_event() is NEED_DATA
        payload = [e for e in said if isinstance(e, list)]
        assert said[-1] == done and all(isinstance(e, list) for e in said[:-1])
        assert b"".join(p[2] for p in payload) == reply[head : head + data]


@pytest.mark.parametrize(
    ("structured", "cookie", "reply", "head"),
    [
        (True, 1, data_chunk(1, 4096, b"a" * 1024), 28),
        (False, 1, simple(1) + b"s" * 1024, 16),
        (True, 1, simple(1, errno.EIO), 16),
        (True, 2, simple(2), 16),
        (True, 2, chunk(2, c.Chunk.NONE, b""), 20),
    ],
)
def test_receive_whole_takes_these(structured: bool, cookie: int, reply: bytes, head: int) -> None:
    tx = in_flight(structured)
    error = errno.EIO if reply == simple(1, errno.EIO) else 0
    assert tx.receive_whole(reply[:head], cookie, len(reply) - head) == Done(cookie, error)
    assert tx.in_flight == 2 and tx.at_rest
