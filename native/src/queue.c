/* fleeced native data path: an I/O queue with C worker threads and an
 * eventfd completion ring.
 *
 * Design notes.  The event loop submits an operation (fl_queue_submit*: a
 * short, non-blocking call) and later reaps completions in batches
 * (fl_queue_reap) when the eventfd becomes readable.  Worker threads are
 * plain pthreads that run the blocking fl_file_* / fl_session_* calls; they
 * never touch Python or the GIL, so a request costs no Python thread
 * hand-off.  Everything that may block on I/O or on a lock held across I/O
 * goes through here, session open and close and block status included,
 * so the event loop never waits for any of it.
 *
 * Lifetimes: an operation holds a reference on the object it points at
 * (fl_file, fl_session, fl_sock), taken in submit and dropped after the
 * worker ran it, so the owner may close the object at any time and
 * nothing is freed while an operation that points at it is queued or
 * running.  An operation that runs after its object was closed fails
 * -ESHUTDOWN.  Caller buffers are the one exception: the caller
 * (datapath.py) keeps each buffer alive until its id is reaped.
 *
 * Priorities, two pools: guest ops (on an fl_file, and session open and
 * close) run in the guest pool; snapshot ops (reads, discards and block
 * status of a session's frozen view) run in a pool of their own whose
 * threads lower their scheduling priority (nice SNAP_NICE) once at start.
 * So a backup pulling at full speed can neither take a worker from guest
 * writes nor their CPU: when the host is short of CPU, the scheduler
 * runs the guest's copy-before-write and write first and the backup's
 * copies into the socket with what is left.  Measured: guest 4k
 * writes during back-to-back backups on 2 cores went from 3-5k IOPS at a
 * p99 of 18-32 ms to 18-20k IOPS at 5.5-7 ms, the backup's MB/s unchanged
 * (qemu-storage-daemon 7.2: 8k IOPS, 5 ms).  Raising one's own nice value
 * needs no privilege, and lowering it back would (the service runs with
 * no capabilities), hence fixed pools rather than re-nicing per op.
 *
 * Wake-ups, one rule per pool: every op waiting there has an idle worker
 * of that pool woken for it (or every idle worker is woken already), or
 * a woken worker is on its way that will see to it.  A worker that gets
 * up, and every change to `stopping`, run wake_locked(), which wakes a
 * worker for each op still waiting (when stopping: every idle worker); a
 * submission only wakes one worker when none is on its way
 * (wake_one_locked()), so that the event loop pays for one futex wake-up
 * per burst of requests, not one per request (4k QD16 writes: +20-45 %
 * IOPS; guest writes during a backup: 17k instead of 11k IOPS at a p99 of
 * 6.5 instead of 9-11 ms).  A worker never relies on a busy worker to
 * pick an op up later: that busy worker may sit in a slow op for seconds.
 * The wake-ups are counted under the lock and signalled after it is
 * released (see wake_locked()).
 *
 * Counting: the sendfile reply counts its READ in the file's stats
 * (fl__file_count, relaxed atomics, no lock), as fl_file_read would; an
 * op with FL_PIECE (a later piece of one streamed READ) adds its bytes
 * but no request.
 *
 * Locking: q->lock guards the pending lists, the done list, `stopping`,
 * the counters and the test hook; it is never held across I/O.  Workers
 * wait on their pool's `work`.  A worker writes the eventfd when the done list goes
 * from empty to non-empty; fl_queue_reap resets the eventfd before it
 * takes the list, so a readable eventfd always means "something to reap"
 * and no completion is left unsignalled.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define THREADS_MAX 64u
#define HDR_MAX 32u
/* The snapshot pool's nice value: the lowest weight short of SCHED_IDLE
 * (nice 10 kept guest p99 at 8-18 ms in the measurement above, nice 19
 * at 5.5-7 ms).  CPU the guest does not want still all goes to the
 * backup; only contention is decided in the guest's favour. */
#define SNAP_NICE 19

/* A connection's socket for replies written by workers.  Owns a dup of
 * the descriptor, so the event loop closing its own copy can never make a
 * worker write into a reused descriptor number.  Reference counted like
 * files and sessions: fl_sock_close gives up the owner's reference, and
 * the descriptor closes with the last one. */
