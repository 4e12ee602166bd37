/* fleeced native data path: definitions shared by file.c, cbw.c and io.c.
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
 */
#ifndef FLEECED_INTERNAL_H
#define FLEECED_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "fleeced.h"

struct fl_file {
    unsigned refs;          /* atomic; see "Lifetimes" */
    int closed;             /* atomic; set once by fl_file_close */
    int fd;                 /* immutable after open */
    int readonly;           /* immutable */
    int is_blk;             /* immutable: block device */
    uint64_t size;          /* immutable */
    /* Guards `sessions` (the list itself, not the sessions' contents).
     * Guest write/zero/trim hold it shared for CBW + source I/O;
     * session open/close hold it exclusive.  Writer-preferring. */
    pthread_rwlock_t sessions_lock;
    fl_session *sessions;   /* singly linked through fl_session.next */
    /* Positive errno of the first failed fdatasync, 0 while none.  Atomic:
     * set once by compare-and-swap, read without a lock (file.c notes). */
    int flush_err;
    /* Guards inject_flush_err and inject_flush_n (the test hook); never
     * held across I/O. */
    pthread_mutex_t hook_lock;
    int inject_flush_err, inject_flush_n;
};

/* References (atomic).  The last unref frees the object. */
void fl__file_ref(fl_file *f);
void fl__file_unref(fl_file *f);
void fl__session_ref(fl_session *s);
void fl__session_unref(fl_session *s);
/* 1 once the owner closed the object (fl_file_close / fl_session_close). */
int fl__file_closed(const fl_file *f);
int fl__session_closed(const fl_session *s);

/* ---- io.c ----------------------------------------------------------- */

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

/* Extent accumulator: appends, merging equal neighbours. */
struct fl__ext {
    uint64_t *lens;
    uint32_t *flags;
    size_t max, n;
};
/* Append (len, flags).  Returns 0, or 1 when the list is full and the
 * extent could not be merged (caller stops). */
int fl__ext_add(struct fl__ext *e, uint64_t len, uint32_t flags);
/* Allocation of [off, off+len) of FD (SEEK_DATA/SEEK_HOLE) appended to E.
 * Block devices and lseek errors report data.  Returns 1 when E filled. */
int fl__fd_extents(int fd, int is_blk, uint64_t off, uint64_t len,
                   struct fl__ext *e);

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
