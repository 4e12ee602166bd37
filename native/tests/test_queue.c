/* fl_queue: submit from one thread, reap by polling the eventfd; every
 * operation completes exactly once with the right result, including
 * errors, and close() finishes what was queued. */
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>

#include "check.h"
#include "fleeced.h"

static uint8_t pat(uint64_t i) { return (uint8_t)(i * 13 + 1); }

#define NOPS 512u
#define BS   4096u

static size_t reap_all(fl_queue *q, int *seen, int32_t *rcs_by_id,
                       size_t want)
{
    uint64_t ids[64];
    int32_t rcs[64], holes[64];
    size_t n, got = 0;
    struct pollfd p = { .fd = fl_queue_fd(q), .events = POLLIN };

    while (got < want) {
        CHECK(poll(&p, 1, 10000) == 1);
        CHECK_RC(fl_queue_reap(q, ids, rcs, holes, 64, &n), 0);
        for (size_t i = 0; i < n; i++) {
            CHECK(ids[i] < NOPS * 2);
            CHECK(seen[ids[i]] == 0);   /* exactly once */
            seen[ids[i]] = 1;
            rcs_by_id[ids[i]] = rcs[i];
        }
        got += n;
    }
    return got;
}

static void test_read_write_errors(void)
{
    char path[4096];
    fl_file *f;
    fl_queue *q;
    static uint8_t bufs[NOPS][BS];
    static int seen[NOPS * 2];
    static int32_t rcs[NOPS * 2];
    uint64_t size = (uint64_t)NOPS * BS;

    make_image(path, size, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_queue_open(0, &q), -EINVAL);
    CHECK_RC(fl_queue_open(65, &q), -EINVAL);
    CHECK_RC(fl_queue_open(4, &q), 0);

    /* reads of every block */
    for (unsigned i = 0; i < NOPS; i++)
        CHECK_RC(fl_queue_submit(q, i, FL_OP_READ, f, bufs[i], BS,
                                 (uint64_t)i * BS, 0), 0);
    CHECK(reap_all(q, seen, rcs, NOPS) == NOPS);
    for (unsigned i = 0; i < NOPS; i++) {
        CHECK(rcs[i] == 0);
        for (unsigned j = 0; j < BS; j++)
            CHECK(bufs[i][j] == pat((uint64_t)i * BS + j));
    }
    /* writes, plus failing ops: out of range, and a bad kind */
    memset(seen, 0, sizeof seen);
    for (unsigned i = 0; i < NOPS; i++) {
        memset(bufs[i], (int)(i & 0xff), BS);
        CHECK_RC(fl_queue_submit(q, NOPS + i, FL_OP_WRITE, f, bufs[i], BS,
                                 (uint64_t)i * BS, i % 7 == 0 ? FL_FUA : 0),
                 0);
    }
    CHECK_RC(fl_queue_submit(q, 0, FL_OP_READ, f, bufs[0], BS, size, 0), 0);
    CHECK_RC(fl_queue_submit(q, 1, 99, f, NULL, 0, 0, 0), -EINVAL);
    CHECK_RC(fl_queue_submit(q, 1, FL_OP_FLUSH, f, NULL, 0, 0, 0), 0);
    CHECK(reap_all(q, seen, rcs, NOPS + 2) == NOPS + 2);
    CHECK(rcs[0] == -EINVAL);
    CHECK(rcs[1] == 0);
    for (unsigned i = 0; i < NOPS; i++) {
        uint8_t b[BS];
        CHECK(rcs[NOPS + i] == 0);
        CHECK_RC(fl_file_read(f, b, BS, (uint64_t)i * BS, NULL), 0);
        CHECK(b[0] == (uint8_t)(i & 0xff) && b[BS - 1] == (uint8_t)(i & 0xff));
    }
    /* close finishes queued work */
    memset(bufs[31], 0x5a, BS);
    for (unsigned i = 0; i < 32; i++)
        CHECK_RC(fl_queue_submit(q, i, FL_OP_READ, f, bufs[i], BS, 0, 0), 0);
    fl_queue_close(q);
    CHECK(bufs[31][0] == 0 && bufs[31][BS - 1] == 0); /* block 0 was written 0x00 */
    fl_file_close(f);
    unlink(path);
}

