/* fleeced native data path: dirty bitmaps (one bit per granule of a disk).
 *
 * Design notes:
 * - A bitmap has one bit per GRANULARITY bytes (a power of two, 512 B ..
 *   1 GiB) of a disk of SIZE bytes; the last bit may cover a partial
 *   granule.  Bits live in 64-bit words, bit g in word g / 64 at position
 *   g % 64.  Bits past the last granule are always 0 (every writer masks
 *   them), so count and extents need no special case for them.
 * - Transient bitmaps are anonymous memory.  Persistent ones are a file
 *   mapped MAP_SHARED in one piece: a 4 KiB header, then the words.
 *   Header (little-endian; this file refuses to build big-endian):
 *       0  magic "FLDIRTY\0"        8 bytes
 *       8  version = 1              u32
 *      12  header size = 4096       u32
 *      16  disk size in bytes       u64
 *      24  granularity in bytes     u64
 *      32  flags (bit 0 IN_USE)     u64   other bits must be 0
 *      40  checksum of the words    u64   FNV-1a 64 over the word bytes
 *      48  word bytes               u64   8 * ceil(granules / 64)
 *      56  zero padding up to 4096
 *   File size = 4096 + word bytes.  The checksum is only meaningful while
 *   IN_USE is clear: it is written at the clean close, together with
 *   clearing IN_USE.  FNV-1a 64 (offset 0xcbf29ce484222325, prime
 *   0x100000001b3, byte at a time) is trivial to re-implement in a
 *   checker and costs ~1 ms per MiB of bits, i.e. per 64 GiB of disk at
 *   the default 64 KiB granularity, paid only at open and clean close.
 * - In-use rule (correctness after a crash never depends on msync):
 *   open sets IN_USE and msyncs the header (MS_SYNC) before returning.
 *   A file found with IN_USE set (the daemon died with it open) loads all
 *   dirty, *recovered = 1; a checksum mismatch or a wrong file length
 *   (torn or truncated file, header intact) loads all dirty, *recovered =
 *   2.  A file made for a disk of another size (resized while no daemon
 *   had it open) keeps the bits of the common part and gets every granule
 *   past the old end set, *recovered = 3 (load_resized).  A short header,
 *   a bad magic/version/header size, another granularity, or unknown
 *   flags are -EINVAL: the file is not ours to repair.  The clean close is: msync the words, write the
 *   checksum, clear IN_USE, msync the header, unmap.  If the words' msync
 *   fails, IN_USE stays set, so the next load is all dirty.
 * - Clean mark (fl_bitmap_mark_clean: "clears it after a clean
 *   flush at shutdown or detach") does the same while the bitmap stays
 *   open, maybe attached to a file that goes on writing.  The guarantee,
 *   for a process crash and for a power cut alike (only msynced bytes
 *   survive, the rest may or may not): once any bit-changing call has
 *   returned (fl_bitmap_set, the guest write path, set_all, merge,
 *   reset, clear), the durable header has IN_USE set, or its checksum
 *   was computed over words that include that call's change.  Together
 *   with "checksum match => the durable words are the checksummed ones"
 *   a load with *recovered = 0 then has every acknowledged bit.  How:
 *   `armed` = 1 means "the durable header has IN_USE set and no clean
 *   mark has begun since".  open leaves it 1; a transient bitmap keeps it
 *   1 forever.  Every bit-changing call, after touching the words, loads
 *   `armed` (the one extra atomic load of the hot path) and, when it is
 *   0, re-arms before returning: under arm_lock, if still 0, set IN_USE,
 *   msync the header (MS_SYNC), then store armed = 1.  file.c marks after
 *   the I/O and before the ack, so the re-arm is durable before the
 *   guest hears of its write.  mark_clean: msync the words (the bulk,
 *   outside the lock); then under arm_lock: store armed = 0 (M1), msync
 *   the words again (whatever changed meanwhile), compute the checksum
 *   over the words (M2), write it, clear IN_USE, msync the header.
 *   Why no change is lost (Dekker; every word access, `armed` and M2's
 *   loads are seq_cst, so one total order S covers them): a writer does
 *   W1 = its fetch_or (or the load that found the bits set) then W2 =
 *   load armed.  Take any clean mark M.  If W1 precedes M2's load of that
 *   word in S, M's checksum includes the bit.  Else M1 < M2 < W1 < W2,
 *   so W2 reads M1's 0 or a later store to `armed`; every such store
 *   runs under arm_lock after M released it (M holds the lock from
 *   before M1 until its header msync returns).  A 0 makes the writer
 *   re-arm, which waits for the lock, so its IN_USE lands after M's
 *   clear.  A 1 comes from a re-arm R after M, whose IN_USE and msync
 *   are done before its store; a later mark M' that clears it again has
 *   M1' after W2 in S (else W2 would read M1' or a store after it), so
 *   M2' > W1 and M' includes the bit.  The lock also orders a re-arm
 *   against a mark's checksum/clear/msync, so "re-armed between the
 *   checksum and the clear" cannot happen: the re-arm waits, and then
 *   sets IN_USE again.
 *   A call that finds its bits already set still loads `armed` and
 *   re-arms on 0: the bit may be another writer's change made after M2
 *   whose own re-arm has not happened yet, and returning early would
 *   acknowledge a write that a power cut could lose (durable header
 *   clean, durable words stale but matching the checksum).  This costs
 *   at most one header msync per clean mark, paid by its first writer.
 *   Bits that change after M2 are maybe in the checksum only partly or
 *   not on disk: that can only make the checksum mismatch (*recovered =
 *   2, all dirty), never load clean with a bit missing.
 *   Failures: a failed re-arm msync leaves IN_USE set in memory and
 *   armed = 0 (the next change retries) and returns -errno from the
 *   call (fl__bitmap_mark too; file.c does not act on it yet).  A failed
 *   msync in mark_clean: the words' one leaves the header alone; the
 *   header's one sets IN_USE back and msyncs again; `armed` becomes 1
 *   again only when IN_USE is known durable.
 *   Cost: a re-arm does I/O under arm_lock and, from file.c, under the
 *   shared sessions_lock (like CBW); under cbw.c's exclusive one only
 *   when a checkpoint clears a NEW bitmap that was marked clean.
 *   Process-crash only (no power cut) is safe by the checksum alone:
 *   the file then holds exactly the memory's words, and any change after
 *   the checksum makes it mismatch.
 * - The file is fallocated at create and open, so storing into a mapped
 *   page never hits ENOSPC (which would be SIGBUS).  An exclusive flock
 *   (-EBUSY when taken) keeps two daemons off one file; something that
 *   truncates the file behind our back can still make an access fault.
 * - Lifetime: reference counted like fl_file (internal.h "Lifetimes").
 *   Holders: the owner (open; fl_bitmap_close), each fl_file it is
 *   attached to (file.c), a session's frozen copy (cbw.c), and any
 *   fl_bitmap_ref taker (the Python boundary pins the bitmaps of a queued
 *   session open that way).  fl_bitmap_close records the owner's clean
 *   flag and drops its reference; whoever drops the last reference runs
 *   the final clean-up with that flag.  Since attached files hold
 *   references, the checksum is computed when no writer can set a bit.
 * - No globals.
 *
 * Concurrency (one lock, arm_lock, never on the hot path unless it must
 * re-arm; the hot path is a load and at most one atomic OR per 64
 * granules touched, plus one load of `armed` per call):
 *   words[]     atomic per word.  Set: __atomic_fetch_or (skipped when the
 *               bits are already set, to keep the cache line shared);
 *               reset: __atomic_fetch_and; clear/set_all: __atomic_store.
 *               All word writes (and the loads that decide a write is
 *               not needed) are seq_cst for the clean-mark protocol
 *               (free on x86: a locked RMW or a plain load either way),
 *               and so are the checksum's loads.  Other readers (count,
 *               extents, copy, merge's source) use relaxed atomic loads.
 *               A reader concurrent with writers
 *               sees each word either before or after each update, never
 *               torn, but no snapshot across words.  A consistent cut of
 *               an attached bitmap comes from the file's sessions_lock
 *               held exclusive (cbw.c checkpoints), not from here.
 *   refs        atomic (acq_rel on the last drop).
 *   clean       atomic; written by fl_bitmap_close, read at the last unref.
 *   armed       atomic seq_cst (see "Clean mark"); read lock-free by every
 *               bit-changing call, written only under arm_lock.
 *   arm_lock    guards the header's flags and checksum and the msyncs of
 *               the header, and orders the stores to `armed`.  Held
 *               across msync (that is its purpose: a writer that must
 *               re-arm has to wait for the durable header anyway).  Lock
 *               order: callers' locks (sessions_lock) before arm_lock;
 *               nothing is taken under it.  open/create and the last
 *               unref touch the header without it: nobody else can then.
 *   shadow      test hook (fl__bitmap_test_shadow), set before any
 *               sharing; its bytes are written with relaxed atomics.
 *   everything else  immutable after open.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the bitmap file format is little-endian; add byte swapping first"
#endif

#define HDR_SIZE    ((uint64_t)4096)
#define HDR_VERSION 1u
#define GRAN_MIN    ((uint64_t)512)
#define GRAN_MAX    ((uint64_t)1 << 30)
#define F_IN_USE    ((uint64_t)1)
#define FNV_OFFSET  0xcbf29ce484222325ull
#define FNV_PRIME   0x100000001b3ull

static const char MAGIC[8] = "FLDIRTY";   /* with its NUL: 8 bytes */

