/* fleeced native data path: an NBD export as a disk's source, through libnbd.
 *
 * Design notes:
 * - QEMU does image formats and storage protocols, fleeced does fleecing
 *   above them.  A disk whose source is not a raw file or block device (a
 *   qcow2 image behind a qemu-storage-daemon child, a Ceph RBD image, a
 *   running VM's own node exported by its QEMU) is reached as an NBD export.
 *   fl_file_open_nbd connects once to learn the size and what the export
 *   can do; from then on the fl_file runs every source operation of the
 *   CBW engine, the snapshot reads and the guest path (file.c's
 *   struct fl_source_ops) over libnbd.  Nothing here parses NBD by hand.
 * - Connections: a pool of up to POOL_MAX libnbd handles, one per worker
 *   that needs one at the same moment.  An export that offers multi-conn
 *   (proto.md NBD_FLAG_CAN_MULTI_CONN) makes a FLUSH on one connection
 *   cover writes done on all; one that does not (QEMU's writable exports
 *   never do) is flushed on every connection that wrote since its last
 *   FLUSH (`dirty`), so writes still go over any and in parallel (one
 *   handle taking turns was a queue depth of 1: half qsd's speed).  A
 *   connection lost with writes not yet flushed on it fails the next sync
 *   -EIO (they may not be durable, and that sync cannot say they are).
 *   An operation takes a free handle, or
 *   opens one more while under the limit (the connect runs outside the
 *   lock, its slot reserved), or waits for one, bounded by the same
 *   timeout as a command.
 * - Every wait is bounded: commands are issued with nbd_aio_* and the
 *   worker polls the handle until they complete or UPSTREAM_TIMEOUT_MS
 *   runs out; connects the same way.  A timeout, or a connection that
 *   died (the child was killed), closes that handle: its command fails
 *   -EIO, the error is recorded (fl_file_source_error, shown as
 *   source-error) and the next operation connects again, so a restarted
 *   child, or a new one at the same socket, is picked up without anybody
 *   telling the daemon.  The record is cleared by the next command that
 *   succeeds.
 * - Holes stay holes: base:allocation is negotiated; extents come from
 *   BLOCK_STATUS (NBD_STATE_HOLE/ZERO are FL_EXT_HOLE/FL_EXT_ZERO), and
 *   reads are structured, so a read learns whether it got only holes.
 * - Requests are split at the export's maximum block size (at most 32 MiB,
 *   a copy-before-write of large clusters may read more), write-zeroes and
 *   trims at 1 GiB.
 * - FUA and flush: file.c makes a FUA write a write and then a sync, as
 *   for files; the sync is a FLUSH on one connection (multi-conn) or on
 *   the only one.  An export that cannot flush is taken as writing
 *   through (its sync is a no-op).
 *
 * Locking (one lock per upstream, never held across I/O):
 *   lock       guards h[], busy[], dirty[] and lost_dirty; cond is
 *              signalled when a handle is given back or a reserved slot
 *              freed.
 *   uri, size, caps and max_req are immutable after open.
 *   source_err (in fl_file) is atomic.
 */
#include <errno.h>
#include <libnbd.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define POOL_MAX 16
#define UPSTREAM_TIMEOUT_MS 30000
#define ZERO_MAX ((uint64_t)1 << 30)
#define REQ_MAX ((uint64_t)32 << 20)

struct upstream {
    char *uri;                      /* immutable */
    uint64_t size;                  /* immutable: what the disk says */
    /* What the export can do: learnt at the first connect (at open, or for
     * a lazy open at the first that succeeds) under lock, read without it
     * after (a handle in hand means they were set before it). */
    int known;                      /* guarded by lock */
    uint64_t max_req;               /* largest read/write */
    int can_flush, can_trim, can_zero, can_fast_zero, can_cache;
    int base_allocation;            /* base:allocation negotiated */
    int multi_conn;                 /* a FLUSH on one connection covers all */
    int timeout_ms;                 /* atomic: every command's bound (test hook) */
    pthread_mutex_t lock;
    pthread_cond_t cond;            /* CLOCK_MONOTONIC */
    struct nbd_handle *h[POOL_MAX]; /* guarded by lock; NULL: free slot */
    int busy[POOL_MAX];             /* guarded by lock; 2: reserved (connecting) */
    int dirty[POOL_MAX];            /* guarded by lock: wrote since its FLUSH */
    int lost_dirty;                 /* guarded by lock: see the notes */
};

