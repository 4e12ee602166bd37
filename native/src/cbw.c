/* fleeced native data path: copy-before-write fleecing sessions.
 *
 * Design notes (semantics follow QEMU block/copy-before-write.c plus the
 * snapshot-access driver; structure follows nbdkit filters/cow/blk.c).
 *
 * Per session, one byte per cluster holds its state:
 *   NOT_NEEDED  outside the scope, or discarded: never copied, never read
 *   NEEDED      the old data is still only in the source
 *   COPYING     a copy is in flight; its owner (the writer that claimed
 *               it, or the copier running that writer's job) settles it
 *   COPIED      the old data is in the memory cache or the temp file
 *   ZERO        the cluster was one hole of the source when its copy ran:
 *               nothing stored, reads as zeros and as a hole
 * Transitions: NEEDED -> COPYING -> COPIED or ZERO, or back to NEEDED
 * when the copy fails, its job was abandoned, or the session broke;
 * COPIED/ZERO -> NEEDED when the session breaks (the map then tells the
 * truth: nothing is stored); NEEDED/COPIED/ZERO -> NOT_NEEDED by discard.
 * NOT_NEEDED is final.
 *
 * Invariants:
 * 1. Before a guest write to cluster C reaches the source, C's old contents
 *    are in the cache or the temp file and C is COPIED (the copy comes
 *    first, then the state), or C was a hole and is ZERO, or C is
 *    NOT_NEEDED, or the session is broken.  While C is COPYING no guest
 *    write reaches it (writers wait, or fail, or break the session), so the
 *    copier may classify and read it without the mutex.
 * 2. A snapshot read of a COPIED cluster reads the cache/temp, of a ZERO
 *    one yields zeros.  A read of a NEEDED run reads the source outside
 *    the mutex *optimistically*: guest writes never wait for it (QEMU's
 *    frozen_read_reqs make them wait; with the backup's workers at a low
 *    priority, queue.c, that wait was a priority inversion and the tail
 *    of guest write latency during a backup).  Back under the mutex the
 *    reader checks that every cluster of the run is still NEEDED; if one
 *    is not, the run is read again from the top (COPYING waits, COPIED
 *    comes from the cache/temp).  Why that is enough: a write reaches the
 *    source only after claiming its clusters (NEEDED -> COPYING) under the
 *    mutex (invariant 1), so if the source read saw any of its bytes, the
 *    claim came before the check, and the check sees the cluster not
 *    NEEDED -- it can be NEEDED again only when the copy failed and the
 *    write did not reach the source (break-guest-write), or the session
 *    broke (the read fails -EIO).  Block status of NEEDED runs follows
 *    the same rule.
 * 3. The copy-failure policy is explicit (s->policy):
 *    FL_BREAK_SNAPSHOT: the session breaks (sticky, with errno), its temp
 *      data is dropped, COPIED/ZERO clusters go back to NEEDED, waiters
 *      wake, the guest write goes on and succeeds.  A broken session does
 *      no more CBW and every snapshot read is -EIO, including reads that
 *      were in flight when it broke.  The break writes the session's
 *      eventfd (fl_session_event_fd) once, under the mutex (a
 *      non-blocking write), so the daemon learns of it without polling.
 *    FL_BREAK_GUEST_WRITE: the write fails with the error and the source
 *      is untouched; the clusters it claimed go back to NEEDED (at once,
 *      or when an abandoned late copy finishes).
 *    Failures: source read error, temp store error (or an injected one),
 *    temp bytes over max_temp (-ENOSPC), cbw_timeout expiry (-ETIMEDOUT).
 * 4. Holes are not copied: the copier classifies its claimed clusters
 *    (SEEK_DATA/SEEK_HOLE, fl__fd_extents) before reserving, and reserves
 *    cache/temp space (the max_temp check) for the data clusters only, so
 *    a run of holes never fails -ENOSPC.
 *
 * cbw_timeout bounds the copy itself (QEMU cbw-timeout).  With
 * timeout_ms > 0 a writer does not copy in its own thread: it claims a
 * run (COPYING), queues a job for the session's copier threads and waits
 * on the condvar until the job is done or its deadline (one per guest
 * write, shared by all its waits) passes.  On expiry it gives the job up
 * and applies the policy at once; the copy finishes late in the copier,
 * which then drops what it stored (punch, reservation released) and puts
 * the clusters back to NEEDED.  Until then they stay COPYING, so other
 * writers and snapshot reads wait for them, bounded by their own
 * deadlines.  A job still queued when given up is unlinked and its claims
 * go back to NEEDED by the writer.  A writer also gives its job up, with
 * no error, when the session breaks meanwhile (nothing left to copy for).  With timeout_ms <= 0 the writer copies
 * inline (no thread hop, no copiers).
 *
 * Jobs and copiers.  COPIERS detached threads start at open; each holds a
 * session reference until it exits.  fl_session_close sets `stopping`
 * (after detaching, so no new job can come) and wakes them; a copier
 * exits once stopping is set and no job is queued (a job it runs is
 * always finished first), drops the mutex, then its reference, which may
 * be the last.  Job ownership, decided under the mutex only: the writer
 * allocates and queues it; a copier unlinks it, sets `running` and owns
 * the claims [c0, c1) until it settles them; then, if the writer gave up
 * (`abandoned`), the copier frees the job, else it sets `done` and the
 * writer frees it.  A writer that gives up a job not yet running unlinks
 * and frees it itself.  So exactly one side frees a job, and never while
 * the other still points at it.
 *
 * Locking: lock order is fl_file.sessions_lock (rwlock, held shared by
 * guest writes across CBW and source I/O), then fl_session.lock (mutex).
 * The mutex guards the map, the cache table, the job queue, the job
 * fields, `stopping`, the stats (the CBW latency histogram included: a
 * write that copied or waited adds to it before it drops the mutex), the broken flag and the fault hooks; it
 * is never held across I/O (only memcpy/memset into caller buffers, which
 * cannot block).  Condvars, both used with the mutex: `cond`
 * (CLOCK_MONOTONIC, for deadlines) is broadcast on every COPYING exit,
 * job completion and break; `work` wakes copiers (a job queued, or
 * stopping).  A copier never waits while it runs a job; a writer waits
 * on its own job's claims only through the job, and otherwise never
 * waits while owning a COPYING claim; snapshot readers wait only for
 * COPYING claims and hold nothing anyone waits for, so waits cannot form
 * a cycle, and no guest write ever waits for a snapshot read.
 * Outside the mutex: `read_bits` (atomic fetch-or per word) and
 * `read_bytes` (atomic add; relaxed: a counter, it orders nothing);
 * `total_bytes` is immutable after open.
 *
 * Storage: cluster C of the temp file lives at C * cluster_size (a sparse
 * unlinked file sized like the disk; O_TMPFILE, else mkostemp + unlink, so
 * a crash leaks nothing).  While cache_bytes allows, a one-cluster copy
 * goes to a malloc'd per-cluster entry in a small hash table instead.  The
 * disk's tail cluster is short when the size is not a multiple of
 * cluster_size.  Space is reserved under the mutex before the I/O
 * (max_temp).  A copy that fails, is abandoned, or finds the session
 * broken punches the range it may have written and releases its
 * reservation (after a break all byte counters stay 0, and the breaker
 * punches the whole temp file).
 *
 * Lifetime: reference counted (internal.h "Lifetimes").  fl_session_close
 * marks the session closed, detaches it from the file (so no guest write
 * runs CBW for it any more), stops the copiers and gives up the owner's
 * reference; queued snapshot operations and copiers keep the memory, the
 * map and the temp descriptor until they are gone, and the operations
 * fail -ESHUTDOWN when they run after the close.  The last reference
 * frees everything and drops the session's reference on its file.
 *
 * Copy-before-write run by another process (fl_session_put_old).  For a
 * VM disk fleeced cannot write itself (a qcow2 or rbd node inside QEMU),
 * QEMU runs the copy-before-write: its filter writes the old data to a
 * target, which is this session (the daemon's cbw-target export), and
 * only then lets the guest write reach the node.  put_old claims the
 * whole NEEDED clusters of the range (COPYING), stores them like a copy
 * (cache or temp, max_temp, the fault hook) and settles them COPIED, or
 * ZERO for zeros, before it returns -- so invariant 1 holds with "the
 * guest write" being QEMU's, and invariant 2's optimistic source reads
 * stay right: a source read that saw new bytes ended after QEMU wrote
 * them, which was after put_old settled the cluster.  The source itself
 * is then read-only to fleeced (QEMU's export of the node).
 *
 * Checkpoints (params checkpoint_since = OLD, checkpoint_new = NEW; the
 * libvirt checkpoint model).  Everything fallible is done first, outside
 * the file's lock: the frozen bitmap (a transient bitmap with OLD's
 * geometry) is allocated, the state map starts all NOT_NEEDED.  Then,
 * under the exclusive sessions_lock that attaches the session (no guest
 * mutation in flight: they hold it shared across CBW, source I/O and
 * their bitmap marks, see file.c), in this order: make room for NEW in
 * the file's bitmap array (the only step that may fail, -ENOMEM, and it
 * changes nothing visible), copy OLD's bits into the frozen bitmap, set
 * NEEDED every cluster that touches a dirty run of it (cluster size and
 * granularity may differ either way), detach OLD from the file if it was
 * attached, clear NEW and attach it if it was not, link the session.  So
 * every guest write acknowledged before the open returned is in the
 * frozen copy (and its clusters are in scope), and every write that
 * starts after it is in NEW: a consistent cut.  The work under the lock is
 * a pass over OLD's words plus a memset per dirty run of the state map;
 * OLD's reference, dropped by the detach, is given up after unlocking
 * (its last drop may sync a persistent file).  The session holds the
 * only reference on the frozen bitmap besides fl_session_frozen_bitmap
 * takers; it never changes after the open.
 *
 * Progress (fl_session_progress): one bit per cluster, set when a
 * successful snapshot read touched any byte of the cluster (a client that
 * reads in pieces smaller than a cluster, or whose last request ends in a
 * short tail cluster, still reaches 100%; a failed read marks nothing;
 * discard marks nothing), or when a base:allocation reply told the client
 * that the whole cluster reads as zeros (fl_session_note_zero: a backup
 * that follows the map never reads those, and a sparse disk's backup
 * would otherwise end far below 100%; the other contexts mark nothing).  Only clusters in the scope at
 * the snapshot point can be read (NOT_NEEDED is final), so the count never
 * exceeds total_bytes, the scope's bytes fixed at open (the whole disk, or
 * the clusters of the --bitmap scope or of checkpoint_since's dirty runs).
 * The bits and read_bytes live outside the mutex: a reader sets its bits
 * with an atomic fetch-or (skipped when they are set already, so a re-read
 * costs a load) and adds the bytes of the bits it was first to set, so
 * every cluster is counted exactly once without a lock on the read path.
 * They are freed with the session's last reference, like the state map.
 *
 * Known race, by design: a snapshot read concurrent with a discard of the
 * same range may return zeros for it (the client asked for both at once).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define CLUSTER_MIN ((uint64_t)FL_CLUSTER_MIN)
#define CLUSTER_MAX ((uint64_t)FL_CLUSTER_MAX)
#define RUN_MAX     ((uint64_t)4 << 20) /* bytes copied per temp-file run */
#define RUN_CLUSTERS ((size_t)(RUN_MAX / CLUSTER_MIN))
#define BUCKETS_MAX ((size_t)1 << 20)
#define DISCARD_BATCH 4096u     /* clusters discarded per mutex hold */
#define N_STATES    5
#define COPIERS     4u                  /* copier threads per session */

