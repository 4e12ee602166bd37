/* fleeced native data path: an NBD connection's transmission phase in C
 * (the connection object: start, references, shutdown, abort, stats).
 *
 * Design notes.  After the handshake (Python: options, TLS, policy) a
 * plain connection's socket is handed over here, and from then on no
 * byte of it passes through the event loop.  The work is in three rooms,
 * each with its own notes:
 *   conn_recv.c      one receive thread per connection reads requests,
 *                    checks each against the engine's rule table and
 *                    applies flow control;
 *   conn_dispatch.c  runs a checked request, inline on the receive thread
 *                    or in a worker of the I/O queue (queue.c);
 *   conn_reply.c     the thread that completed a request writes its reply
 *                    (nbdkit's shape), under the send lock, never waiting
 *                    for the client; what the socket does not take waits
 *                    in the out-queue, drained by the receive thread.
 * Python hears from a connection only through done_fd (an eventfd the
 * event loop watches) and fl_conn_stats (counters, why it ended).
 *
 * Lifetimes: references as everywhere in the library: the owner's
 * (fl_conn_start .. fl_conn_close), the receive thread's (until it
 * exits), and one per request handed to a worker (until it answered).
 * The connection holds a reference on its file or session and on each
 * bitmap of a negotiated dirty-bitmap context, so none of them goes away
 * under a request.  The socket is closed by the receive thread once the
 * connection ended and nothing of it is in flight; done_fd then becomes
 * readable.
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
 * Locks of struct fl_conn (never held across anything that may block,
 * with the one exception conn_reply.c names):
 *   lock       in_flight, inflight_bytes, ended, mode, aborted, stats
 *              (the byte and request counters are atomics instead),
 *              waiting;
 *   send_lock  the out-queue and its byte count (written under it, read
 *              without it by admit()'s fast path and fl_conn_stats, an
 *              atomic load of one aligned word), `torn`, writes to the
 *              socket (each MSG_DONTWAIT, so held only for the copy into
 *              the kernel), `fd` going to -1; a stream entry's piece
 *              fields belong to the receive thread alone;
 *   none       rbuf, rstart, rend, batch, eof: the receive thread alone;
 *              everything set in fl_conn_start: immutable after it.
 * Order: lock, then send_lock (admit() reads both budgets at once);
 * nothing takes lock while holding send_lock.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"

/* ---- references --------------------------------------------------------- */

static void conn_free(fl_conn *c)
{
    uint32_t i;
    struct outq *e;

    while ((e = c->oq_head) != NULL) {
        c->oq_head = e->next;
        fl__conn_free_entry(e);
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

void fl__conn_ref(fl_conn *c)
{
    __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
}

void fl__conn_unref(fl_conn *c)
{
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0)
        conn_free(c);
}

void fl__conn_reason(fl_conn *c, const char *fmt, ...)
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
    rc = -pthread_create(&c->thread, NULL, fl__conn_recv_thread, c);
    if (rc < 0) {
        c->refs = 1;
        fl__conn_unref(c);
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
    fl__conn_reason(c, "aborted");
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
    /* Not under send_lock, which a streamed READ holds across its pread:
     * the owner's thread (the event loop) must never wait on I/O. */
    out->reply_bytes = c->inflight_bytes
                       + __atomic_load_n(&c->oq_bytes, __ATOMIC_RELAXED);
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
    fl__conn_unref(c);
}