static struct upstream *up_of(fl_file *f)
{
    return f->priv;
}

static int timeout(struct upstream *u)
{
    return __atomic_load_n(&u->timeout_ms, __ATOMIC_RELAXED);
}

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* libnbd's errno for its last error on this thread, never 0. */
static int nbd_err(void)
{
    int e = nbd_get_errno();

    return e > 0 ? e : EIO;
}

/* Poll H until COOKIE completes or DEADLINE (ms, CLOCK_MONOTONIC) passes.
 * Returns 0, the command's -errno, or -ETIMEDOUT / -ENOTCONN (the handle
 * is then unusable). */
static int wait_cmd(struct nbd_handle *h, int64_t cookie, int64_t deadline)
{
    if (cookie < 0)
        return -nbd_err();
    for (;;) {
        int r = nbd_aio_command_completed(h, (uint64_t)cookie);
        int64_t left;

        if (r == 1)
            return 0;
        if (r < 0)
            return -nbd_err();
        if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h))
            return -ENOTCONN;
        left = deadline - now_ms();
        if (left <= 0)
            return -ETIMEDOUT;
        if (nbd_poll(h, left > 1000 ? 1000 : (int)left) < 0)
            return -ENOTCONN;
    }
}

/* A new handle connected to URI within TIMEOUT_MS, or NULL with *ERR set. */
static struct nbd_handle *connect_one(const char *uri, int timeout_ms, int *err)
{
    struct nbd_handle *h = nbd_create();
    int64_t deadline = now_ms() + timeout_ms;

    if (h == NULL) {
        *err = nbd_err();
        return NULL;
    }
    if (nbd_set_handle_name(h, "fleeced-upstream") < 0 ||
        nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
        nbd_aio_connect_uri(h, uri) < 0) {
        *err = nbd_err();
        nbd_close(h);
        return NULL;
    }
    while (!nbd_aio_is_ready(h)) {
        int64_t left = deadline - now_ms();

        if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h) ||
            nbd_aio_is_negotiating(h)) {
            *err = nbd_aio_is_negotiating(h) ? EPROTO : nbd_err();
            nbd_close(h);
            return NULL;
        }
        if (left <= 0 || nbd_poll(h, left > 1000 ? 1000 : (int)left) < 0) {
            *err = left <= 0 ? ETIMEDOUT : nbd_err();
            nbd_close(h);
            return NULL;
        }
    }
    return h;
}

static void record(fl_file *f, int rc)
{
    int want = rc == 0 ? 0 : -rc;

    if (__atomic_load_n(&f->source_err, __ATOMIC_RELAXED) != want)
        __atomic_store_n(&f->source_err, want, __ATOMIC_RELAXED);
}

/* Learn what the export behind H can do (caller holds U's lock, or owns U
 * alone).  -EIO when its size is not the one the disk was opened with
 * (another export at the socket), -EROFS when it is read-only and the disk
 * is not. */
static int learn(struct upstream *u, struct nbd_handle *h, int readonly)
{
    int64_t max;

    if (u->known)
        return 0;
    if ((uint64_t)nbd_get_size(h) != u->size)
        return -EIO;
    if (!readonly && nbd_is_read_only(h) == 1)
        return -EROFS;
    max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    u->max_req = max > 0 && (uint64_t)max < REQ_MAX ? (uint64_t)max : REQ_MAX;
    u->can_flush = nbd_can_flush(h) == 1;
    u->can_trim = nbd_can_trim(h) == 1;
    u->can_zero = nbd_can_zero(h) == 1;
    u->can_fast_zero = nbd_can_fast_zero(h) == 1;
    u->can_cache = nbd_can_cache(h) == 1;
    u->base_allocation = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
    u->multi_conn = nbd_can_multi_conn(h) == 1;
    u->known = 1;
    return 0;
}

/* Take a handle (connecting one more while under the limit).  *SLOT gets
 * its index for put().  Returns it, or NULL with *ERR. */
static struct nbd_handle *get(fl_file *f, int *slot, int *err)
{
    struct upstream *u = up_of(f);
    struct timespec until;
    int64_t deadline = now_ms() + timeout(u);