static void test_snapshot_ops(void)
{
    char path[4096];
    fl_file *f;
    fl_session *s;
    fl_queue *q;
    static uint8_t buf[65536];
    static int seen[NOPS * 2];
    static int32_t rcs[NOPS * 2];
    struct fl_session_params p = { .cluster_size = 65536,
                                   .temp_dir = test_tmpdir(),
                                   .policy = FL_BREAK_SNAPSHOT };

    make_image(path, 1 << 20, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_session_open(f, &p, &s), 0);
    CHECK_RC(fl_queue_open(2, &q), 0);
    memset(buf, 0xee, sizeof buf);
    CHECK_RC(fl_queue_submit(q, 1, FL_OP_WRITE, f, buf, 65536, 0, 0), 0);
    CHECK(reap_all(q, seen, rcs, 1) == 1 && rcs[1] == 0);
    CHECK_RC(fl_queue_submit(q, 2, FL_OP_SNAP_READ, s, buf, 65536, 0, 0), 0);
    CHECK(reap_all(q, seen, rcs, 1) == 1 && rcs[2] == 0);
    for (unsigned j = 0; j < 65536; j++)
        CHECK(buf[j] == pat(j));
    CHECK_RC(fl_queue_submit(q, 3, FL_OP_SNAP_DISCARD, s, NULL, 65536, 0, 0),
             0);
    CHECK(reap_all(q, seen, rcs, 1) == 1 && rcs[3] == 0);
    CHECK_RC(fl_queue_submit(q, 4, FL_OP_SNAP_READ, s, buf, 4096, 0, 0), 0);
    CHECK(reap_all(q, seen, rcs, 1) == 1 && rcs[4] == -EPERM);
    fl_queue_close(q);
    fl_session_close(s);
    fl_file_close(f);
    unlink(path);
}

static void reap_one(fl_queue *q, uint64_t want_id, int32_t *rc,
                     int32_t *bits)
{
    uint64_t id;
    size_t n = 0;
    struct pollfd p = { .fd = fl_queue_fd(q), .events = POLLIN };

    while (n == 0) {
        CHECK(poll(&p, 1, 10000) == 1);
        CHECK_RC(fl_queue_reap(q, &id, rc, bits, 1, &n), 0);
    }
    CHECK(id == want_id);
}

static size_t drain(int fd, uint8_t *to, size_t max)
{
    size_t have = 0;
    ssize_t r;

    while (have < max && (r = recv(fd, to + have, max - have, 0)) > 0)
        have += (size_t)r;
    return have;
}

/* Worker-written replies: a reply that fits goes out whole; one that does
 * not goes out in part and stalls the socket until fl_sock_resume (later
 * reads come back deferred, unread; later writes are done and leave their
 * reply to the caller); a hole or a failed read sends nothing;
 * a dead peer tears the stream. */