struct fl_sock {
    unsigned refs;            /* atomic */
    int fd;                   /* immutable: our dup (MSG_DONTWAIT sends) */
    pthread_mutex_t lock;     /* one reply on the wire at a time (workers
                                 only; may be held across file I/O) */
    int stalled;              /* atomic: a reply went out in part, hands
                                 off; set by workers under `lock`, cleared
                                 by fl_sock_resume without it */
};

struct op {
    uint64_t id;
    int kind;
    void *obj;                /* referenced while the op lives */
    uint8_t *buf;
    uint64_t len, off;
    unsigned flags;
    int rc, done;             /* done: FL_DONE_* bits */
    fl_sock *sock;            /* send the reply here (header [+ data]) */
    uint8_t hdr[HDR_MAX];
    size_t hdr_len;
    /* EXTENTS / SNAP_EXTENTS outputs, SESSION_OPEN params and result */
    uint64_t *ext_lens;
    uint32_t *ext_flags;
    size_t ext_max, *ext_n;
    const struct fl_session_params *params;
    fl_session **session_out;
    int32_t *rcs;             /* WRITE_RUN: one result per request */
    void (*fn)(void *);       /* FN: the work, run in a worker */
    struct op *next;
};

struct opq {
    struct op *head, *tail;       /* FIFO */
    uint64_t n;
};

enum { POOL_GUEST, POOL_SNAP, POOLS };

struct pool {
    fl_queue *q;                  /* immutable */
    unsigned size;                /* immutable: its workers */
    pthread_cond_t work;          /* an op is pending here, or stopping */
    /* guarded by q->lock: */
    struct opq pending;
    unsigned idle;                /* workers waiting on `work` */
    unsigned woken;               /* of those, signalled and not yet up */
};

struct fl_queue {
    int efd;                      /* immutable: completion eventfd */
    unsigned nthreads;            /* immutable: started, both pools */
    pthread_t *threads;           /* immutable after open */
    pthread_mutex_t lock;
    struct pool pool[POOLS];      /* guest ops, snapshot ops */
    /* guarded by lock: */
    struct op *done_head, *done_tail;
    int stopping;
    int delay_kind, delay_ms;     /* test hook: slow ops of one kind */
};

/* ---- objects and references ------------------------------------------ */

/* An op that runs a native connection's request (conn_dispatch.c): no object of
 * its own (the caller took its references), no completion to reap. */
#define OP_FN 100

static int is_lo_kind(int kind)
{
    return kind == FL_OP_SNAP_READ || kind == FL_OP_SNAP_DISCARD ||
           kind == FL_OP_SNAP_EXTENTS;
}

static int is_session_kind(int kind)
{
    /* FL_OP_SNAP_PUT is not low: a guest write waits for it elsewhere. */
    return is_lo_kind(kind) || kind == FL_OP_SESSION_CLOSE || kind == FL_OP_SNAP_PUT;
}

static void obj_ref(const struct op *o)
{
    if (o->kind == OP_FN)
        return;
    if (is_session_kind(o->kind))
        fl__session_ref(o->obj);
    else
        fl__file_ref(o->obj);
    if (o->sock != NULL)
        __atomic_add_fetch(&o->sock->refs, 1, __ATOMIC_RELAXED);
}