struct hdr {                  /* the first 56 bytes of the file */
    char magic[8];
    uint32_t version, hdr_size;
    uint64_t disk_size, granularity, flags, checksum, word_bytes;
};

struct fl_bitmap {
    unsigned refs;            /* atomic; see "Lifetime" */
    int clean;                /* atomic; the owner's close flag */
    int armed;                /* atomic seq_cst; stores under arm_lock */
    pthread_mutex_t arm_lock; /* header flags/checksum + its msyncs */
    uint8_t *shadow;          /* test hook: model of the durable bytes */
    uint64_t size, gran, nbits, nwords;  /* immutable */
    unsigned shift;           /* log2(gran), immutable */
    int fd;                   /* persistent: the file; transient: -1 */
    uint8_t *map;             /* the mapping (header + words, or words) */
    size_t map_len;
    uint64_t *words;          /* nwords atomic words */
};

/* ---- words ------------------------------------------------------------ */

static inline uint64_t wload(const fl_bitmap *b, uint64_t i)
{
    return __atomic_load_n(&b->words[i], __ATOMIC_RELAXED);
}

/* Mask of the valid bits of word I (all but the tail word: all ones). */
static inline uint64_t valid_mask(const fl_bitmap *b, uint64_t i)
{
    unsigned r = (unsigned)(b->nbits & 63);
    return (i + 1 < b->nwords || r == 0) ? ~(uint64_t)0
                                         : (((uint64_t)1 << r) - 1);
}

