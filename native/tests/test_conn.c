/* Unit tests of native/src/conn.c: a native connection on one end of a
 * socketpair, NBD request bytes in, the exact reply bytes out (proto.md
 * "Simple reply message", "Structured reply chunk message"), and how it
 * ends: DISC, EOF, a protocol error, shutdown (answered or left for
 * replay), abort, and a client that stops reading. */
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

#include "check.h"
#include "fleeced.h"

#define SZ ((uint64_t)4 << 20)
#define EINVAL_NBD 22u

static uint8_t pat(uint64_t i) { return (uint8_t)(i * 7 + (i >> 10)); }

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }
static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void request(uint8_t *r, uint64_t cookie, uint16_t flags, uint16_t type,
                    uint64_t off, uint32_t len)
{
    put32(r, 0x25609513u);
    put16(r + 4, flags);
    put16(r + 6, type);
    put64(r + 8, cookie);
    put64(r + 16, off);
    put32(r + 24, len);
}

/* The engine's rules for a writable file export (engine.py _build_rules:
 * FUA everywhere, DF on READ, NO_HOLE and FAST_ZERO on WRITE_ZEROES,
 * REQ_ONE on BLOCK_STATUS; ENOSPC past the end of WRITE and
 * WRITE_ZEROES; 32 MiB maximum for READ and WRITE). */
static void rules(struct fl_conn_params *p, int structured)
{
    static const struct fl_conn_rule r[8] = {
        { 1 | 4, 0, 22, 32u << 20 },    /* READ */
        { 1, 0, 28, 32u << 20 },        /* WRITE */
        { 1, 0, 22, 0xffffffffu },      /* DISC */
        { 1, 0, 22, 0xffffffffu },      /* FLUSH */
        { 1, 0, 22, 0xffffffffu },      /* TRIM */
        { 1, 0, 22, 0xffffffffu },      /* CACHE */
        { 1 | 2 | 16, 0, 28, 0xffffffffu }, /* WRITE_ZEROES */
        { 1 | 8, 0, 22, 0xffffffffu },  /* BLOCK_STATUS */
    };

    memcpy(p->rules, r, sizeof r);
    p->size = SZ;
    p->min_block = 1;
    p->structured = (uint32_t)structured;
    p->trim = 1;
    if (!structured)
        p->rules[7].error = EINVAL_NBD;   /* no contexts without structured */
}

struct fixture {
    char path[4096];
    fl_file *f;
    fl_queue *q;
    fl_conn *c;
    int sv[2];
};

static void start(struct fixture *x, int structured, const uint8_t *initial, size_t n)
{
    struct fl_conn_params p;

    memset(&p, 0, sizeof p);
    make_image(x->path, SZ, pat);
    CHECK_RC(fl_file_open(x->path, 0, &x->f), 0);
    CHECK_RC(fl_queue_open(4, &x->q), 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, x->sv) == 0);
    rules(&p, structured);
    p.fd = x->sv[1];
    p.queue = x->q;
    p.file = x->f;
    p.initial = initial;
    p.initial_len = n;
    if (structured) {
        p.n_ctx = 2;
        p.ctx_id[0] = 7;
        p.ctx_kind[0] = FL_CTX_BASE_ALLOCATION;
        p.ctx_id[1] = 9;
        p.ctx_kind[1] = FL_CTX_ALLOCATION_DEPTH;
    }
    CHECK_RC(fl_conn_start(&p, &x->c), 0);
    close(x->sv[1]);    /* the connection has its own */
}

/* Wait (bounded) until the connection says it ended. */
static void wait_done(struct fixture *x)
{
    struct pollfd pf = { fl_conn_done_fd(x->c), POLLIN, 0 };

    CHECK(poll(&pf, 1, 10000) == 1);
}

static void finish(struct fixture *x)
{
    fl_conn_close(x->c);
    close(x->sv[0]);
    fl_queue_close(x->q);
    fl_file_close(x->f);
    unlink(x->path);
}

static void recv_all(int fd, uint8_t *buf, size_t n)
{
    size_t got = 0;

    while (got < n) {
        struct pollfd pf = { fd, POLLIN, 0 };
        ssize_t k;

        CHECK(poll(&pf, 1, 10000) == 1);
        k = recv(fd, buf + got, n - got, 0);
        CHECK(k > 0);
        got += (size_t)k;
    }
}

/* The simple reply to the FLUSH with COOKIE: its error. */
static int recv_answer(int fd, uint64_t cookie)
{
    uint8_t buf[16];

    recv_all(fd, buf, 16);
    CHECK(get32(buf) == 0x67446698 && buf[15] == (uint8_t)cookie);
    return (int)get32(buf + 4);
}