    until.tv_sec = (time_t)(deadline / 1000);
    until.tv_nsec = (long)(deadline % 1000) * 1000000L;
    pthread_mutex_lock(&u->lock);
    for (;;) {
        int empty = -1;

        for (int i = 0; i < POOL_MAX; i++) {
            if (u->h[i] != NULL && !u->busy[i]) {
                u->busy[i] = 1;
                *slot = i;
                pthread_mutex_unlock(&u->lock);
                return u->h[i];
            }
            if (u->h[i] == NULL && !u->busy[i] && empty < 0)
                empty = i;
        }
        if (empty >= 0) {
            struct nbd_handle *h;

            u->busy[empty] = 2;         /* reserved while we connect */
            pthread_mutex_unlock(&u->lock);
            h = connect_one(u->uri, timeout(u), err);
            pthread_mutex_lock(&u->lock);
            if (h != NULL) {
                int rc = learn(u, h, f->readonly);
                if (rc < 0) {
                    nbd_close(h);
                    h = NULL;
                    *err = -rc;
                }
            }
            if (h == NULL) {
                u->busy[empty] = 0;
                pthread_cond_broadcast(&u->cond);
                pthread_mutex_unlock(&u->lock);
                record(f, -*err);
                return NULL;
            }
            u->h[empty] = h;
            u->busy[empty] = 1;
            *slot = empty;
            pthread_mutex_unlock(&u->lock);
            return h;
        }
        if (pthread_cond_timedwait(&u->cond, &u->lock, &until) == ETIMEDOUT) {
            pthread_mutex_unlock(&u->lock);
            *err = ETIMEDOUT;
            return NULL;
        }
    }
}

/* Give the handle back after an operation that returned RC (WROTE: a
 * write, zero or trim was sent on it); a handle whose connection failed is
 * closed (the next get connects again). */
static void put(fl_file *f, int slot, int rc, int wrote)
{
    struct upstream *u = up_of(f);
    struct nbd_handle *dead = NULL;
    int lost = rc == -ETIMEDOUT || rc == -ENOTCONN || rc == -ECONNRESET ||
               rc == -EPIPE || rc == -ESHUTDOWN;

    pthread_mutex_lock(&u->lock);
    if (wrote)
        u->dirty[slot] = 1;
    if (lost || nbd_aio_is_dead(u->h[slot]) || nbd_aio_is_closed(u->h[slot])) {
        dead = u->h[slot];
        u->h[slot] = NULL;
        lost = 1;
        if (u->dirty[slot] && !u->multi_conn)
            u->lost_dirty = 1;
        u->dirty[slot] = 0;
    }
    u->busy[slot] = 0;
    pthread_cond_broadcast(&u->cond);
    pthread_mutex_unlock(&u->lock);
    if (dead != NULL)
        nbd_close(dead);        /* commands of a timed-out one die with it */
    /* A command the export refused (EINVAL, ENOSPC...) says nothing of the
     * connection; only a lost one, or a success, changes the record. */
    if (lost)
        record(f, rc == -ETIMEDOUT ? -ETIMEDOUT : -EIO);
    else if (rc == 0)
        record(f, 0);
}

/* A lost connection reaches the caller as EIO (the NBD errno it maps to),
 * a timeout as ETIMEDOUT (also EIO on the wire). */
static int result(int rc)
{
    return (rc == -ENOTCONN || rc == -ECONNRESET || rc == -EPIPE) ? -EIO : rc;
}

/* ---- the source operations ---------------------------------------------- */

struct read_state {
    int all_hole;
};

static int chunk_cb(void *user, const void *sub, size_t count, uint64_t off,
                    unsigned status, int *error)
{
    struct read_state *st = user;

    (void)sub;
    (void)count;
    (void)off;
    (void)error;
    if (status != LIBNBD_READ_HOLE)
        st->all_hole = 0;
    return 0;
}

