/* fleeced native data path: a native connection's receive thread.
 *
 * Design notes.  One thread per connection reads requests (recv with
 * MSG_DONTWAIT into a 256 KiB buffer, poll on the socket and the wake
 * eventfd), checks each, and hands it to conn_dispatch.c; it also drains
 * the out-queue when the socket takes more (POLLOUT) and makes the pieces
 * of streamed READs.  A snapshot export's receive thread runs at nice
 * SNAP_NICE, as the snapshot pool's workers do: under contention a backup
 * yields the CPU to the guest's connections.
 *
 * The NBD rules (proto.md "Transmission phase"): the checks are written
 * from the engine's rule table (struct fl_conn_rule[8], built by engine.py
 * _build_rules, which stays the specification:
 * tests/integration/test_conn_diff.py feeds the same byte streams to both
 * and requires the same replies and the same closing decisions), in the
 * engine's order (engine.py _next_request: magic, DISC, WRITE payload over
 * 32 MiB, shutting down, unknown command, flags, static error, FLUSH
 * offset/length, zero length, range, maximum length, DF overflow,
 * alignment), with the engine's messages; a refused WRITE's payload is
 * read and dropped to keep the stream in sync; errors are simple replies
 * or ERROR chunks with a message when structured replies were negotiated.
 *
 * Flow control, per connection only (a client that stops reading costs
 * its own connection, nobody else's): no new request is taken while
 * MAX_IN_FLIGHT are in flight, or while the bytes of READs and WRITEs in
 * flight plus the out-queue exceed BUDGET (one request is always admitted
 * when nothing is in flight).  Shutting down, requests are parsed without
 * a budget: each is answered ESHUTDOWN in 16 bytes.
 *
 * At the end the thread stops reading, waits for requests in flight and
 * lets their replies out (bounded by DRAIN_MS for a client that no longer
 * reads), closes the socket with a lingering close (linger(): a request
 * racing the close must not reset the connection under replies the client
 * has not read) and signals done_fd.
 *
 * Locks (conn.c has the table):
 *   lock       taken to read the budget and to publish `ended`;
 *   send_lock  taken to look at the out-queue, never across a wait;
 *   none       the receive buffer and the batch, this thread's alone.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "conn.h"

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
 * queued replies meanwhile.  0, or -1 when aborted or torn: a send that
 * failed here (the client went away while over its budget) ends the
 * connection, since nothing else would wake this wait. */
static int admit(fl_conn *c)
{
    /* The common case, nothing in flight and nothing queued, without a
     * lock (both only grow on this thread). */
    if (__atomic_load_n(&c->in_flight, __ATOMIC_ACQUIRE) == 0
        && __atomic_load_n(&c->oq_bytes, __ATOMIC_ACQUIRE) == 0
        && !__atomic_load_n(&c->aborted, __ATOMIC_ACQUIRE))
        return 0;
    for (;;) {
        int ok, aborted, pending, torn;

        pthread_mutex_lock(&c->lock);
        pthread_mutex_lock(&c->send_lock);
        torn = c->torn;
        pending = c->oq_head != NULL && !torn;
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
        if (aborted || torn)
            return -1;
        if (ok || __atomic_load_n(&c->mode, __ATOMIC_ACQUIRE) != MODE_RUN)
            return 0;   /* shutting down: answered ESHUTDOWN, no budget */
        if (c->batch_len) {     /* what waits for the socket goes first */
            fl__conn_flush_batch(c);
            continue;
        }
        if (pending && (wait_fd(c, POLLOUT, -1) & POLLOUT))
            fl__conn_drain_out(c);
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
            fl__conn_flush_batch(c);
            return 1;
        }
        /* Shutting down, what was received is answered (ESHUTDOWN: 16
         * bytes each) or dropped whatever is in flight. */
        mode = get_mode(c, &aborted);
        if (mode == MODE_RUN && admit(c) < 0)
            return 0;
        mode = get_mode(c, &aborted);
        if (get32(p) != REQUEST_MAGIC) {
            fl__conn_reason(c, "bad request magic 0x%08x", get32(p));
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
            fl__conn_reason(c, "WRITE payload of %u bytes exceeds %u", len, MAX_PAYLOAD);
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
            fl__conn_reply_error(c, cookie, err, msg);
            continue;
        }
        if (cmd == CMD_READ && len <= CACHED_MAX && c->cached
            && fl__queue_delay(c->q, FL_OP_READ) == 0 && fl__conn_try_cached(c, flags, cookie, off, len))
            continue;
        if (cmd == CMD_READ && len > PIECE) {
            fl__conn_queue_stream(c, &(struct req){ c, flags, cmd, cookie, off, len, NULL });
            continue;
        }
        r = calloc(1, sizeof *r);
        if (r == NULL) {
            fl__conn_reason(c, "out of memory");
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
                    fl__conn_reason(c, "client left in a WRITE payload");
                return 0;
            }
        }
        fl__conn_dispatch(c, r, more_waiting);
    }
}

/* A lingering close.  Bytes the client sends after the last look
 * (a request racing the decision to close) would still be unread at
 * close(2), and closing a socket with unread bytes resets the connection:
 * the client then loses the replies it has not read yet.  So the end goes
 * out first (SHUT_WR: the client reads every reply, then EOF), and what
 * the client still sends is read and dropped until it closes too, or
 * LINGER_MS passes, or an abort.  Not after the client's own EOF (it sends
 * nothing more) or a torn stream. */
static void linger(fl_conn *c)
{
    struct timespec t0, t;
    uint8_t sink[4096];
    int torn;

    pthread_mutex_lock(&c->send_lock);
    torn = c->torn;
    if (!torn && !c->eof)
        shutdown(c->fd, SHUT_WR);
    pthread_mutex_unlock(&c->send_lock);
    if (torn || c->eof)
        return;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        long ms;
        ssize_t n;
        int aborted;

        clock_gettime(CLOCK_MONOTONIC, &t);
        ms = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
        get_mode(c, &aborted);
        if (aborted || ms >= LINGER_MS)
            return;
        if (!(wait_fd(c, POLLIN, (int)(LINGER_MS - ms)) & (POLLIN | POLLHUP | POLLERR)))
            continue;
        n = recv(c->fd, sink, sizeof sink, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            return;
    }
}

void *fl__conn_recv_thread(void *arg)
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
            fl__conn_drain_out(c);
        if (!(ev & (POLLIN | POLLHUP | POLLERR)))
            continue;
        rc = fill(c);
        if (rc == 0) {
            c->eof = 1;
            break;
        }
        if (rc < -1) {
            fl__conn_reason(c, "receive failed: %s", strerror(-rc));
            break;
        }
        if (rc == 1)
            go = parse(c, c->rend == RBUF_SIZE);
    }
    fl__conn_flush_batch(c);
    /* Over: nothing more is read.  Wait for requests in flight, and let
     * their replies out (bounded: a client that no longer reads). */
    {
        struct timespec t0, t;
        int empty, aborted, pending, torn;

        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            long ms;

            fl__conn_drain_out(c);
            pthread_mutex_lock(&c->send_lock);
            torn = c->torn;
            pthread_mutex_unlock(&c->send_lock);
            if (torn)
                fl__conn_drop_queue(c);
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
                fl__conn_reason(c, "client did not read its replies");
            }
            wait_fd(c, pending ? POLLOUT : 0, pending ? 100 : -1);
        }
    }
    linger(c);
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
    fl__conn_unref(c);
    return NULL;
}

