"""Precompiled :class:`struct.Struct` layouts of the NBD wire format.  Pack/unpack only.

All integers are big-endian (proto.md "Conventions").
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "GREETING",
    "CLIENT_FLAGS",
    "OPTION_HEADER",
    "OPTION_REPLY_HEADER",
    "EXPORT_NAME_REPLY",
    "U16",
    "U32",
    "INFO_EXPORT",
    "INFO_BLOCK_SIZE",
    "REQUEST",
    "SIMPLE_REPLY",
    "CHUNK_HEADER",
    "CHUNK_OFFSET_DATA",
    "CHUNK_OFFSET_HOLE",
    "CHUNK_ERROR",
    "EXTENT",
]

# S: 64 bits 'NBDMAGIC', 64 bits 'IHAVEOPT', 16 bits handshake flags.
GREETING: Final = struct.Struct(">QQH")
# C: 32 bits client flags.
CLIENT_FLAGS: Final = struct.Struct(">I")
# C: 64 bits 'IHAVEOPT', 32 bits option, 32 bits length of option data.
OPTION_HEADER: Final = struct.Struct(">QII")
# S: 64 bits 0x3e889045565a9, 32 bits option, 32 bits reply type, 32 bits length.
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
# S (NBD_OPT_EXPORT_NAME success): 64 bits size, 16 bits transmission flags.
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
# NBD_REP_INFO payloads: 16 bits info type, then the fields.
INFO_EXPORT: Final = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, flags
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, pref, max

# C: 32 bits magic, 16 bits flags, 16 bits type, 64 bits cookie, 64 bits offset,
#    32 bits length (28 bytes).
REQUEST: Final = struct.Struct(">IHHQQI")
# S: 32 bits magic, 32 bits error, 64 bits cookie (16 bytes).
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
# S: 32 bits magic, 16 bits flags, 16 bits type, 64 bits cookie, 32 bits length.
CHUNK_HEADER: Final = struct.Struct(">IHHQI")
# Chunk header followed by the fixed leading part of some payloads.
CHUNK_OFFSET_DATA: Final = struct.Struct(">IHHQIQ")  # + 64 bits offset
CHUNK_OFFSET_HOLE: Final = struct.Struct(">IHHQIQI")  # + 64 bits offset, 32 bits size
CHUNK_ERROR: Final = struct.Struct(">IHHQIIH")  # + 32 bits error, 16 bits message length
# Block status descriptor: 32 bits length, 32 bits status flags.
EXTENT: Final = struct.Struct(">II")
