/* fleeced native data path: public API.
 *
 * Contract for every function below: returns 0 on success or -errno on
 * failure; results go through out-parameters.  Every offset/length is
 * re-checked against the object's size with overflow-safe arithmetic.
 * Nothing here calls back into Python.  A direct call keeps no pointer
 * to a caller buffer after it returns; a queued operation
 * (fl_queue_submit*) keeps its buffers until its completion is reaped, as
 * each submit function says.  All functions are thread-safe unless stated
 * otherwise.  The daemon calls nothing that may block from its event
 * loop: such calls go through the I/O queue (fl_queue_*: C worker threads,
 * eventfd completions), whose workers run them; the direct calls serve
 * the queue's workers, tests and tools.
 *
 * Objects:
 *   fl_file     a raw image (regular file or block device) opened by path.
 *   fl_session  a fleecing session (copy-before-write snapshot) attached to
 *               one fl_file.  Guest writes go through fl_file_* which run
 *               CBW for every attached session before touching the source.
 *   fl_sock     a connection socket queue workers may write replies to.
 *   fl_bitmap   a dirty bitmap of a disk (transient, or persistent in a
 *               file); attached to an fl_file it records guest writes.
 *
 * Lifetimes: every object is reference counted.  Open gives the caller
 * one reference, close gives it up; a queued or running queue operation
 * holds one on its object, and a session holds one on its file.  So an
 * object may be closed while operations on it are queued or running:
 * they keep it alive and fail -ESHUTDOWN when they start after the close.
 * The caller must not use its handle after close.  A bitmap is also held
 * by every file it is attached to and by a session's frozen copy; a
 * persistent bitmap's clean-up (see fl_bitmap_close) runs when its last
 * reference goes.
 */
#ifndef FLEECED_H
#define FLEECED_H

#include <stddef.h>
#include <stdint.h>

typedef struct fl_file fl_file;
typedef struct fl_session fl_session;
typedef struct fl_bitmap fl_bitmap;

/* Flags for fl_file_write / fl_file_zero. */
#define FL_FUA       1u  /* fdatasync after the write */
#define FL_MAY_TRIM  2u  /* fl_file_zero: may punch a hole (no NO_HOLE) */
#define FL_FAST      4u  /* fl_file_zero: fail -ENOTSUP unless cheap */
/* fl_queue_submit / fl_queue_submit_send of FL_OP_READ: a later piece of
 * one READ streamed in pieces; its bytes (and a failure) count in
 * fl_file_stats, but not as another request. */
#define FL_PIECE     8u

/* Extent flags (same values as NBD base:allocation). */
#define FL_EXT_HOLE  1u
#define FL_EXT_ZERO  2u
/* fl_session_extents: outside the snapshot's scope, or discarded (reads
 * fail EPERM); always with FL_EXT_HOLE.  Not an NBD flag: base:allocation
 * drops it, qemu:allocation-depth reports depth 0 for it. */
#define FL_EXT_UNREADABLE 4u
/* Extent flag of fl_bitmap_extents (NBD qemu:dirty-bitmap). */
#define FL_EXT_DIRTY 1u

/* Cluster states of a session's map (cbw.c has the transitions). */
#define FL_NOT_NEEDED 0  /* out of scope or discarded: never read */
#define FL_NEEDED     1  /* the old data is still only in the source */
#define FL_COPYING    2  /* a copy-before-write of it is in flight */
#define FL_COPIED     3  /* the old data is in the cache or temp file */
#define FL_ZERO       4  /* it was a hole of the source: reads as zeros,
                            stores nothing */

/* Cluster size limits of a session (a power of two in between). */
#define FL_CLUSTER_MIN 4096u
#define FL_CLUSTER_MAX (16u << 20)

/* Failure policies. */
#define FL_BREAK_SNAPSHOT    0
#define FL_BREAK_GUEST_WRITE 1

/* ---- files ---------------------------------------------------------- */

/* Open PATH (O_RDONLY when readonly, else O_RDWR; O_CLOEXEC).  Refuses
 * directories (-EISDIR) and anything but regular files and block devices
 * (-EINVAL). */
int fl_file_open(const char *path, int readonly, fl_file **out);
/* Open the NBD export at URI (libnbd's URI syntax: nbd+unix:///EXPORT?
 * socket=PATH, nbd://HOST[:PORT]/EXPORT) as a disk's source: every
 * operation below then goes to that export over libnbd (upstream.c),
 * each bounded in time.  -EROFS when it is read-only and READONLY is 0;
 * a connect's -errno (-ETIMEDOUT, -ECONNREFUSED, -ENOENT...) else. */
int fl_file_open_nbd(const char *uri, int readonly, fl_file **out);
/* The same for an export that is not there yet (a running VM's own node,
 * exported once the VM's device no longer uses it): nothing is connected
 * now; the first request connects, and fails -EIO while nobody listens
 * at URI or the export there is not SIZE bytes. */
int fl_file_open_nbd_lazy(const char *uri, uint64_t size, int readonly, fl_file **out);
/* Give up the caller's reference (see Lifetimes): the descriptor closes
 * once no session and no queued operation uses the file any more. */
