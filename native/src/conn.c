/* fleeced native data path: an NBD connection's transmission phase in C.
 *
 * Design notes.  After the handshake (Python: options, TLS, policy) a
 * plain connection's socket is handed over here, and from then on no
 * byte of it passes through the event loop.  One receive thread per
 * connection reads requests, checks each against the engine's rule table
 * (passed in as struct fl_conn_rule[8], built by engine.py _build_rules,
 * which stays the specification: tests/integration/test_conn_diff.py
 * feeds the same byte streams to both and requires the same replies),
 * and runs it:
 *   - inline on the receive thread when nothing else of the connection is
 *     in flight and no further request is buffered (queue depth 1 pays
 *     no hand-off; at depth 16 the next request is already there, and
 *     goes to a worker);
 *   - else in a worker of the I/O queue (queue.c): the guest pool for the
 *     active export, the snapshot pool (lower priority) for a session's
 *     frozen view, so a backup never takes a worker or CPU from guest
 *     writes;
 *   - READs longer than PIECE go to the out-queue as streams: the
 *     receive thread reads and sends them a piece at a time as the socket
 *     drains (never held whole), reading requests meanwhile.
 * A snapshot export's receive thread runs at nice SNAP_NICE, as the
 * snapshot pool's workers do: under contention a backup yields the CPU to
 * the guest's connections.
 * The thread that completed a request writes its reply (nbdkit's shape):
 * under send_lock, with MSG_DONTWAIT, so no thread ever waits for a slow
 * client while holding anything.  What the socket does not take goes to
 * the connection's out-queue (the data buffer moves there, no copy),
 * which only the receive thread drains, on POLLOUT.  Replies are whole
 * units on the wire: a partly sent reply is always the out-queue's head,
 * and nothing is sent directly while the queue is not empty.
 *
 * The NBD rules (proto.md "Transmission phase"): requests are checked in
 * the engine's order (engine.py _next_request: magic, DISC, WRITE payload
 * over 32 MiB, shutting down, unknown command, flags, static error,
 * FLUSH offset/length, zero length, range, maximum length, DF overflow,
 * alignment), with the engine's messages; a refused WRITE's payload is
 * read and dropped to keep the stream in sync; errors are simple replies
 * or ERROR chunks with a message when structured replies were
 * negotiated; success replies of commands without payload are simple.
 *
 * Flow control, per connection only (a client that stops reading costs
 * its own connection, nobody else's): the receive thread takes no new
 * request while MAX_IN_FLIGHT are in flight, or while the bytes of READs
 * and WRITEs in flight plus the out-queue exceed BUDGET (one request is
 * always admitted when nothing is in flight).
 *
 * Lifetimes: references as everywhere in the library: the owner's
 * (fl_conn_start .. fl_conn_close), the receive thread's (until it
 * exits), and one per request handed to a worker (until it answered).
 * The connection holds a reference on its file or session and on each
 * bitmap of a negotiated dirty-bitmap context, so none of them goes away
 * under a request.  The socket is closed by the receive thread once the
 * connection ended and nothing of it is in flight; done_fd then becomes
 * readable (the event loop's only signal).
 *
 * Ending: the client's DISC or EOF, a protocol error (fatal, logged in
 * `reason`), a torn send, fl_conn_abort (socket shut down now, replies of
 * requests in flight dropped), or fl_conn_shutdown: every request already
 * received is answered (done, or ESHUTDOWN for those parsed from now on),
 * or with REPLAY read and dropped unanswered (a client that reconnects
 * and resends them: an attached VM), then the socket closes once no
 * unread byte is left in it and nothing is in flight.  The caller bounds
 * how long it waits for that with fl_conn_abort.
 *
 * Locks (never held across anything that may block):
 *   lock       in_flight, inflight_bytes, ended, mode, aborted, stats,
 *              waiting;
 *   send_lock  the out-queue and its byte count, `torn`, writes to the
 *              socket (each MSG_DONTWAIT, so held only for the copy into
 *              the kernel); a stream entry's piece fields belong to the
 *              receive thread alone.
 * Order: lock, then send_lock (admit() reads both budgets at once);
 * nothing takes lock while holding send_lock.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define REQUEST_MAGIC   0x25609513u
#define SIMPLE_MAGIC    0x67446698u
#define STRUCT_MAGIC    0x668e33efu
#define REQ_SIZE        28u
#define MAX_PAYLOAD     (32u << 20)   /* engine.py MAX_PAYLOAD */
#define RBUF_SIZE       (256u << 10)
#define PIECE           (1u << 20)    /* connection.py STREAM_PIECE */
#define MAX_IN_FLIGHT   64u
#define BUDGET          (4u << 20)
#define MAX_EXTENTS     1024u
/* Smaller READs are not asked whether they read a hole (one lseek less
 * each; the reply is data, zeros included, as the loop's runs send it). */
#define HOLE_MIN        (128u << 10)
#define INLINE_WRITE_MAX (64u << 10)
#define MAX_MESSAGE     4096u
#define DRAIN_MS        5000          /* replies left at a close */
#define SNAP_NICE       19            /* queue.c's, for the same reason */
/* READs up to CACHED_MAX are tried on the receive thread from the page
 * cache first (preadv2 RWF_NOWAIT, never blocks); their replies gather in
 * a batch of up to BATCH_CAP bytes, sent with one write. */
#define CACHED_MAX      (128u << 10)
#define BATCH_CAP       (512u << 10)
/* READs of the image from SENDFILE_MIN up go out with sendfile(2): no
 * copy in the server (never for a snapshot: queue.c sendfile_reply has
 * why). */
#define SENDFILE_MIN    (64u << 10)

enum { CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE,
       CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, CMD_COUNT };

#define F_FUA       1u
#define F_NO_HOLE   2u
#define F_DF        4u
#define F_REQ_ONE   8u
#define F_FAST_ZERO 16u

#define REPLY_DONE  1u
#define T_OFFSET_DATA 1u
#define T_OFFSET_HOLE 2u
#define T_BLOCK_STATUS 5u
#define T_ERROR     32769u

/* NBD error values (proto.md "Error values"). */
#define N_EPERM 1u
#define N_EIO 5u
#define N_ENOMEM 12u
#define N_EINVAL 22u
#define N_ENOSPC 28u
#define N_EOVERFLOW 75u
#define N_ENOTSUP 95u
#define N_ESHUTDOWN 108u

enum { MODE_RUN, MODE_SHUTDOWN, MODE_REPLAY };

struct stream;

struct outq {
    struct outq *next;
    uint8_t *a;             /* owned */
    size_t alen;
    uint8_t *b;             /* owned, may be NULL */
    size_t blen;
    size_t pos;             /* bytes of a + b sent */
    /* A READ sent a piece at a time: A and B hold its current piece, made
     * by the receive thread when the last one is out (only it touches a
     * stream entry's fields; others only link entries behind it). */
    struct stream *st;
};

struct req {
    fl_conn *c;
    uint16_t flags, cmd;
    uint64_t cookie, off;
    uint32_t len;
    uint8_t *payload;       /* WRITE: owned when handed to a worker */
};

struct stream {
    struct req r;
    uint64_t done;          /* data bytes made into pieces so far */
    int over;               /* its last piece (or its error) is made */
    uint8_t hdr[32];
    uint8_t *buf;           /* PIECE bytes, reused */
};