/* Bits [g0, g1) of word-aligned form: call FN(word index, mask). */
#define FOR_BITS(b, g0, g1, STMT)                                           \
    do {                                                                    \
        uint64_t g_ = (g0);                                                 \
        while (g_ < (g1)) {                                                 \
            uint64_t wi = g_ >> 6, lo = g_ & 63;                            \
            uint64_t hi = ((g1) - (wi << 6)) < 64 ? ((g1) - (wi << 6)) : 64;\
            uint64_t mask = (hi == 64 ? ~(uint64_t)0                        \
                                      : (((uint64_t)1 << hi) - 1)) &        \
                            (~(uint64_t)0 << lo);                           \
            STMT;                                                           \
            g_ = (wi + 1) << 6;                                             \
        }                                                                   \
    } while (0)

/* Seq_cst load of word I: the "W1" of a set that finds its bits set. */
static inline uint64_t wload_sc(const fl_bitmap *b, uint64_t i)
{
    return __atomic_load_n(&b->words[i], __ATOMIC_SEQ_CST);
}

static void set_bits(fl_bitmap *b, uint64_t g0, uint64_t g1)
{
    FOR_BITS(b, g0, g1, {
        if ((wload_sc(b, wi) & mask) != mask)
            __atomic_fetch_or(&b->words[wi], mask, __ATOMIC_SEQ_CST);
    });
}