void fl_file_close(fl_file *f);
/* 1 when F's source is an NBD upstream (fl_file_open_nbd): no page
 * cache, no sendfile, no read runs. */
int fl_file_is_upstream(const fl_file *f);
/* cache=none (ON) or writeback: whether reads and writes of whole
 * 4096-byte blocks bypass the host page cache (O_DIRECT; file.c).
 * -EINVAL for an NBD upstream or a filesystem without O_DIRECT. */
int fl_file_set_direct(fl_file *f, int on);
int fl_file_is_direct(const fl_file *f);
/* The errno of the upstream's last lost connection or timed-out command,
 * 0 while it answers (always 0 for a file). */
int fl_file_source_error(const fl_file *f);
/* Size in bytes (from fstat or BLKGETSIZE64), fixed at open. */
uint64_t fl_file_size(const fl_file *f);

/* Latency histogram: count, sum and log2 buckets of microseconds.
 * buckets[0] counts observations under 1 us, buckets[i] (0 < i <
 * FL_LAT_BUCKETS - 1) those in [2^(i-1), 2^i) us, the last one all from
 * 2^(FL_LAT_BUCKETS-2) us (about 67 s) up.  Not cumulative. */
#define FL_LAT_BUCKETS 28
struct fl_latency {
    uint64_t count, sum_ns;
    uint64_t buckets[FL_LAT_BUCKETS];
};

/* Commands counted per file (fl_file_stats), NBD's names. */
#define FL_CMD_READ         0
#define FL_CMD_WRITE        1
#define FL_CMD_WRITE_ZEROES 2
#define FL_CMD_TRIM         3
#define FL_CMD_FLUSH        4
#define FL_CMD_CACHE        5
#define FL_CMD_BLOCK_STATUS 6
#define FL_CMDS             7
/* errors[e] counts failures with errno e for 0 < e < FL_ERRNO_SLOTS;
 * errors[0] those with any larger errno. */
#define FL_ERRNO_SLOTS 136

/* What was asked of an fl_file through its entry points, the page-cache
 * fast paths (read_nowait, read runs, sendfile replies) included, from
 * every caller: both data planes count here.  requests counts calls
 * (failed ones too), bytes what the successful ones moved (0 for FLUSH
 * and BLOCK_STATUS), errors the failures by errno.  write_latency times
 * fl_file_write (its copy-before-write, source I/O and FUA),
 * flush_latency fl_file_flush.  Counters only grow. */
struct fl_file_stats {
    uint64_t requests[FL_CMDS];
    uint64_t bytes[FL_CMDS];
    uint64_t errors[FL_ERRNO_SLOTS];
    struct fl_latency write_latency, flush_latency;
};
/* Copy F's counters into OUT (relaxed atomic loads: each counter is
 * exact, the set is not one instant).  Never blocks. */
void fl_file_stats(const fl_file *f, struct fl_file_stats *out);
/* What was opened, from fstat at open: a block device's st_rdev (ino 0),
 * or a file's st_dev and st_ino.  Two paths (symlinks, hard links, device
 * nodes) to one source give the same triple. */
void fl_file_identity(const fl_file *f, int *is_blk, uint64_t *dev, uint64_t *ino);

/* Read LEN bytes at OFF.  If is_hole is non-NULL and the whole range is a
 * hole (SEEK_DATA), the buffer is zeroed, *is_hole = 1 and no read is
 * done; otherwise *is_hole = 0.  Short read (EOF) -> -EIO. */
int fl_file_read(fl_file *f, uint8_t *buf, size_t len, uint64_t off,
                 int *is_hole);
/* Like fl_file_read, but never blocks on I/O: reads only from the page
 * cache (preadv2 RWF_NOWAIT) and returns -EAGAIN when any part of the range
 * would need the disk.  Safe to call from an event-loop thread. */
int fl_file_read_nowait(fl_file *f, uint8_t *buf, size_t len, uint64_t off,
                        int *is_hole);
/* Guest write: runs CBW for every attached session, then pwrite, then
 * marks every attached bitmap (even when the pwrite failed). */
int fl_file_write(fl_file *f, const uint8_t *buf, size_t len, uint64_t off,
                  unsigned flags);
/* Guest write-zeroes: CBW, then FALLOC_FL_PUNCH_HOLE (with FL_MAY_TRIM) or
 * FALLOC_FL_ZERO_RANGE, falling back to writing zeros unless FL_FAST.
 * With FL_FAST it fails -ENOTSUP at once, before any CBW and without
 * touching the source, when an attached, unbroken session would have to
 * copy a cluster of the range (NEEDED or COPYING).  Marks the attached
 * bitmaps after the I/O, unless it refused with FL_FAST. */
int fl_file_zero(fl_file *f, uint64_t off, uint64_t len, unsigned flags);
/* Guest trim: CBW, then punch hole, then mark the attached bitmaps.
 * Unsupported punch is ignored (0) and marks nothing. */