struct fl_conn {
    unsigned refs;                  /* atomic */
    int fd;                         /* ours; closed by the receive thread */
    int wake_fd, done_fd;           /* eventfds, closed with the last ref */
    fl_queue *q;
    fl_file *file;                  /* one of the two, referenced */
    fl_session *session;
    uint64_t size;
    uint32_t min_block, structured, trim;
    struct fl_conn_rule rules[CMD_COUNT];
    uint32_t n_ctx;
    uint32_t ctx_id[FL_CONN_MAX_CTX], ctx_kind[FL_CONN_MAX_CTX];
    fl_bitmap *ctx_bitmap[FL_CONN_MAX_CTX];
    pthread_t thread;
    /* receive buffer and reply batch: only the receive thread */
    uint8_t *rbuf;
    size_t rstart, rend;
    uint8_t *batch;
    size_t batch_len;
    int cached;                     /* immutable: page-cache reads possible */
    int eof;
    /* guarded by lock */
    pthread_mutex_t lock;
    uint32_t in_flight;
    uint64_t inflight_bytes;
    int mode, ended, aborted, waiting;
    struct fl_conn_stats stats;
    /* guarded by send_lock */
    pthread_mutex_t send_lock;
    struct outq *oq_head, *oq_tail;
    uint64_t oq_bytes;
    int torn;
};

/* ---- references, small helpers ---------------------------------------- */

static void free_entry(struct outq *e)
{
    if (e->st != NULL) {
        free(e->st->buf);
        free(e->st);
        e->a = NULL;        /* the stream's own header */
        e->b = NULL;        /* its buffer, freed above */
    }
    free(e->a);
    free(e->b);
    free(e);
}

static void conn_free(fl_conn *c)
{
    uint32_t i;
    struct outq *e;

    while ((e = c->oq_head) != NULL) {
        c->oq_head = e->next;
        free_entry(e);
    }
    for (i = 0; i < c->n_ctx; i++)
        if (c->ctx_bitmap[i] != NULL)
            fl__bitmap_unref(c->ctx_bitmap[i]);
    if (c->file != NULL)
        fl__file_unref(c->file);
    if (c->session != NULL)
        fl__session_unref(c->session);
    if (c->fd >= 0)
        close(c->fd);
    close(c->wake_fd);
    close(c->done_fd);
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->send_lock);
    free(c->batch);
    free(c->rbuf);
    free(c);
}

static void conn_ref(fl_conn *c)
{
    __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
}

static void conn_unref(fl_conn *c)
{
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0)
        conn_free(c);
}

/* Counters are atomic: the hot path takes no lock for them. */
static void stat_add(uint64_t *v, uint64_t n)
{
    __atomic_add_fetch(v, n, __ATOMIC_RELAXED);
}

static void kick(int efd)
{
    uint64_t one = 1;
    ssize_t n;

    do
        n = write(efd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
}

static void drain_efd(int efd)
{
    uint64_t v;
    ssize_t n = read(efd, &v, sizeof v);

    (void)n;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static void simple_hdr(uint8_t *h, uint32_t err, uint64_t cookie)
{
    put32(h, SIMPLE_MAGIC);
    put32(h + 4, err);
    put64(h + 8, cookie);
}

static void chunk_hdr(uint8_t *h, uint16_t flags, uint16_t type, uint64_t cookie,
                      uint32_t len)
{
    put32(h, STRUCT_MAGIC);
    put16(h + 4, flags);
    put16(h + 6, type);
    put64(h + 8, cookie);
    put32(h + 16, len);
}

static void set_reason(fl_conn *c, const char *fmt, ...)
{
    va_list ap;

    pthread_mutex_lock(&c->lock);
    if (c->stats.reason[0] == '\0') {
        va_start(ap, fmt);
        vsnprintf(c->stats.reason, sizeof c->stats.reason, fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&c->lock);
}

/* errors.py to_nbd_errno: an OS errno (positive) as an NBD error value. */
static uint32_t nbd_errno(int err, uint16_t flags)
{
    switch (err) {
    case EPERM: case EROFS: return N_EPERM;
    case EIO: case ETIMEDOUT: return N_EIO;
    case ENOMEM: return N_ENOMEM;
    case ENOSPC: case EDQUOT: case EFBIG: return N_ENOSPC;
    case ESHUTDOWN: return N_ESHUTDOWN;
    case EOVERFLOW: return (flags & F_DF) ? N_EOVERFLOW : N_EINVAL;
    case ENOTSUP: return (flags & F_FAST_ZERO) ? N_ENOTSUP : N_EINVAL;
    default: return N_EINVAL;
    }
}

/* ---- sending ------------------------------------------------------------- */

/* Write what the socket takes of IOV without waiting: bytes written (maybe
 * fewer than asked), or -errno.  IOV is left describing what was not
 * written: entries sent whole get length 0, a partly sent one its rest. */
static ssize_t send_nowait(int fd, struct iovec *iov, int iovcnt)
{
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)iovcnt };
    ssize_t total = 0;

    while (m.msg_iovlen > 0) {
        ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return total;
            return -errno;
        }
        total += n;
        while (m.msg_iovlen > 0 && (n > 0 || m.msg_iov->iov_len == 0)) {
            if ((size_t)n >= m.msg_iov->iov_len) {
                n -= (ssize_t)m.msg_iov->iov_len;
                m.msg_iov->iov_len = 0;
                m.msg_iov++;
                m.msg_iovlen--;
            } else {
                m.msg_iov->iov_base = (uint8_t *)m.msg_iov->iov_base + n;
                m.msg_iov->iov_len -= (size_t)n;
                n = 0;
            }
        }
    }
    return total;
}

static void stream_over(fl_conn *c, struct stream *st);

/* With send_lock held: write the out-queue's head entries while the
 * socket takes them, up to a stream entry whose current piece is out (the
 * caller makes its next one).  0, or -errno of a torn send. */
static int drain_locked(fl_conn *c)
{
    struct outq *e;

    while ((e = c->oq_head) != NULL) {
        struct iovec iov[2];
        int n = 0;
        ssize_t r;
        size_t total = e->alen + e->blen;

        if (e->pos < total) {
            if (e->pos < e->alen) {
                iov[n].iov_base = e->a + e->pos;
                iov[n++].iov_len = e->alen - e->pos;
                if (e->blen) {
                    iov[n].iov_base = e->b;
                    iov[n++].iov_len = e->blen;
                }
            } else {
                iov[n].iov_base = e->b + (e->pos - e->alen);
                iov[n++].iov_len = total - e->pos;
            }
            r = send_nowait(c->fd, iov, n);
            if (r < 0)
                return (int)r;
            e->pos += (size_t)r;
            c->oq_bytes -= (uint64_t)r;
            if (e->pos < total)
                return 0;
        }
        if (e->st != NULL && !e->st->over)
            return 0;       /* its next piece is the caller's to make */
        c->oq_head = e->next;
        if (c->oq_head == NULL)
            c->oq_tail = NULL;
        if (e->st != NULL) {
            /* in flight until its last piece is out */
            pthread_mutex_unlock(&c->send_lock);
            stream_over(c, e->st);
            pthread_mutex_lock(&c->send_lock);
        }
        free_entry(e);
    }
    return 0;
}

