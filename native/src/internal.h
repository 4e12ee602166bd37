/* fleeced native data path: definitions shared by file.c, cbw.c, bitmap.c
 * and io.c.
 *
 * Not part of the public API (fleeced.h) and never seen by cffi.
 *
 * Lock order (whole library): fl_file.sessions_lock (rwlock), then one
 * fl_session.lock (mutex); fl_file.hook_lock is a leaf taken alone.  No
 * mutex is ever held across I/O; the file
 * rwlock is held (shared) across a guest write's CBW and source write so
 * that fl_session_open (exclusive) sees no guest write in flight.
 *
 * Lifetimes (reference counts, never bookkeeping in Python): every fl_file
 * and fl_session starts with one reference, its owner's, which
 * fl_file_close / fl_session_close give up.  A queued or running queue
 * operation holds one on the object it points at (taken in submit,
 * dropped after the worker ran it), and a session holds one on its file.
 * The memory, the descriptors and the locks go away with the last
 * reference, so nothing is freed while an operation that points at it is
 * queued or running.  `closed` is set once by the owner's close; an
 * operation that runs after it fails -ESHUTDOWN instead of touching I/O.
 * A session with cbw_timeout runs copier threads (cbw.c); each holds one
 * reference on it from its start until it exits, after the close.  They
 * are detached: nobody joins them, so the last reference may be dropped
 * by a copier, which then frees the session (and maybe the file).
 * Bitmaps (bitmap.c) are counted the same way: the owner, each file they
 * are attached to (fl_file.bitmaps), a session's frozen copy, and
 * fl_bitmap_ref takers.  A file drops its bitmap references when they are
 * detached or when the file itself goes; the last one runs a persistent
 * bitmap's clean-up, which does I/O, so it is never dropped under a lock.
 */
#ifndef FLEECED_INTERNAL_H
#define FLEECED_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#include "fleeced.h"

/* Extent accumulator: appends, merging equal neighbours. */
struct fl__ext {
    uint64_t *lens;
    uint32_t *flags;
    size_t max, n;
};

/* What a disk's source does, for the CBW engine, the snapshot reads and the
 * guest path (file.c: a raw file or block device; upstream.c: an NBD export
 * through libnbd).  Offsets and lengths are within the size (the callers
 * checked).  Every one returns 0 or -errno; each may block (workers only). */
struct fl_source_ops {
    /* LEN bytes at OFF into BUF; with IS_HOLE, *IS_HOLE = 1 when the whole
     * range is a hole (BUF then holds zeros), else 0. */
    int (*read)(fl_file *f, void *buf, size_t len, uint64_t off, int *is_hole);
    int (*write)(fl_file *f, const void *buf, size_t len, uint64_t off);
    /* FL_MAY_TRIM may deallocate; FL_FAST: -ENOTSUP rather than writing. */
    int (*zero)(fl_file *f, uint64_t off, uint64_t len, unsigned flags);
    /* -ENOTSUP (and friends, see file.c) when nothing can be discarded. */
    int (*trim)(fl_file *f, uint64_t off, uint64_t len);
    int (*sync)(fl_file *f);
    int (*cache)(fl_file *f, uint64_t off, uint64_t len);
    /* Allocation of [off, off+len) appended to E (what cannot be learnt is
     * data); 1 when E filled. */
    int (*extents)(fl_file *f, uint64_t off, uint64_t len, struct fl__ext *e);
    /* The last reference went: give up what PRIV holds. */
    void (*release)(fl_file *f);
};

/* cache=none: offsets, lengths and buffers of O_DIRECT I/O are multiples of
 * this (the largest logical block size in use), and a bounce buffer for an
 * unaligned caller's buffer is at most DIO_BOUNCE bytes. */
#define DIO_ALIGN 4096u
#define DIO_BOUNCE ((size_t)1 << 20)