struct cent {                  /* one cached cluster */
    uint64_t idx;
    struct cent *next;
    uint8_t data[];
};

struct job {                   /* one claimed run for the copiers */
    uint64_t c0, c1;           /* clusters [c0, c1), COPYING */
    int rc;                    /* copy_run's result, once done */
    int running, done, abandoned;
    struct job *next;          /* s->jobs queue */
};

struct fl_session {
    unsigned refs;             /* atomic; see "Lifetime" */
    int closed;                /* atomic; set once by fl_session_close */
    /* Immutable after open. */
    fl_file *file;
    uint64_t size, cs, n_clusters;
    unsigned shift;
    int temp_fd;
    int event_fd;              /* eventfd written once when the session breaks */
    uint64_t cache_budget, max_temp;
    int64_t timeout_ms;
    int policy;
    size_t n_buckets;          /* 0 when there is no cache */
    fl_bitmap *frozen_bm;      /* checkpoint_since's bits, or NULL */
    unsigned n_copiers;        /* 0: copies run inline (no timeout) */

    uint64_t total_bytes;      /* bytes in scope at open ("Progress") */

    fl_session *next;          /* guarded by file->sessions_lock */

    /* Lock-free (see "Progress"): a bit per cluster read at least once,
     * and the bytes of those clusters. */
    uint64_t *read_bits;
    uint64_t read_bytes;

    /* Guards everything below (see "Locking"). */
    pthread_mutex_t lock;
    pthread_cond_t cond;       /* broadcast: COPYING exit, job done, break */
    pthread_cond_t work;       /* copiers: a job queued, or stopping */
    uint8_t *state;            /* n_clusters bytes, FL_* */
    uint64_t n_state[N_STATES];/* clusters per state */
    struct cent **buckets;
    struct job *jobs, *jobs_tail; /* queued, not yet running (FIFO) */
    int stopping;              /* closed: copiers exit when jobs is empty */
    uint64_t temp_bytes, temp_written, cache_used;
    uint64_t cbw_count, cbw_bytes;
    uint64_t read_temp, read_cache, read_source;
    uint64_t read_retries;     /* optimistic source reads done again */
    uint64_t discarded_clusters, discarded_bytes;
    struct fl_latency cbw_lat; /* writes that copied or waited (stats) */
    int broken, broken_errno;
    int inject_err, inject_n;  /* test fault hook */
    int inject_delay_ms;       /* test hook: slow copies down */
    int inject_read_delay_ms;  /* test hook: slow source reads down */
};

/* ---- helpers (call with s->lock held unless noted) ------------------ */

/* cbytes and cluster_end read immutable fields only: no lock needed. */
static uint64_t cbytes(const fl_session *s, uint64_t c)
{
    uint64_t start = c << s->shift, rest = s->size - start;
    return rest < s->cs ? rest : s->cs;
}

static uint64_t cluster_end(const fl_session *s, uint64_t c)
{
    return (c << s->shift) + cbytes(s, c);
}

static void set_state(fl_session *s, uint64_t c, uint8_t st)
{
    s->n_state[s->state[c]]--;
    s->n_state[st]++;
    s->state[c] = st;
}

static size_t bucket_of(const fl_session *s, uint64_t idx)
{
    return (size_t)((idx * UINT64_C(0x9E3779B97F4A7C15)) >> 32) &
           (s->n_buckets - 1);
}

static struct cent *cache_find(const fl_session *s, uint64_t idx)
{
    struct cent *e;

    if (s->n_buckets == 0)
        return NULL;
    for (e = s->buckets[bucket_of(s, idx)]; e != NULL; e = e->next)
        if (e->idx == idx)
            return e;
    return NULL;
}

static struct cent *cache_remove(fl_session *s, uint64_t idx)
{
    struct cent **pp;

    if (s->n_buckets == 0)
        return NULL;
    for (pp = &s->buckets[bucket_of(s, idx)]; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->idx == idx) {
            struct cent *e = *pp;
            *pp = e->next;
            return e;
        }
    }
    return NULL;
}

static void cache_insert(fl_session *s, struct cent *e)
{
    size_t b = bucket_of(s, e->idx);

    e->next = s->buckets[b];
    s->buckets[b] = e;
}