int fl_file_trim(fl_file *f, uint64_t off, uint64_t len);
/* fdatasync, then msync every persistent bitmap attached to F (a bitmap
 * msync failure does not fail the flush: the in-use rule covers it, and
 * fl_bitmap_sync reports it).  Data sync failures are sticky: after one failed fdatasync of F (a
 * flush, or the FUA of a write/zero/trim), which returns its own -errno,
 * every later flush and every FUA on F fails -EIO until F is reopened. */
int fl_file_flush(fl_file *f);
/* The sticky flush error: the first failed fdatasync's positive errno, or
 * 0 while none failed. */
int fl_file_flush_error(const fl_file *f);
/* Test hook: the next N fdatasyncs of F (flush or FUA) fail with -err
 * (err > 0) without syncing, and count as failures; n = 0 disables. */
int fl_file_inject_flush_error(fl_file *f, int err, int n);
/* posix_fadvise WILLNEED. */
int fl_file_cache(fl_file *f, uint64_t off, uint64_t len);
/* Allocation map of [off, off+len): up to max extents, each lens[i] bytes
 * with flags[i] (FL_EXT_*); *n gets the count.  Extents are contiguous
 * from OFF; the last one may end before off+len when max is reached. */
int fl_file_extents(fl_file *f, uint64_t off, uint64_t len,
                    uint64_t *lens, uint32_t *flags, size_t max, size_t *n);

/* ---- runs of NBD READs and WRITEs (runs.c) ---------------------------- */

/* The NBD engine's rule for READ or WRITE requests (engine.py
 * _build_rules). */
struct fl_run_rule {
    uint64_t size;          /* export size */
    uint32_t allowed_flags; /* NBD_CMD_FLAG_* bits accepted on a READ */
    uint32_t max_length;    /* longest READ answered here */
    uint32_t min_block;     /* a power of two; 1 when there is none */
    uint32_t structured;    /* 1: one OFFSET_DATA chunk with DONE; 0: simple */
};

/* What fl_file_read_run or fl_write_run_check did. */
struct fl_run {
    uint64_t consumed;      /* request bytes used (28 per READ, 28 + the
                               payload per WRITE) */
    uint64_t out_len;       /* reply bytes written to OUT (or needed) */
    uint64_t data;          /* data bytes among them */
    uint32_t count;         /* READs answered */
};

/* Answer up to MAX_COUNT consecutive NBD READ requests from REQ[0..LEN)
 * out of the page cache (preadv2 RWF_NOWAIT; never blocks on I/O, safe on
 * an event loop): each reply (simple, or one structured OFFSET_DATA chunk
 * with DONE, per RULE) goes to OUT, in order.  Stops before the first
 * request that is incomplete, not a READ RULE accepts, not cached, failing,
 * or does not fit in CAP bytes; that one and the rest stay unread (the
 * caller's engine parses them).  With OUT == NULL, no I/O: *run says how
 * many requests would be answered and the reply bytes they need.  -EINVAL
 * for NULL arguments, a min_block that is not a power of two, or
 * structured > 1; otherwise 0, also when nothing was answered. */
int fl_file_read_run(fl_file *f, const uint8_t *req, size_t len,
                     const struct fl_run_rule *rule, uint32_t max_count,
                     uint8_t *out, size_t cap, struct fl_run *run);
/* Check up to MAX_COUNT consecutive NBD WRITE requests of REQ[0..LEN)
 * whose payload is there in full, under RULE (structured is ignored), and
 * write their success replies (16-byte simple replies) to ACKS; no I/O.
 * Stops before the first request that is incomplete, not a WRITE RULE
 * accepts, or whose reply does not fit in CAP.  Queue the accepted
 * requests with fl_queue_submit_write_run.  -EINVAL for NULL arguments or
 * a min_block that is not a power of two. */
int fl_write_run_check(const uint8_t *req, size_t len,
                       const struct fl_run_rule *rule, uint32_t max_count,
                       uint8_t *acks, size_t cap, struct fl_run *run);

/* Attach bitmap B to F: from then on every guest write, write-zeroes and
 * trim of F that changes data marks B before it returns (file.c has the
 * ordering).  Takes F's session lock exclusive, so it waits for guest
 * writes in flight (blocks) and B records exactly the writes that start
 * after it.  F takes a reference on B until the detach or F's last
 * reference.  -EINVAL when B's size differs from F's, -EEXIST when B is
 * attached to F already. */
int fl_file_bitmap_attach(fl_file *f, fl_bitmap *b);
/* Detach B from F (waits for guest writes in flight; blocks): B records
 * nothing more and keeps its bits; F drops its reference.  -ENOENT when B
 * is not attached to F. */
int fl_file_bitmap_detach(fl_file *f, fl_bitmap *b);

/* ---- dirty bitmaps ---------------------------------------------------- */