/* 1 when FD reaches EOF within 10 s with no more bytes. */
static int at_eof(int fd)
{
    struct pollfd pf = { fd, POLLIN, 0 };
    uint8_t b;

    return poll(&pf, 1, 10000) == 1 && recv(fd, &b, 1, 0) == 0;
}

static void test_simple_replies(void)
{
    struct fixture x;
    uint8_t req[28 + 512], hdr[16], data[512];
    static const uint8_t want[16] = {   /* magic, error 0, cookie 0x0102... */
        0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
    };

    start(&x, 0, NULL, 0);
    /* WRITE 512 bytes of 0xab at 4096, then (once acknowledged: NBD
     * does not order requests in flight) READ them back */
    request(req, 0x0102030405060708ull, 0, 1, 4096, 512);
    memset(req + 28, 0xab, 512);
    CHECK(send(x.sv[0], req, 28 + 512, 0) == 28 + 512);
    recv_all(x.sv[0], hdr, 16);
    CHECK(memcmp(hdr, want, 16) == 0);
    request(req, 0x0102030405060708ull, 0, 0, 4096, 512);
    CHECK(send(x.sv[0], req, 28, 0) == 28);
    recv_all(x.sv[0], hdr, 16);
    CHECK(memcmp(hdr, want, 16) == 0);
    recv_all(x.sv[0], data, 512);
    for (int i = 0; i < 512; i++)
        CHECK(data[i] == 0xab);
    /* a refused request: zero length, simple error EINVAL */
    request(req, 5, 0, 0, 0, 0);
    CHECK(send(x.sv[0], req, 28, 0) == 28);
    recv_all(x.sv[0], hdr, 16);
    CHECK(get32(hdr) == 0x67446698u && get32(hdr + 4) == EINVAL_NBD && hdr[15] == 5);
    /* DISC: no reply, the connection closes */
    request(req, 6, 0, 2, 0, 0);
    CHECK(send(x.sv[0], req, 28, 0) == 28);
    CHECK(at_eof(x.sv[0]));
    wait_done(&x);
    {
        struct fl_conn_stats st;

        fl_conn_stats(x.c, &st);
        CHECK(st.ended && st.requests == 3 && st.errors == 1);
        CHECK(st.bytes_read == 512 && st.bytes_written == 512);
        CHECK(st.reason[0] == '\0');
    }
    finish(&x);
}

static void test_structured_replies(void)
{
    struct fixture x;
    uint8_t req[28], buf[64];
    /* READ 16 bytes at 0x1000, cookie 1: OFFSET_DATA with DONE */
    static const uint8_t chunk[28] = {
        0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x01,
        0, 0, 0, 0, 0, 0, 0, 1,
        0x00, 0x00, 0x00, 0x18,
        0, 0, 0, 0, 0, 0, 0x10, 0x00,
    };
    const char *msg = "request beyond the end of the export";

    start(&x, 1, NULL, 0);
    request(req, 1, 0, 0, 0x1000, 16);
    CHECK(send(x.sv[0], req, 28, 0) == 28);
    recv_all(x.sv[0], buf, 28 + 16);
    CHECK(memcmp(buf, chunk, 28) == 0);
    for (int i = 0; i < 16; i++)
        CHECK(buf[28 + i] == pat(0x1000 + (uint64_t)i));
    /* past the end: an ERROR chunk with DONE, EINVAL and the engine's text */
    request(req, 2, 0, 0, SZ - 8, 16);
    CHECK(send(x.sv[0], req, 28, 0) == 28);
    recv_all(x.sv[0], buf, 20 + 6 + strlen(msg));
    CHECK(get32(buf) == 0x668e33efu && buf[5] == 1 && buf[6] == 0x80 && buf[7] == 0x01);
    CHECK(get32(buf + 16) == 6 + strlen(msg) && get32(buf + 20) == EINVAL_NBD);
    CHECK(memcmp(buf + 26, msg, strlen(msg)) == 0);
    /* BLOCK_STATUS with REQ_ONE: one chunk per context, one extent each,
     * DONE on the last; all data, allocation depth 1 */
    request(req, 3, 8, 7, 0, 65536);
    CHECK(send(x.sv[0], req, 28, 0) == 28);
    recv_all(x.sv[0], buf, 2 * 32);
    CHECK(buf[5] == 0 && buf[7] == 5 && get32(buf + 16) == 12 && get32(buf + 20) == 7);
    CHECK(get32(buf + 24) == 65536 && get32(buf + 28) == 0);
    CHECK(buf[32 + 5] == 1 && get32(buf + 32 + 20) == 9);
    CHECK(get32(buf + 32 + 24) == 65536 && get32(buf + 32 + 28) == 1);
    /* BLOCK_STATUS across a hole of the raw file: base:allocation data,
     * HOLE|ZERO, data; qemu:allocation-depth one extent of depth 1 (a
     * raw file owns all its bytes, holes included, as qemu-nbd -A says) */
    {
        uint8_t bs[80];
        int fd = open(x.path, O_RDWR | O_CLOEXEC);

        CHECK(fd >= 0);
        CHECK(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        1 << 20, 65536) == 0);
        close(fd);
        request(req, 4, 0, 7, (1 << 20) - 65536, 3 * 65536);
        CHECK(send(x.sv[0], req, 28, 0) == 28);
        recv_all(x.sv[0], bs, 48 + 32);
        CHECK(bs[5] == 0 && get32(bs + 16) == 4 + 3 * 8 && get32(bs + 20) == 7);
        CHECK(get32(bs + 24) == 65536 && get32(bs + 28) == 0);
        CHECK(get32(bs + 32) == 65536 && get32(bs + 36) == 3);
        CHECK(get32(bs + 40) == 65536 && get32(bs + 44) == 0);
        CHECK(bs[48 + 5] == 1 && get32(bs + 48 + 16) == 12 && get32(bs + 48 + 20) == 9);
        CHECK(get32(bs + 48 + 24) == 3 * 65536 && get32(bs + 48 + 28) == 1);
    }
    shutdown(x.sv[0], SHUT_WR);     /* EOF: closes once idle */
    CHECK(at_eof(x.sv[0]));
    wait_done(&x);
    finish(&x);
}