static void clear_bits(fl_bitmap *b, uint64_t g0, uint64_t g1)
{
    FOR_BITS(b, g0, g1, {
        if ((wload_sc(b, wi) & mask) != 0)
            __atomic_fetch_and(&b->words[wi], ~mask, __ATOMIC_SEQ_CST);
    });
}

static void fill(fl_bitmap *b, int ones)
{
    for (uint64_t i = 0; i < b->nwords; i++)
        __atomic_store_n(&b->words[i], ones ? valid_mask(b, i) : 0,
                         __ATOMIC_SEQ_CST);
}

/* First granule >= G (below nbits) whose bit equals BIT, else nbits. */
static uint64_t find_bit(const fl_bitmap *b, uint64_t g, int bit)
{
    while (g < b->nbits) {
        uint64_t wi = g >> 6;
        uint64_t w = wload(b, wi);
        if (!bit)
            w = ~w & valid_mask(b, wi);
        w &= ~(uint64_t)0 << (g & 63);
        if (w != 0) {
            uint64_t r = (wi << 6) + (uint64_t)__builtin_ctzll(w);
            return r < b->nbits ? r : b->nbits;
        }
        g = (wi + 1) << 6;
    }
    return b->nbits;
}

static int get_bit(const fl_bitmap *b, uint64_t g)
{
    return (int)((wload(b, g >> 6) >> (g & 63)) & 1);
}

static uint64_t fnv1a(const fl_bitmap *b)
{
    uint64_t h = FNV_OFFSET;

    for (uint64_t i = 0; i < b->nwords; i++) {
        uint64_t w = wload_sc(b, i);    /* "M2": after M1 in S */
        for (int k = 0; k < 8; k++) {
            h ^= (w >> (8 * k)) & 0xff;
            h *= FNV_PRIME;
        }
    }
    return h;
}

/* ---- persistence -------------------------------------------------------- */

/* Test hook: the bytes [start, end) as they are when an msync of them
 * starts, i.e. the oldest content that msync may have written. */
static void shadow_copy(fl_bitmap *b, size_t start, size_t end)
{
    end = (end + 7) & ~(size_t)7;
    for (size_t i = start; i < end && i < b->map_len; i += 8)
        __atomic_store_n((uint64_t *)(void *)(b->shadow + i),
                         __atomic_load_n((uint64_t *)(void *)(b->map + i),
                                         __ATOMIC_SEQ_CST),
                         __ATOMIC_RELAXED);
}

/* msync [off, off+len) of the mapping, widened to whole pages. */
static int sync_range(fl_bitmap *b, size_t off, size_t len)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE), start = off & ~(pg - 1);

    if (len == 0)
        return 0;
    if (b->shadow != NULL)
        shadow_copy(b, start, off + len);
    if (msync(b->map + start, off + len - start, MS_SYNC) < 0)
        return -errno;
    return 0;
}

static int sync_words(fl_bitmap *b)
{
    return sync_range(b, (size_t)HDR_SIZE, (size_t)(b->nwords * 8));
}

static struct hdr *header(fl_bitmap *b)
{
    return (struct hdr *)(void *)b->map;
}

static int sync_header(fl_bitmap *b)
{
    return sync_range(b, 0, sizeof(struct hdr));
}