/* Open a bitmap of one bit per GRANULARITY bytes (a power of two, 512 B ..
 * 1 GiB; the daemon's default is 64 KiB) of a disk of SIZE bytes; the
 * last bit may cover a partial granule.  PATH NULL: transient, anonymous
 * memory, all clean (CREATE ignored).  Else persistent in the file PATH
 * (format and checksum: the notes in bitmap.c), mapped MAP_SHARED:
 * CREATE = 1 creates it (0600, -EEXIST if it exists) all clean;
 * CREATE = 0 opens an existing one, -EINVAL if it is not a bitmap file
 * (short header, magic, version, unknown flags) or was made for another
 * GRANULARITY, -EBUSY if another open holds it (flock).  *RECOVERED (may
 * be NULL) gets 0; or 1 when the file was left in use (the daemon died
 * with it open) and 2 when its checksum or length is wrong: both load
 * ALL DIRTY; or 3 when the file was made for a disk of another size: it
 * is resized to SIZE, keeping the bits of the common part, with every
 * granule past the old end dirty.  Before returning, open marks the file in use and syncs its
 * header, so a crash from then on is detected.  -EINVAL bad granularity
 * or SIZE > INT64_MAX; -ENOMEM when the bits do not fit in memory. */
int fl_bitmap_open(const char *path, uint64_t size, uint64_t granularity,
                   int create, fl_bitmap **out, int *recovered);
/* Give up the owner's reference (see Lifetimes).  CLEAN records how a
 * persistent bitmap is put away when its last reference goes (after the
 * files it is attached to let go of it): clean = sync the bits, write the
 * checksum, clear the in-use flag, sync the header; not clean = leave the
 * header as it is: in use (the next open loads it all dirty), unless a
 * fl_bitmap_mark_clean cleared it and no bit changed since.  Then unmap
 * and close. */
void fl_bitmap_close(fl_bitmap *b, int clean);
/* Take / give up an extra reference (not the owner's: unref records no
 * CLEAN flag).  fl_session_frozen_bitmap hands out one. */
void fl_bitmap_ref(fl_bitmap *b);
void fl_bitmap_unref(fl_bitmap *b);
uint64_t fl_bitmap_size(const fl_bitmap *b);
uint64_t fl_bitmap_granularity(const fl_bitmap *b);
/* msync(MS_SYNC) the bits of a persistent bitmap (the in-use flag stays
 * set); 0 for a transient one.  Blocks on I/O. */
int fl_bitmap_sync(fl_bitmap *b);
/* The clean close's put-away, while B stays open (and maybe attached to a
 * file that goes on writing): msync the bits, write the checksum, clear
 * the in-use flag, msync the header.  A crash with no bit changed since
 * loads the bits with *recovered = 0.  The first bit-changing call after
 * it (the guest write path, fl_bitmap_set/reset/clear/set_all, a merge
 * into B) re-arms before it returns: sets the in-use flag again and
 * msyncs the header, so a crash after it loads all dirty.  Concurrent
 * writers are safe (bitmap.c "Clean mark").  0 for a transient bitmap.
 * -errno of a failed msync: the in-use flag is then left set.  Blocks on
 * I/O; the caller holds a reference. */
int fl_bitmap_mark_clean(fl_bitmap *b);
/* The bit-changing calls below return 0, or the -errno of a failed
 * re-arm (the header msync after a fl_bitmap_mark_clean): the bits are
 * changed in memory anyway, the in-use flag is set in memory but maybe
 * not on disk, and the next change retries.  Each may block on that
 * msync (once per mark_clean); otherwise they work in memory. */
/* Mark dirty every granule that [off, off+len) touches.  -EINVAL beyond
 * the size; len 0 does nothing. */
int fl_bitmap_set(fl_bitmap *b, uint64_t off, uint64_t len);
/* Mark clean every granule that lies wholly inside [off, off+len) (the
 * disk's partial last granule counts as whole when the range reaches the
 * disk end); granules only partly covered stay as they are, so a reset
 * never loses a write outside the range.  -EINVAL beyond the size. */
int fl_bitmap_reset(fl_bitmap *b, uint64_t off, uint64_t len);
/* All clean / all dirty. */
int fl_bitmap_clear(fl_bitmap *b);
int fl_bitmap_set_all(fl_bitmap *b);
/* DST |= SRC; -EINVAL unless both have the same size and granularity. */
int fl_bitmap_merge(fl_bitmap *dst, const fl_bitmap *src);
/* *OUT = a new transient bitmap with SRC's geometry and bits. */
int fl_bitmap_copy(const fl_bitmap *src, fl_bitmap **out);
/* Dirty bytes: dirty granules times the granularity, the last granule
 * clamped to the disk end. */
uint64_t fl_bitmap_count(const fl_bitmap *b);
/* Dirty map of [off, off+len), like fl_file_extents, except that the
 * range is clamped to the disk end (-EINVAL only when OFF > size): runs
 * from OFF, flags[i] FL_EXT_DIRTY or 0, equal neighbours merged, at most
 * MAX; an in-range request (off < size, len > 0) gets at least one
 * extent.  Never blocks on I/O for a transient bitmap; a persistent one
 * may fault its pages in. */
int fl_bitmap_extents(fl_bitmap *b, uint64_t off, uint64_t len,
                      uint64_t *lens, uint32_t *flags, size_t max,
                      size_t *n);