static void test_send(void)
{
    char path[4096];
    fl_file *f;
    fl_queue *q;
    fl_sock *sk;
    int sv[2], small = 4096;
    static uint8_t buf[4][65536], got[1 << 20], big[1 << 20];
    uint8_t hdr[16];
    int32_t rc, rc3, bits;
    size_t have;

    make_image(path, 1 << 20, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
    CHECK_RC(fl_sock_open(-1, &sk), -EINVAL);
    CHECK_RC(fl_sock_open(sv[0], &sk), 0);
    CHECK_RC(fl_queue_open(2, &q), 0);
    memset(hdr, 0xab, sizeof hdr);

    /* fits: sent whole */
    CHECK_RC(fl_queue_submit_send(q, 1, FL_OP_READ, f, buf[0], 8192, 4096,
                                  sk, hdr, sizeof hdr, 0), 0);
    reap_one(q, 1, &rc, &bits);
    CHECK(rc == 0 && bits == FL_DONE_SENT);
    have = drain(sv[1], got, sizeof got);
    CHECK(have == 16 + 8192 && memcmp(got, hdr, 16) == 0);
    for (unsigned j = 0; j < 8192; j++)
        CHECK(got[16 + j] == pat(4096 + j));

    /* does not fit: partial, stalled; the next read is deferred.  The
     * part sent comes from the file (sendfile), the rest is in the buffer
     * for the caller, and the two make the whole data. */
    CHECK(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
    CHECK_RC(fl_queue_submit_send(q, 2, FL_OP_READ, f, big, 1 << 20, 0, sk,
                                  hdr, sizeof hdr, 0), 0);
    reap_one(q, 2, &rc, &bits);
    CHECK(bits == FL_DONE_SENT && rc > 16 && rc < 16 + (1 << 20));
    memset(buf[2], 0xcc, sizeof buf[2]);
    CHECK_RC(fl_queue_submit_send(q, 3, FL_OP_READ, f, buf[2], 65536, 0, sk,
                                  hdr, sizeof hdr, 0), 0);
    reap_one(q, 3, &rc3, &bits);
    CHECK(rc3 == 0 && bits == FL_DONE_DEFER);  /* deferred: not even read */
    CHECK(buf[2][100] == 0xcc);
    have = drain(sv[1], got, sizeof got);
    CHECK(have == (size_t)rc);            /* only reply 2's part */
    CHECK(memcmp(got, hdr, 16) == 0);
    for (size_t j = 16; j < have; j++)
        CHECK(got[j] == pat(j - 16));
    for (size_t j = have - 16; j < (1 << 20); j++)
        CHECK(big[j] == pat(j));
    /* (after the data check: the socket held page references to it) */
    /* a write is never deferred: it is done, its ack left to the caller */
    memset(buf[1], 0x77, 4096);
    CHECK_RC(fl_queue_submit_send(q, 9, FL_OP_WRITE, f, buf[1], 4096,
                                  12288, sk, hdr, sizeof hdr, 0), 0);
    reap_one(q, 9, &rc3, &bits);
    CHECK(rc3 == 0 && bits == 0);
    CHECK_RC(fl_file_read(f, buf[2], 4096, 12288, NULL), 0);
    CHECK(buf[2][0] == 0x77 && buf[2][4095] == 0x77);
    CHECK(recv(sv[1], got, 1, 0) < 0 && errno == EAGAIN);
    fl_sock_resume(sk);

    /* a piece of a reply whose header went out before: data alone */
    CHECK_RC(fl_queue_submit_send(q, 10, FL_OP_READ, f, buf[1], 4096, 65536,
                                  sk, hdr, 0, 0), 0);
    reap_one(q, 10, &rc, &bits);
    CHECK(rc == 0 && bits == FL_DONE_SENT);
    have = drain(sv[1], got, sizeof got);
    CHECK(have == 4096);
    for (unsigned j = 0; j < 4096; j++)
        CHECK(got[j] == pat(65536 + j));
    /* read errors send nothing */
    CHECK_RC(fl_queue_submit_send(q, 4, FL_OP_READ, f, buf[1], 4096,
                                  1 << 20, sk, hdr, sizeof hdr, 0), 0);
    reap_one(q, 4, &rc, &bits);
    CHECK(rc == -EINVAL && bits == 0);
    CHECK(recv(sv[1], got, 1, 0) < 0 && errno == EAGAIN);
    /* a write's reply is the header alone, sent once the write is done */
    memset(buf[1], 0x5a, 4096);
    CHECK_RC(fl_queue_submit_send(q, 7, FL_OP_WRITE, f, buf[1], 4096, 8192,
                                  sk, hdr, sizeof hdr, FL_FUA), 0);
    reap_one(q, 7, &rc, &bits);
    CHECK(rc == 0 && bits == FL_DONE_SENT);
    have = drain(sv[1], got, sizeof got);
    CHECK(have == 16 && memcmp(got, hdr, 16) == 0);
    CHECK_RC(fl_file_read(f, got, 4096, 8192, NULL), 0);
    CHECK(got[0] == 0x5a && got[4095] == 0x5a);
    /* a failed write sends nothing (the caller answers the error) */
    CHECK_RC(fl_queue_submit_send(q, 8, FL_OP_WRITE, f, buf[1], 4096,
                                  1 << 20, sk, hdr, sizeof hdr, 0), 0);
    reap_one(q, 8, &rc, &bits);
    CHECK(rc == -EINVAL && bits == 0);
    CHECK(recv(sv[1], got, 1, 0) < 0 && errno == EAGAIN);
    /* bad arguments */
    CHECK_RC(fl_queue_submit_send(q, 5, FL_OP_WRITE, f, buf[1], 1, 0, sk,
                                  hdr, sizeof hdr, FL_MAY_TRIM), -EINVAL);
    CHECK_RC(fl_queue_submit_send(q, 5, FL_OP_ZERO, f, buf[1], 1, 0, sk,
                                  hdr, sizeof hdr, 0), -EINVAL);
    CHECK_RC(fl_queue_submit_send(q, 5, FL_OP_READ, f, buf[1], 0, 0, sk,
                                  hdr, sizeof hdr, 0), -EINVAL);
    CHECK_RC(fl_queue_submit_send(q, 5, FL_OP_READ, f, buf[1], 1, 0, sk,
                                  hdr, 33, 0), -EINVAL);
    CHECK_RC(fl_queue_submit_send(q, 5, FL_OP_WRITE, f, buf[1], 1, 0, sk,
                                  hdr, 0, 0), -EINVAL);   /* an ack has a header */
    CHECK_RC(fl_queue_submit_send(q, 5, FL_OP_READ, f, buf[1], 1, 0, sk,
                                  hdr, 16, 1), -EINVAL);
    /* peer gone: the send fails with the SENT bit (stream torn) */
    close(sv[1]);
    CHECK_RC(fl_queue_submit_send(q, 6, FL_OP_READ, f, buf[3], 4096, 0, sk,
                                  hdr, sizeof hdr, 0), 0);
    reap_one(q, 6, &rc, &bits);
    CHECK(rc < 0 && bits == FL_DONE_SENT);
    fl_queue_close(q);
    fl_sock_close(sk);
    close(sv[0]);
    fl_file_close(f);
    unlink(path);
}

/* Reap every completion until WANT arrived; ORDER[i] gets the i-th id. */
static void reap_order(fl_queue *q, uint64_t *order, int32_t *rc_by_id,
                       size_t want, size_t ids_max)
{
    uint64_t ids[16];
    int32_t rcs[16], holes[16];
    size_t n, got = 0;
    struct pollfd p = { .fd = fl_queue_fd(q), .events = POLLIN };

    while (got < want) {
        CHECK(poll(&p, 1, 20000) == 1);
        CHECK_RC(fl_queue_reap(q, ids, rcs, holes, 16, &n), 0);
        for (size_t i = 0; i < n; i++) {
            CHECK(ids[i] < ids_max);
            order[got + i] = ids[i];
            rc_by_id[ids[i]] = rcs[i];
        }
        got += n;
    }
}

/* Idle workers that saw the snapshot class at its cap must be
 * woken again when the cap frees and when the queue closes.  With slow
 * snapshot reads, 4 workers (cap 3) and more reads than the cap, close
 * hung for ever in pthread_join.  alarm() turns a hang into a failure. */
static void test_close_after_cap(void)
{
    char path[4096];
    fl_file *f;
    fl_session *s;
    fl_queue *q;
    static uint8_t buf[8][4096];
    uint64_t order[8];
    int32_t rcs[8];
    struct fl_session_params p = { .cluster_size = 65536,
                                   .temp_dir = test_tmpdir(),
                                   .policy = FL_BREAK_SNAPSHOT };

    make_image(path, 1 << 20, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_session_open(f, &p, &s), 0);
    for (int round = 0; round < 2; round++) {
        alarm(30);
        CHECK_RC(fl_queue_open(4, &q), 0);
        CHECK_RC(fl_queue_inject_delay(q, FL_OP_SNAP_READ, 50), 0);
        for (unsigned i = 0; i < 8; i++)
            CHECK_RC(fl_queue_submit(q, i, FL_OP_SNAP_READ, s, buf[i], 4096,
                                     (uint64_t)i * 4096, 0), 0);
        if (round == 0)         /* every read completes ... */
            reap_order(q, order, rcs, 8, 8);
        fl_queue_close(q);      /* ... and close returns, drained or not */
        alarm(0);
        for (unsigned i = 0; round == 0 && i < 8; i++)
            CHECK(rcs[i] == 0 && buf[i][0] == pat((uint64_t)i * 4096));
    }
    fl_session_close(s);
    fl_file_close(f);
    unlink(path);
}

/* A snapshot op queued behind slow guest ops is taken by an
 * idle worker at once (it waited 2.9 s with 6 idle workers when enqueue
 * assumed a busy worker would take it): it completes before them. */
static void test_no_wait_behind_busy(void)
{
    char path[4096];
    fl_file *f;
    fl_session *s;
    fl_queue *q;
    static uint8_t wbuf[2][4096], rbuf[4096];
    uint64_t order[3];
    int32_t rcs[3];
    struct fl_session_params p = { .cluster_size = 65536,
                                   .temp_dir = test_tmpdir(),
                                   .policy = FL_BREAK_SNAPSHOT };

    make_image(path, 1 << 20, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_session_open(f, &p, &s), 0);
    CHECK_RC(fl_queue_open(8, &q), 0);
    CHECK_RC(fl_queue_inject_delay(q, FL_OP_WRITE, 1500), 0);
    memset(wbuf, 0x11, sizeof wbuf);
    CHECK_RC(fl_queue_submit(q, 0, FL_OP_WRITE, f, wbuf[0], 4096, 1 << 19, 0), 0);
    CHECK_RC(fl_queue_submit(q, 1, FL_OP_WRITE, f, wbuf[1], 4096, 3 << 18, 0), 0);
    CHECK_RC(fl_queue_submit(q, 2, FL_OP_SNAP_READ, s, rbuf, 4096, 0, 0), 0);
    reap_order(q, order, rcs, 3, 3);
    CHECK(order[0] == 2);       /* the read did not wait for the writes */
    CHECK(rcs[0] == 0 && rcs[1] == 0 && rcs[2] == 0);
    fl_queue_close(q);
    fl_session_close(s);
    fl_file_close(f);
    unlink(path);
}

/* The owner closes the session, the file and the socket while
 * operations on them are queued and running.  They must keep the objects
 * alive (ASan reports any use after free) and fail -ESHUTDOWN when they
 * start after the close; the last reference frees everything (ASan's leak
 * check). */
static void test_close_with_ops_queued(void)
{
    char path[4096];
    fl_file *f;
    fl_session *s;
    fl_queue *q;
    fl_sock *sk;
    int sv[2];
    static uint8_t buf[64][65536];
    uint8_t hdr[16] = { 0 };
    uint64_t order[64];
    int32_t rcs[64];
    unsigned shut = 0;
    struct fl_session_params p = { .cluster_size = 65536,
                                   .temp_dir = test_tmpdir(),
                                   .policy = FL_BREAK_SNAPSHOT };

    make_image(path, 4 << 20, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_session_open(f, &p, &s), 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
    CHECK_RC(fl_sock_open(sv[0], &sk), 0);
    CHECK_RC(fl_queue_open(2, &q), 0);
    CHECK_RC(fl_queue_inject_delay(q, FL_OP_SNAP_READ, 5), 0);
    for (unsigned i = 0; i < 32; i++)
        CHECK_RC(fl_queue_submit_send(q, i, FL_OP_SNAP_READ, s, buf[i], 65536,
                                      (uint64_t)i * 65536, sk, hdr, 16, 0), 0);
    for (unsigned i = 32; i < 48; i++)
        CHECK_RC(fl_queue_submit(q, i, FL_OP_SNAP_DISCARD, s, NULL, 65536,
                                 (uint64_t)i * 65536, 0), 0);
    for (unsigned i = 48; i < 64; i++)
        CHECK_RC(fl_queue_submit(q, i, FL_OP_WRITE, f, buf[i], 65536,
                                 (uint64_t)i * 65536, 0), 0);
    close(sv[1]);               /* the client vanished */
    fl_sock_close(sk);
    close(sv[0]);
    fl_session_close(s);        /* fleece-stop */
    fl_file_close(f);           /* shutdown */
    reap_order(q, order, rcs, 64, 64);
    for (unsigned i = 0; i < 64; i++)
        shut += rcs[i] == -ESHUTDOWN;
    CHECK(shut > 0);            /* most ran after the closes */
    fl_queue_close(q);
    unlink(path);
}

/* Block status, session open and session close through the queue. */
static void test_control_ops(void)
{
    char path[4096];
    fl_file *f;
    fl_session *s = NULL;
    fl_queue *q;
    static uint8_t buf[65536];
    uint64_t lens[8], order[1];
    uint32_t flags[8];
    size_t n = 0;
    int32_t rcs[8];
    struct fl_session_params p = { .cluster_size = 65536,
                                   .temp_dir = test_tmpdir(),
                                   .policy = FL_BREAK_SNAPSHOT };

    make_image(path, 1 << 20, NULL);   /* sparse */
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_queue_open(2, &q), 0);
    CHECK_RC(fl_queue_submit_extents(q, 0, FL_OP_EXTENTS, f, 0, 1 << 20,
                                     lens, flags, 8, &n), 0);
    reap_order(q, order, rcs, 1, 8);
    CHECK(rcs[0] == 0 && n == 1 && lens[0] == 1 << 20 &&
          flags[0] == (FL_EXT_HOLE | FL_EXT_ZERO));
    CHECK_RC(fl_queue_submit_extents(q, 1, FL_OP_READ, f, 0, 1, lens, flags,
                                     8, &n), -EINVAL);
    CHECK_RC(fl_queue_submit_open(q, 1, f, &p, &s), 0);
    reap_order(q, order, rcs, 1, 8);
    CHECK(rcs[1] == 0 && s != NULL);
    memset(buf, 0x77, sizeof buf);
    CHECK_RC(fl_queue_submit(q, 2, FL_OP_WRITE, f, buf, 65536, 0, 0), 0);
    reap_order(q, order, rcs, 1, 8);
    CHECK(rcs[2] == 0);
    CHECK_RC(fl_queue_submit_extents(q, 3, FL_OP_SNAP_EXTENTS, s, 0, 1 << 20,
                                     lens, flags, 8, &n), 0);
    reap_order(q, order, rcs, 1, 8);
    CHECK(rcs[3] == 0 && n >= 1);
    CHECK_RC(fl_queue_submit_close(q, 4, s), 0);
    reap_order(q, order, rcs, 1, 8);
    CHECK(rcs[4] == 0);
    /* the session is gone: writes no longer copy */
    CHECK_RC(fl_queue_submit(q, 5, FL_OP_WRITE, f, buf, 65536, 65536, 0), 0);
    reap_order(q, order, rcs, 1, 8);
    CHECK(rcs[5] == 0);
    fl_file_close(f);
    fl_queue_close(q);
    unlink(path);
}

/* Operations queued before the owner closed the file fail -ESHUTDOWN
 * when they run: nothing reaches a file its owner has given up. */
static void test_closed_file_ops(void)
{
    char path[4096];
    fl_file *f;
    fl_queue *q;
    static uint8_t buf[4096];
    uint64_t order[2];
    int32_t rcs[2];

    make_image(path, 1 << 20, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_queue_open(1, &q), 0);
    CHECK_RC(fl_queue_inject_delay(q, FL_OP_FLUSH, 100), 0);
    CHECK_RC(fl_queue_submit(q, 0, FL_OP_FLUSH, f, NULL, 0, 0, 0), 0);
    CHECK_RC(fl_queue_submit(q, 1, FL_OP_WRITE, f, buf, 4096, 0, 0), 0);
    fl_file_close(f);
    reap_order(q, order, rcs, 2, 2);
    CHECK(rcs[0] == -ESHUTDOWN && rcs[1] == -ESHUTDOWN);
    fl_queue_close(q);
    unlink(path);
}

/* Snapshot ops run in a pool of their own at nice 19, so a
 * backup loses every CPU contention with guest writes; the guest pool
 * keeps the caller's priority.  Counts this process's threads by nice. */
static unsigned threads_at_nice(long nice)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    unsigned n = 0;

    CHECK(d != NULL);
    while ((e = readdir(d)) != NULL) {
        char path[300], buf[1024], *p;
        FILE *f;
        long v = 0;
        size_t len;

        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
        f = fopen(path, "r");
        if (f == NULL)
            continue;           /* a thread that just exited */
        len = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[len] = 0;
        p = strrchr(buf, ')');  /* fields after the command name */
        CHECK(p != NULL);
        /* state is field 3; nice is field 19: 16 fields after state */
        CHECK(sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u "
                     "%*u %*u %*d %*d %*d %ld", &v) == 1);
        n += v == nice;
    }
    closedir(d);
    return n;
}