/* Send one reply: A (copied if it must wait) then B (LEN BLEN; taken over
 * when OWN_B, else copied if it must wait).  Never waits for the client.
 * Returns 0, or -ENOMEM when it could not even be queued (the stream
 * would be torn: the connection ends). */
static int send_reply(fl_conn *c, const uint8_t *a, size_t alen, uint8_t *b,
                      size_t blen, int own_b)
{
    struct iovec iov[2] = { { (void *)a, alen }, { b, blen } };
    struct outq *e;
    size_t sent = 0;
    ssize_t r;
    int wake = 0, rc = 0;

    pthread_mutex_lock(&c->send_lock);
    if (c->torn || c->fd < 0) {
        pthread_mutex_unlock(&c->send_lock);
        if (own_b)
            free(b);
        return 0;
    }
    if (c->oq_head == NULL) {
        r = send_nowait(c->fd, iov, blen ? 2 : 1);
        if (r < 0) {
            c->torn = 1;
            pthread_mutex_unlock(&c->send_lock);
            set_reason(c, "send failed: %s", strerror((int)-r));
            if (own_b)
                free(b);
            kick(c->wake_fd);
            return 0;
        }
        sent = (size_t)r;
        if (sent == alen + blen) {
            pthread_mutex_unlock(&c->send_lock);
            if (own_b)
                free(b);
            return 0;
        }
    }
    /* The rest waits in the out-queue, in order. */
    e = calloc(1, sizeof *e);
    if (e != NULL) {
        e->alen = alen;
        e->blen = blen;
        e->pos = sent;
        e->a = malloc(alen ? alen : 1);
        if (blen && !own_b) {
            e->b = malloc(blen);
            if (e->b != NULL)
                memcpy(e->b, b, blen);
        } else {
            e->b = b;
            own_b = 0;
        }
    }
    if (e == NULL || e->a == NULL || (blen && e->b == NULL)) {
        if (e != NULL) {
            free(e->a);
            free(e->b);
            free(e);
        }
        c->torn = 1;
        rc = -ENOMEM;
    } else {
        memcpy(e->a, a, alen);
        wake = c->oq_head == NULL;
        if (c->oq_tail != NULL)
            c->oq_tail->next = e;
        else
            c->oq_head = e;
        c->oq_tail = e;
        c->oq_bytes += alen + blen - sent;
    }
    pthread_mutex_unlock(&c->send_lock);
    if (own_b)
        free(b);
    if (wake || rc < 0)
        kick(c->wake_fd);
    return rc;
}

static void reply_ok(fl_conn *c, uint64_t cookie)
{
    uint8_t h[16];

    simple_hdr(h, 0, cookie);
    send_reply(c, h, sizeof h, NULL, 0, 0);
}

static void reply_error(fl_conn *c, uint64_t cookie, uint32_t err, const char *msg)
{
    uint8_t buf[20 + 6 + MAX_MESSAGE];
    size_t m;

    if (!c->structured) {
        simple_hdr(buf, err, cookie);
        send_reply(c, buf, 16, NULL, 0, 0);
        return;
    }
    m = strlen(msg);
    if (m > MAX_MESSAGE)
        m = MAX_MESSAGE;
    chunk_hdr(buf, REPLY_DONE, (uint16_t)T_ERROR, cookie, (uint32_t)(6 + m));
    put32(buf + 20, err);
    put16(buf + 24, (uint16_t)m);
    memcpy(buf + 26, msg, m);
    send_reply(c, buf, 26 + m, NULL, 0, 0);
}

/* The message of a failed request (exports' error_message): a snapshot's
 * own reasons, else strerror. */
static void error_message(fl_conn *c, int err, char *out, size_t cap)
{
    if (c->session != NULL && err == EPERM) {
        snprintf(out, cap, "outside the snapshot's scope or already discarded");
        return;
    }
    if (c->session != NULL && err == EIO) {
        struct fl_session_stats st;

        if (fl_session_stats(c->session, &st) == 0 && st.broken) {
            snprintf(out, cap, "snapshot is broken: %s",
                     strerror(st.broken_errno ? st.broken_errno : EIO));
            return;
        }
    }
    snprintf(out, cap, "%s", strerror(err));
}

static void reply_failed(fl_conn *c, const struct req *r, int rc)
{
    char msg[256];

    error_message(c, -rc, msg, sizeof msg);
    stat_add(&c->stats.errors, 1);
    reply_error(c, r->cookie, nbd_errno(-rc, r->flags), msg);
}

/* ---- running one request ------------------------------------------------ */