static int up_read(fl_file *f, void *buf, size_t len, uint64_t off, int *is_hole)
{
    struct upstream *u = up_of(f);
    struct read_state st = { 1 };
    int slot, err, rc = 0;
    int64_t deadline = now_ms() + timeout(u);
    struct nbd_handle *h;
    size_t done = 0;

    if (len == 0) {
        if (is_hole != NULL)
            *is_hole = 0;
        return 0;
    }
    h = get(f, &slot, &err);
    if (h == NULL)
        return -EIO;
    while (done < len && rc == 0) {
        size_t n = len - done < u->max_req ? len - done : (size_t)u->max_req;
        nbd_chunk_callback cb = { .callback = chunk_cb, .user_data = &st };
        int64_t c = nbd_aio_pread_structured(h, (uint8_t *)buf + done, n, off + done,
                                             cb, NBD_NULL_COMPLETION, 0);
        rc = wait_cmd(h, c, deadline);
        done += n;
    }
    put(f, slot, rc, 0);
    if (is_hole != NULL)
        *is_hole = rc == 0 && st.all_hole;
    return result(rc);
}

static int up_write(fl_file *f, const void *buf, size_t len, uint64_t off)
{
    struct upstream *u = up_of(f);
    int slot, err, rc = 0;
    int64_t deadline = now_ms() + timeout(u);
    struct nbd_handle *h;
    size_t done = 0;

    if (len == 0)
        return 0;
    h = get(f, &slot, &err);
    if (h == NULL)
        return -EIO;
    while (done < len && rc == 0) {
        size_t n = len - done < u->max_req ? len - done : (size_t)u->max_req;
        int64_t c = nbd_aio_pwrite(h, (const uint8_t *)buf + done, n, off + done,
                                   NBD_NULL_COMPLETION, 0);
        rc = wait_cmd(h, c, deadline);
        done += n;
    }
    put(f, slot, rc, 1);
    return result(rc);
}

/* Write LEN zeros at OFF as data (the fallback of an export that cannot
 * write zeroes), through a bounded buffer. */
static int write_zeros(fl_file *f, uint64_t off, uint64_t len)
{
    size_t bl = len < (1u << 20) ? (size_t)len : (1u << 20);
    uint8_t *z = calloc(1, bl);
    int rc = 0;

    if (z == NULL)
        return -ENOMEM;
    while (len > 0 && rc == 0) {
        size_t n = len < bl ? (size_t)len : bl;
        rc = up_write(f, z, n, off);
        off += n;
        len -= n;
    }
    free(z);
    return rc;
}

static int up_zero(fl_file *f, uint64_t off, uint64_t len, unsigned flags)
{
    struct upstream *u = up_of(f);
    int slot, err, rc = 0;
    int64_t deadline = now_ms() + timeout(u);
    struct nbd_handle *h;
    uint32_t nf = 0;

    if (!(flags & FL_MAY_TRIM))
        nf |= LIBNBD_CMD_FLAG_NO_HOLE;
    if (flags & FL_FAST)
        nf |= LIBNBD_CMD_FLAG_FAST_ZERO;
    h = get(f, &slot, &err);    /* (a handle in hand: the caps are known) */
    if (h == NULL)
        return -EIO;
    if (!u->can_zero || ((flags & FL_FAST) && !u->can_fast_zero)) {
        put(f, slot, 0, 0);
        return (flags & FL_FAST) ? -ENOTSUP : write_zeros(f, off, len);
    }
    while (len > 0 && rc == 0) {
        uint64_t n = len < ZERO_MAX ? len : ZERO_MAX;
        rc = wait_cmd(h, nbd_aio_zero(h, n, off, NBD_NULL_COMPLETION, nf), deadline);
        off += n;
        len -= n;
    }
    put(f, slot, rc, 1);
    return result(rc);
}

static int up_trim(fl_file *f, uint64_t off, uint64_t len)
{
    struct upstream *u = up_of(f);
    int slot, err, rc = 0;
    int64_t deadline = now_ms() + timeout(u);
    struct nbd_handle *h;

    h = get(f, &slot, &err);
    if (h == NULL)
        return -EIO;
    if (!u->can_trim) {
        put(f, slot, 0, 0);
        return -ENOTSUP;        /* advisory: file.c takes it as a no-op */
    }
    while (len > 0 && rc == 0) {
        uint64_t n = len < ZERO_MAX ? len : ZERO_MAX;
        rc = wait_cmd(h, nbd_aio_trim(h, n, off, NBD_NULL_COMPLETION, 0), deadline);
        off += n;
        len -= n;
    }
    put(f, slot, rc, 1);
    return result(rc);
}

