/* fleeced native data path: an I/O queue with C worker threads and an
 * eventfd completion ring.
 *
 * Design notes.  The event loop submits an operation (fl_queue_submit: a
 * short, non-blocking call) and later reaps completions in batches
 * (fl_queue_reap) when the eventfd becomes readable.  Worker threads are
 * plain pthreads that run the blocking fl_file_* / fl_session_* calls; they
 * never touch Python or the GIL, so a request costs no Python thread
 * hand-off.  This replaces a Python ThreadPoolExecutor on the hot path
 * (DESIGN.md "Decided": the benchmark chose the eventfd completion queue).
 *
 * Buffer lifetime: this is the one place where C keeps a caller's pointer
 * after returning.  The caller (datapath.py) keeps the buffer and its cffi
 * handle alive until the operation's id comes back from fl_queue_reap.
 * The objects (fl_file / fl_session) must likewise stay open until every
 * operation on them is reaped.
 *
 * Priorities: guest ops (on an fl_file) are taken before snapshot ops (on
 * an fl_session), and snapshot ops never occupy more than lo_max workers,
 * so a backup pulling at full speed cannot starve guest writes.
 *
 * Locking: q->lock guards the pending list, the done list, `stopping` and
 * the counters; it is never held across I/O.  Workers wait on q->work.
 * A worker writes the eventfd when the done list goes from empty to
 * non-empty; fl_queue_reap resets the eventfd before it takes the list, so
 * a readable eventfd always means "something to reap" and no completion is
 * left unsignalled.  Submitters wake a worker only when one is idle.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

#define THREADS_MAX 64u
#define HDR_MAX 32u

/* A connection's socket for replies written by workers.  Owns a dup of
 * the descriptor, so the event loop closing its own copy can never make a
 * worker write into a reused descriptor number. */
struct fl_sock {
    int fd;                   /* immutable: our dup (MSG_DONTWAIT sends) */
    pthread_mutex_t lock;     /* one reply on the wire at a time; guards: */
    int stalled;              /* a reply went out in part: hands off */
};

struct op {
    uint64_t id;
    int kind;
    void *obj;
    uint8_t *buf;
    uint64_t len, off;
    unsigned flags;
    int rc, hole;             /* hole: FL_DONE_* bits */
    fl_sock *sock;            /* READ/SNAP_READ: send header + data here */
    uint8_t hdr[HDR_MAX];
    size_t hdr_len;
    struct op *next;
};

struct opq {
    struct op *head, *tail;       /* FIFO */
};

struct fl_queue {
    int efd;                      /* immutable: completion eventfd */
    unsigned nthreads;            /* immutable */
    pthread_t *threads;           /* immutable after open */
    pthread_mutex_t lock;
    pthread_cond_t work;          /* signalled on submit and stop */
    /* guarded by lock: */
    struct opq hi, lo;            /* pending: guest (file) ops, snapshot ops */
    unsigned lo_running, lo_max;  /* snapshot ops running, and their cap */
    struct op *done_head, *done_tail;
    unsigned idle;                /* workers waiting on `work` */
    unsigned signalled;           /* of those, already signalled */
    uint64_t pending;             /* ops in head..tail */
    int stopping;
};

/* Write IOV to S without ever waiting: returns the bytes written (all of
 * them, or fewer when the socket buffer filled up), or -errno. */