static void delay_hook(fl_conn *c, int kind)
{
    int ms = fl__queue_delay(c->q, kind);

    if (ms > 0) {
        struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
}

static int is_closed(const fl_conn *c)
{
    return c->file != NULL ? fl__file_closed(c->file) : fl__session_closed(c->session);
}

/* A READ of the image with its data sent straight from the page cache
 * (sendfile), when the out-queue is empty.  Returns 1 when the reply is
 * taken care of (sent whole, or its rest queued as the out-queue's head,
 * or dropped on a torn connection), 0 when nothing was sent (the caller
 * reads and sends it the usual way).  The rest of a reply the socket took
 * only in part is read with send_lock held (nothing may go before it):
 * only then, when the socket filled up in mid-reply. */
static int sendfile_reply(fl_conn *c, const struct req *r, const uint8_t *h, size_t hlen)
{
    fl_file *f = c->file;
    size_t total = hlen + r->len, sent = 0;
    struct iovec iov = { (void *)h, hlen };
    off_t pos = (off_t)r->off;
    struct outq *e;
    ssize_t n;
    int rc = 0;

    pthread_mutex_lock(&c->send_lock);
    if (c->torn || c->fd < 0) {
        pthread_mutex_unlock(&c->send_lock);
        return 1;
    }
    if (c->oq_head != NULL) {
        pthread_mutex_unlock(&c->send_lock);
        return 0;
    }
    n = send_nowait(c->fd, &iov, 1);
    if (n < 0) {
        c->torn = 1;
        pthread_mutex_unlock(&c->send_lock);
        kick(c->wake_fd);
        return 1;
    }
    sent = (size_t)n;
    while (sent == hlen + (size_t)(pos - (off_t)r->off) && sent < total) {
        n = sendfile(c->fd, f->fd, &pos, total - sent);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;      /* full, or no splice here: the rest from memory */
        sent += (size_t)n;
    }
    if (sent == total || sent == 0) {
        pthread_mutex_unlock(&c->send_lock);
        return sent == total;
    }
    e = calloc(1, sizeof *e);
    if (e != NULL) {
        size_t from = sent > hlen ? sent - hlen : 0;

        e->alen = sent < hlen ? hlen - sent : 0;
        e->a = malloc(e->alen ? e->alen : 1);
        e->blen = r->len - from;
        e->b = malloc(e->blen);
        if (e->a != NULL && e->b != NULL) {
            memcpy(e->a, h + (sent < hlen ? sent : hlen), e->alen);
            rc = fl__full_pread(f->fd, e->b, e->blen, r->off + from);
        } else {
            rc = -ENOMEM;
        }
    }
    if (e == NULL || rc < 0) {
        if (e != NULL)
            free_entry(e);
        c->torn = 1;    /* half a reply is out: the stream cannot go on */
        pthread_mutex_unlock(&c->send_lock);
        set_reason(c, "READ failed in mid-reply");
        kick(c->wake_fd);
        return 1;
    }
    c->oq_head = c->oq_tail = e;
    c->oq_bytes += e->alen + e->blen;
    pthread_mutex_unlock(&c->send_lock);
    kick(c->wake_fd);
    return 1;
}

/* The batch of cached READ replies goes out (receive thread). */
static void flush_batch(fl_conn *c)
{
    if (c->batch_len) {
        send_reply(c, c->batch, c->batch_len, NULL, 0, 0);
        c->batch_len = 0;
    }
}

/* Answer a READ into the batch from the page cache, without blocking:
 * 1 when done, 0 when the data is not all cached (or anything else): the
 * usual path then runs it. */
static int try_cached(fl_conn *c, uint16_t flags, uint64_t cookie, uint64_t off, uint32_t len)
{
    size_t hlen = c->structured ? 28 : 16;
    uint8_t *h;

    (void)flags;
    if (c->batch_len + hlen + len > BATCH_CAP)
        flush_batch(c);
    h = c->batch + c->batch_len;
    if (fl_file_read_nowait(c->file, h + hlen, len, off, NULL) < 0)
        return 0;
    if (c->structured) {
        chunk_hdr(h, REPLY_DONE, T_OFFSET_DATA, cookie, 8 + len);
        put64(h + 20, off);
    } else {
        simple_hdr(h, 0, cookie);
    }
    c->batch_len += hlen + len;
    stat_add(&c->stats.requests, 1);
    stat_add(&c->stats.bytes_read, len);
    return 1;
}

static void run_read(fl_conn *c, const struct req *r)
{
    uint8_t h[32];
    uint8_t *buf = malloc(r->len);
    int hole = 0, rc;

    if (buf == NULL) {
        reply_failed(c, r, -ENOMEM);
        return;
    }
    delay_hook(c, c->file != NULL ? FL_OP_READ : FL_OP_SNAP_READ);
    if (c->cached && r->len >= SENDFILE_MIN && !fl__file_closed(c->file)
        && !fl_file_is_direct(c->file)
        && !(c->structured && r->len > HOLE_MIN
             && fl__range_is_hole(c->file->fd, c->file->is_blk, r->off, r->len))) {
        size_t hlen = 16;

        if (c->structured) {
            chunk_hdr(h, REPLY_DONE, T_OFFSET_DATA, r->cookie, 8 + r->len);
            put64(h + 20, r->off);
            hlen = 28;
        } else {
            simple_hdr(h, 0, r->cookie);
        }
        if (sendfile_reply(c, r, h, hlen)) {
            free(buf);
            stat_add(&c->stats.bytes_read, r->len);
            return;
        }
    }
    if (is_closed(c))
        rc = -ESHUTDOWN;
    else if (c->file != NULL)
        rc = fl_file_read(c->file, buf, r->len, r->off, r->len > HOLE_MIN ? &hole : NULL);
    else
        rc = fl_session_read(c->session, buf, r->len, r->off,
                             r->len > HOLE_MIN ? &hole : NULL);
    if (rc < 0) {
        free(buf);
        reply_failed(c, r, rc);
        return;
    }
    stat_add(&c->stats.bytes_read, r->len);
    if (!c->structured) {
        simple_hdr(h, 0, r->cookie);
        send_reply(c, h, 16, buf, r->len, 1);
    } else if (hole) {
        free(buf);
        chunk_hdr(h, REPLY_DONE, T_OFFSET_HOLE, r->cookie, 12);
        put64(h + 20, r->off);
        put32(h + 28, r->len);
        send_reply(c, h, 32, NULL, 0, 0);
    } else {
        chunk_hdr(h, REPLY_DONE, T_OFFSET_DATA, r->cookie, 8 + r->len);
        put64(h + 20, r->off);
        send_reply(c, h, 28, buf, r->len, 1);
    }
}

/* Allocation depth of a raw image (exports/base.py allocation_depth): 0
 * for a hole, 1 for data, neighbours merged, in place. */
static size_t depth_of(uint64_t *lens, uint32_t *flags, size_t n)
{
    size_t i, k = 0;

    for (i = 0; i < n; i++) {
        uint32_t d = (flags[i] & FL_EXT_HOLE) ? 0 : 1;

        if (k > 0 && flags[k - 1] == d) {
            lens[k - 1] += lens[i];
        } else {
            lens[k] = lens[i];
            flags[k++] = d;
        }
    }
    return k;
}

static void run_block_status(fl_conn *c, const struct req *r)
{
    uint64_t lens[MAX_EXTENTS];
    uint32_t flags[MAX_EXTENTS];
    uint8_t *out = NULL;
    size_t used = 0, n, j;
    uint32_t i;
    int rc = 0;

    for (i = 0; i < c->n_ctx && rc == 0; i++) {
        uint8_t *grown;
        size_t bytes;

        n = 0;
        if (c->ctx_kind[i] == FL_CTX_DIRTY_BITMAP)
            rc = fl_bitmap_extents(c->ctx_bitmap[i], r->off, r->len, lens, flags,
                                   MAX_EXTENTS, &n);
        else if (c->file != NULL)
            rc = fl_file_extents(c->file, r->off, r->len, lens, flags, MAX_EXTENTS, &n);
        else
            rc = fl_session_extents(c->session, r->off, r->len, lens, flags,
                                    MAX_EXTENTS, &n);
        if (rc < 0)
            break;
        if (c->ctx_kind[i] == FL_CTX_ALLOCATION_DEPTH)
            n = depth_of(lens, flags, n);
        if (n == 0) {       /* never: every in-range request gets one */
            rc = -EIO;
            break;
        }
        if (r->flags & F_REQ_ONE)
            n = 1;
        bytes = 20 + 4 + 8 * n;
        grown = realloc(out, used + bytes);
        if (grown == NULL) {
            rc = -ENOMEM;
            break;
        }
        out = grown;
        chunk_hdr(out + used, i + 1 == c->n_ctx ? REPLY_DONE : 0, T_BLOCK_STATUS,
                  r->cookie, (uint32_t)(4 + 8 * n));
        put32(out + used + 20, c->ctx_id[i]);
        for (j = 0; j < n; j++) {
            /* an extent is at most the request's length: fits in 32 bits */
            put32(out + used + 24 + 8 * j, (uint32_t)lens[j]);
            put32(out + used + 28 + 8 * j, flags[j]);
        }
        used += bytes;
    }
    if (rc < 0) {
        free(out);
        reply_failed(c, r, rc);
        return;
    }
    send_reply(c, out, used, NULL, 0, 0);
    free(out);
}

/* Run request R (checked) and answer it. */
static void run_req(fl_conn *c, struct req *r)
{
    int rc = 0;

    stat_add(&c->stats.requests, 1);
    switch (r->cmd) {
    case CMD_READ:
        run_read(c, r);
        return;
    case CMD_BLOCK_STATUS:
        run_block_status(c, r);
        return;
    case CMD_WRITE:
        delay_hook(c, FL_OP_WRITE);
        rc = fl__file_closed(c->file) ? -ESHUTDOWN
             : fl_file_write(c->file, r->payload, r->len, r->off,
                             (r->flags & F_FUA) ? FL_FUA : 0);
        if (rc == 0) {
            stat_add(&c->stats.bytes_written, r->len);
        }
        break;
    case CMD_WRITE_ZEROES: {
        unsigned fl = ((r->flags & F_NO_HOLE) || !c->trim ? 0 : FL_MAY_TRIM)
                      | ((r->flags & F_FAST_ZERO) ? FL_FAST : 0)
                      | ((r->flags & F_FUA) ? FL_FUA : 0);
        delay_hook(c, FL_OP_ZERO);
        rc = fl__file_closed(c->file) ? -ESHUTDOWN
             : fl_file_zero(c->file, r->off, r->len, fl);
        break;
    }
    case CMD_TRIM:
        if (c->session != NULL) {
            rc = fl__session_closed(c->session) ? -ESHUTDOWN
                 : fl_session_discard(c->session, r->off, r->len);
        } else if (c->trim) {
            rc = fl__file_closed(c->file) ? -ESHUTDOWN
                 : fl_file_trim(c->file, r->off, r->len);
            if (rc == 0 && (r->flags & F_FUA))
                rc = fl_file_flush(c->file);
        }
        break;
    case CMD_FLUSH:
        if (c->file != NULL) {
            delay_hook(c, FL_OP_FLUSH);
            rc = fl__file_closed(c->file) ? -ESHUTDOWN : fl_file_flush(c->file);
        }
        break;
    case CMD_CACHE:
        if (c->file != NULL)
            rc = fl__file_closed(c->file) ? -ESHUTDOWN
                 : fl_file_cache(c->file, r->off, r->len);
        break;
    default:
        rc = -EINVAL;
    }
    if (rc < 0)
        reply_failed(c, r, rc);
    else
        reply_ok(c, r->cookie);
}

static uint64_t req_bytes(const struct req *r)
{
    return r->cmd == CMD_READ || r->cmd == CMD_WRITE ? r->len : 0;
}

/* A request is over: in-flight accounting, and the receive thread woken
 * when it waits for that. */
static void req_done(fl_conn *c, const struct req *r)
{
    int wake;

    pthread_mutex_lock(&c->lock);
    c->in_flight--;
    c->inflight_bytes -= req_bytes(r);
    wake = c->waiting;
    c->waiting = 0;
    pthread_mutex_unlock(&c->lock);
    if (wake)
        kick(c->wake_fd);
}

/* The same for a streamed READ (in flight with PIECE bytes). */
static void req_done_bytes(fl_conn *c, uint64_t bytes)
{
    int wake;

    pthread_mutex_lock(&c->lock);
    c->in_flight--;
    c->inflight_bytes -= bytes;
    wake = c->waiting;
    c->waiting = 0;
    pthread_mutex_unlock(&c->lock);
    if (wake)
        kick(c->wake_fd);
}

static void stream_over(fl_conn *c, struct stream *st)
{
    (void)st;
    req_done_bytes(c, PIECE);
}

static void worker_req(void *arg)
{
    struct req *r = arg;
    fl_conn *c = r->c;

    run_req(c, r);
    req_done(c, r);
    free(r->payload);
    free(r);
    conn_unref(c);
}

/* ---- the receive thread ---------------------------------------------------- */

/* Wait until FD is readable (or writable with OUT), the wake eventfd
 * fires, or MS passes (-1: no bound).  Returns poll's revents of FD, 0 on
 * a wake-up or the bound. */
static int wait_fd(fl_conn *c, short events, int ms)
{
    /* No events: only the wake-up counts (a hung-up socket would
     * otherwise report POLLHUP at once, again and again). */
    struct pollfd p[2] = { { events ? c->fd : -1, events, 0 },
                           { c->wake_fd, POLLIN, 0 } };
    int n;

    n = poll(p, 2, ms);
    if (n <= 0)
        return 0;
    if (p[1].revents)
        drain_efd(c->wake_fd);
    return p[0].revents;
}

/* Receive up to the buffer's room; 1 read, 0 EOF, -1 nothing now,
 * -errno error. */
static int fill(fl_conn *c)
{
    ssize_t n;

    if (c->rstart > 0 && c->rstart == c->rend)
        c->rstart = c->rend = 0;
    if (c->rend == RBUF_SIZE && c->rstart > 0) {
        memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
        c->rend -= c->rstart;
        c->rstart = 0;
    }
    if (c->rend == RBUF_SIZE)
        return -1;
    n = recv(c->fd, c->rbuf + c->rend, RBUF_SIZE - c->rend, MSG_DONTWAIT);
    if (n > 0) {
        c->rend += (size_t)n;
        return 1;
    }
    if (n == 0)
        return 0;
    if (errno == EAGAIN || errno == EINTR)
        return -1;
    return -errno;
}

static int unread(const fl_conn *c)
{
    int n = 0;

    if (ioctl(c->fd, FIONREAD, &n) < 0)
        return 0;
    return n;
}

/* Get LEN payload bytes: what is buffered, then straight from the socket
 * into DST (NULL: dropped).  0, or -1 when the connection ended first. */
static int take_payload(fl_conn *c, uint8_t *dst, uint32_t len)
{
    uint32_t got = 0;
    uint8_t sink[4096];

    while (got < len) {
        size_t have = c->rend - c->rstart, n = len - got;
        ssize_t k;

        if (have > 0) {
            if (n > have)
                n = have;
            if (dst != NULL)
                memcpy(dst + got, c->rbuf + c->rstart, n);
            c->rstart += n;
            got += (uint32_t)n;
            continue;
        }
        if (dst == NULL && n > sizeof sink)
            n = sizeof sink;
        k = recv(c->fd, dst != NULL ? dst + got : sink, n, MSG_DONTWAIT);
        if (k > 0) {
            got += (uint32_t)k;
            continue;
        }
        if (k == 0)
            return -1;
        if (errno != EAGAIN && errno != EINTR)
            return -1;
        pthread_mutex_lock(&c->lock);
        k = c->aborted;
        pthread_mutex_unlock(&c->lock);
        if (k)
            return -1;
        wait_fd(c, POLLIN, -1);
    }
    return 0;
}

/* Make the next piece of stream ST (the head of the out-queue, its last
 * piece out): read it (I/O, no lock held) and give it the wire form of
 * engine.py PieceReply.  A failure before the first piece is an ordinary
 * error reply; after it, an ERROR chunk where the wire form can carry one,
 * else the connection must end (returns -1). */
static int next_piece(fl_conn *c, struct outq *e)
{
    struct stream *st = e->st;
    const struct req *r = &st->r;
    uint32_t n = (uint32_t)(r->len - st->done < PIECE ? r->len - st->done : PIECE);
    int hole = 0, rc = 0, df = (r->flags & F_DF) != 0;
    int last = st->done + n == r->len;
    size_t alen = 0, blen = 0;
    uint8_t *h = st->hdr;

    if (st->buf == NULL)
        st->buf = malloc(PIECE);    /* also where an error reply is made */
    if (st->buf == NULL) {
        set_reason(c, "out of memory");
        return -1;
    }
    if (st->done == 0 && c->session != NULL)
        rc = fl_session_readable(c->session, r->off, r->len);
    if (rc == 0) {
        if (c->file != NULL)
            rc = fl__file_closed(c->file) ? -ESHUTDOWN
                 : fl_file_read(c->file, st->buf, n, r->off + st->done, &hole);
        else
            rc = fl__session_closed(c->session) ? -ESHUTDOWN
                 : fl_session_read(c->session, st->buf, n, r->off + st->done, &hole);
    }
    if (rc < 0) {
        char msg[256];
        size_t m;

        if (st->done > 0 && (!c->structured || df)) {
            /* The header said success: the wire cannot carry it. */
            set_reason(c, "READ failed after its first piece: %s", strerror(-rc));
            return -1;
        }
        error_message(c, -rc, msg, sizeof msg);
        stat_add(&c->stats.errors, 1);
        /* The piece buffer holds the error reply: nothing else needs it. */
        if (!c->structured) {
            simple_hdr(st->buf, nbd_errno(-rc, r->flags), r->cookie);
            blen = 16;
        } else {
            m = strlen(msg);
            chunk_hdr(st->buf, REPLY_DONE, (uint16_t)T_ERROR, r->cookie, (uint32_t)(6 + m));
            put32(st->buf + 20, nbd_errno(-rc, r->flags));
            put16(st->buf + 24, (uint16_t)m);
            memcpy(st->buf + 26, msg, m);
            blen = 26 + m;
        }
        st->over = 1;
    } else {
        if (!c->structured) {
            if (st->done == 0) {
                simple_hdr(h, 0, r->cookie);
                alen = 16;
            }
        } else if (df) {
            if (st->done == 0) {
                chunk_hdr(h, REPLY_DONE, T_OFFSET_DATA, r->cookie, 8 + r->len);
                put64(h + 20, r->off);
                alen = 28;
            }
        } else if (hole) {
            chunk_hdr(h, last ? REPLY_DONE : 0, T_OFFSET_HOLE, r->cookie, 12);
            put64(h + 20, r->off + st->done);
            put32(h + 28, n);
            alen = 32;
        } else {
            chunk_hdr(h, last ? REPLY_DONE : 0, T_OFFSET_DATA, r->cookie, 8 + n);
            put64(h + 20, r->off + st->done);
            alen = 28;
        }
        if (!(c->structured && !df && hole))
            blen = n;       /* a hole here is zeros in the buffer */
        st->done += n;
        if (last) {
            st->over = 1;
            stat_add(&c->stats.bytes_read, r->len);
        }
    }
    pthread_mutex_lock(&c->send_lock);
    e->a = h;
    e->alen = alen;
    e->b = st->buf;
    e->blen = blen;
    e->pos = 0;
    c->oq_bytes += alen + blen;
    pthread_mutex_unlock(&c->send_lock);
    return 0;
}

/* Send what waits in the out-queue as far as the socket takes it, making
 * the pieces of streamed READs as they come to the head.  Receive thread
 * only. */
static void drain_out(fl_conn *c)
{
    for (;;) {
        struct outq *e;
        int rc;

        pthread_mutex_lock(&c->send_lock);
        if (c->torn) {
            pthread_mutex_unlock(&c->send_lock);
            return;
        }
        rc = drain_locked(c);
        if (rc < 0)
            c->torn = 1;
        e = c->oq_head;
        if (rc < 0 || e == NULL || e->st == NULL || e->pos < e->alen + e->blen) {
            pthread_mutex_unlock(&c->send_lock);
            if (rc < 0)
                set_reason(c, "send failed: %s", strerror(-rc));
            return;     /* done, or the socket is full */
        }
        pthread_mutex_unlock(&c->send_lock);
        if (next_piece(c, e) < 0) {
            pthread_mutex_lock(&c->send_lock);
            c->torn = 1;
            pthread_mutex_unlock(&c->send_lock);
            return;
        }
    }
}

/* The stream is torn: what waits in the out-queue is dropped, and the
 * streamed READs in it are over. */
static void drop_queue(fl_conn *c)
{
    struct outq *e, *next;

    pthread_mutex_lock(&c->send_lock);
    e = c->oq_head;
    c->oq_head = c->oq_tail = NULL;
    c->oq_bytes = 0;
    pthread_mutex_unlock(&c->send_lock);
    for (; e != NULL; e = next) {
        next = e->next;
        if (e->st != NULL)
            stream_over(c, e->st);
        free_entry(e);
    }
}

/* A READ longer than PIECE goes to the out-queue's tail as a stream: its
 * pieces are made as the socket drains, so the receive thread goes on
 * reading requests meanwhile, and no more than a piece is held. */
static void queue_stream(fl_conn *c, const struct req *r)
{
    struct stream *st = calloc(1, sizeof *st);
    struct outq *e = calloc(1, sizeof *e);

    stat_add(&c->stats.requests, 1);
    pthread_mutex_lock(&c->lock);
    c->in_flight++;
    c->inflight_bytes += PIECE;
    pthread_mutex_unlock(&c->lock);
    if (st == NULL || e == NULL) {
        free(st);
        free(e);
        reply_failed(c, r, -ENOMEM);
        req_done_bytes(c, PIECE);
        return;
    }
    st->r = *r;
    e->st = st;
    pthread_mutex_lock(&c->send_lock);
    if (c->torn) {
        pthread_mutex_unlock(&c->send_lock);
        free_entry(e);
        req_done_bytes(c, PIECE);
        return;
    }
    if (c->oq_tail != NULL)
        c->oq_tail->next = e;
    else
        c->oq_head = e;
    c->oq_tail = e;
    pthread_mutex_unlock(&c->send_lock);
    drain_out(c);
}

/* The checks of engine.py _next_request, in its order.  Returns the NBD
 * error (0: accepted) and its message. */
static uint32_t check(const fl_conn *c, int mode, uint16_t flags, uint16_t cmd,
                      uint64_t off, uint32_t len, const char **msg)
{
    const struct fl_conn_rule *rule;

    if (mode != MODE_RUN) {
        *msg = "server is shutting down";
        return N_ESHUTDOWN;
    }
    if (cmd >= CMD_COUNT) {
        *msg = "unknown command";
        return N_EINVAL;
    }
    rule = &c->rules[cmd];
    if (flags & ~rule->allowed_flags) {
        *msg = "invalid or unsupported flags";
        return N_EINVAL;
    }
    if (rule->error) {
        *msg = "operation not permitted";
        return rule->error;
    }
    if (cmd == CMD_FLUSH) {
        if (off || len) {
            *msg = "flush with nonzero offset or length";
            return N_EINVAL;
        }
        return 0;
    }
    if (len == 0) {
        *msg = "zero length";
        return N_EINVAL;
    }
    if (off > c->size || len > c->size - off) {
        *msg = "request beyond the end of the export";
        return rule->range_error;
    }
    if (len > rule->max_length) {
        if ((flags & F_DF) && len > MAX_PAYLOAD) {
            *msg = "READ length too large to send unfragmented (DF)";
            return N_EOVERFLOW;
        }
        *msg = cmd == CMD_READ ? "READ length larger than the maximum block size"
                               : "request larger than the maximum block size";
        return N_EINVAL;
    }
    if (c->min_block > 1 && ((off | len) & (c->min_block - 1))) {
        *msg = "request not aligned to the minimum block size";
        return N_EINVAL;
    }
    return 0;
}

static int get_mode(fl_conn *c, int *aborted)
{
    /* Written under lock, read without: a change is seen by the next
     * request at the latest, which is all shutdown and abort ask. */
    *aborted = __atomic_load_n(&c->aborted, __ATOMIC_ACQUIRE);
    return __atomic_load_n(&c->mode, __ATOMIC_ACQUIRE);
}

/* Wait until a new request may be taken (see "Flow control"), sending
 * queued replies meanwhile.  0, or -1 when aborted. */
static int admit(fl_conn *c)
{
    /* The common case, nothing in flight and nothing queued, without a
     * lock (both only grow on this thread). */
    if (__atomic_load_n(&c->in_flight, __ATOMIC_ACQUIRE) == 0
        && __atomic_load_n(&c->oq_bytes, __ATOMIC_ACQUIRE) == 0
        && !__atomic_load_n(&c->aborted, __ATOMIC_ACQUIRE))
        return 0;
    for (;;) {
        int ok, aborted, pending;

        pthread_mutex_lock(&c->lock);
        pthread_mutex_lock(&c->send_lock);
        pending = c->oq_head != NULL && !c->torn;
        /* Replies the client has not read count as much as requests in
         * flight: a client that stops reading stops being read. */
        ok = c->oq_bytes <= BUDGET &&
             (c->in_flight == 0 ||
              (c->in_flight < MAX_IN_FLIGHT &&
               c->inflight_bytes + c->oq_bytes <= BUDGET));
        pthread_mutex_unlock(&c->send_lock);
        aborted = c->aborted;
        if (!ok)
            c->waiting = 1;
        pthread_mutex_unlock(&c->lock);
        if (aborted)
            return -1;
        if (ok || __atomic_load_n(&c->mode, __ATOMIC_ACQUIRE) != MODE_RUN)
            return 0;   /* shutting down: answered ESHUTDOWN, no budget */
        if (c->batch_len) {     /* what waits for the socket goes first */
            flush_batch(c);
            continue;
        }
        if (pending && (wait_fd(c, POLLOUT, -1) & POLLOUT))
            drain_out(c);
        else if (!pending)
            wait_fd(c, 0, -1);
    }
}

/* Parse and run what is buffered.  Returns 1 to go on reading, 0 when the
 * connection is over (DISC, protocol error, torn). */
static int parse(fl_conn *c, int more_waiting)
{
    for (;;) {
        const uint8_t *p = c->rbuf + c->rstart;
        size_t have = c->rend - c->rstart;
        uint16_t flags, cmd;
        uint64_t cookie, off;
        uint32_t len, err;
        const char *msg = "";
        int mode, aborted;
        struct req *r;

        if (have < REQ_SIZE) {
            flush_batch(c);
            return 1;
        }
        /* Shutting down, what was received is answered (ESHUTDOWN: 16
         * bytes each) or dropped whatever is in flight. */
        mode = get_mode(c, &aborted);
        if (mode == MODE_RUN && admit(c) < 0)
            return 0;
        mode = get_mode(c, &aborted);
        if (get32(p) != REQUEST_MAGIC) {
            set_reason(c, "bad request magic 0x%08x", get32(p));
            return 0;
        }
        flags = get16(p + 4);
        cmd = get16(p + 6);
        cookie = get64(p + 8);
        off = get64(p + 16);
        len = get32(p + 24);
        if (cmd == CMD_DISC) {
            c->rstart += REQ_SIZE;
            return 0;
        }
        if (cmd == CMD_WRITE && len > MAX_PAYLOAD) {
            set_reason(c, "WRITE payload of %u bytes exceeds %u", len, MAX_PAYLOAD);
            return 0;
        }
        c->rstart += REQ_SIZE;
        if (mode == MODE_REPLAY) {
            /* dropped unanswered: the client resends it after reconnecting */
            if (cmd == CMD_WRITE && take_payload(c, NULL, len) < 0)
                return 0;
            continue;
        }
        err = check(c, mode, flags, cmd, off, len, &msg);
        if (err) {
            if (cmd == CMD_WRITE && take_payload(c, NULL, len) < 0)
                return 0;
            stat_add(&c->stats.requests, 1);  /* refusals count, as on the loop */
            stat_add(&c->stats.errors, 1);
            reply_error(c, cookie, err, msg);
            continue;
        }
        if (cmd == CMD_READ && len <= CACHED_MAX && c->cached
            && fl__queue_delay(c->q, FL_OP_READ) == 0 && try_cached(c, flags, cookie, off, len))
            continue;
        if (cmd == CMD_READ && len > PIECE) {
            queue_stream(c, &(struct req){ c, flags, cmd, cookie, off, len, NULL });
            continue;
        }
        r = calloc(1, sizeof *r);
        if (r == NULL) {
            set_reason(c, "out of memory");
            return 0;
        }
        *r = (struct req){ c, flags, cmd, cookie, off, len, NULL };
        if (cmd == CMD_WRITE) {
            int inline_ok = c->rend - c->rstart >= len;

            r->payload = malloc(len);
            if (r->payload == NULL || take_payload(c, r->payload, len) < 0) {
                free(r->payload);
                free(r);
                if (!inline_ok)
                    set_reason(c, "client left in a WRITE payload");
                return 0;
            }
        }
        pthread_mutex_lock(&c->lock);
        {
            int alone = c->in_flight == 0 && c->rend == c->rstart && !more_waiting;

            /* A small WRITE to a disk with no session (no copy before it
             * can make it wait) goes into the page cache in microseconds:
             * a hand-off to a worker would cost more than it does. */
            if (cmd == CMD_WRITE && len <= INLINE_WRITE_MAX && c->file != NULL
                && c->cached
                && __atomic_load_n(&c->file->sessions, __ATOMIC_ACQUIRE) == NULL
                && !fl_file_is_direct(c->file))
                alone = 1;

            c->in_flight++;
            c->inflight_bytes += req_bytes(r);
            pthread_mutex_unlock(&c->lock);
            if (alone) {
                flush_batch(c);
                run_req(c, r);
                req_done(c, r);
                free(r->payload);
                free(r);
                continue;
            }
        }
        conn_ref(c);
        if (fl__queue_submit_fn(c->q, c->session != NULL, worker_req, r) < 0) {
            conn_unref(c);
            reply_error(c, cookie, N_ESHUTDOWN, "server is shutting down");
            req_done(c, r);
            free(r->payload);
            free(r);
        }
    }
}

static void *recv_thread(void *arg)
{
    fl_conn *c = arg;
    int go = 1;

    /* A backup's connection yields the CPU to the guest's under contention,
     * as the snapshot pool of the queue does (queue.c SNAP_NICE); best
     * effort. */
    if (c->session != NULL)
        (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), SNAP_NICE);

    if (c->rend > c->rstart)
        go = parse(c, 0);
    while (go) {
        int mode, aborted, ev, rc, pending;

        mode = get_mode(c, &aborted);
        if (aborted)
            break;
        pthread_mutex_lock(&c->send_lock);
        pending = c->oq_head != NULL && !c->torn;
        if (c->torn)
            go = 0;
        pthread_mutex_unlock(&c->send_lock);
        if (!go)
            break;
        if (mode != MODE_RUN && unread(c) == 0) {
            /* Shutting down and the client sent nothing more: whatever
             * was received is answered once in flight requests are
             * (requests still buffered, held back by flow control, too). */
            parse(c, 0);
            break;
        }
        ev = wait_fd(c, (short)(POLLIN | (pending ? POLLOUT : 0)), -1);
        if (ev & POLLOUT)
            drain_out(c);
        if (!(ev & (POLLIN | POLLHUP | POLLERR)))
            continue;
        rc = fill(c);
        if (rc == 0) {
            c->eof = 1;
            break;
        }
        if (rc < -1) {
            set_reason(c, "receive failed: %s", strerror(-rc));
            break;
        }
        if (rc == 1)
            go = parse(c, c->rend == RBUF_SIZE);
    }
    flush_batch(c);
    /* Over: nothing more is read.  Wait for requests in flight, and let
     * their replies out (bounded: a client that no longer reads). */
    {
        struct timespec t0, t;
        int empty, aborted, pending, torn;

        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            long ms;

            drain_out(c);
            pthread_mutex_lock(&c->send_lock);
            torn = c->torn;
            pthread_mutex_unlock(&c->send_lock);
            if (torn)
                drop_queue(c);
            pthread_mutex_lock(&c->lock);
            aborted = c->aborted;
            empty = c->in_flight == 0;
            if (!empty)
                c->waiting = 1;
            pthread_mutex_unlock(&c->lock);
            pthread_mutex_lock(&c->send_lock);
            if (c->oq_head != NULL && !c->torn && !aborted)
                empty = 0;
            pending = c->oq_head != NULL && !c->torn;
            pthread_mutex_unlock(&c->send_lock);
            if (empty)
                break;
            clock_gettime(CLOCK_MONOTONIC, &t);
            ms = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
            if (ms > DRAIN_MS && pending) {
                pthread_mutex_lock(&c->send_lock);
                c->torn = 1;    /* replies are dropped from now on */
                pthread_mutex_unlock(&c->send_lock);
                set_reason(c, "client did not read its replies");
            }
            wait_fd(c, pending ? POLLOUT : 0, pending ? 100 : -1);
        }
    }
    pthread_mutex_lock(&c->send_lock);
    close(c->fd);
    c->fd = -1;
    pthread_mutex_unlock(&c->send_lock);
    pthread_mutex_lock(&c->lock);
    c->ended = 1;
    c->stats.ended = 1;
    c->stats.eof = c->eof;
    pthread_mutex_unlock(&c->lock);
    kick(c->done_fd);
    conn_unref(c);
    return NULL;
}