/* Slow path of after_change: make IN_USE durable (see "Clean mark"). */
static int rearm(fl_bitmap *b)
{
    int rc = 0;

    pthread_mutex_lock(&b->arm_lock);
    if (!__atomic_load_n(&b->armed, __ATOMIC_SEQ_CST)) {
        header(b)->flags |= F_IN_USE;
        rc = sync_header(b);
        if (rc == 0)
            __atomic_store_n(&b->armed, 1, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&b->arm_lock);
    return rc;
}

/* Every bit-changing call, after its word accesses and before returning:
 * "W2", one seq_cst load (a plain load on x86); always 1 when transient. */
static inline int after_change(fl_bitmap *b)
{
    if (__builtin_expect(__atomic_load_n(&b->armed, __ATOMIC_SEQ_CST), 1))
        return 0;
    return rearm(b);
}

/* The last reference is gone: clean close (see the notes), unmap, free. */
static void destroy(fl_bitmap *b)
{
    if (b->fd >= 0) {
        if (__atomic_load_n(&b->clean, __ATOMIC_ACQUIRE) &&
            sync_words(b) == 0) {
            struct hdr *h = header(b);
            h->checksum = fnv1a(b);
            h->flags &= ~F_IN_USE;
            (void)sync_header(b);
        }
        close(b->fd);   /* drops the flock */
    }
    munmap(b->map, b->map_len);
    pthread_mutex_destroy(&b->arm_lock);
    free(b);
}

void fl__bitmap_ref(fl_bitmap *b)
{
    __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
}

void fl__bitmap_unref(fl_bitmap *b)
{
    if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0)
        destroy(b);
}

/* Geometry of a bitmap of SIZE bytes at GRAN; -EINVAL or -ENOMEM. */
static int geometry(fl_bitmap *b, uint64_t size, uint64_t gran)
{
    if (gran < GRAN_MIN || gran > GRAN_MAX || (gran & (gran - 1)) != 0 ||
        size > (uint64_t)INT64_MAX)
        return -EINVAL;
    b->size = size;
    b->gran = gran;
    b->shift = (unsigned)__builtin_ctzll(gran);
    b->nbits = (size >> b->shift) + ((size & (gran - 1)) != 0);
    b->nwords = (b->nbits + 63) >> 6;
    if (b->nwords > (SIZE_MAX - HDR_SIZE) / 8)
        return -ENOMEM;
    return 0;
}

static int map_file(fl_bitmap *b)
{
    void *m;

    b->map_len = (size_t)(HDR_SIZE + b->nwords * 8);
    m = mmap(NULL, b->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, b->fd, 0);
    if (m == MAP_FAILED)
        return -errno;
    b->map = m;
    b->words = (uint64_t *)(void *)(b->map + HDR_SIZE);
    return 0;
}

/* Allocate the file's blocks so stores into the mapping never fault. */
static int reserve(int fd, uint64_t total)
{
    int rc = posix_fallocate(fd, 0, (off_t)total);

    return (rc == 0 || rc == EOPNOTSUPP || rc == EINVAL) ? 0 : -rc;
}

static int create_file(fl_bitmap *b, const char *path)
{
    uint64_t total = HDR_SIZE + b->nwords * 8;
    struct hdr *h;
    int rc;

    b->fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
                 0600);
    if (b->fd < 0)
        return -errno;
    if (flock(b->fd, LOCK_EX | LOCK_NB) < 0) {
        rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
        goto err;
    }
    if (ftruncate(b->fd, (off_t)total) < 0) {
        rc = -errno;
        goto err;
    }
    rc = reserve(b->fd, total);
    if (rc < 0)
        goto err;
    rc = map_file(b);
    if (rc < 0)
        goto err;
    h = header(b);      /* the file is all zeros: bits clean */
    memcpy(h->magic, MAGIC, sizeof(h->magic));
    h->version = HDR_VERSION;
    h->hdr_size = (uint32_t)HDR_SIZE;
    h->disk_size = b->size;
    h->granularity = b->gran;
    h->word_bytes = b->nwords * 8;
    h->checksum = fnv1a(b);
    h->flags = F_IN_USE;
    rc = sync_range(b, 0, (size_t)HDR_SIZE);
    if (rc < 0) {
        munmap(b->map, b->map_len);
        goto err;
    }
    return 0;

err:
    close(b->fd);
    unlink(path);
    return rc;
}

/* Check the loaded words of a bitmap whose geometry B has: 0 when they
 * can be trusted, 2 when not (checksum, or bits past the end). */
static int words_trusted(const fl_bitmap *b, const struct hdr *h)
{
    if (fnv1a(b) != h->checksum)
        return 2;
    for (uint64_t i = 0; i < b->nwords; i++)
        if (wload(b, i) & ~valid_mask(b, i))
            return 2;                       /* bits past the end: corrupt */
    return 0;
}