static void cache_free_all(fl_session *s)
{
    for (size_t b = 0; b < s->n_buckets; b++) {
        struct cent *e = s->buckets[b];
        while (e != NULL) {
            struct cent *n = e->next;
            free(e);
            e = n;
        }
        s->buckets[b] = NULL;
    }
}

/* Whether every cluster of [c0, c1) is still NEEDED (invariant 2: an
 * optimistic source read of them is then valid). */
static int still_needed(const fl_session *s, uint64_t c0, uint64_t c1)
{
    for (uint64_t c = c0; c < c1; c++)
        if (s->state[c] != FL_NEEDED)
            return 0;
    return 1;
}

/* Progress: mark clusters [c0, c1] read (no lock; see "Progress"). */
static void mark_read(fl_session *s, uint64_t c0, uint64_t c1)
{
    uint64_t tail = s->n_clusters - 1, added = 0, bytes;
    int tail_new = 0;

    for (uint64_t w = c0 >> 6; w <= c1 >> 6; w++) {
        unsigned lo = w == c0 >> 6 ? (unsigned)(c0 & 63) : 0;
        unsigned hi = w == c1 >> 6 ? (unsigned)(c1 & 63) : 63;
        uint64_t mask = (~UINT64_C(0) >> (63 - hi)) & (~UINT64_C(0) << lo);
        uint64_t old = __atomic_load_n(&s->read_bits[w], __ATOMIC_RELAXED);

        if ((old & mask) == mask)
            continue;   /* read before: no store, the line stays shared */
        old = __atomic_fetch_or(&s->read_bits[w], mask, __ATOMIC_RELAXED);
        old = mask & ~old;                  /* the bits this read set */
        added += (uint64_t)__builtin_popcountll(old);
        if (w == tail >> 6 && (old >> (tail & 63) & 1))
            tail_new = 1;
    }
    if (added == 0)
        return;
    bytes = added << s->shift;
    if (tail_new)
        bytes -= s->cs - cbytes(s, tail);   /* the tail cluster is short */
    __atomic_add_fetch(&s->read_bytes, bytes, __ATOMIC_RELAXED);
}

/* Wait on the condvar until START + cbw_timeout (no deadline without
 * cbw_timeout).  START is when the guest write (or snapshot read) began,
 * the same for every session it visits, so the timeout bounds its whole
 * copy-before-write, time spent waiting for the mutex included.  Returns 0
 * or -ETIMEDOUT. */
