"""The receive side of one NBD connection: who reads it, and how that changes hands.

A request alone on the connection is read by its own caller: it sends, then reads its
reply straight from the socket, the data into its own buffer, and no other task wakes.
With others in flight, the reader task reads and wakes each caller (client.py).  Which
one reads is the *turn*; exactly one task holds it while anything is in flight::

         a request arrives alone: its caller takes the turn, sends, reads its reply
    PARKED  ---------------------------------------------------------------->  OWN
    nobody reads;  <------------------------------------------------------  the caller
    the reader        its reply done, nothing else in flight                 reads (and
    task waits                                                               delivers any
      |  ^                                                                   reply first)
      |  |  every call answered              its reply done with others in      |
      v  |                                   flight, or its caller cancelled    |
    READER  <-------------------------------------------------------------------+
    the reader task reads; requests that come meanwhile wait for it

- A request goes its own way only when the turn is PARKED (nothing in flight, nobody
  reading); its caller takes the turn (OWN) before its first checkpoint.  A request that
  comes while the turn is OWN or READER is queued as before and waits for its call's
  event: whoever reads delivers its reply, whichever reply comes first.
- One that comes while the caller holding the turn is still sending (the socket did not
  take its request at once) gives the turn to the reader task: that send goes on with
  the newcomer's request too, and nobody would read meanwhile, so a server that stops
  reading until its replies are read (any in-order one, once its buffers are full) would
  stall both sides until the timeout dropped the connection.  The caller that sent then
  waits for its call's event like any other (``sent``).
- The caller gives the turn back in a ``finally`` as soon as it stops reading, without a
  checkpoint in between: PARKED when nothing is in flight, else READER, waking the
  reader task.  So a second request sent while the first caller reads is answered:
  the first caller delivers its reply if it comes first, the reader task otherwise.
- A caller cancelled mid-reply gives the turn to the reader task too: its call stays
  registered, so the reader reads the rest of that reply into the buffer nobody reads
  any more (or drops the connection at the call's deadline), and the stream never
  falls out of step.  Nothing needs a shield.
- The turn changes only between checkpoints, so two tasks never read at once.
- The reader task parks once every call is answered.  Parked, it still keeps the
  deadlines: its wait ends at the earliest one (watchdog.py), and a call still
  unanswered then is a ``Stalled`` connection, dropped and closed, which wakes the
  caller reading it (``ClosedResourceError``) to raise its call's error.  After
  ``IDLE_WATCH`` seconds without a request it takes the turn itself, to watch the idle
  connection (a server that closes it, or sends what nobody asked for, is noticed at
  once); the next request then goes the reader's way, and the reader parks again.

Reading the socket's fd directly has one more rule: after every checkpoint, before the
next read, the socket is looked at (``_still_open``).  A task woken because the socket
became readable may find it closed by the time it runs (``aclose``, or the reader task
dropping the connection at a deadline, ran first in the same batch), and the number may
already be another file's or connection's (whoever opens one gets the lowest free
number): reading it would take that file's bytes as a reply, and steal them from it.

The reading itself: on a socket, a lone caller reads exactly the header its reply
should begin with (the core's ``receive_header`` parses it in place), then the data
straight into its buffer; anything unexpected (another call's reply, an error chunk,
several chunks) goes through the core as usual.  The reader task reads big blocks,
with READ data straight into the callers' buffers.  A stream that is not a socket
(TLS, memory streams in tests) is read by ``receive_some``, in turn as well, and READ
data over TLS is decrypted straight into the caller's buffer (``TLSStream.receive_into``:
no receive buffer, no copy through the core): over TLS a lone request is still read by
its caller, only without the lean header, and that caller's wait ends at its call's
deadline by itself too (closing a TLS stream under a receive need not wake it).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from ..nbd.constants import Cmd
from ..nbd.events import NEED_DATA, Done, ReplyEvent
from ..nbd.transmission import ClientTransmission
from .calls import Call
from .handshake import ConnectionLost, Stalled
from .sender import Sender, still_open
from .watchdog import Watchdog

RECEIVE_SIZE = 1 << 17
BURST = 16
IDLE_WATCH = 1.0
"""Seconds without a request after which the reader task watches the idle connection."""


class Turn(enum.Enum):
    """Who reads the connection now."""

    PARKED = "nobody"
    OWN = "a caller, its own reply"
    READER = "the reader task"


class Receiver:
    """Reads replies into the core and hands each event to ``deliver``; see the module
    text.  Its methods raise what a broken connection raises (``PeerClosed``,
    ``ProtocolError``, ``ConnectionLost``, ``Stalled``, the stream's errors): the client
    fails every call then."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        fd: int | None,
        tx: ClientTransmission,
        calls: dict[int, Call],
        sender: Sender,
        server: str,
        deliver: Callable[[ReplyEvent], None],
    ) -> None:
        self._stream = stream
        self._receive_into: Callable[[memoryview], Awaitable[int]] | None = getattr(
            stream, "receive_into", None
        )
        """A TLS stream's: decrypts straight into a buffer (``_receive_stream_once``)."""
        self._fd = fd
        self._socket: trio.socket.SocketType | None = getattr(stream, "socket", None)
        self._tx = tx
        self._calls = calls
        self._sender = sender
        self._server = server
        self._deliver = deliver
        self.watchdog = Watchdog()
        self.turn = Turn.READER
        self._wake = trio.Event()
        self._last_request = trio.current_time()
        self._view = memoryview(bytearray(RECEIVE_SIZE))
        self._read_head = memoryview(bytearray(tx.header_size(Cmd.READ)))
        self._other_head = memoryview(bytearray(tx.header_size(Cmd.FLUSH)))
        self._sending = False
        """The caller holding the turn has not finished sending its request."""
        self.handovers = 0
        """Times a caller gave the turn to the reader task with calls in flight (or lost
        it to the reader task while it sent)."""
        self._answered = 0
        """Replies completed so far (the reader's measure of being idle)."""

    # --- the turn ---------------------------------------------------------------------

    def take(self, now: float) -> bool:
        """Take the turn for a lone request (at ``now``), if nothing is in flight and
        nobody reads."""
        if self.turn is not Turn.PARKED or self._sender.busy:
            return False
        self.turn = Turn.OWN
        self._sending = True
        self._last_request = now
        return True

    def sent(self) -> bool:
        """The caller that took the turn has sent its request: whether it still holds the
        turn (else a request queued meanwhile gave it to the reader task).  No checkpoint
        since the send ended, so a turn still OWN is this caller's."""
        self._sending = False
        return self.turn is Turn.OWN

    def give_back(self) -> None:
        """End a caller's turn: parked if nothing is in flight, else to the reader task.
        Nothing if the turn went to the reader task while the caller sent."""
        self._sending = False
        if self.turn is not Turn.OWN:
            return
        if self._calls:
            self.handovers += 1
            self._to_reader()
        else:
            self.turn = Turn.PARKED

    def queued(self) -> None:
        """A call was queued the usual way: wake the reader task if nobody reads, or if
        the caller holding the turn is still sending (its send carries this one too)."""
        if self.turn is Turn.PARKED:
            self._to_reader()
        elif self._sending and self.turn is Turn.OWN:
            self.handovers += 1
            self._sending = False
            self._to_reader()

    def _to_reader(self) -> None:
        self.turn = Turn.READER
        self._wake.set()

    # --- the reader task --------------------------------------------------------------

    async def serve(self) -> None:
        """The reader task's part: read while calls are in flight, park in between."""
        while True:
            await self._park()
            if self._fd is not None:
                await self._receive_fd(self._fd)
            else:
                await self._receive_some()

    async def _park(self) -> None:
        """Wait while nobody or a caller reads; keep the deadlines meanwhile.  Not at all
        with calls in flight (requests queued before the reader task first ran)."""
        if self._calls:
            return
        self.turn = Turn.PARKED
        while self.turn is not Turn.READER:
            self._wake = trio.Event()
            now = trio.current_time()
            idle_at = self._last_request + IDLE_WATCH
            with self._watching(), trio.move_on_at(idle_at if idle_at > now else now + IDLE_WATCH):
                await self._wake.wait()  # (a caller reading for long: look again later)
            idle = trio.current_time() >= self._last_request + IDLE_WATCH
            if self.turn is Turn.PARKED and idle:
                self.turn = Turn.READER

    def _idle(self, answered: int) -> bool:
        """Every call is answered, and some were since the reader took the turn."""
        return not self._calls and self._answered != answered

    async def _receive_some(self) -> None:
        answered = self._answered
        while not self._idle(answered):
            with self._watching() as wait:
                n = await self._receive_stream_once()
            if wait.cancelled_caught:
                continue
            await self._sender.send_if_idle()
            if not n:
                raise ConnectionLost(f"{self._server} closed the connection")

    async def _receive_fd(self, fd: int) -> None:
        """Like ``_receive_some``, but reading the socket directly while data flows.

        READ data goes straight into the caller's buffer (``payload_target``), and up to
        ``BURST`` reads in a row happen without a trip through the scheduler; the task
        waits for the socket (a checkpoint) only when it has nothing more to read.
        """
        answered = self._answered
        while True:
            self._still_open(fd)  # after a checkpoint: the park, a wait, a send
            for _ in range(BURST):
                try:
                    n = self._read_once(fd)
                except BlockingIOError:
                    break
                if not n:
                    raise ConnectionLost(f"{self._server} closed the connection")
            await self._sender.send_if_idle()
            if self._idle(answered):
                return
            with self._watching():
                await trio.lowlevel.wait_readable(fd)

    @contextmanager
    def _watching(self) -> Iterator[trio.CancelScope]:
        """A wait that ends at the earliest deadline; the deadlines are checked before
        and after it (``Stalled`` if a call is past its own)."""
        self._check_deadlines()
        with self.watchdog.waiting() as scope:
            yield scope
        self._check_deadlines()

    def _check_deadlines(self) -> None:
        late = self.watchdog.overdue(self._calls.values())
        if late:
            more = f" and {len(late) - 1} more" if len(late) > 1 else ""
            raise Stalled(
                f"{self._server}: no reply by the deadline to {late[0].describe()}{more}; "
                f"the connection was dropped"
            )

    # --- a caller's own reply ---------------------------------------------------------

    async def read_own(self, call: Call) -> None:
        """Read until ``call`` is done (in the caller's task, holding the turn).

        On a socket no wait here has a clock of its own: the parked reader task keeps
        the call's deadline, and the socket of a connection it drops is closed under
        this wait, which ends it (``ClosedResourceError``)."""
        if call.done.is_set():  # failed while it was sent
            return
        if self._fd is None:
            await self._read_own_stream(call)
            return
        fd = self._fd
        await trio.lowlevel.wait_readable(fd)
        self._still_open(fd)
        try:
            if self._read_whole(fd, call):
                return
            while not call.done.is_set():
                self._read_own_once(fd, call)
        except BlockingIOError:
            pass
        while not call.done.is_set():
            await trio.lowlevel.wait_readable(fd)
            self._still_open(fd)
            try:
                while not call.done.is_set():
                    self._read_own_once(fd, call)
            except BlockingIOError:
                pass

    async def _read_own_stream(self, call: Call) -> None:
        """``read_own`` on a stream that is not a socket (TLS), bounded by the call's
        deadline itself too: closing such a stream under a wait need not end the wait."""
        with trio.move_on_at(call.deadline) as scope:
            head = self._tx.header_size(call.cmd)
            while not call.done.is_set():
                if not await self._receive_stream_once(head):
                    raise ConnectionLost(f"{self._server} closed the connection")
        if scope.cancelled_caught:
            self._check_deadlines()

    def _read_whole(self, fd: int, call: Call) -> bool:
        """The first read of a lone reply: the header it should begin with, and a READ's
        data right after it straight into the buffer, in one ``readv``; whether that
        was the whole reply (``receive_whole``: then nothing else is done).  Bytes that
        are something else (another call's reply, an error, a reply in pieces) go
        through the core."""
        tx = self._tx
        if not tx.at_rest:
            return False
        sink = call.sink
        if sink is None:
            head = self._other_head
            n = os.readv(fd, [head])
        else:
            head = self._read_head
            n = os.readv(fd, [head, sink])
        if not n:
            self._closed()
        got = n if n < len(head) else len(head)
        raw = head if got == len(head) else head[:got]
        if (done := tx.receive_whole(raw, call.cookie, n - got)) is not None:
            self._answered += 1
            self._deliver(done)
            return True
        tx.receive_header(raw)
        if n > got:
            self._landed(call, n - got)
        self.feed(b"", eof=False)
        return call.done.is_set()

    def _landed(self, call: Call, n: int) -> None:
        """``n`` bytes that came after a header went to the start of ``call``'s buffer:
        its data, if the header says so; the rest (or all) is fed to the core."""
        assert call.sink is not None
        target = self._tx.payload_target()
        taken = 0
        if target is not None and target[:2] == (call.cookie, call.offset):
            taken = min(n, target[2])
            self._tx.payload_received(taken)
        if n > taken:
            self._tx.receive_data(bytes(call.sink[taken:n]))

    def _read_own_once(self, fd: int, call: Call) -> None:
        """At rest, the header the reply should begin with, parsed in place; else a
        step of the reader's kind (payload into its buffer, or a block into the core)."""
        if not self._tx.at_rest:
            if not self._read_once(fd):
                self._closed()
            return
        head = self._read_head if call.cmd is Cmd.READ else self._other_head
        n = os.readv(fd, [head])
        if not n:
            self._closed()
        self._tx.receive_header(head[:n])
        self.feed(b"", eof=False)

    def _still_open(self, fd: int) -> None:
        """Raise ``ClosedResourceError`` if the socket was closed since the last look (its
        number ``fd`` may be another file's now: see the module text)."""
        if not still_open(self._socket, fd):
            raise trio.ClosedResourceError("the connection was closed")

    def _closed(self) -> None:
        """The server closed the connection (the core says how, if it was mid-reply)."""
        self.feed(b"")
        raise ConnectionLost(f"{self._server} closed the connection")

    # --- feeding the core -------------------------------------------------------------

    def _read_once(self, fd: int) -> int:
        target = self._tx.payload_target()
        if target is None:
            view = self._view
            n = os.readv(fd, [view])
            self.feed(view[:n].tobytes())
            return n
        n = os.readv(fd, [self._payload_destination(target)])
        self._payload_arrived(n, target[2])
        return n

    async def _receive_stream_once(self, head: int = RECEIVE_SIZE) -> int:
        """One receive from a stream that is not a socket; how many bytes (0: the end,
        told to the core).  A READ's data goes straight into its buffer where the core
        streams it and the stream can (a TLS stream's ``receive_into``); anything else
        is fed to the core, at most ``head`` bytes between replies (a lone caller's:
        its reply's header, so that its data comes next by ``receive_into``)."""
        target = self._tx.payload_target()
        receive_into = self._receive_into
        if target is None or receive_into is None:
            size = head if self._tx.at_rest and receive_into else RECEIVE_SIZE
            data = await self._stream.receive_some(size)
            self.feed(data)
            return len(data)
        n = await receive_into(self._payload_destination(target))
        self._payload_arrived(n, target[2])
        return n

    def _payload_destination(self, target: tuple[int, int, int]) -> memoryview:
        """Where the next bytes of a READ's data go: its call's buffer, or (the call
        failed already) the receive view, to be dropped."""
        cookie, offset, remaining = target
        call = self._calls.get(cookie)
        if call is None or call.sink is None:
            return self._view[: min(remaining, len(self._view))]
        start = offset - call.offset
        return call.sink[start : start + remaining]

    def _payload_arrived(self, n: int, remaining: int) -> None:
        """``n`` bytes of the ``remaining`` data landed where ``_payload_destination``
        said (0: the end)."""
        if n:
            self._tx.payload_received(n)
        if n == remaining or not n:
            self.feed(b"", eof=not n)

    def feed(self, data: bytes | bytearray, *, eof: bool = True) -> None:
        """``data`` into the core (``b""``: the end, unless ``eof`` is false), and every
        event it completes to ``deliver``."""
        if data or eof:
            self._tx.receive_data(data)
        while (event := self._tx.next_event()) is not NEED_DATA:
            if type(event) is Done:
                self._answered += 1
            self._deliver(event)