/* Requests buffered before the hand-over (initial) are served first, a
 * refused WRITE's payload is skipped, and a bad magic ends the connection
 * after what came before it was answered. */
static void test_initial_bytes_and_protocol_error(void)
{
    struct fixture x;
    uint8_t init[28 + 28 + 8 + 28], buf[32];
    struct fl_conn_stats st;

    request(init, 1, 0, 3, 0, 0);                   /* FLUSH */
    request(init + 28, 2, 4, 1, 0, 8);              /* WRITE with DF: refused */
    memset(init + 56, 0xee, 8);
    request(init + 64, 3, 0, 0, 0, 8);
    init[64] = 0x12;                                /* bad magic */
    start(&x, 0, init, sizeof init);
    recv_all(x.sv[0], buf, 32);     /* in either order: FLUSH ran in a worker */
    for (int i = 0; i < 2; i++) {
        const uint8_t *r = buf + 16 * i;

        CHECK(get32(r) == 0x67446698u);
        CHECK(r[15] == 1 ? get32(r + 4) == 0 : r[15] == 2 && get32(r + 4) == EINVAL_NBD);
    }
    CHECK(buf[15] != buf[31]);
    CHECK(at_eof(x.sv[0]));
    wait_done(&x);
    fl_conn_stats(x.c, &st);
    CHECK(strstr(st.reason, "bad request magic") != NULL);
    finish(&x);
    /* the refused WRITE did not reach the image */
}

/* Shutdown: what arrives from then on is answered ESHUTDOWN (108); with
 * replay it is dropped unanswered; either way the socket closes once the
 * client sent nothing more. */
static void test_shutdown(void)
{
    for (int replay = 0; replay < 2; replay++) {
        struct fixture x;
        uint8_t req[28];

        start(&x, 0, NULL, 0);
        /* Sent before the shutdown, so received: answered (done, when it
         * ran before the shutdown, else ESHUTDOWN) or, replaying, done or
         * left for the client to send again; never lost without either. */
        request(req, 4, 0, 3, 0, 0);
        CHECK(send(x.sv[0], req, 28, 0) == 28);
        fl_conn_shutdown(x.c, replay);
        if (!replay) {
            int err = recv_answer(x.sv[0], 4);

            CHECK(err == 0 || err == 108);
        } else {
            struct pollfd pf = { x.sv[0], POLLIN, 0 };
            uint8_t b;

            CHECK(poll(&pf, 1, 10000) == 1);
            if (recv(x.sv[0], &b, 1, MSG_PEEK) > 0)
                CHECK(recv_answer(x.sv[0], 4) == 0);
        }
        CHECK(at_eof(x.sv[0]));
        wait_done(&x);
        finish(&x);
    }
}

/* A request that races the decision to close: the server has answered
 * everything and ends the connection as the client sends one more.  The
 * end must not reset the connection (AF_UNIX and TCP both do when a socket
 * is closed with unread bytes), or the client loses the reply it has not
 * read yet: it gets that reply, then EOF (or, when the request came in
 * time, its ESHUTDOWN answer first).  Without the lingering end, the second
 * send fails (EPIPE) or the first reply is lost to the reset. */