static int wait_cond(fl_session *s, const struct timespec *start)
{
    struct timespec dl;
    int r;

    if (s->timeout_ms <= 0) {
        pthread_cond_wait(&s->cond, &s->lock);
        return 0;
    }
    dl = *start;
    dl.tv_sec += (time_t)(s->timeout_ms / 1000);
    dl.tv_nsec += (long)(s->timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    r = pthread_cond_timedwait(&s->cond, &s->lock, &dl);
    return r == ETIMEDOUT ? -ETIMEDOUT : 0;
}

/* Break the snapshot (sticky).  Returns 1 when this call broke it: the
 * caller must then punch the whole temp file once the mutex is dropped. */
static int break_locked(fl_session *s, int err)
{
    if (s->broken)
        return 0;
    s->broken = 1;
    s->broken_errno = err > 0 ? err : EIO;
    {
        /* Tell the event loop (fl_session_event_fd): once, non-blocking.
         * A full counter cannot happen (one write per session). */
        uint64_t one = 1;
        ssize_t n = write(s->event_fd, &one, sizeof one);
        (void)n;
    }
    cache_free_all(s);
    s->cache_used = 0;
    s->temp_bytes = 0;
    /* Nothing is stored any more: say so in the map (COPYING clusters are
     * settled by their owner, back to NEEDED). */
    for (uint64_t c = 0;
         c < s->n_clusters && s->n_state[FL_COPIED] + s->n_state[FL_ZERO] > 0;
         c++)
        if (s->state[c] == FL_COPIED || s->state[c] == FL_ZERO)
            set_state(s, c, FL_NEEDED);
    pthread_cond_broadcast(&s->cond);
    return 1;
}

/* Drop the whole temp file's data (no mutex held). */
static void punch_all(fl_session *s)
{
    /* Without hole punching, shrink and regrow instead (best effort: the
     * data is unreachable either way once the session is broken). */
    if (fl__punch(s->temp_fd, 0, s->size) < 0 && ftruncate(s->temp_fd, 0) == 0 &&
        ftruncate(s->temp_fd, (off_t)s->size) < 0)
        return;
}

/* Apply the policy to a CBW failure ERR (< 0).  Returns ERR when the guest
 * write must fail, 0 when it goes on (snapshot broken). */
static int fail_locked(fl_session *s, int err, int *need_punch)
{
    if (s->policy == FL_BREAK_GUEST_WRITE)
        return err;
    *need_punch |= break_locked(s, -err);
    return 0;
}

static void revert_claims(fl_session *s, uint64_t c0, uint64_t c1)
{
    for (uint64_t c = c0; c < c1; c++)
        set_state(s, c, FL_NEEDED);
    pthread_cond_broadcast(&s->cond);
}

/* Sleep MS milliseconds (test hook; no lock held). */
static void nap(int ms)
{
    struct timespec ts = { .tv_sec = ms / 1000,
                           .tv_nsec = (long)(ms % 1000) * 1000000L };

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Set HOLE[i] to 1 when cluster c0 + i of [c0, c1) is one hole of the
 * source, else 0.  No lock: the caller owns the COPYING claims, so no
 * guest write changes these clusters meanwhile (invariant 1). */
static void classify(const fl_session *s, uint64_t c0, uint64_t c1,
                     uint8_t *hole)
{
    uint64_t lens[16], pos = c0 << s->shift, end = cluster_end(s, c1 - 1);
    uint32_t flags[16];

    memset(hole, 0, (size_t)(c1 - c0));
    while (pos < end) {
        struct fl__ext e = { lens, flags, 16, 0 };

        s->file->ops->extents(s->file, pos, end - pos, &e);
        if (e.n == 0)
            break;
        for (size_t i = 0; i < e.n; i++) {
            uint64_t xend = pos + lens[i];
            if (flags[i] & FL_EXT_HOLE) /* the clusters wholly inside */
                for (uint64_t c = (pos + s->cs - 1) >> s->shift;
                     c < c1 && cluster_end(s, c) <= xend; c++)
                    hole[c - c0] = 1;
            pos = xend;
        }
    }
}

/* Copy the data clusters of [c0, c1) (HOLE marks the others) from the
 * source to the temp file, each maximal data sub-run through one buffer.
 * Not through copy_file_range: on ext4 (no reflink) its splice path
 * collapses under concurrent copies into one temp file (measured: 8
 * threads of 4k CBW writes, 17-49k ops/s with copy_file_range against
 * 213k through a buffer).  Test hooks: sleep DELAY_MS after the first
 * source read; INJ fails the first store after writing its first half.
 * *wrote is set once the temp file may have been modified.  No lock. */
static int copy_to_temp(fl_session *s, uint64_t c0, uint64_t c1,
                        const uint8_t *hole, int inj, int delay_ms,
                        int *wrote)
{
    int rc = 0;

    for (uint64_t c = c0, c2; c < c1 && rc == 0; c = c2) {
        uint64_t off, bytes;
        uint8_t *buf;

        if (hole[c - c0]) {
            c2 = c + 1;
            continue;
        }
        for (c2 = c + 1; c2 < c1 && !hole[c2 - c0]; c2++)
            ;
        off = c << s->shift;
        bytes = cluster_end(s, c2 - 1) - off;
        buf = malloc((size_t)bytes);
        if (buf == NULL)
            return -ENOMEM;
        rc = s->file->ops->read(s->file, buf, (size_t)bytes, off, NULL);
        if (rc == 0 && delay_ms > 0) {
            nap(delay_ms);
            delay_ms = 0;
        }
        if (rc == 0) {
            *wrote = 1;
            if (inj) { /* torn write: half of it lands, then the error */
                rc = fl__full_pwrite(s->temp_fd, buf, (size_t)(bytes / 2), off);
                if (rc == 0)
                    rc = -inj;
            } else {
                rc = fl__full_pwrite(s->temp_fd, buf, (size_t)bytes, off);
            }
        }
        free(buf);
    }
    return rc;
}

/* Copy the claimed clusters [c0, c1) (COPYING, owned by the caller: the
 * writer inline, or a copier running job J).  Called and returns with
 * s->lock held; drops it around the I/O.  Every claim is settled on
 * return: COPIED or ZERO on success, else back to NEEDED with whatever
 * was stored dropped.  Returns 0 on success and when the session broke or
 * J was abandoned (nobody to tell), else -errno for the policy. */
static int copy_run(fl_session *s, uint64_t c0, uint64_t c1,
                    const struct job *j)
{
    uint8_t hole[RUN_CLUSTERS];
    uint64_t off = c0 << s->shift, end = cluster_end(s, c1 - 1);
    uint64_t data = 0, n_data = 0;
    struct cent *e = NULL;
    int delay_ms = s->inject_delay_ms, inj = 0, rc = 0, to_cache = 0;
    int wrote = 0;

    /* A run is one cluster, or clusters of at most RUN_MAX bytes in all. */
    if (c1 - c0 > RUN_CLUSTERS) {
        revert_claims(s, c0, c1);
        return -EINVAL; /* cannot happen: see the claim in before_write */
    }
    pthread_mutex_unlock(&s->lock);
    classify(s, c0, c1, hole);
    pthread_mutex_lock(&s->lock);
    for (uint64_t c = c0; c < c1; c++) {
        if (!hole[c - c0]) {
            data += cbytes(s, c);
            n_data++;
        }
    }
    if (s->broken || (j != NULL && j->abandoned))
        goto revert; /* nothing reserved, nothing stored */
    /* Reserve for the data clusters only (invariant 4). */
    if (data > 0) {
        if (c1 - c0 == 1 && s->cache_budget > 0 &&
            s->cache_used <= s->cache_budget &&
            data <= s->cache_budget - s->cache_used) {
            to_cache = 1;
            s->cache_used += data;
        } else if (s->max_temp > 0 &&
                   (s->temp_bytes > s->max_temp ||
                    data > s->max_temp - s->temp_bytes)) {
            rc = -ENOSPC;
            goto revert;
        } else {
            s->temp_bytes += data;
        }
        if (s->inject_n > 0) {
            s->inject_n--;
            inj = s->inject_err;
        }
    }
    pthread_mutex_unlock(&s->lock);

    if (data == 0) {
        if (delay_ms > 0)
            nap(delay_ms);
    } else if (to_cache) {
        e = malloc(sizeof(*e) + data);
        if (e == NULL) {
            rc = -ENOMEM;
        } else {
            e->idx = c0;
            rc = s->file->ops->read(s->file, e->data, (size_t)data, off, NULL);
            if (rc == 0 && delay_ms > 0)
                nap(delay_ms);
            if (rc == 0 && inj)
                rc = -inj; /* test hook: the cache store fails */
        }
    } else {
        rc = copy_to_temp(s, c0, c1, hole, inj, delay_ms, &wrote);
    }

    pthread_mutex_lock(&s->lock);
    if (rc == 0 && !s->broken && !(j != NULL && j->abandoned)) {
        if (to_cache)
            cache_insert(s, e);
        else
            s->temp_written += data;
        for (uint64_t c = c0; c < c1; c++)
            set_state(s, c, hole[c - c0] ? FL_ZERO : FL_COPIED);
        s->cbw_count += n_data;
        s->cbw_bytes += data;
        pthread_cond_broadcast(&s->cond);
        return 0;
    }
    /* Failed, broken meanwhile, or abandoned: drop what we stored (a
     * breaker's punch may have run before our pwrite), then release the
     * reservation (a break already zeroed the counters). */
    free(e);
    if (wrote) {
        pthread_mutex_unlock(&s->lock);
        fl__punch(s->temp_fd, off, end - off);
        pthread_mutex_lock(&s->lock);
    }
    if (!s->broken) {
        if (to_cache)
            s->cache_used -= data;
        else
            s->temp_bytes -= data;
    }
revert:
    revert_claims(s, c0, c1);
    if (s->broken || (j != NULL && j->abandoned))
        return 0;
    return rc;
}

/* ---- copier threads (cbw_timeout > 0) -------------------------------- */

static void *copier_main(void *arg)
{
    fl_session *s = arg;

    pthread_mutex_lock(&s->lock);
    for (;;) {
        struct job *j = s->jobs;

        if (j == NULL) {
            if (s->stopping)
                break;
            pthread_cond_wait(&s->work, &s->lock);
            continue;
        }
        s->jobs = j->next;
        if (s->jobs == NULL)
            s->jobs_tail = NULL;
        j->running = 1;
        j->rc = copy_run(s, j->c0, j->c1, j);
        if (j->abandoned) {
            free(j); /* the writer gave up: we are last */
        } else {
            j->done = 1;
            pthread_cond_broadcast(&s->cond);
        }
    }
    pthread_mutex_unlock(&s->lock);
    fl__session_unref(s); /* may be the last reference */
    return NULL;
}

/* Start up to COPIERS detached copiers, each with a session reference, all
 * signals but the synchronous ones blocked.  Returns how many started, or
 * -errno when none did. */
static int start_copiers(fl_session *s)
{
    static const int sync_sigs[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL,
                                     SIGABRT, SIGTRAP };
    pthread_attr_t attr;
    sigset_t all, old;
    unsigned n;
    int rc;

    rc = -pthread_attr_init(&attr);
    if (rc < 0)
        return rc;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    for (size_t i = 0; i < sizeof(sync_sigs) / sizeof(sync_sigs[0]); i++)
        sigdelset(&all, sync_sigs[i]);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (n = 0; n < COPIERS; n++) {
        pthread_t t;

        fl__session_ref(s);
        rc = -pthread_create(&t, &attr, copier_main, s);
        if (rc < 0) {
            fl__session_unref(s); /* never the last: the owner holds one */
            break;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return n > 0 ? (int)n : rc;
}

/* The writer gives job J up (s->lock held): a running job is marked
 * abandoned (its copier drops the copy and frees J); a queued one is
 * unlinked, its claims go back to NEEDED and J is freed here. */
static void give_up(fl_session *s, struct job *j)
{
    struct job **pp = &s->jobs, *prev = NULL;

    if (j->running) {
        j->abandoned = 1;
        return;
    }
    while (*pp != j) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    *pp = j->next;
    if (s->jobs_tail == j)
        s->jobs_tail = prev;
    revert_claims(s, j->c0, j->c1);
    free(j);
}

/* Hand the claimed run [c0, c1) to the copiers and wait for it until the
 * writer's deadline.  Called with s->lock held.  Returns copy_run's
 * result, -ENOMEM (claims reverted), -ETIMEDOUT when the deadline passed,
 * or 0 when the session broke meanwhile (nothing to wait for); in the last
 * two cases the job is given up. */
static int run_job(fl_session *s, uint64_t c0, uint64_t c1,
                   const struct timespec *start)
{
    struct job *j = calloc(1, sizeof(*j));
    int rc = 0;

    if (j == NULL) {
        revert_claims(s, c0, c1);
        return -ENOMEM;
    }
    j->c0 = c0;
    j->c1 = c1;
    if (s->jobs_tail != NULL)
        s->jobs_tail->next = j;
    else
        s->jobs = j;
    s->jobs_tail = j;
    pthread_cond_signal(&s->work);
    while (!j->done && !s->broken && rc == 0)
        rc = wait_cond(s, start);
    if (j->done) {
        rc = j->rc;
        free(j);
        return rc;
    }
    give_up(s, j);
    return rc;
}

/* ---- guest write hook ----------------------------------------------- */

fl_session *fl__session_next(const fl_session *s)
{
    return s->next;
}

int fl__session_needs_copy(fl_session *s, uint64_t off, uint64_t len)
{
    uint64_t c0, n;
    int r = 0;

    /* A closing session still counts: until its detach it runs CBW, and a
     * snapshot read in flight may still need the old data. */
    if (len == 0)
        return 0;
    c0 = off >> s->shift;
    n = ((off + len - 1) >> s->shift) - c0 + 1;
    pthread_mutex_lock(&s->lock);
    if (!s->broken)
        r = memchr(s->state + c0, FL_NEEDED, (size_t)n) != NULL ||
            memchr(s->state + c0, FL_COPYING, (size_t)n) != NULL;
    pthread_mutex_unlock(&s->lock);
    return r;
}

int fl__session_before_write(fl_session *s, uint64_t off, uint64_t len,
                             const struct timespec *start)
{
    int need_punch = 0, rc = 0;
    uint64_t c, last, t0 = 0;

    if (len == 0)
        return 0;
    c = off >> s->shift;
    last = (off + len - 1) >> s->shift;

    pthread_mutex_lock(&s->lock);
    while (!s->broken && c <= last) {
        uint8_t st = s->state[c];
        uint64_t c1, bytes;
        int one;

        if (st == FL_COPYING) { /* another write copies it: wait */
            if (t0 == 0)
                t0 = fl__now_ns();
            rc = wait_cond(s, start);
            if (rc < 0) {
                rc = fail_locked(s, rc, &need_punch);
                goto out;
            }
            continue;
        }
        if (st != FL_NEEDED) {
            c++;
            continue;
        }
        if (t0 == 0)
            t0 = fl__now_ns();
        /* Claim a run: one cluster when the cache may take it, else up to
         * RUN_MAX bytes (at least one cluster). */
        bytes = cbytes(s, c);
        one = s->cache_budget > 0 && s->cache_used <= s->cache_budget &&
              bytes <= s->cache_budget - s->cache_used;
        set_state(s, c, FL_COPYING);
        c1 = c + 1;
        while (!one && c1 <= last && s->state[c1] == FL_NEEDED &&
               bytes + cbytes(s, c1) <= RUN_MAX) {
            bytes += cbytes(s, c1);
            set_state(s, c1, FL_COPYING);
            c1++;
        }
        if (s->n_copiers > 0)
            rc = run_job(s, c, c1, start);
        else
            rc = copy_run(s, c, c1, NULL);
        if (rc < 0) {
            rc = fail_locked(s, rc, &need_punch);
            goto out;
        }
        c = c1;
    }
out:
    if (t0 != 0)
        fl__lat_add(&s->cbw_lat, fl__now_ns() - t0, 0);
    pthread_mutex_unlock(&s->lock);
    if (need_punch)
        punch_all(s);
    return rc;
}

/* ---- copy-before-write run by another process ------------------------ */

/* Store the old contents of the whole NEEDED clusters [c0, c1) (COPYING,
 * claimed by the caller), which are at BUF (NULL: zeros).  Called and
 * returns with s->lock held; drops it around the store.  Settles every
 * claim like copy_run. */
static int put_run(fl_session *s, uint64_t c0, uint64_t c1, const uint8_t *buf)
{
    uint64_t off = c0 << s->shift, data = cluster_end(s, c1 - 1) - off;
    struct cent *e = NULL;
    int inj = 0, rc = 0, to_cache = 0, wrote = 0;

    if (buf == NULL) {          /* zeros: nothing to store */
        for (uint64_t c = c0; c < c1; c++)
            set_state(s, c, FL_ZERO);
        pthread_cond_broadcast(&s->cond);
        return 0;
    }
    if (c1 - c0 == 1 && s->cache_budget > 0 && s->cache_used <= s->cache_budget &&
        data <= s->cache_budget - s->cache_used) {
        to_cache = 1;
        s->cache_used += data;
    } else if (s->max_temp > 0 &&
               (s->temp_bytes > s->max_temp || data > s->max_temp - s->temp_bytes)) {
        revert_claims(s, c0, c1);
        return -ENOSPC;
    } else {
        s->temp_bytes += data;
    }
    if (s->inject_n > 0) {
        s->inject_n--;
        inj = s->inject_err;
    }
    pthread_mutex_unlock(&s->lock);
    if (to_cache) {
        e = malloc(sizeof(*e) + data);
        if (e == NULL) {
            rc = -ENOMEM;
        } else {
            e->idx = c0;
            memcpy(e->data, buf, (size_t)data);
            if (inj)
                rc = -inj;
        }
    } else {
        wrote = 1;
        rc = inj ? -inj : fl__full_pwrite(s->temp_fd, buf, (size_t)data, off);
    }
    pthread_mutex_lock(&s->lock);
    if (rc == 0 && !s->broken) {
        if (to_cache)
            cache_insert(s, e);
        else
            s->temp_written += data;
        for (uint64_t c = c0; c < c1; c++)
            set_state(s, c, FL_COPIED);
        s->cbw_count += c1 - c0;
        s->cbw_bytes += data;
        pthread_cond_broadcast(&s->cond);
        return 0;
    }
    free(e);
    if (wrote) {
        pthread_mutex_unlock(&s->lock);
        fl__punch(s->temp_fd, off, data);
        pthread_mutex_lock(&s->lock);
    }
    if (!s->broken) {
        if (to_cache)
            s->cache_used -= data;
        else
            s->temp_bytes -= data;
    }
    revert_claims(s, c0, c1);
    return s->broken ? 0 : rc;
}

int fl_session_break(fl_session *s, int err)
{
    int need_punch;

    if (err <= 0)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    need_punch = break_locked(s, err);
    pthread_mutex_unlock(&s->lock);
    if (need_punch)
        punch_all(s);
    return 0;
}

int fl_session_put_old(fl_session *s, const uint8_t *buf, uint64_t len, uint64_t off)
{
    uint64_t c, last, end = off + len;
    int need_punch = 0, rc = fl__range_ok(off, len, s->size);

    if (rc < 0 || len == 0)
        return rc;
    c = off >> s->shift;
    last = (end - 1) >> s->shift;
    pthread_mutex_lock(&s->lock);
    while (!s->broken && c <= last) {
        uint64_t c1;

        if (s->state[c] != FL_NEEDED) {    /* kept already, or copying */
            c++;
            continue;
        }
        if ((c << s->shift) < off || cluster_end(s, c) > end) {
            /* Part of a cluster the snapshot still needs: the copier works
             * with smaller clusters than the session, and the rest of this
             * one will never come.  The snapshot cannot be kept whole
             * whatever the policy (failing the guest write would fail
             * every one after it too). */
            need_punch = break_locked(s, EINVAL);
            break;
        }
        for (c1 = c + 1; c1 <= last && s->state[c1] == FL_NEEDED &&
                         cluster_end(s, c1) <= end &&
                         (c1 - c) < RUN_CLUSTERS; c1++)
            ;
        for (uint64_t i = c; i < c1; i++)
            set_state(s, i, FL_COPYING);
        rc = put_run(s, c, c1, buf == NULL ? NULL : buf + ((c << s->shift) - off));
        if (rc < 0) {
            rc = fail_locked(s, rc, &need_punch);
            break;
        }
        c = c1;
    }
    pthread_mutex_unlock(&s->lock);
    if (need_punch)
        punch_all(s);
    return rc;
}

/* ---- sessions ------------------------------------------------------- */

static int open_temp(const char *dir)
{
    size_t n = strlen(dir);
    char *path;
    int fd;

    fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0)
        return fd;
    /* No O_TMPFILE (kernel or filesystem): create and unlink at once. */
    if (n > PATH_MAX)
        return -ENAMETOOLONG;
    path = malloc(n + sizeof("/fleeced-cbw-XXXXXX"));
    if (path == NULL)
        return -ENOMEM;
    memcpy(path, dir, n);
    memcpy(path + n, "/fleeced-cbw-XXXXXX", sizeof("/fleeced-cbw-XXXXXX"));
    fd = mkostemp(path, O_CLOEXEC);
    if (fd < 0) {
        fd = -errno;
    } else if (unlink(path) < 0) {
        int e = -errno;
        close(fd);
        fd = e;
    }
    free(path);
    return fd;
}

static int check_params(const fl_file *f, const struct fl_session_params *p)
{
    if (p->cluster_size < CLUSTER_MIN || p->cluster_size > CLUSTER_MAX ||
        (p->cluster_size & (p->cluster_size - 1)) != 0)
        return -EINVAL;
    if (p->temp_dir == NULL || p->temp_dir[0] == '\0')
        return -EINVAL;
    if (p->policy != FL_BREAK_SNAPSHOT && p->policy != FL_BREAK_GUEST_WRITE)
        return -EINVAL;
    if (p->n_scope > 0 && (p->scope_off == NULL || p->scope_len == NULL))
        return -EINVAL;
    for (size_t i = 0; i < p->n_scope; i++)
        if (fl__range_ok(p->scope_off[i], p->scope_len[i], f->size) < 0)
            return -EINVAL;
    if (p->checkpoint_since != NULL &&
        (p->n_scope > 0 || fl_bitmap_size(p->checkpoint_since) != f->size))
        return -EINVAL;
    if (p->checkpoint_new != NULL &&
        (p->checkpoint_new == p->checkpoint_since ||
         fl_bitmap_size(p->checkpoint_new) != f->size))
        return -EINVAL;
    return 0;
}

/* Checkpoint, under the exclusive sessions_lock (notes "Checkpoints"):
 * returns 0, with *OLD_REF set to OLD when the file's reference on it
 * must be dropped after unlocking, or -ENOMEM with nothing changed. */
static int checkpoint_locked(fl_session *s, const struct fl_session_params *p,
                             fl_bitmap **old_ref)
{
    fl_file *f = s->file;
    fl_bitmap *nb = p->checkpoint_new;
    int new_attached = nb != NULL && fl__file_bitmap_find(f, nb) >= 0;
    long i;

    *old_ref = NULL;
    if (nb != NULL && !new_attached && fl__file_bitmap_reserve(f, 1) < 0)
        return -ENOMEM;
    if (p->checkpoint_since != NULL) {
        uint64_t from = 0, b0, b1, prev = 0, needed = 0;

        fl__bitmap_copy_bits(s->frozen_bm, p->checkpoint_since);
        while (fl__bitmap_next_run(s->frozen_bm, from, &b0, &b1)) {
            uint64_t c0 = b0 >> s->shift, c1 = ((b1 - 1) >> s->shift) + 1;
            if (c0 < prev)
                c0 = prev;     /* shares a cluster with the run before */
            if (c0 < c1) {
                memset(s->state + c0, FL_NEEDED, (size_t)(c1 - c0));
                needed += c1 - c0;
                prev = c1;
            }
            from = b1;
        }
        s->n_state[FL_NEEDED] = needed;
        s->n_state[FL_NOT_NEEDED] = s->n_clusters - needed;
        i = fl__file_bitmap_find(f, p->checkpoint_since);
        if (i >= 0) {
            fl__file_bitmap_remove(f, (size_t)i);
            *old_ref = p->checkpoint_since;
        }
    }
    if (nb != NULL) {
        fl_bitmap_clear(nb);
        if (!new_attached)
            fl__file_bitmap_add(f, nb);
    }
    return 0;
}

int fl_session_open(fl_file *f, const struct fl_session_params *p,
                    fl_session **out)
{
    pthread_condattr_t ca;
    fl_bitmap *old_ref;
    fl_session *s;
    int rc;

    if (f == NULL || p == NULL || out == NULL)
        return -EINVAL;
    *out = NULL;
    rc = check_params(f, p);
    if (rc < 0)
        return rc;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    s->refs = 1;
    s->file = f;
    s->size = f->size;
    s->cs = p->cluster_size;
    s->shift = (unsigned)__builtin_ctzll(p->cluster_size);
    s->n_clusters = (s->size >> s->shift) + ((s->size & (s->cs - 1)) != 0);
    s->cache_budget = p->cache_bytes;
    s->max_temp = p->max_temp;
    s->timeout_ms = p->cbw_timeout_ms;
    s->policy = p->policy;
    s->temp_fd = -1;
    s->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->event_fd < 0) {
        rc = -errno;
        goto err;
    }
    if (s->timeout_ms > INT64_MAX / 2) /* keep the deadline arithmetic sane */
        s->timeout_ms = INT64_MAX / 2;

    if (s->n_clusters > SIZE_MAX) {
        rc = -ENOMEM;
        goto err;
    }
    s->state = malloc(s->n_clusters > 0 ? (size_t)s->n_clusters : 1);
    s->read_bits = calloc((size_t)((s->n_clusters + 63) / 64) + 1,
                          sizeof(*s->read_bits));
    if (s->state == NULL || s->read_bits == NULL) {
        rc = -ENOMEM;
        goto err;
    }
    if (p->checkpoint_since != NULL) {
        /* The scope is set under the lock, from the frozen copy. */
        memset(s->state, FL_NOT_NEEDED, (size_t)s->n_clusters);
        rc = fl_bitmap_open(NULL, s->size,
                            fl_bitmap_granularity(p->checkpoint_since), 0,
                            &s->frozen_bm, NULL);
        if (rc < 0)
            goto err;
    } else if (p->n_scope == 0) {
        memset(s->state, FL_NEEDED, (size_t)s->n_clusters);
    } else {
        memset(s->state, FL_NOT_NEEDED, (size_t)s->n_clusters);
        for (size_t i = 0; i < p->n_scope; i++) {
            uint64_t o = p->scope_off[i], l = p->scope_len[i];
            if (l == 0)
                continue;
            for (uint64_t c = o >> s->shift; c <= (o + l - 1) >> s->shift; c++)
                s->state[c] = FL_NEEDED;
        }
    }
    for (uint64_t c = 0; c < s->n_clusters; c++)
        s->n_state[s->state[c]]++;

    if (s->cache_budget > 0) {
        uint64_t want = s->cache_budget >> s->shift;
        size_t nb = 16;
        while (nb < BUCKETS_MAX && nb < want)
            nb <<= 1;
        s->buckets = calloc(nb, sizeof(*s->buckets));
        if (s->buckets == NULL) {
            rc = -ENOMEM;
            goto err;
        }
        s->n_buckets = nb;
    }

    rc = open_temp(p->temp_dir);
    if (rc < 0)
        goto err;
    s->temp_fd = rc;
    if (ftruncate(s->temp_fd, (off_t)s->size) < 0) {
        rc = -errno;
        goto err;
    }

    rc = -pthread_mutex_init(&s->lock, NULL);
    if (rc < 0)
        goto err;
    rc = -pthread_condattr_init(&ca);
    if (rc == 0) {
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        rc = -pthread_cond_init(&s->cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    if (rc < 0) {
        pthread_mutex_destroy(&s->lock);
        goto err;
    }
    rc = -pthread_cond_init(&s->work, NULL);
    if (rc < 0)
        goto err_sync;
    /* Last fallible step: once a copier runs it holds a reference, and
     * the session can only go away through fl_session_close. */
    if (s->timeout_ms > 0) {
        rc = start_copiers(s);
        if (rc < 0) {
            pthread_cond_destroy(&s->work);
            goto err_sync;
        }
        s->n_copiers = (unsigned)rc;
    }

    /* Attach with no guest write in flight: the snapshot point. */
    pthread_rwlock_wrlock(&f->sessions_lock);
    rc = checkpoint_locked(s, p, &old_ref);
    if (rc < 0) {
        pthread_rwlock_unlock(&f->sessions_lock);
        goto err_started;
    }
    /* The scope is final now and nobody else sees the map yet. */
    s->total_bytes = (s->n_clusters - s->n_state[FL_NOT_NEEDED]) << s->shift;
    if (s->n_clusters > 0 && s->state[s->n_clusters - 1] != FL_NOT_NEEDED)
        s->total_bytes -= s->cs - cbytes(s, s->n_clusters - 1);
    fl__file_ref(f);
    s->next = f->sessions;
    f->sessions = s;
    pthread_rwlock_unlock(&f->sessions_lock);
    if (old_ref != NULL)
        fl__bitmap_unref(old_ref);   /* the file's reference on OLD */
    *out = s;
    return 0;

err_started:
    if (s->n_copiers > 0) {
        /* The copiers hold references: let them exit and free the rest.
         * The session was never attached, so it takes no file reference
         * with it: take one for its unref to give back. */
        fl__file_ref(f);
        __atomic_store_n(&s->closed, 1, __ATOMIC_RELEASE);
        pthread_mutex_lock(&s->lock);
        s->stopping = 1;
        pthread_cond_broadcast(&s->work);
        pthread_mutex_unlock(&s->lock);
        fl__session_unref(s);
        return rc;
    }
    pthread_cond_destroy(&s->work);
err_sync:
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
err:
    if (s->temp_fd >= 0)
        close(s->temp_fd);
    if (s->event_fd >= 0)
        close(s->event_fd);
    if (s->frozen_bm != NULL)
        fl__bitmap_unref(s->frozen_bm);
    free(s->buckets);
    free(s->state);
    free(s->read_bits);
    free(s);
    return rc;
}

void fl__session_ref(fl_session *s)
{
    __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
}

void fl__session_unref(fl_session *s)
{
    fl_file *f = s->file;

    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    cache_free_all(s);
    free(s->buckets);
    free(s->state);
    free(s->read_bits);
    if (s->frozen_bm != NULL)
        fl__bitmap_unref(s->frozen_bm);
    close(s->temp_fd);
    close(s->event_fd);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    free(s);
    fl__file_unref(f);
}

int fl__session_closed(const fl_session *s)
{
    return __atomic_load_n(&s->closed, __ATOMIC_ACQUIRE);
}

void fl_session_close(fl_session *s)
{
    fl_file *f;
    fl_session **pp;

    if (s == NULL)
        return;
    f = s->file;
    __atomic_store_n(&s->closed, 1, __ATOMIC_RELEASE);
    /* Detach: waits for guest writes in flight (they hold the lock
     * shared), so none runs CBW for this session afterwards. */
    pthread_rwlock_wrlock(&f->sessions_lock);
    for (pp = &f->sessions; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    pthread_rwlock_unlock(&f->sessions_lock);
    /* No writer can queue a job any more: let the copiers finish. */
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->lock);
    fl__session_unref(s);
}

int fl_session_read(fl_session *s, uint8_t *buf, size_t len, uint64_t off,
                    int *is_hole)
{
    struct timespec start;
    int rc, all_hole = 1;
    uint64_t pos = off, end, last;

    rc = fl__range_ok(off, len, s->size);
    if (rc < 0)
        return rc;
    if (is_hole != NULL)
        *is_hole = 0;
    end = off + len;
    last = len > 0 ? (end - 1) >> s->shift : 0;
    if (s->timeout_ms > 0)
        clock_gettime(CLOCK_MONOTONIC, &start);

    pthread_mutex_lock(&s->lock);
    while (pos < end) {
        uint64_t c = pos >> s->shift, c1, seg_end;
        uint8_t st = s->state[c];
        struct cent *e;
        int r, hole = 0, nap_ms;

        if (s->broken) {
            rc = -EIO;
            break;
        }
        if (st == FL_NOT_NEEDED) {
            rc = -EPERM;
            break;
        }
        if (st == FL_COPYING) {
            rc = wait_cond(s, &start);
            if (rc < 0)
                break;
            continue;
        }
        if (st == FL_ZERO) {
            for (c1 = c + 1; c1 <= last && s->state[c1] == FL_ZERO; c1++)
                ;
            seg_end = (c1 << s->shift) < end ? (c1 << s->shift) : end;
            memset(buf + (pos - off), 0, (size_t)(seg_end - pos));
            pos = seg_end;
            continue;
        }
        if (st == FL_COPIED && (e = cache_find(s, c)) != NULL) {
            seg_end = cluster_end(s, c) < end ? cluster_end(s, c) : end;
            memcpy(buf + (pos - off), e->data + (pos - (c << s->shift)),
                   (size_t)(seg_end - pos));
            s->read_cache += seg_end - pos;
            all_hole = 0;
            pos = seg_end;
            continue;
        }
        if (st == FL_COPIED) {
            for (c1 = c + 1; c1 <= last && s->state[c1] == FL_COPIED &&
                             cache_find(s, c1) == NULL; c1++)
                ;
            seg_end = (c1 << s->shift) < end ? (c1 << s->shift) : end;
            pthread_mutex_unlock(&s->lock);
            r = fl__full_pread(s->temp_fd, buf + (pos - off),
                               (size_t)(seg_end - pos), pos);
            pthread_mutex_lock(&s->lock);
            if (r < 0) {
                rc = s->broken ? -EIO : r;
                break;
            }
            s->read_temp += seg_end - pos;
            all_hole = 0;
            pos = seg_end;
            continue;
        }
        /* NEEDED: read the source optimistically (invariant 2). */
        for (c1 = c + 1; c1 <= last && s->state[c1] == FL_NEEDED; c1++)
            ;
        seg_end = (c1 << s->shift) < end ? (c1 << s->shift) : end;
        nap_ms = s->inject_read_delay_ms;
        pthread_mutex_unlock(&s->lock);
        r = s->file->ops->read(s->file, buf + (pos - off), (size_t)(seg_end - pos), pos,
                               is_hole != NULL ? &hole : NULL);
        if (nap_ms > 0)
            nap(nap_ms);
        pthread_mutex_lock(&s->lock);
        if (r < 0) {
            rc = r;
            break;
        }
        if (!still_needed(s, c, c1)) {
            s->read_retries++;
            continue;           /* a write got in: read the run again */
        }
        s->read_source += seg_end - pos;
        if (!hole)
            all_hole = 0;
        pos = seg_end;
    }
    /* A break during our source/temp read may have let a write through. */
    if (rc == 0 && s->broken)
        rc = -EIO;
    pthread_mutex_unlock(&s->lock);
    if (rc == 0 && len > 0)
        mark_read(s, off >> s->shift, last);
    if (rc == 0 && is_hole != NULL && len > 0)
        *is_hole = all_hole;
    return rc;
}

int fl_session_discard(fl_session *s, uint64_t off, uint64_t len)
{
    uint64_t end, c0, c1, pend;
    int rc = fl__range_ok(off, len, s->size);

    if (rc < 0)
        return rc;
    end = off + len;
    c0 = (off >> s->shift) + ((off & (s->cs - 1)) != 0);
    c1 = end == s->size ? s->n_clusters : end >> s->shift;
    if (c0 >= c1)
        return 0;

    pthread_mutex_lock(&s->lock);
    for (uint64_t c = c0; c < c1; c++) {
        uint8_t st;

        /* Let guest writes in between: a discard of a whole large disk
         * must not hold the mutex they wait for (their cbw_timeout runs). */
        if (c > c0 && (c - c0) % DISCARD_BATCH == 0) {
            pthread_mutex_unlock(&s->lock);
            pthread_mutex_lock(&s->lock);
        }
        while (s->state[c] == FL_COPYING) /* its owner always settles it */
            pthread_cond_wait(&s->cond, &s->lock);
        st = s->state[c];
        if (st == FL_NOT_NEEDED)
            continue;
        if (st == FL_COPIED && !s->broken) {
            struct cent *e = cache_remove(s, c);
            if (e != NULL) {
                s->cache_used -= cbytes(s, c);
                free(e);
            } else {
                s->temp_bytes -= cbytes(s, c);
            }
        }
        set_state(s, c, FL_NOT_NEEDED);
        s->discarded_clusters++;
        s->discarded_bytes += cbytes(s, c);
    }
    pthread_mutex_unlock(&s->lock);
    /* NOT_NEEDED is final, so nobody stores into this range again. */
    pend = c1 << s->shift;
    if (pend > s->size)
        pend = s->size;
    fl__punch(s->temp_fd, c0 << s->shift, pend - (c0 << s->shift));
    return 0;
}

/* How fl_session_extents reports a cluster state. */
enum { EXT_DATA, EXT_SOURCE, EXT_ZERO, EXT_OUTSIDE };

static int ext_kind(uint8_t st)
{
    return st == FL_NEEDED ? EXT_SOURCE : st == FL_ZERO ? EXT_ZERO
           : st == FL_NOT_NEEDED ? EXT_OUTSIDE : EXT_DATA;
}

int fl_session_extents(fl_session *s, uint64_t off, uint64_t len,
                       uint64_t *lens, uint32_t *flags, size_t max,
                       size_t *n)
{
    struct fl__ext e = { lens, flags, max, 0 };
    uint64_t pos = off, end, last;
    int rc = fl__range_ok(off, len, s->size);

    if (rc < 0)
        return rc;
    if (n == NULL || (len > 0 && (max == 0 || lens == NULL || flags == NULL)))
        return -EINVAL;
    end = off + len;
    last = len > 0 ? (end - 1) >> s->shift : 0;

    pthread_mutex_lock(&s->lock);
    while (pos < end && rc == 0) {
        uint64_t c = pos >> s->shift, c1, seg_end;
        int kind = ext_kind(s->state[c]), full;

        if (s->broken) {
            rc = -EIO;
            break;
        }
        for (c1 = c + 1; c1 <= last && ext_kind(s->state[c1]) == kind; c1++)
            ;
        seg_end = (c1 << s->shift) < end ? (c1 << s->shift) : end;
        if (kind == EXT_ZERO) {
            full = fl__ext_add(&e, seg_end - pos, FL_EXT_HOLE | FL_EXT_ZERO);
        } else if (kind == EXT_OUTSIDE) {
            /* Nothing is stored and a read fails EPERM: not allocated
             * (HOLE) but not reading as zeros either (no ZERO), so a client
             * that copies onto a backing file (qemu-img convert -B) skips
             * it instead of writing zeros over the older backup's data. */
            full = fl__ext_add(&e, seg_end - pos, FL_EXT_HOLE | FL_EXT_UNREADABLE);
        } else if (kind == EXT_SOURCE) {
            /* Optimistic, as a read (invariant 2): a write that got in
             * may have changed the source's allocation; then drop what
             * was added and look at the run again. */
            size_t n0 = e.n;
            uint64_t last_len = n0 > 0 ? e.lens[n0 - 1] : 0;

            pthread_mutex_unlock(&s->lock);
            full = s->file->ops->extents(s->file, pos, seg_end - pos, &e);
            pthread_mutex_lock(&s->lock);
            if (!still_needed(s, c, c1)) {
                e.n = n0;
                if (n0 > 0)
                    e.lens[n0 - 1] = last_len;
                s->read_retries++;
                continue;
            }
        } else {
            full = fl__ext_add(&e, seg_end - pos, 0);
        }
        if (full)
            break;
        pos = seg_end;
    }
    if (rc == 0 && s->broken)
        rc = -EIO;
    pthread_mutex_unlock(&s->lock);
    if (rc == 0)
        *n = e.n;
    return rc;
}

int fl_session_stats(fl_session *s, struct fl_session_stats *out)
{
    struct stat st;

    if (out == NULL)
        return -EINVAL;
    /* Outside the mutex: fstat is a syscall. */
    out->temp_bytes_allocated =
        fstat(s->temp_fd, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
    pthread_mutex_lock(&s->lock);
    out->clusters_total = s->n_clusters;
    out->clusters_needed = s->n_state[FL_NEEDED];
    out->clusters_copied = s->n_state[FL_COPIED];
    out->clusters_zero = s->n_state[FL_ZERO];
    out->clusters_discarded = s->discarded_clusters;
    out->temp_bytes = s->temp_bytes;
    out->temp_bytes_written = s->temp_written;
    out->cache_bytes = s->cache_used;
    out->cbw_count = s->cbw_count;
    out->cbw_bytes = s->cbw_bytes;
    out->read_temp_bytes = s->read_temp;
    out->read_cache_bytes = s->read_cache;
    out->read_source_bytes = s->read_source;
    out->read_retries = s->read_retries;
    out->discarded_bytes = s->discarded_bytes;
    out->broken = s->broken;
    out->broken_errno = s->broken_errno;
    out->cbw_latency = s->cbw_lat;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int fl_session_progress(const fl_session *s, uint64_t *read_bytes,
                        uint64_t *total_bytes)
{
    if (s == NULL || read_bytes == NULL || total_bytes == NULL)
        return -EINVAL;
    *read_bytes = __atomic_load_n(&s->read_bytes, __ATOMIC_RELAXED);
    *total_bytes = s->total_bytes;
    return 0;
}

int fl_session_note_zero(fl_session *s, uint64_t off, uint64_t len)
{
    uint64_t end, c, c0, c1;
    int rc = fl__range_ok(off, len, s->size);

    if (rc < 0 || len == 0)
        return rc;
    end = off + len;
    c0 = (off + s->cs - 1) >> s->shift;                 /* first whole one */
    c1 = end == s->size ? s->n_clusters : end >> s->shift; /* exclusive */
    pthread_mutex_lock(&s->lock);
    /* Runs of clusters in the scope: the others are never in total_bytes
     * (base:allocation reports them HOLE without ZERO anyway). */
    for (c = c0; c < c1;) {
        uint64_t run = c;

        while (run < c1 && s->state[run] != FL_NOT_NEEDED)
            run++;
        if (run > c)
            mark_read(s, c, run - 1);
        c = run + 1;
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int fl_session_frozen_bitmap(fl_session *s, fl_bitmap **out)
{
    if (s == NULL || out == NULL)
        return -EINVAL;
    *out = s->frozen_bm;   /* immutable after open */
    if (s->frozen_bm == NULL)
        return -ENOENT;
    fl__bitmap_ref(s->frozen_bm);
    return 0;
}

int fl_session_cluster_state(fl_session *s, uint64_t off, int *state)
{
    if (state == NULL || off >= s->size)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    *state = s->state[off >> s->shift];
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int fl_session_readable(fl_session *s, uint64_t off, uint64_t len)
{
    int rc = fl__range_ok(off, len, s->size);

    if (rc < 0 || len == 0)
        return rc;
    pthread_mutex_lock(&s->lock);
    if (s->broken) {
        rc = -EIO;
    } else {
        for (uint64_t c = off >> s->shift; c <= (off + len - 1) >> s->shift; c++) {
            if (s->state[c] == FL_NOT_NEEDED) {
                rc = -EPERM;
                break;
            }
        }
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* Set one of S's test-hook delays (a field guarded by s->lock). */
static int set_delay(fl_session *s, int *field, int ms)
{
    if (ms < 0 || ms > 60000)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    *field = ms;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int fl_session_inject_delay(fl_session *s, int ms)
{
    return set_delay(s, &s->inject_delay_ms, ms);
}

int fl_session_inject_read_delay(fl_session *s, int ms)
{
    return set_delay(s, &s->inject_read_delay_ms, ms);
}

int fl_session_inject_error(fl_session *s, int err, int n)
{
    if (n < 0 || (n > 0 && err <= 0))
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    s->inject_err = err;
    s->inject_n = n;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int fl_session_event_fd(const fl_session *s)
{
    return s->event_fd;
}
