/* fleeced native data path: raw images (regular files, block devices).
 *
 * Design notes:
 * - An fl_file is an fd plus a size fixed at open (fstat, or BLKGETSIZE64
 *   for block devices).  Every entry point re-checks off/len against that
 *   size with overflow-safe arithmetic before any syscall.
 * - Guest-visible mutations (write, zero, trim) first take sessions_lock
 *   shared and run copy-before-write for every attached session
 *   (cbw.c), then touch the source, then drop the lock.  Holding the
 *   rwlock across the source I/O is what lets fl_session_open (exclusive)
 *   take its snapshot with no guest write half done.  It is a rwlock, so
 *   guest writes still run in parallel with each other.
 * - Write-zeroes on a file: PUNCH_HOLE|KEEP_SIZE when trimming is
 *   allowed, else ZERO_RANGE, else (unless FL_FAST) writing zeros from a
 *   bounded buffer.  On a block device: BLKZEROOUT (the device zeroes, by
 *   a WRITE ZEROES or unmap command where it has one) for the whole
 *   logical blocks inside the range, zeros written for the partial blocks
 *   at its ends.  FL_FAST refuses any fallback that would write data:
 *   -ENOTSUP.
 * - Trim punches a hole in a file.  On a block device it is BLKDISCARD of
 *   the whole logical blocks inside the range (an unaligned range still
 *   discards those; fallocate would turn it into write-zeroes, and a thin
 *   volume would never get its space back, as QEMU's host_device knows).
 *   Where nothing can be discarded, trim is a successful no-op (advisory
 *   in NBD).
 * - A device that is read-only (BLKROGET) is refused read-write at open
 *   (-EROFS), as qemu-nbd does, instead of failing every write.
 * - The backends: a file or device here; an NBD export in upstream.c.
 *   Both behind struct fl_source_ops (internal.h), which the CBW engine
 *   and the snapshot reads use too; the page-cache fast paths
 *   (read_nowait, read runs, sendfile) exist for files only.
 * - FUA is fdatasync after the write (the NBD spec allows the stronger
 *   whole-file sync).
 * - cache=none (fl_file_set_direct), QEMU's cache.direct=on: a second
 *   descriptor of the same file with O_DIRECT, opened the first time it is
 *   asked for and kept until the file goes (so switching back and forth
 *   while requests run never closes one under them); `direct` says which
 *   one reads and writes use.  Reads and writes whose offset and length
 *   are multiples of DIO_ALIGN go through it, via an aligned bounce buffer
 *   when the caller's is not aligned; the rest (a guest's 512-byte edge,
 *   a client's odd range) stays buffered, which Linux keeps coherent with
 *   the direct descriptor (a direct read writes dirty pages back first, a
 *   direct write drops the cached ones).  The page-cache fast paths
 *   (inline reads, read runs, sendfile) are off while direct: they would
 *   fill the cache cache=none keeps clean.
 * - Sticky flush errors: Linux reports a writeback error to one fdatasync
 *   only (errseq per open file), so a FUA that consumed it would leave a
 *   later FLUSH succeeding over lost writes.  The first failed fdatasync
 *   (flush, or the FUA of write/zero/trim) stores its errno in flush_err
 *   (set once, compare-and-swap); from then on every flush and every FUA
 *   fails -EIO without syncing, until the image is reopened.  A sync that
 *   succeeds re-reads flush_err afterwards, so one that ran alongside the
 *   failing one fails too (left open: the failing caller being preempted
 *   between its fdatasync and the store).  A sync that fails when nothing
 *   was written since the last one that succeeded loses nothing, and is
 *   not sticky: an NBD upstream that is not there (yet, or any more: a VM
 *   node's export) or that came back fails that sync only.  A mutation is counted
 *   when it is done, so a sync never claims one that was still running.
 * - FL_FAST write-zeroes refuses (-ENOTSUP) before any CBW when a session
 *   would have to copy part of the range (fl__session_needs_copy): fast
 *   zeroing must not turn into a copy of GiBs or break a snapshot.
 * - Dirty bitmaps: every guest mutation marks each attached bitmap
 *   (fl__bitmap_mark: a load plus at most one atomic OR per 64 granules,
 *   no lock of its own) AFTER its source I/O and before it returns, still
 *   under the shared sessions_lock it took for CBW.  Why after:
 *   (1) a checkpoint (cbw.c, exclusive sessions_lock) sees no guest
 *   mutation in flight, so before or after would both give it a
 *   consistent cut: every write acknowledged before it is in OLD, every
 *   write after it in NEW; (2) but fl_bitmap_clear/reset run without the
 *   file's lock, and with mark-before a clear landing between the mark
 *   and the pwrite would lose a write that changes the data after the
 *   clear; with mark-after, "data changed at time t" implies "bit set at
 *   some time >= t", so a clear can only forget writes whose data landed
 *   before it.  A failed or partial write still marks (over-approximation
 *   is fine, a miss is not); only outcomes that touched nothing skip it:
 *   FL_FAST zero refusing (-ENOTSUP), and a trim the filesystem cannot
 *   punch (a successful no-op).  Crash safety comes from the bitmap's
 *   in-use flag, not from the order of the mark and the write.
 *   fl_file_flush msyncs the attached persistent bitmaps after the
 *   fdatasync, outside the lock (it pins them with references first).
 * - Lifetime: reference counted (internal.h "Lifetimes").  fl_file_close
 *   gives up the owner's reference; sessions and queued operations keep
 *   the descriptor open until they are gone.  The last reference drops
 *   the attached bitmaps' references.
 * - Counters (fl_file_stats): every entry point counts its call, its
 *   bytes or its errno once it returns, with relaxed atomic adds into
 *   f->stats (no lock, no ordering needed: each counter only grows and
 *   readers want totals, not a consistent instant); writes and flushes
 *   also add their duration to a log2 histogram (two clock reads).  The
 *   page-cache fast paths count where they answer: read_nowait and read
 *   runs on success only (a miss falls back to a counted read), the
 *   sendfile replies (queue.c, conn_reply.c) when they sent the data.  A
 *   READ streamed in pieces (conn_reply.c, or the loop's FL_PIECE ops)
 *   counts one request: its later pieces add bytes only.
 * - No globals.
 *
 * Locks of an fl_file (internal.h has the fields):
 *   sessions_lock  rwlock: the session list and the attached bitmaps
 *                  (see internal.h); shared for guest mutations (CBW,
 *                  source I/O, bitmap marks), exclusive for session
 *                  open/close and bitmap attach/detach
 *   hook_lock      mutex: inject_flush_err, inject_flush_n (test hook);
 *                  never held across I/O
 *   flush_err and the counters in `stats` are atomic, not locked.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

#define ZERO_BUF_MAX (1u << 20) /* bytes of zeros written per pwrite */

