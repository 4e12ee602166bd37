"""What the engine needs to know about an export: size, capabilities, block sizes.

The transmission flags are *derived* from the capabilities here, never hard-coded in
the handshake (as nbdkit's ``backend_can_*``).  Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import MAX_PAYLOAD, MAX_STRING, TransmissionFlag

__all__ = ["ExportInfo"]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """Immutable description of one export as the NBD engine sees it.

    :param name: export name (UTF-8, at most 4096 bytes, no NUL).
    :param size: size in bytes.
    :param description: shown by ``NBD_OPT_LIST`` / ``NBD_INFO_DESCRIPTION`` if non-empty.
    :param read_only: advertise READ_ONLY; WRITE, WRITE_ZEROES and TRIM get EPERM.
    :param can_write: with ``read_only=False``, ``False`` refuses WRITE/WRITE_ZEROES
        (EPERM) but still allows TRIM (the snapshot export).
    :param can_trim: advertise and accept NBD_CMD_TRIM.
    :param can_write_zeroes: advertise and accept NBD_CMD_WRITE_ZEROES.
    :param can_fast_zero: advertise NBD_FLAG_SEND_FAST_ZERO (only with write zeroes).
    :param can_flush: advertise and accept NBD_CMD_FLUSH.
    :param can_fua: advertise NBD_FLAG_SEND_FUA (never on read-only exports).
    :param can_multi_conn: advertise NBD_FLAG_CAN_MULTI_CONN.
    :param can_cache: advertise and accept NBD_CMD_CACHE.
    :param can_df: advertise NBD_FLAG_SEND_DF (only with structured replies).
    :param min_block: minimum block size, a power of two <= 64 KiB.
    :param pref_block: preferred block size, a power of two >= ``min_block``.
    :param max_block: largest READ/WRITE accepted; a multiple of ``min_block``,
        at most :data:`MAX_PAYLOAD`.
    :param meta_contexts: metadata context names offered for this export.
    :raise ValueError: if a field is out of range.
    """

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_write: bool = True
    can_trim: bool = True
    can_write_zeroes: bool = True
    can_fast_zero: bool = True
    can_flush: bool = True
    can_fua: bool = True
    can_multi_conn: bool = False
    can_cache: bool = True
    can_df: bool = True
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    meta_contexts: tuple[str, ...] = ("base:allocation",)

    def __post_init__(self) -> None:
        encoded = self.name.encode("utf-8")
        if len(encoded) > MAX_STRING or b"\0" in encoded:
            raise ValueError(f"invalid export name {self.name!r}")
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size out of range: {self.size}")
        # proto.md "Block size constraints".
        if not _is_pow2(self.min_block) or self.min_block > 64 * 1024:
            raise ValueError(f"min_block must be a power of two <= 64 KiB: {self.min_block}")
        if not _is_pow2(self.pref_block) or self.pref_block < self.min_block:
            raise ValueError(f"pref_block must be a power of two >= min_block: {self.pref_block}")
        if (
            self.max_block < self.min_block
            or self.max_block % self.min_block
            or self.max_block > MAX_PAYLOAD
        ):
            raise ValueError(f"max_block out of range: {self.max_block}")
        for ctx in self.meta_contexts:
            if not ctx or ":" not in ctx or len(ctx.encode("utf-8")) > MAX_STRING:
                raise ValueError(f"invalid metadata context name {ctx!r}")

    @property
    def writable(self) -> bool:
        """True if WRITE and WRITE_ZEROES are allowed."""
        return self.can_write and not self.read_only

    def transmission_flags(self, structured: bool = False) -> TransmissionFlag:
        """Derive the 16-bit transmission flags sent at the end of the handshake.

        Read-only exports advertise neither TRIM, WRITE_ZEROES, FAST_ZERO nor FUA.
        FAST_ZERO needs WRITE_ZEROES (proto.md), DF needs structured replies.

        :param structured: whether structured replies were negotiated.
        :return: the flags, always including HAS_FLAGS.
        """
        f = TransmissionFlag.HAS_FLAGS
        if self.read_only:
            f |= TransmissionFlag.READ_ONLY
        if self.can_flush:
            f |= TransmissionFlag.SEND_FLUSH
        if self.can_fua and not self.read_only:
            f |= TransmissionFlag.SEND_FUA
        if self.can_trim and not self.read_only:
            f |= TransmissionFlag.SEND_TRIM
        if self.can_write_zeroes and self.writable:
            f |= TransmissionFlag.SEND_WRITE_ZEROES
            if self.can_fast_zero:
                f |= TransmissionFlag.SEND_FAST_ZERO
        if self.can_df and structured:
            f |= TransmissionFlag.SEND_DF
        if self.can_multi_conn:
            f |= TransmissionFlag.CAN_MULTI_CONN
        if self.can_cache:
            f |= TransmissionFlag.SEND_CACHE
        return f