static void test_snapshot_pool_priority(void)
{
    fl_queue *q;
    unsigned base19 = threads_at_nice(19), low = 0;
    struct timespec ts = { 0, 10000000 };

    CHECK_RC(fl_queue_open(8, &q), 0);
    for (int i = 0; i < 500 && low < 6; i++) {   /* workers start async */
        low = threads_at_nice(19) - base19;
        nanosleep(&ts, NULL);
    }
    CHECK(low == 6);            /* 8 - 8/4 snapshot workers, all niced */
    fl_queue_close(q);
    CHECK(threads_at_nice(19) == base19);
}

/* A READ streamed in pieces counts one request: FL_PIECE ops add their
 * bytes only, whether the worker reads into the buffer or sends. */
static void test_piece_counts_bytes_only(void)
{
    char path[4096];
    fl_file *f;
    fl_queue *q;
    fl_sock *sock;
    struct fl_file_stats st;
    static uint8_t buf[BS], wire[2 * BS];
    int sv[2];
    int32_t rc, bits;

    make_image(path, 4 * BS, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_queue_open(2, &q), 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0);
    CHECK_RC(fl_sock_open(sv[1], &sock), 0);
    CHECK_RC(fl_queue_submit(q, 1, FL_OP_READ, f, buf, BS, 0, 0), 0);
    reap_one(q, 1, &rc, &bits);
    CHECK_RC(fl_queue_submit(q, 2, FL_OP_READ, f, buf, BS, BS, FL_PIECE), 0);
    reap_one(q, 2, &rc, &bits);
    CHECK_RC(fl_queue_submit_send(q, 3, FL_OP_READ, f, buf, BS, 2 * BS, sock,
                                  (const uint8_t *)"", 0, FL_PIECE), 0);
    reap_one(q, 3, &rc, &bits);
    CHECK(rc == 0 && bits == FL_DONE_SENT && drain(sv[0], wire, sizeof wire) == BS);
    CHECK_RC(fl_queue_submit(q, 4, FL_OP_WRITE, f, buf, BS, 0, FL_PIECE), -EINVAL);
    fl_file_stats(f, &st);
    CHECK(st.requests[FL_CMD_READ] == 1 && st.bytes[FL_CMD_READ] == 3 * BS);
    fl_sock_close(sock);
    close(sv[0]);
    close(sv[1]);
    fl_queue_close(q);
    fl_file_close(f);
    unlink(path);
}

int main(void)
{
    fprintf(stderr, "test_queue\n");
    RUN(test_read_write_errors);
    RUN(test_snapshot_ops);
    RUN(test_send);
    RUN(test_close_after_cap);
    RUN(test_no_wait_behind_busy);
    RUN(test_close_with_ops_queued);
    RUN(test_control_ops);
    RUN(test_closed_file_ops);
    RUN(test_snapshot_pool_priority);
    RUN(test_piece_counts_bytes_only);
    fprintf(stderr, "test_queue: OK\n");
    return 0;
}
