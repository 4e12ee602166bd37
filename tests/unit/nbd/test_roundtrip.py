"""A whole session through the in-memory client helper (h11 ConnectionPair style)."""

from __future__ import annotations

import struct

from fleeced.nbd import (
    Command,
    Disconnect,
    ExportChosen,
    NbdCmd,
    NbdCmdFlag,
    NbdErrno,
    NbdOpt,
    NbdRep,
    Rejected,
)
from tests.helpers import (
    DISK,
    Reader,
    client_flags,
    drain_events,
    make_server,
    meta_payload,
    name_info_payload,
    option,
    request,
)


def test_session() -> None:
    server = make_server()
    client = Reader()
    client.feed(server.data_to_send())
    assert client.greeting() == 3

    server.receive_data(
        client_flags()
        + option(NbdOpt.STRUCTURED_REPLY)
        + option(NbdOpt.SET_META_CONTEXT, meta_payload("disk", ["base:allocation"]))
        + option(NbdOpt.GO, name_info_payload("disk"))
    )
    assert drain_events(server) == [ExportChosen(DISK)]
    client.feed(server.data_to_send())
    assert client.opt_reply().type == NbdRep.ACK
    ctx = client.opt_reply()
    assert ctx.type == NbdRep.META_CONTEXT and ctx.data == b"\0\0\0\x01base:allocation"
    assert [r.type for r in client.opt_replies()][-1] == NbdRep.ACK

    server.receive_data(
        request(NbdCmd.WRITE, 1, 0, 3, NbdCmdFlag.FUA, b"abc")
        + request(NbdCmd.READ, 2, 0, 3)
        + request(NbdCmd.BLOCK_STATUS, 3, 0, 4096, NbdCmdFlag.REQ_ONE)
        + request(NbdCmd.READ, 4, DISK.size, 1)
        + request(NbdCmd.DISC, 5)
    )
    events = drain_events(server)
    assert events == [
        Command(1, NbdCmd.WRITE, NbdCmdFlag.FUA, 0, 3, b"abc"),
        Command(2, NbdCmd.READ, NbdCmdFlag(0), 0, 3),
        Command(3, NbdCmd.BLOCK_STATUS, NbdCmdFlag.REQ_ONE, 0, 4096),
        Rejected(4, NbdCmd.READ, NbdErrno.EINVAL),
        Disconnect(),
    ]
    assert server.meta_contexts == {1: "base:allocation"}
    server.reply_ok(1)
    server.reply_read(2, 0, b"abc")
    server.reply_block_status(3, [(1, [(4096, 0)])])
    client.feed(server.data_to_send())
    assert client.reply_error() == (4, 22)
    assert client.simple().cookie == 1
    data = client.chunk()
    assert (data.cookie, data.payload) == (2, struct.pack(">Q", 0) + b"abc")
    bs = client.chunk()
    assert (bs.cookie, bs.flags, bs.payload) == (3, 1, struct.pack(">III", 1, 4096, 0))
    assert client.empty()