static const struct fl_source_ops file_ops;

int fl_file_open(const char *path, int readonly, fl_file **out)
{
    struct stat st;
    fl_file *f;
    int fd, rc;
    uint64_t size;

    if (path == NULL || out == NULL)
        return -EINVAL;
    *out = NULL;
    fd = open(path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        goto err_fd;
    }
    if (S_ISDIR(st.st_mode)) {
        rc = -EISDIR;
        goto err_fd;
    }
    if (S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        int ro = 0;
        if (ioctl(fd, BLKGETSIZE64, &size) < 0 || ioctl(fd, BLKROGET, &ro) < 0) {
            rc = -errno;
            goto err_fd;
        }
        if (ro && !readonly) {
            rc = -EROFS;
            goto err_fd;
        }
    } else {
        rc = -EINVAL;
        goto err_fd;
    }
    rc = fl__file_new(&file_ops, NULL, fd, readonly, S_ISBLK(st.st_mode), size, &f);
    if (rc < 0)
        goto err_fd;
    if (f->is_blk) {
        int lbs = 512;
        if (ioctl(fd, BLKSSZGET, &lbs) < 0 || lbs <= 0 || (lbs & (lbs - 1)) != 0)
            lbs = 512;
        f->lbs = (uint32_t)lbs;
    }
    f->id_dev = f->is_blk ? (uint64_t)st.st_rdev : (uint64_t)st.st_dev;
    f->id_ino = f->is_blk ? 0 : (uint64_t)st.st_ino;
    *out = f;
    return 0;

err_fd:
    close(fd);
    return rc;
}