static void sock_unref(fl_sock *s)
{
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    close(s->fd);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static void obj_unref(const struct op *o)
{
    if (o->kind == OP_FN)
        return;
    if (is_session_kind(o->kind))
        fl__session_unref(o->obj);
    else
        fl__file_unref(o->obj);
    if (o->sock != NULL)
        sock_unref(o->sock);
}

static int obj_closed(const struct op *o)
{
    /* SESSION_CLOSE is the owner's close itself. */
    if (o->kind == FL_OP_SESSION_CLOSE)
        return 0;
    if (is_session_kind(o->kind))
        return fl__session_closed(o->obj);
    return fl__file_closed(o->obj);
}

/* ---- worker-written replies ------------------------------------------- */

/* After a successful read or write: put the reply on the wire if that can be done
 * without waiting.  Outcomes (o->done bits, o->rc):
 *   hole, not sent        FL_DONE_HOLE, rc 0 (the caller describes it)
 *   sent whole            FL_DONE_SENT, rc 0
 *   not sent at all       0, rc 0 (socket full or stalled: caller sends)
 *   (a read that finds the socket stalled before it starts is deferred
 *   unread instead: FL_DONE_DEFER, see run_op)
 *   sent in part          FL_DONE_SENT, rc = bytes sent > 0; the socket is
 *                         now stalled: no worker writes to it until
 *                         fl_sock_resume, and the caller must write the
 *                         rest before anything else
 *   send error            FL_DONE_SENT, rc < 0 (stream torn) */
static void send_reply(struct op *o, int hole)
{
    struct iovec iov[2];
    ssize_t n;
    /* A READ reply carries the data read; a WRITE reply is HDR alone. */
    int with_data = o->kind != FL_OP_WRITE;
    size_t total = o->hdr_len + (with_data ? (size_t)o->len : 0);

    if (hole) {
        o->done = FL_DONE_HOLE;
        return;
    }
    iov[0].iov_base = o->hdr;
    iov[0].iov_len = o->hdr_len;
    iov[1].iov_base = o->buf;
    iov[1].iov_len = (size_t)o->len;
    pthread_mutex_lock(&o->sock->lock);
    if (__atomic_load_n(&o->sock->stalled, __ATOMIC_ACQUIRE)) {
        pthread_mutex_unlock(&o->sock->lock);
        o->done = 0;
        return;
    }
    n = fl__send_nowait(o->sock->fd, iov, with_data ? 2 : 1);
    if (n > 0 && (size_t)n < total)
        __atomic_store_n(&o->sock->stalled, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&o->sock->lock);
    if (n == 0) {
        o->done = 0;
    } else if (n < 0) {
        o->done = FL_DONE_SENT;
        o->rc = (int)n;
    } else {
        o->done = FL_DONE_SENT;
        o->rc = (size_t)n < total ? (int)n : 0;
    }
}

/* A READ of the image whose reply goes to a socket: the header, then the
 * data straight from the page cache with sendfile(2), so the server
 * copies no byte (pread + send copies each twice).  Same outcomes as
 * send_reply.  The sock lock is held across sendfile, which may read the
 * disk: only workers take it (fl_sock_resume does not).  Where the socket
 * takes only part, the rest of the data is read into o->buf for the
 * caller, so a partial reply is finished from memory as before.
 *
 * Only for an image that is a file (the active export; an NBD upstream
 * is read into o->buf and sent as a snapshot read is).  Never for a session's frozen
 * view: the socket keeps references to the page-cache pages, not copies,
 * until the peer reads them, so a guest write landing after sendfile
 * returned would reach the backup (shown on Linux 6.18 for Unix and TCP
 * sockets).  For the image itself that is a read racing a
 * write, which may return either data. */
static void sendfile_reply(struct op *o)
{
    fl_file *f = o->obj;
    size_t total = o->hdr_len + (size_t)o->len, sent = 0;
    struct iovec iov = { o->hdr, o->hdr_len };
    unsigned piece = o->flags & FL_PIECE;
    ssize_t n;
    int rc;

    o->done = 0;
    rc = fl__range_ok(o->off, o->len, f->size);
    if (rc < 0) {
        fl__file_count_as(f, FL_CMD_READ, 0, rc, piece == 0);
        o->rc = rc;
        return;
    }
    if (fl__range_is_hole(f->fd, f->is_blk, o->off, o->len)) {
        memset(o->buf, 0, (size_t)o->len);
        o->done = FL_DONE_HOLE;
        o->rc = 0;
        fl__file_count_as(f, FL_CMD_READ, o->len, 0, piece == 0);
        return;
    }
    pthread_mutex_lock(&o->sock->lock);
    if (!__atomic_load_n(&o->sock->stalled, __ATOMIC_ACQUIRE)) {
        n = fl__send_nowait(o->sock->fd, &iov, 1);
        if (n == (ssize_t)o->hdr_len) {
            off_t pos = (off_t)o->off;
            sent = o->hdr_len;
            /* Any stop, a full socket or an error (a file system
             * without splice support says EINVAL), hands the rest to the
             * caller as a partial reply: it is read into o->buf below,
             * and a dead socket then fails the caller's write. */
            while (sent < total) {
                n = sendfile(o->sock->fd, f->fd, &pos, total - sent);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0)
                    break;
                sent += (size_t)n;
            }
        } else if (n > 0) {
            sent = (size_t)n;
        } else if (n < 0) {
            pthread_mutex_unlock(&o->sock->lock);
            o->done = FL_DONE_SENT;
            o->rc = (int)n;
            return;
        }
        if (sent > 0 && sent < total)
            __atomic_store_n(&o->sock->stalled, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&o->sock->lock);
    if (sent == total) {
        o->done = FL_DONE_SENT;
        o->rc = 0;
        fl__file_count_as(f, FL_CMD_READ, o->len, 0, piece == 0);
        return;
    }
    /* The caller writes the rest from o->buf: read what was not sent. */
    {
        size_t from = sent > o->hdr_len ? sent - o->hdr_len : 0;

        rc = fl__full_pread(f->fd, o->buf + from, (size_t)o->len - from,
                            o->off + from);
    }
    fl__file_count_as(f, FL_CMD_READ, o->len, rc, piece == 0);
    if (sent == 0) {
        o->rc = rc;
    } else {
        o->done = FL_DONE_SENT;
        o->rc = rc < 0 ? rc : (int)sent;
    }
}

/* ---- running one op ----------------------------------------------------- */

static void sleep_ms(int ms)
{
    struct timespec ts = { .tv_sec = ms / 1000,
                           .tv_nsec = (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void run_op(struct op *o, int delay_ms)
{
    int hole = 0;

    if (delay_ms > 0)
        sleep_ms(delay_ms);
    if (obj_closed(o)) {
        o->rc = -ESHUTDOWN;
        o->done = 0;
        return;
    }
    if (o->sock != NULL && o->kind != FL_OP_WRITE
        && __atomic_load_n(&o->sock->stalled, __ATOMIC_ACQUIRE)) {
        /* The caller is still writing the rest of a partial reply, so
         * this one could not go out now: reading it into o->buf only to
         * have the caller send it later costs a copy for nothing (and
         * the caller's thread the send).  Hand it back unread; it is
         * submitted again once the socket is resumed.  A stall that
         * starts after this check is handled by the send as before. */
        o->rc = 0;
        o->done = FL_DONE_DEFER;
        return;
    }
    switch (o->kind) {
    case FL_OP_READ:
        if (o->sock != NULL && !fl_file_is_upstream(o->obj) && !fl_file_is_direct(o->obj)) {
            sendfile_reply(o);
            return;
        }
        o->rc = fl__file_read(o->obj, o->buf, (size_t)o->len, o->off, &hole,
                              (o->flags & FL_PIECE) != 0);
        break;
    case FL_OP_WRITE:
        o->rc = fl_file_write(o->obj, o->buf, (size_t)o->len, o->off, o->flags);
        break;
    case FL_OP_WRITE_RUN: /* off: the request count */
        o->rc = fl__file_write_run(o->obj, o->buf, (size_t)o->len, (uint32_t)o->off,
                                   o->rcs);
        break;
    case FL_OP_ZERO:
        o->rc = fl_file_zero(o->obj, o->off, o->len, o->flags);
        break;
    case FL_OP_TRIM:
        o->rc = fl_file_trim(o->obj, o->off, o->len);
        if (o->rc == 0 && (o->flags & FL_FUA))
            o->rc = fl_file_flush(o->obj);
        break;
    case FL_OP_FLUSH:
        o->rc = fl_file_flush(o->obj);
        break;
    case FL_OP_CACHE:
        o->rc = fl_file_cache(o->obj, o->off, o->len);
        break;
    case FL_OP_SNAP_READ:
        o->rc = fl_session_read(o->obj, o->buf, (size_t)o->len, o->off, &hole);
        break;
    case FL_OP_SNAP_DISCARD:
        o->rc = fl_session_discard(o->obj, o->off, o->len);
        break;
    case FL_OP_SNAP_PUT:
        o->rc = fl_session_put_old(o->obj, o->buf, o->len, o->off);
        break;
    case FL_OP_EXTENTS:
        o->rc = fl_file_extents(o->obj, o->off, o->len, o->ext_lens,
                                o->ext_flags, o->ext_max, o->ext_n);
        break;
    case FL_OP_SNAP_EXTENTS:
        o->rc = fl_session_extents(o->obj, o->off, o->len, o->ext_lens,
                                   o->ext_flags, o->ext_max, o->ext_n);
        break;
    case FL_OP_SESSION_OPEN:
        o->rc = fl_session_open(o->obj, o->params, o->session_out);
        break;
    case FL_OP_SESSION_CLOSE:
        /* The submitter handed its (owner's) reference over to us. */
        fl_session_close(o->obj);
        o->rc = 0;
        break;
    default:
        o->rc = -EINVAL;
    }
    o->done = hole ? FL_DONE_HOLE : 0;
    if (o->sock != NULL && o->rc == 0)
        send_reply(o, hole);
}

/* ---- pending lists and the wake-up rule --------------------------------- */

static void opq_push(struct opq *l, struct op *o)
{
    o->next = NULL;
    if (l->tail != NULL)
        l->tail->next = o;
    else
        l->head = o;
    l->tail = o;
    l->n++;
}

static struct op *opq_pop(struct opq *l)
{
    struct op *o = l->head;

    if (o != NULL) {
        l->head = o->next;
        if (l->head == NULL)
            l->tail = NULL;
        l->n--;
    }
    return o;
}

static struct pool *pool_of(fl_queue *q, const struct op *o)
{
    if (o->kind == OP_FN)   /* flags: 1 for the snapshot pool */
        return &q->pool[o->flags ? POOL_SNAP : POOL_GUEST];
    return &q->pool[is_lo_kind(o->kind) ? POOL_SNAP : POOL_GUEST];
}

/* The full wake-up rule (see the design notes): every op pending in P
 * gets an idle worker of P woken for it, or every idle worker of P is
 * woken already; when stopping, every idle worker wakes.  Run with q->lock
 * held by a worker that got up and on every change to `stopping`
 * (submissions use wake_one_locked()).  Only counts: returns how many to
 * signal, which the caller does with signal_work() once it released the
 * lock: a worker signalled while the lock is held would wake only to block
 * on it (measured: workers spent a quarter of their samples in
 * lll_lock_wait at 4k QD16 writes).  Safe: a worker counted here is still
 * waiting, or left the wait on a spurious wake-up and took an op itself;
 * a signal that then finds a different or no waiter costs nothing, since
 * a worker never waits while ops are pending. */
static unsigned wake_locked(struct pool *p)
{
    uint64_t want = p->q->stopping ? p->idle : p->pending.n;
    unsigned n = 0;

    if (want > p->idle)
        want = p->idle;
    while (p->woken < want) {
        p->woken++;
        n++;
    }
    return n;
}

/* The submitter's share of the rule: wake one idle worker, unless one is
 * woken already (signalled, not yet up).  That worker, on getting up,
 * runs wake_locked() for whatever else is pending by then, so the
 * remaining wake-ups cost a worker's time instead of the event loop's
 * (a futex wake of a thread on another CPU costs the waker several
 * microseconds on a VM: at 4k QD16 writes the loop spent half its time
 * in fl_queue_submit).  Returns how many to signal (0 or 1). */
static unsigned wake_one_locked(struct pool *p)
{
    if (p->pending.n == 0 || p->woken > 0 || p->idle == 0)
        return 0;
    p->woken++;
    return 1;
}

static void signal_work(struct pool *p, unsigned n)
{
    while (n-- > 0)
        pthread_cond_signal(&p->work);
}

static void *worker(void *arg)
{
    struct pool *p = arg;
    fl_queue *q = p->q;
    struct op *o;
    uint64_t one = 1;
    ssize_t n;
    int was_empty, delay;
    unsigned wake;

    if (p == &q->pool[POOL_SNAP])   /* best effort: no error is fatal */
        (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), SNAP_NICE);
    for (;;) {
        pthread_mutex_lock(&q->lock);
        while ((o = opq_pop(&p->pending)) == NULL) {
            if (q->stopping) {
                pthread_mutex_unlock(&q->lock);
                return NULL;            /* stopping and drained */
            }
            p->idle++;
            pthread_cond_wait(&p->work, &q->lock);
            p->idle--;
            if (p->woken > 0)   /* a spurious wake only over-signals later */
                p->woken--;
        }
        wake = wake_locked(p);  /* more pending ops: more workers */
        delay = o->kind == q->delay_kind ? q->delay_ms : 0;
        if (o->kind == FL_OP_WRITE_RUN && q->delay_kind == FL_OP_WRITE) {
            uint64_t d = (uint64_t)q->delay_ms * o->off; /* each write */
            delay = d > 3600000u ? 3600000 : (int)d;
        }
        pthread_mutex_unlock(&q->lock);
        signal_work(p, wake);

        if (o->kind == OP_FN) {
            o->fn(o->obj);      /* it answers its request itself */
            free(o);
            continue;
        }
        run_op(o, delay);
        obj_unref(o);           /* may free the object: last use of it */

        o->next = NULL;
        pthread_mutex_lock(&q->lock);
        was_empty = q->done_head == NULL;
        if (q->done_tail != NULL)
            q->done_tail->next = o;
        else
            q->done_head = o;
        q->done_tail = o;
        pthread_mutex_unlock(&q->lock);
        /* Signal only the empty -> non-empty edge: the reaper takes the
         * whole list after resetting the eventfd, so a completion queued
         * behind others is never left without a signal. */
        if (was_empty) {
            do
                n = write(q->efd, &one, sizeof one);
            while (n < 0 && errno == EINTR);
        }
    }
}

int fl_queue_open(unsigned nthreads, fl_queue **out)
{
    fl_queue *q;
    unsigned i, snap;
    int rc;

    *out = NULL;
    if (nthreads == 0 || nthreads > THREADS_MAX)
        return -EINVAL;
    /* Snapshot workers: three quarters of the guest pool, at least one. */
    snap = nthreads - nthreads / 4;
    q = calloc(1, sizeof *q);
    if (q == NULL)
        return -ENOMEM;
    q->threads = calloc(nthreads + snap, sizeof *q->threads);
    if (q->threads == NULL) {
        free(q);
        return -ENOMEM;
    }
    q->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->efd < 0) {
        rc = -errno;
        free(q->threads);
        free(q);
        return rc;
    }
    pthread_mutex_init(&q->lock, NULL);
    q->pool[POOL_GUEST].size = nthreads;
    q->pool[POOL_SNAP].size = snap;
    for (i = 0; i < POOLS; i++) {
        q->pool[i].q = q;
        pthread_cond_init(&q->pool[i].work, NULL);
    }
    for (i = 0; i < nthreads + snap; i++) {
        struct pool *p = &q->pool[i < nthreads ? POOL_GUEST : POOL_SNAP];

        rc = -pthread_create(&q->threads[i], NULL, worker, p);
        if (rc < 0) {
            q->nthreads = i;
            fl_queue_close(q);
            return rc;
        }
    }
    q->nthreads = nthreads + snap;
    *out = q;
    return 0;
}

int fl_queue_fd(const fl_queue *q)
{
    return q->efd;
}

/* Take O's references and queue it; frees O on refusal. */
static int enqueue(fl_queue *q, struct op *o)
{
    struct pool *p = pool_of(q, o);
    unsigned wake;

    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        free(o);
        return -ESHUTDOWN;
    }
    obj_ref(o);
    opq_push(&p->pending, o);
    wake = wake_one_locked(p);
    pthread_mutex_unlock(&q->lock);
    signal_work(p, wake);
    return 0;
}

/* A zeroed op on OBJ for [OFF, OFF+LEN), or NULL (out of memory). */
static struct op *new_op(uint64_t id, int kind, void *obj, uint64_t off,
                         uint64_t len)
{
    struct op *o = calloc(1, sizeof *o);

    if (o != NULL) {
        o->id = id;
        o->kind = kind;
        o->obj = obj;
        o->off = off;
        o->len = len;
    }
    return o;
}

int fl_queue_submit(fl_queue *q, uint64_t id, int kind, void *obj,
                    uint8_t *buf, uint64_t len, uint64_t off, unsigned flags)
{
    struct op *o;

    if (obj == NULL || ((kind < FL_OP_READ || kind > FL_OP_SNAP_DISCARD) &&
                        kind != FL_OP_SNAP_PUT))
        return -EINVAL;
    if ((kind == FL_OP_READ || kind == FL_OP_WRITE || kind == FL_OP_SNAP_READ)
        && (buf == NULL || len > SIZE_MAX))
        return -EINVAL;
    if ((flags & FL_PIECE) && kind != FL_OP_READ)
        return -EINVAL;
    o = new_op(id, kind, obj, off, len);
    if (o == NULL)
        return -ENOMEM;
    o->buf = buf;
    o->flags = flags;
    return enqueue(q, o);
}

int fl_queue_submit_send(fl_queue *q, uint64_t id, int kind, void *obj,
                         uint8_t *buf, uint64_t len, uint64_t off,
                         fl_sock *sock, const uint8_t *hdr, size_t hdr_len,
                         unsigned flags)
{
    struct op *o;

    if (obj == NULL || sock == NULL || buf == NULL || len > SIZE_MAX ||
        hdr_len > HDR_MAX || (hdr_len == 0 && kind == FL_OP_WRITE))
        return -EINVAL;
    if (kind == FL_OP_WRITE ? (flags & ~FL_FUA) != 0
        : (kind != FL_OP_READ && kind != FL_OP_SNAP_READ) ||
          (flags & ~(kind == FL_OP_READ ? FL_PIECE : 0u)) != 0 || len == 0)
        return -EINVAL;
    o = new_op(id, kind, obj, off, len);
    if (o == NULL)
        return -ENOMEM;
    o->buf = buf;
    o->flags = flags;
    o->sock = sock;
    o->hdr_len = hdr_len;
    memcpy(o->hdr, hdr, hdr_len);
    return enqueue(q, o);
}

int fl_queue_submit_write_run(fl_queue *q, uint64_t id, fl_file *f,
                              const uint8_t *req, size_t len, uint32_t count,
                              int32_t *rcs)
{
    struct op *o;

    if (f == NULL || req == NULL || rcs == NULL || count == 0 || len > SIZE_MAX)
        return -EINVAL;
    o = new_op(id, FL_OP_WRITE_RUN, f, count, len);
    if (o == NULL)
        return -ENOMEM;
    o->buf = (uint8_t *)req; /* only read */
    o->rcs = rcs;
    return enqueue(q, o);
}

int fl_queue_submit_extents(fl_queue *q, uint64_t id, int kind, void *obj,
                            uint64_t off, uint64_t len, uint64_t *lens,
                            uint32_t *flags, size_t max, size_t *n)
{
    struct op *o;

    if (obj == NULL || lens == NULL || flags == NULL || n == NULL ||
        max == 0 || (kind != FL_OP_EXTENTS && kind != FL_OP_SNAP_EXTENTS))
        return -EINVAL;
    o = new_op(id, kind, obj, off, len);
    if (o == NULL)
        return -ENOMEM;
    o->ext_lens = lens;
    o->ext_flags = flags;
    o->ext_max = max;
    o->ext_n = n;
    return enqueue(q, o);
}

int fl_queue_submit_open(fl_queue *q, uint64_t id, fl_file *f,
                         const struct fl_session_params *p, fl_session **out)
{
    struct op *o;

    if (f == NULL || p == NULL || out == NULL)
        return -EINVAL;
    *out = NULL;
    o = new_op(id, FL_OP_SESSION_OPEN, f, 0, 0);
    if (o == NULL)
        return -ENOMEM;
    o->params = p;
    o->session_out = out;
    return enqueue(q, o);
}

int fl_queue_submit_close(fl_queue *q, uint64_t id, fl_session *s)
{
    struct op *o;

    if (s == NULL)
        return -EINVAL;
    o = new_op(id, FL_OP_SESSION_CLOSE, s, 0, 0);
    if (o == NULL)
        return -ENOMEM;
    return enqueue(q, o);
}

int fl__queue_submit_fn(fl_queue *q, int snap, void (*fn)(void *), void *arg)
{
    struct op *o = new_op(0, OP_FN, arg, 0, 0);

    if (o == NULL)
        return -ENOMEM;
    o->fn = fn;
    o->flags = snap ? 1u : 0u;
    return enqueue(q, o);
}

int fl__queue_delay(fl_queue *q, int kind)
{
    /* Per request of a native connection: no lock (the hook is set by a
     * test before the requests it slows down). */
    if (__atomic_load_n(&q->delay_kind, __ATOMIC_RELAXED) != kind)
        return 0;
    return __atomic_load_n(&q->delay_ms, __ATOMIC_RELAXED);
}

int fl_queue_inject_delay(fl_queue *q, int kind, int ms)
{
    if (ms < 0 || ms > 60000)
        return -EINVAL;
    pthread_mutex_lock(&q->lock);
    __atomic_store_n(&q->delay_kind, kind, __ATOMIC_RELAXED);
    __atomic_store_n(&q->delay_ms, ms, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

int fl_sock_open(int fd, fl_sock **out)
{
    fl_sock *s;

    *out = NULL;
    if (fd < 0)
        return -EINVAL;
    s = calloc(1, sizeof *s);
    if (s == NULL)
        return -ENOMEM;
    s->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (s->fd < 0) {
        int rc = -errno;
        free(s);
        return rc;
    }
    s->refs = 1;
    pthread_mutex_init(&s->lock, NULL);
    *out = s;
    return 0;
}

void fl_sock_resume(fl_sock *s)
{
    /* Not under s->lock: a worker may hold it across file I/O, and this
     * runs on the event loop. */
    __atomic_store_n(&s->stalled, 0, __ATOMIC_RELEASE);
}

void fl_sock_close(fl_sock *s)
{
    if (s != NULL)
        sock_unref(s);
}

int fl_queue_reap(fl_queue *q, uint64_t *ids, int32_t *rcs, int32_t *bits,
                  size_t max, size_t *n)
{
    struct op *o;
    uint64_t count;
    size_t i = 0;

    *n = 0;
    /* Reset the counter first: a completion landing after this read
     * bumps it again, so nothing is ever left unsignalled. */
    if (read(q->efd, &count, sizeof count) < 0 && errno != EAGAIN
        && errno != EINTR)
        return -errno;
    pthread_mutex_lock(&q->lock);
    while (i < max && (o = q->done_head) != NULL) {
        q->done_head = o->next;
        if (q->done_head == NULL)
            q->done_tail = NULL;
        ids[i] = o->id;
        rcs[i] = o->rc;
        bits[i] = o->done;
        free(o);
        i++;
    }
    /* More than MAX done: keep the eventfd readable for the next call. */
    if (q->done_head != NULL) {
        uint64_t one = 1;
        ssize_t w = write(q->efd, &one, sizeof one);
        (void)w;
    }
    pthread_mutex_unlock(&q->lock);
    *n = i;
    return 0;
}

void fl_queue_close(fl_queue *q)
{
    struct op *o;
    unsigned i, wake[POOLS];

    if (q == NULL)
        return;
    pthread_mutex_lock(&q->lock);
    q->stopping = 1;
    for (i = 0; i < POOLS; i++)
        wake[i] = wake_locked(&q->pool[i]);
    pthread_mutex_unlock(&q->lock);
    for (i = 0; i < POOLS; i++)
        signal_work(&q->pool[i], wake[i]);
    for (i = 0; i < q->nthreads; i++)
        pthread_join(q->threads[i], NULL);
    while ((o = q->done_head) != NULL) {
        q->done_head = o->next;
        free(o);
    }
    close(q->efd);
    for (i = 0; i < POOLS; i++)
        pthread_cond_destroy(&q->pool[i].work);
    pthread_mutex_destroy(&q->lock);
    free(q->threads);
    free(q);
}
