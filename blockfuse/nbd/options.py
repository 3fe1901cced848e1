"""Option payloads of the NBD handshake: how they are encoded and decoded.

Strings carry their length and are refused beyond ``MAX_STRING`` bytes; INFO items are
checked against their fixed sizes and the spec's block-size rules before they are
believed: the minimum a power of two up to 64 KiB, the preferred size a power of two of
at least max(minimum, 512), the maximum at least the preferred size.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import ProtocolError
from .constants import (
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_MIN_BLOCK,
    MAX_STRING,
    MIN_PREFERRED_BLOCK,
    OPTION,
    U16,
    U32,
    InfoType,
    Opt,
    TxFlag,
)
from .events import ExportInfo


def encode_option(option: Opt, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, option, len(data)) + data


def encode_name(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > MAX_STRING:
        raise ValueError(f"export name longer than {MAX_STRING} bytes")
    return U32.pack(len(raw)) + raw


def encode_info_request(name: str, infos: tuple[InfoType, ...]) -> bytes:
    return encode_name(name) + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def decode_string(raw: bytes, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise ProtocolError(f"{what} is {len(raw)} bytes (the limit is {MAX_STRING})")
    return raw.decode("utf-8", errors="replace")


def apply_info(info: ExportInfo, itype: int, data: bytes) -> ExportInfo:
    """``info`` updated with one ``NBD_REP_INFO`` payload (unknown types are ignored)."""
    if itype == InfoType.EXPORT:
        if len(data) != INFO_EXPORT.size:
            raise ProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes (must be 12)")
        _, size, flags = INFO_EXPORT.unpack(data)
        return replace(info, size=size, flags=TxFlag(flags))
    if itype == InfoType.NAME:
        return replace(info, name=decode_string(data[2:], "export name"))
    if itype == InfoType.DESCRIPTION:
        return replace(info, description=decode_string(data[2:], "description"))
    if itype == InfoType.BLOCK_SIZE:
        return apply_block_size(info, data)
    return info


def apply_block_size(info: ExportInfo, data: bytes) -> ExportInfo:
    if len(data) != INFO_BLOCK_SIZE.size:
        raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes (must be 14)")
    _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
    if not is_power_of_two(minimum) or minimum > MAX_MIN_BLOCK:
        raise ProtocolError(f"minimum block size {minimum} is not a power of two up to 64 KiB")
    if (
        not is_power_of_two(preferred)
        or preferred < max(minimum, MIN_PREFERRED_BLOCK)
        or maximum < preferred
    ):
        raise ProtocolError(
            f"block sizes {minimum}/{preferred}/{maximum} (minimum/preferred/maximum) break "
            f"the spec: preferred must be a power of two of at least max(minimum, "
            f"{MIN_PREFERRED_BLOCK}), the maximum at least the preferred"
        )
    return replace(
        info,
        min_block=minimum,
        preferred_block=preferred,
        max_payload=maximum,
        block_size_given=True,
    )


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