/* ---- fleecing sessions ---------------------------------------------- */

struct fl_session_params {
    uint64_t cluster_size;   /* power of two, 4 KiB .. 16 MiB */
    const char *temp_dir;    /* where the unlinked temp file lives */
    uint64_t cache_bytes;    /* in-memory CBW cache budget, 0 = none */
    uint64_t max_temp;       /* temp-file byte limit, 0 = unlimited */
    /* Bound on a guest write's copy-before-write (its own copies and its
     * waits for others'); on expiry the policy applies (-ETIMEDOUT).
     * > 0 runs the copies on the session's copier threads; <= 0: no
     * timeout, copies run in the writer's thread. */
    int64_t  cbw_timeout_ms;
    int      policy;         /* FL_BREAK_SNAPSHOT / FL_BREAK_GUEST_WRITE */
    /* Scope: if n_scope > 0 only clusters touched by these byte ranges
     * start NEEDED, all others NOT_NEEDED; else every cluster is NEEDED. */
    const uint64_t *scope_off;
    const uint64_t *scope_len;
    size_t n_scope;
    /* Checkpoint (both optional, NULL = none; neither is kept by the
     * session).  At the snapshot instant, between two guest writes:
     * checkpoint_since (OLD): its bits are copied into the session's
     *   frozen bitmap (fl_session_frozen_bitmap), the scope becomes
     *   exactly the clusters that touch its dirty granules (n_scope must
     *   be 0), and OLD is detached from the file if attached (it keeps
     *   its bits and stops recording);
     * checkpoint_new (NEW): cleared and attached to the file (just
     *   cleared if attached already), so it records every write after
     *   the snapshot.
     * Both must have the file's size (-EINVAL) and differ from each
     * other; on any error nothing was attached, detached or cleared. */
    fl_bitmap *checkpoint_since;
    fl_bitmap *checkpoint_new;
};

struct fl_session_stats {
    /* Clusters by current state: clusters_copied counts COPIED only (data
     * in cache or temp), clusters_zero the ZERO ones (holes, no data).
     * After a break both are 0: the map goes back to NEEDED. */
    uint64_t clusters_total, clusters_needed, clusters_copied,
             clusters_discarded;
    uint64_t clusters_zero;
    uint64_t temp_bytes;          /* bytes currently stored in temp file */
    uint64_t temp_bytes_allocated;/* temp file's allocated bytes (st_blocks) */
    uint64_t temp_bytes_written;  /* total bytes ever written to temp */
    uint64_t cache_bytes;         /* bytes currently held in memory */
    uint64_t cbw_count, cbw_bytes; /* clusters/bytes copied (holes not) */
    uint64_t read_temp_bytes, read_cache_bytes, read_source_bytes;
    uint64_t read_retries;        /* source reads done again: a guest write
                                     got in (cbw.c invariant 2) */
    uint64_t discarded_bytes;
    int      broken;              /* 1 once the snapshot is broken */
    int      broken_errno;        /* positive errno that broke it */
    /* Time guest writes spent in this session's copy-before-write, for
     * the writes that had to copy or wait for a copy (the others cost a
     * map lookup). */
    struct fl_latency cbw_latency;
};

/* Create a session and attach it to F atomically with respect to guest
 * writes: the snapshot is of the data as of return (in-flight writes
 * finish first).  Errors: -EINVAL bad params, -ENOENT/-EACCES/... temp dir. */
int fl_session_open(fl_file *f, const struct fl_session_params *p,
                    fl_session **out);
/* Detach from the file (waiting for in-flight guest writes: blocks) and
 * give up the caller's reference.  Queued snapshot operations keep S alive
 * and fail -ESHUTDOWN.  With cbw_timeout_ms > 0 the session's copier
 * threads (detached) also keep it alive until they finish copies that
 * timed out, then free it.  fl_queue_submit_close does the same in a
 * worker. */
void fl_session_close(fl_session *s);
/* Read the frozen view.  NOT_NEEDED cluster -> -EPERM; broken -> -EIO.
 * is_hole as for fl_file_read (may be NULL); ZERO clusters read as a
 * hole. */
int fl_session_read(fl_session *s, uint8_t *buf, size_t len, uint64_t off,
                    int *is_hole);
/* Discard: rounds inward to whole clusters (the disk's tail cluster counts
 * as whole when the range reaches the end), drops stored data, marks
 * NOT_NEEDED.  Never fails for an in-range request. */
int fl_session_discard(fl_session *s, uint64_t off, uint64_t len);
/* Block status of the frozen view, like fl_file_extents.  COPIED clusters
 * report data; ZERO ones FL_EXT_HOLE|FL_EXT_ZERO; NEEDED ones the
 * source's allocation; NOT_NEEDED FL_EXT_HOLE|FL_EXT_UNREADABLE. */
int fl_session_extents(fl_session *s, uint64_t off, uint64_t len,
                       uint64_t *lens, uint32_t *flags, size_t max,
                       size_t *n);