/* ---- API ---------------------------------------------------------------- */

int fl_conn_start(const struct fl_conn_params *p, fl_conn **out)
{
    fl_conn *c;
    uint32_t i;
    int rc;

    *out = NULL;
    if (p == NULL || p->queue == NULL || (p->file == NULL) == (p->session == NULL) ||
        p->fd < 0 || p->n_ctx > FL_CONN_MAX_CTX || p->initial_len > RBUF_SIZE ||
        (p->initial_len && p->initial == NULL) || p->structured > 1 ||
        (p->min_block & (p->min_block - 1)) != 0)
        return -EINVAL;
    for (i = 0; i < p->n_ctx; i++)
        if ((p->ctx_kind[i] == FL_CTX_DIRTY_BITMAP) != (p->ctx_bitmap[i] != NULL) ||
            p->ctx_kind[i] < FL_CTX_BASE_ALLOCATION || p->ctx_kind[i] > FL_CTX_DIRTY_BITMAP)
            return -EINVAL;
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return -ENOMEM;
    c->rbuf = malloc(RBUF_SIZE);
    c->cached = p->file != NULL && !fl_file_is_upstream(p->file);
    c->batch = c->cached ? malloc(BATCH_CAP) : NULL;
    c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    c->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    c->fd = fcntl(p->fd, F_DUPFD_CLOEXEC, 0);
    if (c->rbuf == NULL || (c->cached && c->batch == NULL) || c->wake_fd < 0 || c->done_fd < 0 || c->fd < 0) {
        rc = c->rbuf == NULL || (c->cached && c->batch == NULL) ? -ENOMEM : -errno;
        free(c->batch);
        free(c->rbuf);
        if (c->wake_fd >= 0)
            close(c->wake_fd);
        if (c->done_fd >= 0)
            close(c->done_fd);
        if (c->fd >= 0)
            close(c->fd);
        free(c);
        return rc;
    }
    /* Nothing here ever waits in a send: sendfile(2) has no MSG_DONTWAIT. */
    {
        int fl = fcntl(c->fd, F_GETFL);

        if (fl < 0 || fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
            rc = -errno;
            close(c->fd);
            close(c->wake_fd);
            close(c->done_fd);
            free(c->batch);
            free(c->rbuf);
            free(c);
            return rc;
        }
    }
    c->refs = 2;                /* the owner's and the receive thread's */
    c->q = p->queue;
    c->file = p->file;
    c->session = p->session;
    if (c->file != NULL)
        fl__file_ref(c->file);
    else
        fl__session_ref(c->session);
    c->size = p->size;
    c->min_block = p->min_block ? p->min_block : 1;
    c->structured = p->structured;
    c->trim = p->trim;
    memcpy(c->rules, p->rules, sizeof c->rules);
    c->n_ctx = p->n_ctx;
    for (i = 0; i < p->n_ctx; i++) {
        c->ctx_id[i] = p->ctx_id[i];
        c->ctx_kind[i] = p->ctx_kind[i];
        c->ctx_bitmap[i] = p->ctx_bitmap[i];
        if (c->ctx_bitmap[i] != NULL)
            fl__bitmap_ref(c->ctx_bitmap[i]);
    }
    if (p->initial_len)
        memcpy(c->rbuf, p->initial, p->initial_len);
    c->rend = p->initial_len;
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->send_lock, NULL);
    rc = -pthread_create(&c->thread, NULL, recv_thread, c);
    if (rc < 0) {
        c->refs = 1;
        conn_unref(c);
        return rc;
    }
    pthread_detach(c->thread);
    *out = c;
    return 0;
}