static void test_request_racing_the_close(void)
{
    struct fixture x;
    uint8_t req[28], buf[16];
    int err;

    start(&x, 0, NULL, 0);
    request(req, 1, 0, 3, 0, 0);
    CHECK(send(x.sv[0], req, 28, MSG_NOSIGNAL) == 28);
    fl_conn_shutdown(x.c, 0);
    usleep(50000);      /* answered, nothing more to read: the end begins */
    request(req, 2, 0, 3, 0, 0);
    CHECK(send(x.sv[0], req, 28, MSG_NOSIGNAL) == 28);
    err = recv_answer(x.sv[0], 1);
    CHECK(err == 0 || err == 108);
    {
        struct pollfd pf = { x.sv[0], POLLIN, 0 };
        ssize_t n;

        CHECK(poll(&pf, 1, 10000) == 1);
        n = recv(x.sv[0], buf, 16, MSG_WAITALL);
        if (n == 16) {
            CHECK(buf[15] == 2 && get32(buf + 4) == 108);
            CHECK(at_eof(x.sv[0]));
        } else {
            CHECK(n == 0);
        }
    }
    wait_done(&x);
    finish(&x);
}

/* A client that sends 200 READs of 1 MiB and never reads: the connection
 * stops taking requests at its budget (a few MiB held, not 200), and an
 * abort ends it with everything released. */
static void test_client_that_never_reads(void)
{
    struct fixture x;
    struct fl_conn_stats st;
    int sent;

    start(&x, 0, NULL, 0);
    {
        static uint8_t reqs[200 * 28];

        for (int i = 0; i < 200; i++)
            request(reqs + 28 * i, (uint64_t)i, 0, 0, 0, 1u << 20);
        /* 5.6 KB of requests fit in the socket buffer at once */
        sent = (int)send(x.sv[0], reqs, sizeof reqs, MSG_DONTWAIT) / 28;
    }
    CHECK(sent == 200);
    usleep(300000);
    fl_conn_stats(x.c, &st);
    CHECK(st.requests < 20);
    fl_conn_abort(x.c);
    wait_done(&x);
    fl_conn_stats(x.c, &st);
    CHECK(st.ended && st.in_flight == 0);
    finish(&x);
}

/* The same client going away without reading: the connection ends by
 * itself (its receive thread waited for budget the client would never
 * free, until an abort that only the daemon's shutdown sent). */
static void test_client_that_vanishes_unread(void)
{
    static uint8_t reqs[200 * 28];
    struct fixture x;
    struct fl_conn_stats st;
    int sent;

    start(&x, 0, NULL, 0);
    for (int i = 0; i < 200; i++)
        request(reqs + 28 * i, (uint64_t)i, 0, 0, 0, 1u << 20);
    sent = (int)send(x.sv[0], reqs, sizeof reqs, MSG_DONTWAIT) / 28;
    CHECK(sent == 200);
    /* Until the connection holds its budget and waits for the client. */
    for (int i = 0; i < 1000; i++) {
        fl_conn_stats(x.c, &st);
        if (st.reply_bytes >= (4u << 20))
            break;
        usleep(10000);
    }
    CHECK(st.reply_bytes >= (4u << 20) && st.reply_bytes <= (5u << 20));
    close(x.sv[0]);
    x.sv[0] = -1;
    wait_done(&x);
    fl_conn_stats(x.c, &st);
    CHECK(st.ended && st.in_flight == 0 && st.reply_bytes == 0);
    finish(&x);
}

/* A READ longer than a piece: simple header once, then the data. */
static void test_streamed_read(void)
{
    struct fixture x;
    uint32_t len = (3u << 20) + 512;
    uint8_t req[28], hdr[16];
    uint8_t *data = malloc(len);

    CHECK(data != NULL);
    start(&x, 0, NULL, 0);
    request(req, 9, 0, 0, 4096, len);
    CHECK(send(x.sv[0], req, 28, 0) == 28);
    recv_all(x.sv[0], hdr, 16);
    CHECK(get32(hdr) == 0x67446698u && get32(hdr + 4) == 0 && hdr[15] == 9);
    recv_all(x.sv[0], data, len);
    for (uint32_t i = 0; i < len; i++)
        CHECK(data[i] == pat(4096 + (uint64_t)i));
    free(data);
    shutdown(x.sv[0], SHUT_WR);
    CHECK(at_eof(x.sv[0]));
    wait_done(&x);
    finish(&x);
}

int main(void)
{
    fprintf(stderr, "test_conn\n");
    RUN(test_simple_replies);
    RUN(test_structured_replies);
    RUN(test_initial_bytes_and_protocol_error);
    RUN(test_shutdown);
    RUN(test_request_racing_the_close);
    RUN(test_client_that_never_reads);
    RUN(test_client_that_vanishes_unread);
    RUN(test_streamed_read);
    fprintf(stderr, "test_conn: OK\n");
    return 0;
}