/* The file holds a bitmap of a disk of another size (the disk was resized
 * while no daemon had it open): check its bits with the file's own
 * geometry, then resize the file to B's.  Bits of the common part are
 * kept; the granules that cover bytes past the old end are set (they were
 * never recorded, and an incremental backup of the old size never read
 * them); bits past the new end go.  *REC as for an open (1 or 2: all
 * dirty), else 3.  B's fd is open and locked; on success B is mapped. */
static int load_resized(fl_bitmap *b, const struct hdr *h, uint64_t file_len, int *rec)
{
    fl_bitmap old = { .fd = b->fd };
    uint64_t total = HDR_SIZE + b->nwords * 8;
    int rc;

    rc = geometry(&old, h->disk_size, h->granularity);
    if (rc < 0 || h->word_bytes != old.nwords * 8)
        return -EINVAL;
    if (file_len != HDR_SIZE + old.nwords * 8)
        *rec = 2;                           /* torn: nothing to keep */
    else if (h->flags & F_IN_USE)
        *rec = 1;
    if (*rec == 0) {
        rc = map_file(&old);
        if (rc < 0)
            return rc;
        *rec = words_trusted(&old, h);
        munmap(old.map, old.map_len);
    }
    if (ftruncate(b->fd, (off_t)total) < 0)
        return -errno;
    rc = reserve(b->fd, total);
    if (rc < 0)
        return rc;
    rc = map_file(b);
    if (rc < 0)
        return rc;
    if (*rec != 0) {
        fill(b, 1);
    } else {
        if (b->nwords > 0)                  /* shrunk: drop the tail's rest */
            __atomic_store_n(&b->words[b->nwords - 1],
                             wload(b, b->nwords - 1) & valid_mask(b, b->nwords - 1),
                             __ATOMIC_SEQ_CST);
        if (h->disk_size < b->size)
            set_bits(b, h->disk_size >> b->shift, b->nbits);
        *rec = 3;
    }
    header(b)->disk_size = b->size;
    header(b)->word_bytes = b->nwords * 8;
    return 0;
}

static int load_file(fl_bitmap *b, const char *path, int *recovered)
{
    uint64_t total = HDR_SIZE + b->nwords * 8;
    struct hdr h;
    struct stat st;
    int rc, rec = 0;

    b->fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (b->fd < 0)
        return -errno;
    if (fstat(b->fd, &st) < 0) {
        rc = -errno;
        goto err;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = -EINVAL;
        goto err;
    }
    if (flock(b->fd, LOCK_EX | LOCK_NB) < 0) {
        rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
        goto err;
    }
    rc = fl__full_pread(b->fd, &h, sizeof(h), 0);
    if (rc < 0) {
        rc = rc == -EIO ? -EINVAL : rc;   /* short file: not a bitmap */
        goto err;
    }
    if (memcmp(h.magic, MAGIC, sizeof(h.magic)) != 0 ||
        h.version != HDR_VERSION || h.hdr_size != HDR_SIZE ||
        h.granularity != b->gran || (h.flags & ~F_IN_USE) != 0 ||
        (uint64_t)st.st_size < HDR_SIZE) {
        rc = -EINVAL;
        goto err;
    }
    if (h.disk_size != b->size) {
        rc = load_resized(b, &h, (uint64_t)st.st_size, &rec);
        if (rc < 0)
            goto err;
    } else {
        if (h.word_bytes != b->nwords * 8) {
            rc = -EINVAL;
            goto err;
        }
        if ((uint64_t)st.st_size != total) {  /* torn: repair the length */
            if (ftruncate(b->fd, (off_t)total) < 0) {
                rc = -errno;
                goto err;
            }
            rec = 2;
        }
        rc = reserve(b->fd, total);
        if (rc < 0)
            goto err;
        rc = map_file(b);
        if (rc < 0)
            goto err;
        if (h.flags & F_IN_USE)
            rec = 1;
        else if (rec == 0)
            rec = words_trusted(b, &h);
        if (rec != 0)
            fill(b, 1);
    }
    header(b)->flags |= F_IN_USE;
    rc = sync_range(b, 0, (size_t)HDR_SIZE);
    if (rc < 0) {
        munmap(b->map, b->map_len);
        goto err;
    }
    if (recovered != NULL)
        *recovered = rec;
    return 0;

err:
    close(b->fd);
    return rc;
}