int fl_conn_done_fd(const fl_conn *c)
{
    return c->done_fd;
}

void fl_conn_shutdown(fl_conn *c, int replay)
{
    pthread_mutex_lock(&c->lock);
    if (c->mode == MODE_RUN)
        __atomic_store_n(&c->mode, replay ? MODE_REPLAY : MODE_SHUTDOWN, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&c->lock);
    kick(c->wake_fd);
}

void fl_conn_abort(fl_conn *c)
{
    pthread_mutex_lock(&c->lock);
    __atomic_store_n(&c->aborted, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_lock(&c->send_lock);
    c->torn = 1;
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
    pthread_mutex_unlock(&c->send_lock);
    set_reason(c, "aborted");
    kick(c->wake_fd);
}

void fl_conn_stats(fl_conn *c, struct fl_conn_stats *out)
{
    pthread_mutex_lock(&c->lock);
    *out = c->stats;
    out->requests = __atomic_load_n(&c->stats.requests, __ATOMIC_RELAXED);
    out->errors = __atomic_load_n(&c->stats.errors, __ATOMIC_RELAXED);
    out->bytes_read = __atomic_load_n(&c->stats.bytes_read, __ATOMIC_RELAXED);
    out->bytes_written = __atomic_load_n(&c->stats.bytes_written, __ATOMIC_RELAXED);
    out->in_flight = c->in_flight;
    pthread_mutex_unlock(&c->lock);
}

void fl_conn_close(fl_conn *c)
{
    if (c == NULL)
        return;
    pthread_mutex_lock(&c->lock);
    if (!c->ended) {
        pthread_mutex_unlock(&c->lock);
        fl_conn_abort(c);
    } else {
        pthread_mutex_unlock(&c->lock);
    }
    conn_unref(c);
}