int fl_session_stats(fl_session *s, struct fl_session_stats *out);
/* Backup progress: *READ_BYTES = bytes of the clusters that a successful
 * fl_session_read touched at least once (a cluster counts whole when any
 * of its bytes was read; the disk's tail cluster counts its own bytes),
 * *TOTAL_BYTES = bytes of the clusters in the scope at the snapshot point
 * (the disk, or the --bitmap / checkpoint_since scope; discards do not
 * shrink it).  Discard counts nothing; block status only through
 * fl_session_note_zero.  Lock-free, never
 * blocks: safe on an event-loop thread. */
int fl_session_progress(const fl_session *s, uint64_t *read_bytes,
                        uint64_t *total_bytes);
/* Progress of [OFF, OFF+LEN), which a base:allocation reply told a client
 * reads as zeros (NBD_STATE_ZERO): its whole clusters in the scope count
 * as read, since a backup that follows the map (nbdcopy, qemu-img convert)
 * skips them and has their content all the same (the disk's tail cluster
 * counts when the range reaches the end).  A partly covered cluster counts
 * nothing.  Takes the session's mutex (never held across I/O).  -EINVAL
 * when the range is outside the disk. */
int fl_session_note_zero(fl_session *s, uint64_t off, uint64_t len);
/* An eventfd (non-blocking, close-on-exec) that becomes readable once,
 * when the session breaks (CBW failed under FL_BREAK_SNAPSHOT): the
 * daemon's event loop watches it instead of polling the stats.  Owned by
 * the session: valid until its last reference goes, so stop watching it
 * before giving up yours. */
int fl_session_event_fd(const fl_session *s);
/* *OUT = the session's frozen bitmap (the bits of checkpoint_since at the
 * snapshot instant; transient, never changes) with a new reference the
 * caller gives up with fl_bitmap_unref.  -ENOENT when the session was
 * opened without checkpoint_since. */
int fl_session_frozen_bitmap(fl_session *s, fl_bitmap **out);
/* Cluster state of the cluster containing OFF (FL_* state), for tests. */
int fl_session_cluster_state(fl_session *s, uint64_t off, int *state);
/* Whether a read of [OFF, OFF+LEN) of the snapshot would succeed as far as
 * the session can tell now: -EIO when it is broken, -EPERM when a cluster
 * in the range is NOT_NEEDED (outside the scope, or discarded), -EINVAL
 * out of range, else 0.  Takes only the session's lock (never held across
 * I/O), so it is safe on an event-loop thread: a large read that is sent a
 * piece at a time is checked whole before its first piece. */
int fl_session_readable(fl_session *s, uint64_t off, uint64_t len);
/* Break the snapshot now with ERR (> 0), as a failed copy would under
 * FL_BREAK_SNAPSHOT (sticky; the eventfd fires once): for a copy that
 * another process runs and fleeced learns it can no longer receive. */
int fl_session_break(fl_session *s, int err);
/* The old contents of [OFF, OFF+LEN), from a copy-before-write that
 * another process runs (QEMU's copy-before-write filter writing to its
 * target: the disk's own writes then never pass through fleeced).  BUF
 * NULL means zeros.  Every whole cluster of the range that is NEEDED is
 * stored (COPIED, or ZERO for zeros) before this returns, so the writer
 * may overwrite the source once it has the answer; clusters kept already
 * are left alone.  Part of a NEEDED cluster breaks the snapshot (the rest
 * of it would never come).  A store that fails follows the policy:
 * -errno (FL_BREAK_GUEST_WRITE: the writer must fail its write) or 0 with
 * the snapshot broken.  -EINVAL out of range. */
int fl_session_put_old(fl_session *s, const uint8_t *buf, uint64_t len, uint64_t off);
/* Test hook: every copy-before-write copy of S sleeps MS (0..60000)
 * outside the lock, after reading the source and before storing the data
 * (so a late copy has data to drop), so timeouts can be provoked. */
int fl_session_inject_delay(fl_session *s, int ms);
/* Test hook: every snapshot read of S from the source sleeps MS (0..60000)
 * after its read, outside the lock, so guest writes can race it. */
int fl_session_inject_read_delay(fl_session *s, int ms);
/* Test hook: make the next N temp-store writes of S fail with -err
 * (err > 0), n = 0 disables.  A failing temp-file write first writes
 * the first half of its run (a torn write); hole-only runs store nothing
 * and do not use the hook. */
int fl_session_inject_error(fl_session *s, int err, int n);

/* ---- I/O queue (C worker threads, eventfd completions) --------------- */

typedef struct fl_queue fl_queue;

/* Operation kinds for fl_queue_submit; OBJ is an fl_file for FL_OP_READ ..
 * FL_OP_CACHE and an fl_session for the FL_OP_SNAP_* kinds. */