/* FLUSH on handle SLOT (taken), given back. */
static int flush_one(fl_file *f, struct nbd_handle *h, int slot)
{
    int rc = wait_cmd(h, nbd_aio_flush(h, NBD_NULL_COMPLETION, 0),
                      now_ms() + timeout(up_of(f)));

    put(f, slot, rc, 0);
    return rc;
}

static int up_sync(fl_file *f)
{
    struct upstream *u = up_of(f);
    struct timespec until;
    int64_t deadline = now_ms() + timeout(u);
    int slot, err, rc = 0;
    struct nbd_handle *h;

    int known, multi;

    pthread_mutex_lock(&u->lock);
    known = u->known;
    multi = u->multi_conn;
    pthread_mutex_unlock(&u->lock);
    if (multi || !known) {
        h = get(f, &slot, &err);
        if (h == NULL)
            return -EIO;
        if (!u->can_flush) {
            put(f, slot, 0, 0);
            return 0;
        }
        pthread_mutex_lock(&u->lock);
        memset(u->dirty, 0, sizeof(u->dirty));  /* one covers all */
        pthread_mutex_unlock(&u->lock);
        return result(flush_one(f, h, slot));
    }
    if (!u->can_flush)
        return 0;
    /* Each connection that wrote since its last FLUSH is flushed, taken in
     * turn as it comes free (bounded like any wait). */
    until.tv_sec = (time_t)(deadline / 1000);
    until.tv_nsec = (long)(deadline % 1000) * 1000000L;
    pthread_mutex_lock(&u->lock);
    if (u->lost_dirty) {
        u->lost_dirty = 0;
        pthread_mutex_unlock(&u->lock);
        return -EIO;
    }
    for (int i = 0; i < POOL_MAX && rc == 0; i++) {
        while (u->dirty[i] && u->busy[i] && rc == 0)
            if (pthread_cond_timedwait(&u->cond, &u->lock, &until) == ETIMEDOUT)
                rc = -ETIMEDOUT;
        if (rc < 0 || !u->dirty[i] || u->h[i] == NULL)
            continue;
        u->busy[i] = 1;
        u->dirty[i] = 0;
        h = u->h[i];
        pthread_mutex_unlock(&u->lock);
        rc = flush_one(f, h, i);
        pthread_mutex_lock(&u->lock);
        if (rc < 0 && u->h[i] != NULL)
            u->dirty[i] = 1;    /* still not known durable */
    }
    if (rc == 0 && u->lost_dirty) {
        u->lost_dirty = 0;
        rc = -EIO;
    }
    pthread_mutex_unlock(&u->lock);
    return result(rc);
}

static int up_cache(fl_file *f, uint64_t off, uint64_t len)
{
    struct upstream *u = up_of(f);
    int slot, err, rc = 0;
    int64_t deadline = now_ms() + timeout(u);
    struct nbd_handle *h;

    h = get(f, &slot, &err);
    if (h == NULL)
        return -EIO;
    if (!u->can_cache) {
        put(f, slot, 0, 0);
        return 0;               /* a hint nobody takes */
    }
    while (len > 0 && rc == 0) {
        uint64_t n = len < u->max_req ? len : u->max_req;
        rc = wait_cmd(h, nbd_aio_cache(h, n, off, NBD_NULL_COMPLETION, 0), deadline);
        off += n;
        len -= n;
    }
    put(f, slot, rc, 0);
    return result(rc);
}

struct ext_state {
    struct fl__ext *e;
    uint64_t want;      /* bytes still to describe */
    int full;
};