/* ---- public API ----------------------------------------------------------- */

int fl_bitmap_open(const char *path, uint64_t size, uint64_t granularity,
                   int create, fl_bitmap **out, int *recovered)
{
    fl_bitmap *b;
    int rc;

    if (out == NULL)
        return -EINVAL;
    *out = NULL;
    if (recovered != NULL)
        *recovered = 0;
    b = calloc(1, sizeof(*b));
    if (b == NULL)
        return -ENOMEM;
    rc = geometry(b, size, granularity);
    if (rc < 0)
        goto err;
    b->refs = 1;
    b->armed = 1;   /* open leaves IN_USE durable; transient: always */
    b->fd = -1;
    if (path == NULL) {
        void *m;
        b->map_len = (size_t)(b->nwords > 0 ? b->nwords * 8 : 8);
        m = mmap(NULL, b->map_len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            rc = -errno;
            goto err;
        }
        b->map = m;
        b->words = m;
    } else {
        rc = create ? create_file(b, path) : load_file(b, path, recovered);
        if (rc < 0)
            goto err;
    }
    pthread_mutex_init(&b->arm_lock, NULL);
    *out = b;
    return 0;

err:
    free(b);
    return rc;
}

void fl_bitmap_close(fl_bitmap *b, int clean)
{
    if (b == NULL)
        return;
    __atomic_store_n(&b->clean, clean != 0, __ATOMIC_RELEASE);
    fl__bitmap_unref(b);
}

void fl_bitmap_ref(fl_bitmap *b)
{
    fl__bitmap_ref(b);
}

void fl_bitmap_unref(fl_bitmap *b)
{
    if (b != NULL)
        fl__bitmap_unref(b);
}

uint64_t fl_bitmap_size(const fl_bitmap *b)
{
    return b->size;
}

uint64_t fl_bitmap_granularity(const fl_bitmap *b)
{
    return b->gran;
}

int fl_bitmap_sync(fl_bitmap *b)
{
    return b->fd >= 0 ? sync_words(b) : 0;
}

int fl_bitmap_mark_clean(fl_bitmap *b)
{
    struct hdr *h;
    int rc, was;

    if (b == NULL)
        return -EINVAL;
    if (b->fd < 0)
        return 0;
    rc = sync_words(b);        /* the bulk, outside the lock */
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&b->arm_lock);
    was = __atomic_exchange_n(&b->armed, 0, __ATOMIC_SEQ_CST);   /* M1 */
    rc = sync_words(b);        /* what changed since the first one */
    if (rc == 0) {
        h = header(b);
        h->checksum = fnv1a(b);                                  /* M2 */
        h->flags &= ~F_IN_USE;
        rc = sync_header(b);
        if (rc < 0) {          /* the durable header is unknown now */
            h->flags |= F_IN_USE;
            was = sync_header(b) == 0;
        }
    }
    if (rc < 0 && was)         /* IN_USE is durable: no re-arm needed */
        __atomic_store_n(&b->armed, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&b->arm_lock);
    return rc;
}

int fl__bitmap_mark(fl_bitmap *b, uint64_t off, uint64_t len)
{
    /* Callers checked off + len <= size (hot path: no re-check). */
    if (len == 0)
        return 0;
    set_bits(b, off >> b->shift, ((off + len - 1) >> b->shift) + 1);
    return after_change(b);
}

void fl__bitmap_test_shadow(fl_bitmap *b, uint8_t *shadow)
{
    b->shadow = shadow;
}

int fl_bitmap_set(fl_bitmap *b, uint64_t off, uint64_t len)
{
    int rc = fl__range_ok(off, len, b->size);

    return rc < 0 ? rc : fl__bitmap_mark(b, off, len);
}