#define FL_OP_READ          1  /* fl_file_read, hole reported */
#define FL_OP_WRITE         2  /* fl_file_write(flags) */
#define FL_OP_ZERO          3  /* fl_file_zero(flags) */
#define FL_OP_TRIM          4  /* fl_file_trim, then flush with FL_FUA */
#define FL_OP_FLUSH         5  /* fl_file_flush */
#define FL_OP_CACHE         6  /* fl_file_cache */
#define FL_OP_SNAP_READ     7  /* fl_session_read, hole reported */
#define FL_OP_SNAP_DISCARD  8  /* fl_session_discard */
#define FL_OP_EXTENTS       9  /* fl_file_extents (fl_queue_submit_extents) */
#define FL_OP_SNAP_EXTENTS 10  /* fl_session_extents (same) */
#define FL_OP_SESSION_OPEN 11  /* fl_session_open (fl_queue_submit_open) */
#define FL_OP_SESSION_CLOSE 12 /* fl_session_close (fl_queue_submit_close) */
#define FL_OP_WRITE_RUN    13  /* fl_file_write per request (below) */
#define FL_OP_SNAP_PUT     14  /* fl_session_put_old (BUF NULL: zeros) */

/* Start NTHREADS (1..64) guest workers, NTHREADS - NTHREADS/4 snapshot
 * workers at a lower scheduling priority (queue.c) and a completion
 * eventfd. */
int fl_queue_open(unsigned nthreads, fl_queue **out);
/* The eventfd: readable when completions wait in fl_queue_reap. */
int fl_queue_fd(const fl_queue *q);
/* Queue one operation (FL_OP_READ .. FL_OP_SNAP_DISCARD, FL_OP_SNAP_PUT);
 * never blocks on
 * I/O.  Takes a reference on OBJ until the operation has run.  BUF
 * (READ/WRITE/SNAP_READ) must stay valid until ID is reaped.  -ESHUTDOWN
 * once the queue is closing. */
int fl_queue_submit(fl_queue *q, uint64_t id, int kind, void *obj,
                    uint8_t *buf, uint64_t len, uint64_t off, unsigned flags);
/* Queue block status (FL_OP_EXTENTS on an fl_file, FL_OP_SNAP_EXTENTS on
 * an fl_session); LENS, FLAGS (MAX each) and N must stay valid until ID
 * is reaped. */
int fl_queue_submit_extents(fl_queue *q, uint64_t id, int kind, void *obj,
                            uint64_t off, uint64_t len, uint64_t *lens,
                            uint32_t *flags, size_t max, size_t *n);
/* Queue fl_session_open(F, P, OUT) (it waits for guest writes in flight);
 * P (and what it points at) and OUT must stay valid until ID is reaped;
 * *OUT is the session once it completed with rc 0. */
int fl_queue_submit_open(fl_queue *q, uint64_t id, fl_file *f,
                         const struct fl_session_params *p, fl_session **out);
/* Queue the COUNT WRITE requests at REQ[0..LEN) that fl_write_run_check
 * accepted: a worker writes each with fl_file_write (FUA when the request
 * has NBD_CMD_FLAG_FUA), in order, and stores each result in RCS[i]; a
 * failure does not stop the rest.  The op's rc is the first failure or 0
 * (-ESHUTDOWN and RCS untouched when F was closed before it ran).  REQ and
 * RCS must stay valid until ID is reaped. */
int fl_queue_submit_write_run(fl_queue *q, uint64_t id, fl_file *f,
                              const uint8_t *req, size_t len, uint32_t count,
                              int32_t *rcs);
/* Queue fl_session_close(S); the caller's reference passes to the
 * operation, so the caller must not use S after this call returns 0. */
int fl_queue_submit_close(fl_queue *q, uint64_t id, fl_session *s);
/* Test hook: every operation of KIND first sleeps MS (0..60000) in its
 * worker, so slow disks can be imitated; with FL_OP_WRITE, a write run
 * sleeps MS per write. */
int fl_queue_inject_delay(fl_queue *q, int kind, int ms);
/* A connection socket that workers may write replies to (a dup of
 * FD).  Workers never wait on it: a reply that does not fit in the socket
 * buffer is left to the caller (see fl_queue_submit_send). */
typedef struct fl_sock fl_sock;
int fl_sock_open(int fd, fl_sock **out);
/* Let workers write again after a partial reply stalled the socket (call
 * once the caller has written the rest and its own buffer is empty). */
void fl_sock_resume(fl_sock *s);
/* Give up the caller's reference; the dup closes once no queued
 * operation uses S any more. */
void fl_sock_close(fl_sock *s);

/* Completion bits reported in bits[] by fl_queue_reap. */
#define FL_DONE_HOLE  1  /* the range read as a hole (zeros); not sent */
#define FL_DONE_SENT  2  /* (part of) the reply went to the socket */
#define FL_DONE_DEFER 4  /* a read found its socket stalled: nothing was
                            read or sent; submit it again once resumed */