struct fl_file {
    unsigned refs;          /* atomic; see "Lifetimes" */
    int closed;             /* atomic; set once by fl_file_close */
    const struct fl_source_ops *ops; /* immutable */
    void *priv;             /* immutable: the backend's own state */
    /* atomic: the errno of the source's last lost connection, 0 while it
     * answers (an NBD upstream; always 0 for a file) */
    int source_err;
    int fd;                 /* immutable after open: -1 unless a file */
    /* cache=none (file.c): the O_DIRECT descriptor, -1 until first asked
     * for (set once under hook_lock, then immutable until release), and
     * whether reads and writes use it (atomic). */
    int dfd, direct;
    int readonly;           /* immutable */
    int is_blk;             /* immutable: block device */
    uint32_t lbs;           /* immutable: a device's logical block size, else 1 */
    uint64_t size;          /* immutable */
    /* immutable: what the fd is (a file's st_dev/st_ino, a device's
     * st_rdev and 0), so two paths to one source can be told apart */
    uint64_t id_dev, id_ino;
    /* Guards `sessions` (the list itself, not the sessions' contents).
     * Guest write/zero/trim hold it shared for CBW + source I/O;
     * session open/close hold it exclusive.  Writer-preferring. */
    pthread_rwlock_t sessions_lock;
    fl_session *sessions;   /* singly linked through fl_session.next */
    /* Attached dirty bitmaps (one reference each), also guarded by
     * sessions_lock: guest mutations read the array under the shared
     * hold they already have, attach/detach/checkpoints change it under
     * the exclusive one.  cap_bitmaps >= n_bitmaps entries allocated. */
    fl_bitmap **bitmaps;
    size_t n_bitmaps, cap_bitmaps;
    /* Positive errno of the first failed fdatasync, 0 while none.  Atomic:
     * set once by compare-and-swap, read without a lock (file.c notes). */
    int flush_err;
    /* Atomic: mutations tried (write/zero/trim), and how many of them the
     * last sync that succeeded covered (file.c, "Sticky flush errors"). */
    uint64_t mutations, synced;
    /* Guards inject_flush_err and inject_flush_n (the test hook); never
     * held across I/O. */
    pthread_mutex_t hook_lock;
    int inject_flush_err, inject_flush_n;
    /* Atomic (relaxed adds, no lock): what was asked of the file, for
     * fl_file_stats.  Written by whichever thread runs the call. */
    struct fl_file_stats stats;
};

/* Count one call of command CMD on F that returned RC (0 or -errno) and
 * moved BYTES when it succeeded.  Relaxed atomics, no lock. */
void fl__file_count(fl_file *f, int cmd, uint64_t bytes, int rc);
/* The same, with REQUEST 0 for a later piece of one request (bytes and
 * a failure count, not another request). */
void fl__file_count_as(fl_file *f, int cmd, uint64_t bytes, int rc, int request);
/* fl_file_read, counted as a later piece of one READ when PIECE. */
int fl__file_read(fl_file *f, uint8_t *buf, size_t len, uint64_t off,
                  int *is_hole, int piece);

/* A new fl_file over OPS/PRIV (FD: a file's descriptor, else -1), one
 * reference, the caller's.  On failure nothing of PRIV or FD is taken. */
int fl__file_new(const struct fl_source_ops *ops, void *priv, int fd, int readonly,
                 int is_blk, uint64_t size, fl_file **out);

/* References (atomic).  The last unref frees the object. */
void fl__file_ref(fl_file *f);
void fl__file_unref(fl_file *f);
void fl__session_ref(fl_session *s);
void fl__session_unref(fl_session *s);
/* 1 once the owner closed the object (fl_file_close / fl_session_close). */
int fl__file_closed(const fl_file *f);
int fl__session_closed(const fl_session *s);

/* ---- upstream.c ------------------------------------------------------ */

/* Test hook: the bound of every later command and connect of F's upstream. */
void fl__upstream_set_timeout(fl_file *f, int ms);

/* ---- runs.c --------------------------------------------------------- */

/* The worker half of a write run (fl_queue_submit_write_run): COUNT WRITE
 * requests at REQ[0..LEN), each written with fl_file_write, its result in
 * RCS[i].  Returns the first failure, or 0. */
int fl__file_write_run(fl_file *f, const uint8_t *req, size_t len,
                       uint32_t count, int32_t *rcs);

/* ---- queue.c -------------------------------------------------------- */

/* Run FN(ARG) in a worker of the guest pool (SNAP 0) or the snapshot pool
 * (SNAP 1).  Nothing is referenced or reaped for it: FN does its own
 * completion, and the caller keeps ARG alive until FN ran.  -ESHUTDOWN
 * once the queue is closing (FN will not run), -ENOMEM. */
int fl__queue_submit_fn(fl_queue *q, int snap, void (*fn)(void *), void *arg);
/* The test hook's delay (fl_queue_inject_delay) for ops of KIND, in ms. */
int fl__queue_delay(fl_queue *q, int kind);

/* ---- io.c ----------------------------------------------------------- */

/* CLOCK_MONOTONIC now, in nanoseconds. */
uint64_t fl__now_ns(void);
/* Add one observation of NS nanoseconds to L: with relaxed atomic adds
 * when ATOMIC (concurrent writers, no lock), else plainly (the caller
 * holds the lock guarding L). */
void fl__lat_add(struct fl_latency *l, uint64_t ns, int atomic);

/* 0 if [off, off+len) lies within [0, size) without overflow, else -EINVAL. */
int fl__range_ok(uint64_t off, uint64_t len, uint64_t size);
/* pread/pwrite the whole buffer, retrying EINTR; early EOF -> -EIO.
 * Returns 0 or -errno. */