int fl_bitmap_reset(fl_bitmap *b, uint64_t off, uint64_t len)
{
    int rc = fl__range_ok(off, len, b->size);
    uint64_t end, g0, g1;

    if (rc < 0 || len == 0)
        return rc;
    end = off + len;
    g0 = (off >> b->shift) + ((off & (b->gran - 1)) != 0);
    g1 = end == b->size ? b->nbits : end >> b->shift;
    if (g0 >= g1)
        return 0;
    clear_bits(b, g0, g1);
    return after_change(b);
}

int fl_bitmap_clear(fl_bitmap *b)
{
    fill(b, 0);
    return after_change(b);
}

int fl_bitmap_set_all(fl_bitmap *b)
{
    fill(b, 1);
    return after_change(b);
}

int fl_bitmap_merge(fl_bitmap *dst, const fl_bitmap *src)
{
    if (dst == NULL || src == NULL || dst->size != src->size ||
        dst->gran != src->gran)
        return -EINVAL;
    if (dst == src)
        return 0;
    for (uint64_t i = 0; i < dst->nwords; i++) {
        uint64_t w = wload(src, i);
        if ((w & ~wload_sc(dst, i)) != 0)
            __atomic_fetch_or(&dst->words[i], w, __ATOMIC_SEQ_CST);
    }
    return after_change(dst);
}

void fl__bitmap_copy_bits(fl_bitmap *dst, const fl_bitmap *src)
{
    for (uint64_t i = 0; i < dst->nwords; i++)
        __atomic_store_n(&dst->words[i], wload(src, i), __ATOMIC_SEQ_CST);
    /* DST is cbw.c's transient frozen copy, for which this is a load;
     * were it persistent, a failed re-arm would leave armed = 0 and the
     * next change would retry. */
    (void)after_change(dst);
}

int fl_bitmap_copy(const fl_bitmap *src, fl_bitmap **out)
{
    int rc;

    if (src == NULL || out == NULL)
        return -EINVAL;
    rc = fl_bitmap_open(NULL, src->size, src->gran, 0, out, NULL);
    if (rc == 0)
        fl__bitmap_copy_bits(*out, src);
    return rc;
}

uint64_t fl_bitmap_count(const fl_bitmap *b)
{
    uint64_t n = 0;

    for (uint64_t i = 0; i < b->nwords; i++)
        n += (uint64_t)__builtin_popcountll(wload(b, i));
    n <<= b->shift;
    /* The last granule is clamped to the disk end. */
    if (b->nbits > 0 && get_bit(b, b->nbits - 1))
        n -= (b->nbits << b->shift) - b->size;
    return n;
}

int fl__bitmap_next_run(const fl_bitmap *b, uint64_t from, uint64_t *off,
                        uint64_t *end)
{
    uint64_t g0, g1;

    if (from >= b->size)
        return 0;
    g0 = find_bit(b, from >> b->shift, 1);
    if (g0 >= b->nbits)
        return 0;
    g1 = find_bit(b, g0, 0);
    *off = g0 << b->shift;
    *end = g1 >= b->nbits ? b->size : g1 << b->shift;
    return 1;
}

int fl_bitmap_extents(fl_bitmap *b, uint64_t off, uint64_t len,
                      uint64_t *lens, uint32_t *flags, size_t max, size_t *n)
{
    struct fl__ext e = { lens, flags, max, 0 };
    uint64_t end;

    if (n == NULL || off > b->size)
        return -EINVAL;
    end = len > b->size - off ? b->size : off + len;  /* clamp */
    if (end > off && (max == 0 || lens == NULL || flags == NULL))
        return -EINVAL;
    while (off < end) {
        uint64_t g = off >> b->shift, stop;
        int bit = get_bit(b, g);
        uint64_t g1 = find_bit(b, g + 1, !bit);

        stop = g1 >= b->nbits ? b->size : g1 << b->shift;
        if (stop > end)
            stop = end;
        if (fl__ext_add(&e, stop - off, bit ? FL_EXT_DIRTY : 0))
            break;
        off = stop;
    }
    *n = e.n;
    return 0;
}