/* Queue a read (FL_OP_READ, FLAGS 0 or FL_PIECE; FL_OP_SNAP_READ, FLAGS 0) whose reply the
 * worker writes itself, HDR (up to 32 bytes, copied; none for a piece of
 * a reply whose header went out before) then the LEN bytes read, as one
 * reply on SOCK, if the socket takes it without waiting; or
 * a guest write (FL_OP_WRITE, FLAGS 0 or FL_FUA) whose reply, HDR alone,
 * the worker writes once the write succeeded, so the acknowledgement
 * does not wait for the caller's thread.
 * Completion: I/O error -> rc < 0, nothing sent; hole -> FL_DONE_HOLE,
 * nothing sent; a read that finds SOCK stalled when it starts ->
 * FL_DONE_DEFER, rc 0, nothing read or sent (the caller submits it again
 * once it resumed the socket: no copy is made only to wait in memory);
 * socket full or stalled later -> 0 bits, nothing sent (the data is in
 * BUF); a write is never deferred (its reply then has 0 bits); whole reply sent -> FL_DONE_SENT, rc 0; part sent ->
 * FL_DONE_SENT with rc = bytes sent (> 0): the socket is stalled and the
 * caller writes the rest first; send error -> FL_DONE_SENT, rc < 0: the
 * stream is torn. */
int fl_queue_submit_send(fl_queue *q, uint64_t id, int kind, void *obj,
                         uint8_t *buf, uint64_t len, uint64_t off,
                         fl_sock *sock, const uint8_t *hdr, size_t hdr_len,
                         unsigned flags);
/* Take up to MAX completions: ids[i], rcs[i] (0 or -errno), bits[i]
 * (FL_DONE_*);
 * *n gets the count.  Never blocks. */
int fl_queue_reap(fl_queue *q, uint64_t *ids, int32_t *rcs, int32_t *bits,
                  size_t max, size_t *n);
/* Finish every queued operation, join the workers, free. */
void fl_queue_close(fl_queue *q);

/* ---- native NBD connections (conn.c) ---------------------------------- */

/* A connection in its transmission phase, run in C from the handshake's
 * end to the close: its own receive thread checks and dispatches
 * requests (inline, or to Q's workers), and replies are written by the
 * thread that completed them. */
typedef struct fl_conn fl_conn;

/* The engine's rule for one command (engine.py _build_rules): flags
 * accepted, the error every such request gets (NBD errno, 0 none), the
 * error of a request beyond the end, and the longest one accepted. */
struct fl_conn_rule {
    uint32_t allowed_flags, error, range_error, max_length;
};

#define FL_CONN_MAX_CTX 16
/* Metadata context kinds (exports/base.py). */
#define FL_CTX_BASE_ALLOCATION  1
#define FL_CTX_ALLOCATION_DEPTH 2
#define FL_CTX_DIRTY_BITMAP     3

struct fl_conn_params {
    int fd;                     /* the socket (a dup is taken; non-blocking
                                   or not, it is used without waiting) */
    fl_queue *queue;
    fl_file *file;              /* the active export's disk, or */
    fl_session *session;        /* a snapshot export's session */
    uint64_t size;
    uint32_t min_block;         /* a power of two, or 0/1: none */
    uint32_t structured;        /* structured replies negotiated */
    uint32_t trim;              /* file: TRIM punches (discard=unmap) and
                                   WRITE_ZEROES may deallocate; 0: TRIM is
                                   answered and dropped */
    struct fl_conn_rule rules[8];   /* by command, NBD_CMD_READ .. */
    uint32_t n_ctx;             /* negotiated metadata contexts */
    uint32_t ctx_id[FL_CONN_MAX_CTX];
    uint32_t ctx_kind[FL_CONN_MAX_CTX];
    fl_bitmap *ctx_bitmap[FL_CONN_MAX_CTX]; /* FL_CTX_DIRTY_BITMAP's, else NULL */
    const uint8_t *initial;     /* bytes read past the handshake (requests) */
    size_t initial_len;         /* at most 256 KiB */
};

struct fl_conn_stats {
    uint64_t requests, errors, bytes_read, bytes_written;
    uint32_t in_flight;
    uint64_t reply_bytes;       /* READ bytes admitted in flight plus replies
                                   queued unsent: its reply memory, at most
                                   the flow-control budget and one piece */
    int ended;                  /* socket closed, nothing in flight */
    int eof;                    /* the client closed first */
    char reason[128];           /* why it ended, when not the client's DISC
                                   or EOF ("" then) */
};

/* Take over the transmission phase of the connection on P->fd (its
 * references on the file or session and bitmaps taken; P not kept).
 * -EINVAL bad parameters, -ENOMEM, a thread or eventfd error. */
int fl_conn_start(const struct fl_conn_params *p, fl_conn **out);
/* An eventfd that becomes readable once the connection ended: socket
 * closed and no request in flight (then fl_conn_close it). */
int fl_conn_done_fd(const fl_conn *c);
/* Answer what was received (ESHUTDOWN from now on) or, with REPLAY, drop
 * new requests unanswered; close once the client sent nothing more and
 * nothing is in flight.  Never blocks. */
void fl_conn_shutdown(fl_conn *c, int replay);
/* Shut the socket down now; replies of requests in flight are dropped.
 * Never blocks. */
void fl_conn_abort(fl_conn *c);
void fl_conn_stats(fl_conn *c, struct fl_conn_stats *out);
/* Give up the owner's reference (aborting first if it has not ended). */
void fl_conn_close(fl_conn *c);

#endif