static ssize_t send_some(fl_sock *s, struct iovec *iov, int iovcnt)
{
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)iovcnt };
    ssize_t total = 0;

    while (m.msg_iovlen > 0) {
        ssize_t n = sendmsg(s->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return total;
            return -errno;
        }
        total += n;
        while (n > 0 && m.msg_iovlen > 0) {
            if ((size_t)n >= m.msg_iov->iov_len) {
                n -= (ssize_t)m.msg_iov->iov_len;
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

/* After a successful read: put the reply on the wire if that can be done
 * without waiting.  Outcomes (o->hole bits, o->rc):
 *   hole, not sent        FL_DONE_HOLE, rc 0 (the caller describes it)
 *   sent whole            FL_DONE_SENT, rc 0
 *   not sent at all       0, rc 0 (socket full or stalled: caller sends)
 *   sent in part          FL_DONE_SENT, rc = bytes sent > 0; the socket is
 *                         now stalled: no worker writes to it until
 *                         fl_sock_resume, and the caller must write the
 *                         rest before anything else
 *   send error            FL_DONE_SENT, rc < 0 (stream torn) */
static void send_reply(struct op *o, int hole)
{
    struct iovec iov[2];
    ssize_t n;
    size_t total = o->hdr_len + (size_t)o->len;

    if (hole) {
        o->hole = FL_DONE_HOLE;
        return;
    }
    iov[0].iov_base = o->hdr;
    iov[0].iov_len = o->hdr_len;
    iov[1].iov_base = o->buf;
    iov[1].iov_len = (size_t)o->len;
    pthread_mutex_lock(&o->sock->lock);
    if (o->sock->stalled) {
        pthread_mutex_unlock(&o->sock->lock);
        o->hole = 0;
        return;
    }
    n = send_some(o->sock, iov, 2);
    if (n > 0 && (size_t)n < total)
        o->sock->stalled = 1;
    pthread_mutex_unlock(&o->sock->lock);
    if (n == 0) {
        o->hole = 0;
    } else if (n < 0) {
        o->hole = FL_DONE_SENT;
        o->rc = (int)n;
    } else {
        o->hole = FL_DONE_SENT;
        o->rc = (size_t)n < total ? (int)n : 0;
    }
}

static void run_op(struct op *o)
{
    int hole = 0;

    switch (o->kind) {
    case FL_OP_READ:
        o->rc = fl_file_read(o->obj, o->buf, (size_t)o->len, o->off, &hole);
        break;
    case FL_OP_WRITE:
        o->rc = fl_file_write(o->obj, o->buf, (size_t)o->len, o->off, o->flags);
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
    default:
        o->rc = -EINVAL;
    }
    o->hole = hole ? FL_DONE_HOLE : 0;
    if (o->sock != NULL && o->rc == 0)
        send_reply(o, hole);
}

static int is_lo(const struct op *o)
{
    return o->kind == FL_OP_SNAP_READ || o->kind == FL_OP_SNAP_DISCARD;
}

static void opq_push(struct opq *l, struct op *o)
{
    o->next = NULL;
    if (l->tail != NULL)
        l->tail->next = o;
    else
        l->head = o;
    l->tail = o;
}

static struct op *opq_pop(struct opq *l)
{
    struct op *o = l->head;

    if (o != NULL) {
        l->head = o->next;
        if (l->head == NULL)
            l->tail = NULL;
    }
    return o;
}

/* Next op for a worker, guest ops first; snapshot ops only while fewer
 * than lo_max run, so a backup can never occupy every worker and guest
 * writes always find one free (DESIGN: the guest comes first). */
static struct op *take(fl_queue *q)
{
    struct op *o = opq_pop(&q->hi);

    if (o == NULL && q->lo.head != NULL && q->lo_running < q->lo_max) {
        o = opq_pop(&q->lo);
        q->lo_running++;
    }
    if (o != NULL)
        q->pending--;
    return o;
}

static void *worker(void *arg)
{
    fl_queue *q = arg;
    struct op *o;
    uint64_t one = 1;
    ssize_t n;
    int was_empty;

    for (;;) {
        pthread_mutex_lock(&q->lock);
        while ((o = take(q)) == NULL) {
            if (q->stopping && q->hi.head == NULL && q->lo.head == NULL) {
                pthread_mutex_unlock(&q->lock);
                return NULL;            /* stopping and drained */
            }
            q->idle++;
            pthread_cond_wait(&q->work, &q->lock);
            q->idle--;
            if (q->signalled > 0)   /* a spurious wake only under-counts */
                q->signalled--;
        }
        pthread_mutex_unlock(&q->lock);

        run_op(o);

        o->next = NULL;
        pthread_mutex_lock(&q->lock);
        if (is_lo(o)) {
            q->lo_running--;
            /* a snapshot op held back by the cap may run now */
            if (q->lo.head != NULL && q->idle > q->signalled) {
                q->signalled++;
                pthread_cond_signal(&q->work);
            }
        }
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
    unsigned i;
    int rc;

    *out = NULL;
    if (nthreads == 0 || nthreads > THREADS_MAX)
        return -EINVAL;
    q = calloc(1, sizeof *q);
    if (q == NULL)
        return -ENOMEM;
    q->threads = calloc(nthreads, sizeof *q->threads);
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
    pthread_cond_init(&q->work, NULL);
    /* Keep a quarter of the workers (at least one) for guest I/O. */
    q->lo_max = nthreads > 1 ? nthreads - (nthreads / 4 > 0 ? nthreads / 4 : 1) : 1;
    for (i = 0; i < nthreads; i++) {
        rc = -pthread_create(&q->threads[i], NULL, worker, q);
        if (rc < 0) {
            q->nthreads = i;
            fl_queue_close(q);
            return rc;
        }
    }
    q->nthreads = nthreads;
    *out = q;
    return 0;
}

int fl_queue_fd(const fl_queue *q)
{
    return q->efd;
}

static int enqueue(fl_queue *q, struct op *o)
{
    pthread_mutex_lock(&q->lock);
    if (q->stopping) {
        pthread_mutex_unlock(&q->lock);
        free(o);
        return -ESHUTDOWN;
    }
    opq_push(is_lo(o) ? &q->lo : &q->hi, o);
    q->pending++;
    /* Busy workers take the next op before sleeping, so wake a sleeper
     * only when the queue outgrows the workers already running (or about
     * to): one wake-up per burst instead of one per request.  A guest op
     * always gets a sleeper if there is one: the running workers may all
     * be busy with snapshot reads. */
    if (q->idle > q->signalled &&
        (!is_lo(o) ||
         q->pending > (uint64_t)(q->nthreads - q->idle) + q->signalled)) {
        q->signalled++;
        pthread_cond_signal(&q->work);
    }
    pthread_mutex_unlock(&q->lock);
    return 0;
}

int fl_queue_submit(fl_queue *q, uint64_t id, int kind, void *obj,
                    uint8_t *buf, uint64_t len, uint64_t off, unsigned flags)
{
    struct op *o;

    if (obj == NULL || kind < FL_OP_READ || kind > FL_OP_SNAP_DISCARD)
        return -EINVAL;
    if ((kind == FL_OP_READ || kind == FL_OP_WRITE || kind == FL_OP_SNAP_READ)
        && (buf == NULL || len > SIZE_MAX))
        return -EINVAL;
    o = malloc(sizeof *o);
    if (o == NULL)
        return -ENOMEM;
    *o = (struct op){ .id = id, .kind = kind, .obj = obj, .buf = buf,
                      .len = len, .off = off, .flags = flags };
    return enqueue(q, o);
}

int fl_queue_submit_send(fl_queue *q, uint64_t id, int kind, void *obj,
                         uint8_t *buf, uint64_t len, uint64_t off,
                         fl_sock *sock, const uint8_t *hdr, size_t hdr_len,
                         unsigned flags)
{
    struct op *o;

    if (obj == NULL || sock == NULL || buf == NULL || len == 0 ||
        len > SIZE_MAX || hdr_len == 0 || hdr_len > HDR_MAX ||
        (kind != FL_OP_READ && kind != FL_OP_SNAP_READ) || flags != 0)
        return -EINVAL;
    o = malloc(sizeof *o);
    if (o == NULL)
        return -ENOMEM;
    *o = (struct op){ .id = id, .kind = kind, .obj = obj, .buf = buf,
                      .len = len, .off = off, .flags = flags, .sock = sock,
                      .hdr_len = hdr_len };
    memcpy(o->hdr, hdr, hdr_len);
    return enqueue(q, o);
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
    pthread_mutex_init(&s->lock, NULL);
    *out = s;
    return 0;
}

void fl_sock_resume(fl_sock *s)
{
    pthread_mutex_lock(&s->lock);
    s->stalled = 0;
    pthread_mutex_unlock(&s->lock);
}

void fl_sock_close(fl_sock *s)
{
    if (s == NULL)
        return;
    close(s->fd);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

int fl_queue_reap(fl_queue *q, uint64_t *ids, int32_t *rcs, int32_t *holes,
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
        holes[i] = o->hole;
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
    unsigned i;

    if (q == NULL)
        return;
    pthread_mutex_lock(&q->lock);
    q->stopping = 1;
    pthread_cond_broadcast(&q->work);
    pthread_mutex_unlock(&q->lock);
    for (i = 0; i < q->nthreads; i++)
        pthread_join(q->threads[i], NULL);
    while ((o = q->done_head) != NULL) {
        q->done_head = o->next;
        free(o);
    }
    close(q->efd);
    pthread_cond_destroy(&q->work);
    pthread_mutex_destroy(&q->lock);
    free(q->threads);
    free(q);
}