int fl__file_new(const struct fl_source_ops *ops, void *priv, int fd, int readonly,
                 int is_blk, uint64_t size, fl_file **out)
{
    pthread_rwlockattr_t attr;
    fl_file *f;
    int rc;

    if (size > (uint64_t)INT64_MAX)
        return -EFBIG;
    f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -ENOMEM;
    f->refs = 1;
    f->ops = ops;
    f->priv = priv;
    f->fd = fd;
    f->dfd = -1;
    f->readonly = readonly != 0;
    f->is_blk = is_blk != 0;
    f->lbs = 1;
    f->size = size;
    rc = -pthread_rwlockattr_init(&attr);
    if (rc < 0)
        goto err_free;
    /* A session open must not starve behind a stream of guest writes. */
    pthread_rwlockattr_setkind_np(&attr,
                                  PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    rc = -pthread_rwlock_init(&f->sessions_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (rc < 0)
        goto err_free;
    rc = -pthread_mutex_init(&f->hook_lock, NULL);
    if (rc < 0) {
        pthread_rwlock_destroy(&f->sessions_lock);
        goto err_free;
    }
    *out = f;
    return 0;

err_free:
    free(f);
    return rc;
}

void fl__file_ref(fl_file *f)
{
    __atomic_add_fetch(&f->refs, 1, __ATOMIC_RELAXED);
}

void fl__file_unref(fl_file *f)
{
    if (__atomic_sub_fetch(&f->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (size_t i = 0; i < f->n_bitmaps; i++)
        fl__bitmap_unref(f->bitmaps[i]);
    free(f->bitmaps);
    pthread_mutex_destroy(&f->hook_lock);
    pthread_rwlock_destroy(&f->sessions_lock);
    f->ops->release(f);
    free(f);
}

int fl__file_closed(const fl_file *f)
{
    return __atomic_load_n(&f->closed, __ATOMIC_ACQUIRE);
}

void fl_file_close(fl_file *f)
{
    if (f == NULL)
        return;
    __atomic_store_n(&f->closed, 1, __ATOMIC_RELEASE);
    fl__file_unref(f);
}

void fl_file_identity(const fl_file *f, int *is_blk, uint64_t *dev, uint64_t *ino)
{
    *is_blk = f->is_blk;
    *dev = f->id_dev;
    *ino = f->id_ino;
}

uint64_t fl_file_size(const fl_file *f)
{
    return f->size;
}

void fl__file_count(fl_file *f, int cmd, uint64_t bytes, int rc)
{
    fl__file_count_as(f, cmd, bytes, rc, 1);
}

void fl__file_count_as(fl_file *f, int cmd, uint64_t bytes, int rc, int request)
{
    if (request)
        __atomic_add_fetch(&f->stats.requests[cmd], 1, __ATOMIC_RELAXED);
    if (rc >= 0) {
        if (bytes > 0)
            __atomic_add_fetch(&f->stats.bytes[cmd], bytes, __ATOMIC_RELAXED);
    } else {
        int e = -rc < FL_ERRNO_SLOTS ? -rc : 0;
        __atomic_add_fetch(&f->stats.errors[e], 1, __ATOMIC_RELAXED);
    }
}

void fl_file_stats(const fl_file *f, struct fl_file_stats *out)
{
    /* Every field is a uint64_t: copy them one relaxed load each. */
    const uint64_t *src = (const uint64_t *)&f->stats;
    uint64_t *dst = (uint64_t *)out;

    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

int fl__file_read(fl_file *f, uint8_t *buf, size_t len, uint64_t off,
                  int *is_hole, int piece)
{
    int rc = fl__range_ok(off, len, f->size);

    if (rc == 0)
        rc = f->ops->read(f, buf, len, off, is_hole);
    fl__file_count_as(f, FL_CMD_READ, len, rc, !piece);
    return rc;
}

int fl_file_read(fl_file *f, uint8_t *buf, size_t len, uint64_t off,
                 int *is_hole)
{
    return fl__file_read(f, buf, len, off, is_hole, 0);
}

int fl_file_read_nowait(fl_file *f, uint8_t *buf, size_t len, uint64_t off,
                        int *is_hole)
{
    int rc = fl__range_ok(off, len, f->size);
    struct iovec iov;
    ssize_t n;

    if (rc < 0)
        return rc;
    if (f->fd < 0 || fl_file_is_direct(f))
        return -EAGAIN;         /* only a file has a page cache to look in */
    if (is_hole != NULL) {
        *is_hole = 0;
        /* lseek(SEEK_DATA) reads extent metadata, which stays cached for
         * an open file in use; only a cold lookup may touch the disk. */
        if (!f->is_blk && fl__range_is_hole(f->fd, f->is_blk, off, len)) {
            memset(buf, 0, len);
            *is_hole = 1;
            fl__file_count(f, FL_CMD_READ, len, 0);
            return 0;
        }
    }
    iov.iov_base = buf;
    iov.iov_len = len;
    do
        n = preadv2(f->fd, &iov, 1, (off_t)off, RWF_NOWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EOPNOTSUPP ? -EAGAIN : -errno;
    /* A short count means part of the range is not cached (or EOF, which
     * the range check excludes): let the blocking path do it all. */
    if ((size_t)n != len)
        return -EAGAIN;
    fl__file_count(f, FL_CMD_READ, len, 0);
    return 0;
}

/* Take sessions_lock shared and run CBW of every session over the range.
 * With FL_FAST, first refuse (-ENOTSUP) if any session would have to copy
 * (no CBW done, source untouched).  On success the lock stays held; the
 * caller writes, then unlocks. */
static int begin_guest_write(fl_file *f, uint64_t off, uint64_t len,
                             unsigned flags)
{
    fl_session *s;
    struct timespec start;
    int rc;

    /* One start for every session: cbw_timeout bounds the write's whole
     * copy-before-write, waits for the session mutexes included. */
    clock_gettime(CLOCK_MONOTONIC, &start);
    rc = -pthread_rwlock_rdlock(&f->sessions_lock);
    if (rc < 0)
        return rc;
    /* Under the same shared hold as the CBW below: no session attaches in
     * between, and a cluster that needs no copy now never needs one
     * again while the session stays unbroken. */
    for (s = f->sessions; (flags & FL_FAST) && s != NULL;
         s = fl__session_next(s)) {
        if (fl__session_needs_copy(s, off, len)) {
            pthread_rwlock_unlock(&f->sessions_lock);
            return -ENOTSUP;
        }
    }
    for (s = f->sessions; s != NULL; s = fl__session_next(s)) {
        rc = fl__session_before_write(s, off, len, &start);
        if (rc < 0) {
            pthread_rwlock_unlock(&f->sessions_lock);
            return rc;
        }
    }
    return 0;
}

/* Mark every attached bitmap; sessions_lock held shared (design notes). */
static void mark_bitmaps(fl_file *f, uint64_t off, uint64_t len)
{
    for (size_t i = 0; i < f->n_bitmaps; i++)
        fl__bitmap_mark(f->bitmaps[i], off, len);
}

static int check_mutation(fl_file *f, uint64_t off, uint64_t len)
{
    int rc = fl__range_ok(off, len, f->size);

    if (rc < 0)
        return rc;
    if (f->readonly)
        return -EROFS;
    return 0;
}

/* fdatasync with the sticky error (design notes).  Returns 0, the first
 * failure's -errno to the call that failed, and -EIO ever after. */
static int sync_file(fl_file *f)
{
    int err = 0, none = 0;
    uint64_t seen;

    if (__atomic_load_n(&f->flush_err, __ATOMIC_ACQUIRE) != 0)
        return -EIO;
    seen = __atomic_load_n(&f->mutations, __ATOMIC_ACQUIRE);
    pthread_mutex_lock(&f->hook_lock);
    if (f->inject_flush_n > 0) {
        f->inject_flush_n--;
        err = f->inject_flush_err;
    }
    pthread_mutex_unlock(&f->hook_lock);
    if (err == 0) {
        int r = f->ops->sync(f);
        if (r < 0)
            err = -r;
    }
    if (err == 0) {
        uint64_t old = __atomic_load_n(&f->synced, __ATOMIC_ACQUIRE);
        while (old < seen && !__atomic_compare_exchange_n(&f->synced, &old, seen, 0,
                                                          __ATOMIC_ACQ_REL,
                                                          __ATOMIC_ACQUIRE))
            ;
        return __atomic_load_n(&f->flush_err, __ATOMIC_ACQUIRE) != 0 ? -EIO : 0;
    }
    if (seen == __atomic_load_n(&f->synced, __ATOMIC_ACQUIRE))
        return -err;    /* nothing unsynced: nothing lost */
    if (!__atomic_compare_exchange_n(&f->flush_err, &none, err, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return -EIO; /* a concurrent sync failed first */
    return -err;
}

static int fua(fl_file *f, unsigned flags, int rc)
{
    if (rc == 0 && (flags & FL_FUA))
        rc = sync_file(f);
    return rc;
}

static int do_write(fl_file *f, const uint8_t *buf, size_t len, uint64_t off,
                    unsigned flags)
{
    int rc = check_mutation(f, off, len);

    if (rc < 0)
        return rc;
    if (flags & ~(unsigned)FL_FUA)
        return -EINVAL;
    if (len == 0)
        return fua(f, flags, 0);
    rc = begin_guest_write(f, off, len, 0);
    if (rc < 0)
        return rc;
    rc = f->ops->write(f, buf, len, off);
    /* Counted once done: a sync that read the count before then does not
     * claim it. */
    __atomic_add_fetch(&f->mutations, 1, __ATOMIC_ACQ_REL);
    mark_bitmaps(f, off, len);
    rc = fua(f, flags, rc);
    pthread_rwlock_unlock(&f->sessions_lock);
    return rc;
}

int fl_file_write(fl_file *f, const uint8_t *buf, size_t len, uint64_t off,
                  unsigned flags)
{
    uint64_t t0 = fl__now_ns();
    int rc = do_write(f, buf, len, off, flags);

    fl__lat_add(&f->stats.write_latency, fl__now_ns() - t0, 1);
    fl__file_count(f, FL_CMD_WRITE, len, rc);
    return rc;
}

static int write_zeros(fl_file *f, uint64_t off, uint64_t len)
{
    size_t bl = len < ZERO_BUF_MAX ? (size_t)len : ZERO_BUF_MAX;
    uint8_t *z = calloc(1, bl);
    int rc = 0;

    if (z == NULL)
        return -ENOMEM;
    while (len > 0 && rc == 0) {
        size_t n = len < bl ? (size_t)len : bl;
        rc = fl__full_pwrite(f->fd, z, n, off);
        off += n;
        len -= n;
    }
    free(z);
    return rc;
}

static int is_unsupported(int err)
{
    return err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS ||
           err == EINVAL || err == ENOTTY;
}

/* The whole logical blocks inside [off, off+len) of a device: 1 and
 * [*a, *b), or 0 when there is none. */
static int inner_blocks(const fl_file *f, uint64_t off, uint64_t len, uint64_t *a,
                        uint64_t *b)
{
    uint64_t m = f->lbs - 1;

    *a = (off + m) & ~m;
    *b = (off + len) & ~m;
    return *a < *b;
}

static int device_zero(fl_file *f, uint64_t off, uint64_t len, unsigned flags)
{
    uint64_t a, b;
    int rc;

    if (!inner_blocks(f, off, len, &a, &b))
        return (flags & FL_FAST) ? -ENOTSUP : write_zeros(f, off, len);
    {
        uint64_t r[2] = { a, b - a };
        if (ioctl(f->fd, BLKZEROOUT, r) < 0) {
            if (!is_unsupported(errno))
                return -errno;
            if (flags & FL_FAST)
                return -ENOTSUP;
            return write_zeros(f, off, len);
        }
    }
    /* the partial blocks at the ends (only a small write each) */
    rc = a > off ? write_zeros(f, off, a - off) : 0;
    if (rc == 0 && off + len > b)
        rc = write_zeros(f, b, off + len - b);
    return rc;
}

static int do_zero(fl_file *f, uint64_t off, uint64_t len, unsigned flags)
{
    if (f->is_blk)
        return device_zero(f, off, len, flags);
    if (flags & FL_MAY_TRIM) {
        if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)off, (off_t)len) == 0)
            return 0;
        if (!is_unsupported(errno))
            return -errno;
    }
    if (fallocate(f->fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len) == 0)
        return 0;
    if (!is_unsupported(errno))
        return -errno;
    if (flags & FL_FAST)
        return -ENOTSUP;
    return write_zeros(f, off, len);
}

static int do_zero_call(fl_file *f, uint64_t off, uint64_t len, unsigned flags)
{
    int rc = check_mutation(f, off, len);

    if (rc < 0)
        return rc;
    if (flags & ~(unsigned)(FL_FUA | FL_MAY_TRIM | FL_FAST))
        return -EINVAL;
    if (len == 0)
        return fua(f, flags, 0);
    rc = begin_guest_write(f, off, len, flags);
    if (rc < 0)
        return rc;
    rc = f->ops->zero(f, off, len, flags);
    __atomic_add_fetch(&f->mutations, 1, __ATOMIC_ACQ_REL);
    if (!(rc == -ENOTSUP && (flags & FL_FAST)))   /* refused: untouched */
        mark_bitmaps(f, off, len);
    rc = fua(f, flags, rc);
    pthread_rwlock_unlock(&f->sessions_lock);
    return rc;
}

int fl_file_zero(fl_file *f, uint64_t off, uint64_t len, unsigned flags)
{
    int rc = do_zero_call(f, off, len, flags);

    fl__file_count(f, FL_CMD_WRITE_ZEROES, len, rc);
    return rc;
}

static int do_trim(fl_file *f, uint64_t off, uint64_t len)
{
    int rc = check_mutation(f, off, len);

    if (rc < 0)
        return rc;
    if (len == 0)
        return 0;
    rc = begin_guest_write(f, off, len, 0);
    if (rc < 0)
        return rc;
    rc = f->ops->trim(f, off, len);
    __atomic_add_fetch(&f->mutations, 1, __ATOMIC_ACQ_REL);
    if (rc < 0 && is_unsupported(-rc))
        rc = 0;                 /* nothing punched: nothing to mark */
    else
        mark_bitmaps(f, off, len);
    pthread_rwlock_unlock(&f->sessions_lock);
    return rc;
}

int fl_file_trim(fl_file *f, uint64_t off, uint64_t len)
{
    int rc = do_trim(f, off, len);

    fl__file_count(f, FL_CMD_TRIM, len, rc);
    return rc;
}

/* msync the attached persistent bitmaps, pinned under the shared lock and
 * synced outside it (no lock across I/O).  Failures are left to
 * fl_bitmap_sync callers: the in-use rule keeps a crash safe anyway. */
static void sync_bitmaps(fl_file *f)
{
    fl_bitmap **pin;
    size_t n;

    pthread_rwlock_rdlock(&f->sessions_lock);
    n = f->n_bitmaps;
    pin = n > 0 ? malloc(n * sizeof(*pin)) : NULL;
    if (pin == NULL) {
        pthread_rwlock_unlock(&f->sessions_lock);
        return;   /* none attached, or no memory: the next sync does it */
    }
    for (size_t i = 0; i < n; i++) {
        pin[i] = f->bitmaps[i];
        fl__bitmap_ref(pin[i]);
    }
    pthread_rwlock_unlock(&f->sessions_lock);
    for (size_t i = 0; i < n; i++) {
        (void)fl_bitmap_sync(pin[i]);
        fl__bitmap_unref(pin[i]);
    }
    free(pin);
}

int fl_file_flush(fl_file *f)
{
    uint64_t t0 = fl__now_ns();
    int rc = sync_file(f);

    sync_bitmaps(f);
    fl__lat_add(&f->stats.flush_latency, fl__now_ns() - t0, 1);
    fl__file_count(f, FL_CMD_FLUSH, 0, rc);
    return rc;
}

/* ---- dirty bitmaps (see the design notes) ---------------------------- */

long fl__file_bitmap_find(const fl_file *f, const fl_bitmap *b)
{
    for (size_t i = 0; i < f->n_bitmaps; i++)
        if (f->bitmaps[i] == b)
            return (long)i;
    return -1;
}

int fl__file_bitmap_reserve(fl_file *f, size_t n)
{
    size_t cap = f->cap_bitmaps;
    fl_bitmap **nb;

    if (f->n_bitmaps + n <= cap)
        return 0;
    while (cap < f->n_bitmaps + n)
        cap = cap ? cap * 2 : 4;
    nb = realloc(f->bitmaps, cap * sizeof(*nb));
    if (nb == NULL)
        return -ENOMEM;
    f->bitmaps = nb;
    f->cap_bitmaps = cap;
    return 0;
}

void fl__file_bitmap_add(fl_file *f, fl_bitmap *b)
{
    fl__bitmap_ref(b);
    f->bitmaps[f->n_bitmaps++] = b;
}

void fl__file_bitmap_remove(fl_file *f, size_t i)
{
    f->n_bitmaps--;
    memmove(&f->bitmaps[i], &f->bitmaps[i + 1],
            (f->n_bitmaps - i) * sizeof(*f->bitmaps));
}

int fl_file_bitmap_attach(fl_file *f, fl_bitmap *b)
{
    int rc;

    if (f == NULL || b == NULL || fl_bitmap_size(b) != f->size)
        return -EINVAL;
    pthread_rwlock_wrlock(&f->sessions_lock);
    if (fl__file_bitmap_find(f, b) >= 0)
        rc = -EEXIST;
    else
        rc = fl__file_bitmap_reserve(f, 1);
    if (rc == 0)
        fl__file_bitmap_add(f, b);
    pthread_rwlock_unlock(&f->sessions_lock);
    return rc;
}

int fl_file_bitmap_detach(fl_file *f, fl_bitmap *b)
{
    long i;

    if (f == NULL || b == NULL)
        return -EINVAL;
    pthread_rwlock_wrlock(&f->sessions_lock);
    i = fl__file_bitmap_find(f, b);
    if (i >= 0)
        fl__file_bitmap_remove(f, (size_t)i);
    pthread_rwlock_unlock(&f->sessions_lock);
    if (i < 0)
        return -ENOENT;
    fl__bitmap_unref(b);   /* maybe the last: I/O, so outside the lock */
    return 0;
}

int fl_file_flush_error(const fl_file *f)
{
    return __atomic_load_n(&f->flush_err, __ATOMIC_ACQUIRE);
}

int fl_file_inject_flush_error(fl_file *f, int err, int n)
{
    if (n < 0 || (n > 0 && err <= 0))
        return -EINVAL;
    pthread_mutex_lock(&f->hook_lock);
    f->inject_flush_err = err;
    f->inject_flush_n = n;
    pthread_mutex_unlock(&f->hook_lock);
    return 0;
}

int fl_file_cache(fl_file *f, uint64_t off, uint64_t len)
{
    int rc = fl__range_ok(off, len, f->size);

    if (rc == 0 && len > 0)
        rc = f->ops->cache(f, off, len);
    fl__file_count(f, FL_CMD_CACHE, len, rc);
    return rc;
}

int fl_file_extents(fl_file *f, uint64_t off, uint64_t len,
                    uint64_t *lens, uint32_t *flags, size_t max, size_t *n)
{
    struct fl__ext e = { lens, flags, max, 0 };
    int rc = fl__range_ok(off, len, f->size);

    if (rc == 0 && (n == NULL || (len > 0 && (max == 0 || lens == NULL || flags == NULL))))
        rc = -EINVAL;
    if (rc == 0) {
        f->ops->extents(f, off, len, &e);
        *n = e.n;
    }
    fl__file_count(f, FL_CMD_BLOCK_STATUS, 0, rc);
    return rc;
}

int fl_file_source_error(const fl_file *f)
{
    return __atomic_load_n(&f->source_err, __ATOMIC_RELAXED);
}

int fl_file_is_upstream(const fl_file *f)
{
    return f->fd < 0;
}

/* ---- the file backend: a raw file or block device ---------------------- */

/* The O_DIRECT descriptor when cache=none applies to [OFF, OFF+LEN), else
 * -1 (the buffered one is used). */
static int direct_fd(const fl_file *f, uint64_t off, size_t len)
{
    if (!__atomic_load_n(&f->direct, __ATOMIC_ACQUIRE) || len == 0 ||
        (off | len) % DIO_ALIGN != 0)
        return -1;
    return f->dfd;
}

/* pread/pwrite on the direct descriptor DFD, through an aligned bounce
 * buffer (of at most DIO_BOUNCE bytes) when BUF is not aligned. */
static int direct_io(int dfd, void *buf, size_t len, uint64_t off, int write)
{
    uint8_t *bounce = NULL;
    size_t step = len < DIO_BOUNCE ? len : DIO_BOUNCE;
    int rc = 0;

    if (((uintptr_t)buf % DIO_ALIGN) == 0)
        return write ? fl__full_pwrite(dfd, buf, len, off) : fl__full_pread(dfd, buf, len, off);
    if (posix_memalign((void **)&bounce, DIO_ALIGN, step) != 0)
        return -ENOMEM;
    for (size_t done = 0; done < len && rc == 0; done += step) {
        size_t n = len - done < step ? len - done : step;

        if (write) {
            memcpy(bounce, (const uint8_t *)buf + done, n);
            rc = fl__full_pwrite(dfd, bounce, n, off + done);
        } else {
            rc = fl__full_pread(dfd, bounce, n, off + done);
            if (rc == 0)
                memcpy((uint8_t *)buf + done, bounce, n);
        }
    }
    free(bounce);
    return rc;
}

static int file_read(fl_file *f, void *buf, size_t len, uint64_t off, int *is_hole)
{
    int dfd;

    if (is_hole != NULL) {
        *is_hole = 0;
        if (fl__range_is_hole(f->fd, f->is_blk, off, len)) {
            memset(buf, 0, len);
            *is_hole = 1;
            return 0;
        }
    }
    dfd = direct_fd(f, off, len);
    if (dfd >= 0)
        return direct_io(dfd, buf, len, off, 0);
    return fl__full_pread(f->fd, buf, len, off);
}

static int file_write(fl_file *f, const void *buf, size_t len, uint64_t off)
{
    int dfd = direct_fd(f, off, len);

    if (dfd >= 0)
        return direct_io(dfd, (void *)buf, len, off, 1);
    return fl__full_pwrite(f->fd, buf, len, off);
}

int fl_file_set_direct(fl_file *f, int on)
{
    int rc = 0;

    if (f->fd < 0)
        return -EINVAL;         /* an NBD upstream has no page cache here */
    pthread_mutex_lock(&f->hook_lock);
    if (on && f->dfd < 0) {
        char path[64];
        int fd;

        snprintf(path, sizeof path, "/proc/self/fd/%d", f->fd);
        fd = open(path, (f->readonly ? O_RDONLY : O_RDWR) | O_DIRECT | O_CLOEXEC);
        if (fd < 0)
            rc = -errno;        /* EINVAL: the filesystem has no O_DIRECT */
        else
            f->dfd = fd;
    }
    if (rc == 0)
        __atomic_store_n(&f->direct, on != 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&f->hook_lock);
    return rc;
}

int fl_file_is_direct(const fl_file *f)
{
    return __atomic_load_n(&f->direct, __ATOMIC_ACQUIRE);
}

static int file_trim(fl_file *f, uint64_t off, uint64_t len)
{
    uint64_t a, b;

    if (!f->is_blk)
        return fl__punch(f->fd, off, len);
    if (!inner_blocks(f, off, len, &a, &b))
        return -EOPNOTSUPP;     /* no whole block inside: nothing to discard */
    {
        uint64_t r[2] = { a, b - a };
        return ioctl(f->fd, BLKDISCARD, r) < 0 ? -errno : 0;
    }
}

static int file_sync(fl_file *f)
{
    return fdatasync(f->fd) < 0 ? -(errno != 0 ? errno : EIO) : 0;
}

static int file_cache(fl_file *f, uint64_t off, uint64_t len)
{
    return -posix_fadvise(f->fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
}

static int file_extents(fl_file *f, uint64_t off, uint64_t len, struct fl__ext *e)
{
    return fl__fd_extents(f->fd, f->is_blk, off, len, e);
}

static void file_release(fl_file *f)
{
    if (f->dfd >= 0)
        close(f->dfd);
    close(f->fd);
}

static const struct fl_source_ops file_ops = {
    .read = file_read,
    .write = file_write,
    .zero = do_zero,
    .trim = file_trim,
    .sync = file_sync,
    .cache = file_cache,
    .extents = file_extents,
    .release = file_release,
};
