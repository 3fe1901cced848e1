"""NBD wire constants, grouped as ``doc/proto.md`` groups them.

Values come from the protocol document, never from the reference server's ``nbd.h``
(which has ``NBD_REPLY_TYPE_BLOCK_STATUS`` wrong).  Struct layouts sit next to the words
that describe them; every integer on the wire is big-endian.
"""

from __future__ import annotations

import enum
import struct

# --- magics -----------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting (not supported)
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

DEFAULT_PORT = 10809

# --- handshake flags ------------------------------------------------------------------


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


# --- options and option replies -------------------------------------------------------


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT + 1
    ERR_POLICY = REP_ERROR_BIT + 2
    ERR_INVALID = REP_ERROR_BIT + 3
    ERR_PLATFORM = REP_ERROR_BIT + 4
    ERR_TLS_REQD = REP_ERROR_BIT + 5
    ERR_UNKNOWN = REP_ERROR_BIT + 6
    ERR_SHUTDOWN = REP_ERROR_BIT + 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
    ERR_TOO_BIG = REP_ERROR_BIT + 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT + 10


class InfoType(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# --- transmission ---------------------------------------------------------------------


class TxFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


NO_TX_FLAGS = TxFlag(0)


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


NO_CMD_FLAGS = CmdFlag(0)
KNOWN_CMD_FLAGS = CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO
REPLY_FLAG_DONE = 1 << 0


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


CHUNK_ERROR_BIT = 1 << 15


class Errno(enum.IntEnum):
    """The only error values allowed on the wire; a client reads others as EINVAL."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


STATE_HOLE = 1
STATE_ZERO = 2
BASE_ALLOCATION = "base:allocation"

# --- limits -----------------------------------------------------------------------------

MAX_STRING = 4096
"""A name, description or message longer than this is a protocol violation."""
MAX_OPTION_REPLY = 4 + 2 * MAX_STRING
"""The longest option reply we accept (``NBD_REP_SERVER``: length, name, description)."""
MAX_EXPORTS = 65536
"""The most ``NBD_REP_SERVER`` replies one LIST may bring."""
MAX_LIST_BYTES = 1 << 24
"""The most bytes one LIST may bring (16 MiB): its SERVER replies and the INFO replies
that follow for each export, all counted."""
MAX_INFO_REPLIES = 64
"""The most ``NBD_REP_INFO`` replies one INFO or GO may bring (there are four info types;
a server may add unknown ones, which are ignored, but not without end)."""
MIN_PREFERRED_BLOCK = 512
"""A preferred block size below this (or below the minimum) breaks the spec."""
MAX_EXPORT_SIZE = (1 << 63) - 1
"""The largest export blockfuse opens: file sizes and offsets are signed 64-bit (st_size,
off_t, FUSE), though the protocol's size field is unsigned."""
DEFAULT_MAX_PAYLOAD = 1 << 25
"""32 MiB: what every server must take when it advertises no maximum."""
MAX_MIN_BLOCK = 1 << 16
MAX_READ_PIECES = 1024
"""How many separate pieces the chunks of one READ reply may have left apart at once.
Chunks may come in any order, but a server that scatters a reply more than this (every
other byte first, say) is dropped: tracking the pieces stays cheap and small."""
MAX_EXTENTS = 1 << 20
MAX_BLOCK_STATUS_CHUNK = 4 + 8 * MAX_EXTENTS
MAX_ERROR_CHUNK = 6 + MAX_STRING + 8

# --- limits of the server side (what a client may make us hold) -----------------------

MAX_OPTION_DATA = 1 << 16
"""The most option data the server reads and parses (a name, a few meta-context queries:
real clients send well under 10 KiB).  Longer options are skipped as they arrive, never
buffered, and refused (``ERR_TOO_BIG``, or ``ERR_UNSUP`` for an unknown option)."""
MAX_QUERIES = 64
"""The most meta-context queries one LIST/SET_META_CONTEXT may carry (``ERR_TOO_BIG``)."""
MAX_REFUSED_PAYLOAD = 1 << 26
"""A WRITE longer than the maximum payload but at most this (64 MiB) is read and thrown
away as it arrives, then refused with EINVAL, so the stream stays in sync; a longer one
is absurd and drops the connection."""
MAX_STATUS_EXTENTS = 1 << 12
"""The most extents one BLOCK_STATUS reply of ours carries (the client asks again)."""

# --- struct layouts ---------------------------------------------------------------------

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
EXPORT_NAME_PADDING = 124
INFO_EXPORT = struct.Struct(">HQH")  # type, size, flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # type, minimum, preferred, maximum
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")  # a CHUNK_HEADER and an OFFSET_DATA's offset
HOLE = struct.Struct(">QI")  # offset, size
ERROR_HEADER = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, flags