static int extent_cb(void *user, const char *ctx, uint64_t off, uint32_t *entries,
                     size_t n, int *error)
{
    struct ext_state *st = user;

    (void)off;
    (void)error;
    if (strcmp(ctx, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
        return 0;
    for (size_t i = 0; i + 1 < n && st->want > 0 && !st->full; i += 2) {
        uint64_t len = entries[i] < st->want ? entries[i] : st->want;
        uint32_t fl = ((entries[i + 1] & LIBNBD_STATE_HOLE) ? FL_EXT_HOLE : 0) |
                      ((entries[i + 1] & LIBNBD_STATE_ZERO) ? FL_EXT_ZERO : 0);

        st->full = fl__ext_add(st->e, len, fl);
        st->want -= len;
    }
    return 0;
}

/* Allocation of [off, off+len) appended to E; what cannot be learnt
 * counts as data (never a hole by mistake).  Returns 1 when E filled. */
static int up_extents(fl_file *f, uint64_t off, uint64_t len, struct fl__ext *e)
{
    struct upstream *u = up_of(f);
    int slot, err, rc = 0;
    int64_t deadline = now_ms() + timeout(u);
    struct nbd_handle *h;
    uint64_t end = off + len;

    if (len == 0)
        return 0;
    h = get(f, &slot, &err);
    if (h == NULL)
        return fl__ext_add(e, len, 0);
    if (!u->base_allocation) {
        put(f, slot, 0, 0);
        return fl__ext_add(e, len, 0);
    }
    while (off < end && rc == 0) {
        uint64_t n = end - off < ZERO_MAX ? end - off : ZERO_MAX;
        struct ext_state st = { e, n, 0 };
        nbd_extent_callback cb = { .callback = extent_cb, .user_data = &st };

        rc = wait_cmd(h, nbd_aio_block_status(h, n, off, cb, NBD_NULL_COMPLETION, 0),
                      deadline);
        if (rc < 0 || st.full)
            break;
        if (st.want == n)         /* no progress: say data, and stop */
            break;
        off += n - st.want;
    }
    put(f, slot, rc, 0);
    if (off < end && !(e->n == e->max))
        return fl__ext_add(e, end - off, 0);
    return e->n == e->max;
}

static void free_upstream(struct upstream *u)
{
    for (int i = 0; i < POOL_MAX; i++)
        nbd_close(u->h[i]);
    pthread_cond_destroy(&u->cond);
    pthread_mutex_destroy(&u->lock);
    free(u->uri);
    free(u);
}

static void up_release(fl_file *f)
{
    free_upstream(up_of(f));
}

static const struct fl_source_ops upstream_ops = {
    .read = up_read,
    .write = up_write,
    .zero = up_zero,
    .trim = up_trim,
    .sync = up_sync,
    .cache = up_cache,
    .extents = up_extents,
    .release = up_release,
};

/* A new upstream for URI of SIZE bytes, holding H (NULL: connect later);
 * H is taken whatever happens (closed on failure). */
static int new_upstream(const char *uri, uint64_t size, int readonly, struct nbd_handle *h,
                        fl_file **out)
{
    struct upstream *u;
    pthread_condattr_t ca;
    int rc;

    u = calloc(1, sizeof(*u));
    if (u == NULL || (u->uri = strdup(uri)) == NULL) {
        free(u);
        nbd_close(h);
        return -ENOMEM;
    }
    u->size = size;
        u->max_req = REQ_MAX;
    u->timeout_ms = UPSTREAM_TIMEOUT_MS;
    pthread_mutex_init(&u->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&u->cond, &ca);
    pthread_condattr_destroy(&ca);
    u->h[0] = h;                /* ours from here: free_upstream closes it */
    if (h != NULL) {
        rc = learn(u, h, readonly);
        if (rc < 0) {
            free_upstream(u);
            return rc;
        }
    }
    rc = fl__file_new(&upstream_ops, u, -1, readonly, 0, size, out);
    if (rc < 0)
        free_upstream(u);       /* closes h too */
    return rc;
}

int fl_file_open_nbd(const char *uri, int readonly, fl_file **out)
{
    struct nbd_handle *h;
    int64_t size;
    int err, rc;

    if (uri == NULL || out == NULL)
        return -EINVAL;
    *out = NULL;
    h = connect_one(uri, UPSTREAM_TIMEOUT_MS, &err);
    if (h == NULL)
        return -err;
    size = nbd_get_size(h);
    if (size < 0) {
        rc = -nbd_err();
        nbd_close(h);
        return rc;
    }
    return new_upstream(uri, (uint64_t)size, readonly, h, out);
}

int fl_file_open_nbd_lazy(const char *uri, uint64_t size, int readonly, fl_file **out)
{
    if (uri == NULL || out == NULL)
        return -EINVAL;
    *out = NULL;
    return new_upstream(uri, size, readonly, NULL, out);
}

void fl__upstream_set_timeout(fl_file *f, int ms)
{
    __atomic_store_n(&up_of(f)->timeout_ms, ms, __ATOMIC_RELAXED);
}