int fl__full_pread(int fd, void *buf, size_t len, uint64_t off);
int fl__full_pwrite(int fd, const void *buf, size_t len, uint64_t off);
/* 1 if [off, off+len) of FD is one hole (SEEK_DATA), else 0.  Any lseek
 * error counts as data. */
int fl__range_is_hole(int fd, int is_blk, uint64_t off, uint64_t len);
/* Punch [off, off+len) of FD keeping its size.  Returns 0 or -errno. */
int fl__punch(int fd, uint64_t off, uint64_t len);
/* Write what socket FD takes of IOV without waiting (MSG_DONTWAIT): the
 * bytes written (all, or fewer when the socket filled up), or -errno.
 * IOV is left describing what was not written: entries sent whole get
 * length 0 (an empty one, a piece's missing header, is passed over), a
 * partly sent one its rest. */
ssize_t fl__send_nowait(int fd, struct iovec *iov, int iovcnt);

/* Append (len, flags).  Returns 0, or 1 when the list is full and the
 * extent could not be merged (caller stops). */
int fl__ext_add(struct fl__ext *e, uint64_t len, uint32_t flags);
/* Allocation of [off, off+len) of FD (SEEK_DATA/SEEK_HOLE) appended to E.
 * Block devices and lseek errors report data.  Returns 1 when E filled. */
int fl__fd_extents(int fd, int is_blk, uint64_t off, uint64_t len,
                   struct fl__ext *e);

/* ---- bitmap.c --------------------------------------------------------- */

void fl__bitmap_ref(fl_bitmap *b);
/* The last unref runs the clean-up (I/O for a persistent bitmap): never
 * call it with a lock held. */
void fl__bitmap_unref(fl_bitmap *b);
/* Hot path: mark every granule touching [off, off+len), which the caller
 * has checked lies within the size.  Lock-free (atomic OR, then one load
 * of `armed`), except the first call after a fl_bitmap_mark_clean, which
 * re-arms: sets the in-use flag and msyncs the header (blocks on I/O)
 * before returning.  0, or the -errno of a failed re-arm msync (the write
 * is then not covered against a power cut; the next mark retries). */
int fl__bitmap_mark(fl_bitmap *b, uint64_t off, uint64_t len);
/* Test hook: from now on every msync of B first copies the bytes it
 * covers (as they are when it starts) into SHADOW (B's mapping length,
 * header included), a model of what a power cut keeps.  Set it before
 * B is shared; NULL turns it off. */
void fl__bitmap_test_shadow(fl_bitmap *b, uint8_t *shadow);
/* DST's bits = SRC's; same geometry (caller checked). */
void fl__bitmap_copy_bits(fl_bitmap *dst, const fl_bitmap *src);
/* The first dirty run at or after byte FROM (granule-aligned start, end
 * clamped to the size): 1 and [*off, *end), or 0 when none. */
int fl__bitmap_next_run(const fl_bitmap *b, uint64_t from, uint64_t *off,
                        uint64_t *end);

/* ---- file.c (call with f->sessions_lock held exclusive) --------------- */

/* Index of B in F's attached bitmaps, or -1. */
long fl__file_bitmap_find(const fl_file *f, const fl_bitmap *b);
/* Make room for N more attached bitmaps: 0 or -ENOMEM (nothing changed). */
int fl__file_bitmap_reserve(fl_file *f, size_t n);
/* Append B (room reserved; not attached yet) and take a reference. */
void fl__file_bitmap_add(fl_file *f, fl_bitmap *b);
/* Remove the entry at I; the caller drops its reference after unlocking. */
void fl__file_bitmap_remove(fl_file *f, size_t i);

/* ---- cbw.c ---------------------------------------------------------- */

/* Run copy-before-write of S for a guest write to [off, off+len) of its
 * file.  Called with the file's sessions_lock held shared.  START is when
 * the guest write began (CLOCK_MONOTONIC), the same for every session, so
 * cbw_timeout bounds the write's whole CBW.  Returns 0
 * when the source may be written, or -errno (only under
 * FL_BREAK_GUEST_WRITE) when the guest write must fail untouched. */
int fl__session_before_write(fl_session *s, uint64_t off, uint64_t len,
                             const struct timespec *start);
/* 1 if S (attached, not closed, not broken) would have to copy something
 * for a guest write to [off, off+len): a NEEDED or COPYING cluster there;
 * else 0.  Called with the file's sessions_lock held shared; takes
 * S's mutex (no I/O).  FL_FAST write-zeroes refuses on 1. */
int fl__session_needs_copy(fl_session *s, uint64_t off, uint64_t len);
/* Next session in the file's list. */
fl_session *fl__session_next(const fl_session *s);

#endif
