/* fleeced native data path: running a native connection's requests.
 *
 * Design notes.  A checked request runs where it costs least:
 *   - READs up to CACHED_MAX of an image are tried from the page cache on
 *     the receive thread first (preadv2 RWF_NOWAIT, never blocks); their
 *     replies gather in a batch sent with one write;
 *   - inline on the receive thread when nothing else of the connection is
 *     in flight and no further request is buffered (queue depth 1 pays no
 *     hand-off; at depth 16 the next request is already there, and goes
 *     to a worker), and small WRITEs to a disk no session can make wait;
 *   - else in a worker of the I/O queue (queue.c): the guest pool for the
 *     active export, the snapshot pool (lower priority) for a session's
 *     frozen view, so a backup never takes a worker or CPU from guest
 *     writes.
 * READs of the image from SENDFILE_MIN up go out by sendfile(2)
 * (conn_reply.c); smaller ones, and every snapshot READ, are read into a
 * buffer that moves to the reply.  READs longer than PIECE never come
 * here: conn_reply.c streams them.
 *
 * Every command: READ (OFFSET_HOLE for a hole when structured, the
 * range over HOLE_MIN), WRITE (FUA), WRITE_ZEROES (NO_HOLE, FAST_ZERO,
 * FUA), TRIM (a session's discard on a snapshot), FLUSH, CACHE,
 * BLOCK_STATUS (base:allocation, qemu:allocation-depth,
 * qemu:dirty-bitmap:*; one chunk per negotiated context, REQ_ONE; a
 * snapshot's base:allocation ZERO extents count toward its progress).
 * Success replies of commands without payload are simple.
 *
 * Locks (conn.c has the table): lock only to count a request in and out
 * of flight; the file, session and bitmap calls take their own (never
 * this connection's), and nothing is held across them.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "conn.h"

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

/* Answer a READ into the batch from the page cache, without blocking:
 * 1 when done, 0 when the data is not all cached (or anything else): the
 * usual path then runs it. */
int fl__conn_try_cached(fl_conn *c, uint16_t flags, uint64_t cookie, uint64_t off,
                        uint32_t len)
{
    size_t hlen = c->structured ? 28 : 16;
    uint8_t *h;

    (void)flags;
    if (c->batch_len + hlen + len > BATCH_CAP)
        fl__conn_flush_batch(c);
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
        fl__conn_reply_failed(c, r, -ENOMEM);
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
        if (fl__conn_sendfile(c, r, h, hlen)) {
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
        fl__conn_reply_failed(c, r, rc);
        return;
    }
    stat_add(&c->stats.bytes_read, r->len);
    if (!c->structured) {
        simple_hdr(h, 0, r->cookie);
        fl__conn_send(c, h, 16, buf, r->len, 1);
    } else if (hole) {
        free(buf);
        chunk_hdr(h, REPLY_DONE, T_OFFSET_HOLE, r->cookie, 12);
        put64(h + 20, r->off);
        put32(h + 28, r->len);
        fl__conn_send(c, h, 32, NULL, 0, 0);
    } else {
        chunk_hdr(h, REPLY_DONE, T_OFFSET_DATA, r->cookie, 8 + r->len);
        put64(h + 20, r->off);
        fl__conn_send(c, h, 28, buf, r->len, 1);
    }
}

/* Context KIND's view of the frozen view's or image's extents, in place,
 * neighbours merged (exports/base.py context_view).  base:allocation:
 * the NBD flags only.  qemu:allocation-depth: 1 wherever a read returns
 * the raw image's data, holes included (a raw file is one layer and owns
 * all of its bytes: what qemu-nbd -A reports), 0 where nothing is there
 * (outside a snapshot's scope, or discarded). */
static size_t context_view(int kind, uint64_t *lens, uint32_t *flags, size_t n)
{
    size_t i, k = 0;

    for (i = 0; i < n; i++) {
        uint32_t d = kind == FL_CTX_ALLOCATION_DEPTH
                     ? ((flags[i] & FL_EXT_UNREADABLE) ? 0 : 1)
                     : flags[i] & (FL_EXT_HOLE | FL_EXT_ZERO);

        if (k > 0 && flags[k - 1] == d) {
            lens[k - 1] += lens[i];
        } else {
            lens[k] = lens[i];
            flags[k++] = d;
        }
    }
    return k;
}

/* The snapshot's zero extents this reply tells the client of count as
 * backed up (fl_session_note_zero); the extents lie inside the request,
 * which lies inside the disk. */
static void note_zeros(fl_session *s, uint64_t off, const uint64_t *lens,
                       const uint32_t *flags, size_t n)
{
    for (size_t j = 0; j < n; off += lens[j++])
        if (flags[j] & FL_EXT_ZERO)
            (void)fl_session_note_zero(s, off, lens[j]);
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
        if (c->ctx_kind[i] != FL_CTX_DIRTY_BITMAP)
            n = context_view(c->ctx_kind[i], lens, flags, n);
        if (n == 0) {       /* never: every in-range request gets one */
            rc = -EIO;
            break;
        }
        if (r->flags & F_REQ_ONE)
            n = 1;
        if (c->ctx_kind[i] == FL_CTX_BASE_ALLOCATION && c->file == NULL)
            note_zeros(c->session, r->off, lens, flags, n);
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
        fl__conn_reply_failed(c, r, rc);
        return;
    }
    fl__conn_send(c, out, used, NULL, 0, 0);
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
        fl__conn_reply_failed(c, r, rc);
    else
        fl__conn_reply_ok(c, r->cookie);
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
void fl__conn_req_done_bytes(fl_conn *c, uint64_t bytes)
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

static void worker_req(void *arg)
{
    struct req *r = arg;
    fl_conn *c = r->c;

    run_req(c, r);
    req_done(c, r);
    free(r->payload);
    free(r);
    fl__conn_unref(c);
}

/* Run checked request R (taken over) where it costs least: inline on the
 * receive thread when it is alone (nothing in flight, nothing more
 * buffered or waiting in the socket), or when it is a small WRITE that
 * nothing can make wait; else in a worker of the queue's pool for its
 * export. */
void fl__conn_dispatch(fl_conn *c, struct req *r, int more_waiting)
{
    int alone;

    pthread_mutex_lock(&c->lock);
    alone = c->in_flight == 0 && c->rend == c->rstart && !more_waiting;
    /* A small WRITE to a disk with no session (no copy before it can make
     * it wait) goes into the page cache in microseconds: a hand-off to a
     * worker would cost more than it does. */
    if (r->cmd == CMD_WRITE && r->len <= INLINE_WRITE_MAX && c->file != NULL
        && c->cached
        && __atomic_load_n(&c->file->sessions, __ATOMIC_ACQUIRE) == NULL
        && !fl_file_is_direct(c->file))
        alone = 1;
    c->in_flight++;
    c->inflight_bytes += req_bytes(r);
    pthread_mutex_unlock(&c->lock);
    if (alone) {
        fl__conn_flush_batch(c);
        run_req(c, r);
        req_done(c, r);
        free(r->payload);
        free(r);
        return;
    }
    fl__conn_ref(c);
    if (fl__queue_submit_fn(c->q, c->session != NULL, worker_req, r) < 0) {
        fl__conn_unref(c);
        fl__conn_reply_error(c, r->cookie, N_ESHUTDOWN, "server is shutting down");
        req_done(c, r);
        free(r->payload);
        free(r);
    }
}
