/* Unit tests of native/src/bitmap.c and its hooks in file.c and cbw.c:
 * set/reset/extents edge cases against a reference model, the persistent
 * format (round trip, in-use recovery, checksum, torn files), clean marks
 * (re-arm on the next change; a crash-at-a-random-point stress with
 * concurrent writers, checked both as a process crash and as a power
 * cut), attachment to the guest write path, and checkpoints in
 * fl_session_open (the consistent cut, with concurrent writers). */
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "check.h"
#include "fleeced.h"
#include "internal.h"    /* fl__bitmap_test_shadow */

#define G   ((uint64_t)65536)
#define SZ  (5 * G + 1000)           /* 6 granules, the last one short */

struct ext { uint64_t len; uint32_t flags; };

static size_t extents(fl_bitmap *b, uint64_t off, uint64_t len,
                      struct ext *out, size_t max)
{
    uint64_t lens[64];
    uint32_t flags[64];
    size_t n = 99;

    CHECK(max <= 64);
    CHECK_RC(fl_bitmap_extents(b, off, len, lens, flags, max, &n), 0);
    for (size_t i = 0; i < n; i++) {
        out[i].len = lens[i];
        out[i].flags = flags[i];
    }
    return n;
}

static void tmp_path(char *path, const char *name)
{
    snprintf(path, 4096, "%s/fleeced-bm-%d-%s", test_tmpdir(), (int)getpid(),
             name);
    unlink(path);
}

static void test_args(void)
{
    fl_bitmap *b = (fl_bitmap *)1;
    int rec = 7;

    CHECK_RC(fl_bitmap_open(NULL, SZ, 0, 0, &b, &rec), -EINVAL);
    CHECK(b == NULL && rec == 0);
    CHECK_RC(fl_bitmap_open(NULL, SZ, 256, 0, &b, NULL), -EINVAL);
    CHECK_RC(fl_bitmap_open(NULL, SZ, 3 * 4096, 0, &b, NULL), -EINVAL);
    CHECK_RC(fl_bitmap_open(NULL, SZ, (uint64_t)2 << 30, 0, &b, NULL), -EINVAL);
    CHECK_RC(fl_bitmap_open(NULL, (uint64_t)INT64_MAX + 1, G, 0, &b, NULL),
             -EINVAL);
    CHECK_RC(fl_bitmap_open(NULL, SZ, G, 0, NULL, NULL), -EINVAL);
    /* 2^63 bytes at 512 B: 2^51 bytes of bits, refused, never a crash. */
    CHECK(fl_bitmap_open(NULL, (uint64_t)INT64_MAX, 512, 0, &b, NULL) < 0);
    CHECK_RC(fl_bitmap_open(NULL, 0, G, 0, &b, NULL), 0);   /* empty disk */
    CHECK(fl_bitmap_count(b) == 0);
    CHECK_RC(fl_bitmap_set(b, 0, 0), 0);
    CHECK_RC(fl_bitmap_set(b, 0, 1), -EINVAL);
    fl_bitmap_set_all(b);
    CHECK(fl_bitmap_count(b) == 0);
    fl_bitmap_close(b, 1);
}

static void test_set_reset_extents(void)
{
    fl_bitmap *b, *c;
    struct ext e[64];
    size_t n;

    CHECK_RC(fl_bitmap_open(NULL, SZ, G, 0, &b, NULL), 0);
    CHECK(fl_bitmap_size(b) == SZ && fl_bitmap_granularity(b) == G);
    CHECK(fl_bitmap_count(b) == 0);
    n = extents(b, 0, SZ, e, 64);
    CHECK(n == 1 && e[0].len == SZ && e[0].flags == 0);

    /* Unaligned, one byte: its granule. */
    CHECK_RC(fl_bitmap_set(b, 1, 1), 0);
    CHECK(fl_bitmap_count(b) == G);
    n = extents(b, 0, SZ, e, 64);
    CHECK(n == 2 && e[0].len == G && e[0].flags == FL_EXT_DIRTY &&
          e[1].len == SZ - G && e[1].flags == 0);
    /* Spanning a granule boundary by two bytes: both granules. */
    CHECK_RC(fl_bitmap_set(b, 3 * G - 1, 2), 0);
    CHECK(fl_bitmap_count(b) == 3 * G);
    /* Last odd granule, counted clamped to the disk end. */
    CHECK_RC(fl_bitmap_set(b, SZ - 1, 1), 0);
    CHECK(fl_bitmap_count(b) == 3 * G + 1000);
    n = extents(b, 0, SZ, e, 64);
    CHECK(n == 5);
    CHECK(e[0].len == G && e[0].flags == 1);
    CHECK(e[1].len == G && e[1].flags == 0);
    CHECK(e[2].len == 2 * G && e[2].flags == 1);
    CHECK(e[3].len == G && e[3].flags == 0);
    CHECK(e[4].len == 1000 && e[4].flags == 1);
    /* From an unaligned offset, runs start at OFF. */
    n = extents(b, 100, 2 * G, e, 64);
    CHECK(n == 3 && e[0].len == G - 100 && e[1].len == G &&
          e[2].len == 100 && e[2].flags == 1);
    /* Huge lengths are clamped to the disk end. */
    n = extents(b, 5 * G + 10, UINT64_MAX, e, 64);
    CHECK(n == 1 && e[0].len == 990 && e[0].flags == 1);
    n = extents(b, 4 * G, (uint64_t)4 << 30, e, 64);
    CHECK(n == 2 && e[0].len == G && e[1].len == 1000);
    n = extents(b, SZ, 10, e, 64);                 /* at the end: nothing */
    CHECK(n == 0);
    {
        uint64_t l[1];
        uint32_t f[1];
        size_t k;
        CHECK_RC(fl_bitmap_extents(b, SZ + 1, 1, l, f, 1, &k), -EINVAL);
        CHECK_RC(fl_bitmap_extents(b, 0, 1, l, f, 0, &k), -EINVAL);
        CHECK_RC(fl_bitmap_extents(b, 0, 1, l, f, 1, NULL), -EINVAL);
    }
    /* Max extents: the answer ends early, contiguous from OFF. */
    n = extents(b, 0, SZ, e, 2);
    CHECK(n == 2 && e[0].len == G && e[1].len == G && e[1].flags == 0);
    n = extents(b, 0, SZ, e, 1);
    CHECK(n == 1 && e[0].len == G);

    /* Range checks. */
    CHECK_RC(fl_bitmap_set(b, SZ, 1), -EINVAL);
    CHECK_RC(fl_bitmap_set(b, UINT64_MAX, 2), -EINVAL);
    CHECK_RC(fl_bitmap_set(b, 1, UINT64_MAX), -EINVAL);
    CHECK_RC(fl_bitmap_reset(b, SZ - 1, 2), -EINVAL);

    /* Reset clears whole granules only. */
    CHECK_RC(fl_bitmap_reset(b, 1, G), 0);          /* granule 0 partly */
    CHECK(fl_bitmap_count(b) == 3 * G + 1000);
    CHECK_RC(fl_bitmap_reset(b, 0, G), 0);          /* granule 0 whole */
    CHECK(fl_bitmap_count(b) == 2 * G + 1000);
    CHECK_RC(fl_bitmap_reset(b, 2 * G + 1, 2 * G), 0); /* 3 whole, 2/4 not */
    CHECK(fl_bitmap_count(b) == G + 1000);
    CHECK_RC(fl_bitmap_reset(b, 5 * G + 1, 999), 0); /* tail, not whole */
    CHECK(fl_bitmap_count(b) == G + 1000);
    CHECK_RC(fl_bitmap_reset(b, 5 * G, 1000), 0);    /* tail, to the end */
    CHECK(fl_bitmap_count(b) == G);
    CHECK_RC(fl_bitmap_reset(b, 0, 0), 0);

    fl_bitmap_set_all(b);
    CHECK(fl_bitmap_count(b) == SZ);
    n = extents(b, 0, SZ, e, 64);
    CHECK(n == 1 && e[0].len == SZ && e[0].flags == 1);
    CHECK_RC(fl_bitmap_copy(b, &c), 0);
    CHECK(fl_bitmap_count(c) == SZ);
    fl_bitmap_clear(b);
    CHECK(fl_bitmap_count(b) == 0 && fl_bitmap_count(c) == SZ);
    CHECK_RC(fl_bitmap_merge(b, c), 0);
    CHECK(fl_bitmap_count(b) == SZ);
    CHECK_RC(fl_bitmap_merge(b, b), 0);
    fl_bitmap_close(c, 0);
    CHECK_RC(fl_bitmap_open(NULL, SZ, G / 2, 0, &c, NULL), 0);
    CHECK_RC(fl_bitmap_merge(b, c), -EINVAL);        /* granularity */
    fl_bitmap_close(c, 0);
    CHECK_RC(fl_bitmap_open(NULL, SZ + 1, G, 0, &c, NULL), 0);
    CHECK_RC(fl_bitmap_merge(c, b), -EINVAL);        /* size */
    fl_bitmap_close(c, 0);
    fl_bitmap_close(b, 0);
}

/* Random set/reset/merge against a byte-per-granule model, with word
 * boundaries (64 granules) crossed: 512 B granules, 300 granules. */
static void test_model(void)
{
    const uint64_t g = 512, size = 299 * 512 + 7;
    const uint64_t ng = 300;
    uint8_t model[300], model2[300];
    fl_bitmap *b, *o;
    unsigned seed = 12345;

    CHECK_RC(fl_bitmap_open(NULL, size, g, 0, &b, NULL), 0);
    CHECK_RC(fl_bitmap_open(NULL, size, g, 0, &o, NULL), 0);
    memset(model, 0, sizeof(model));
    memset(model2, 0, sizeof(model2));
    for (int it = 0; it < 4000; it++) {
        uint64_t off = (uint64_t)rand_r(&seed) % size;
        uint64_t len = (uint64_t)rand_r(&seed) % (size - off + 1);
        int op = rand_r(&seed) % 10;

        if (rand_r(&seed) % 4 == 0)
            len = (uint64_t)rand_r(&seed) % 1500;
        if (off + len > size)
            len = size - off;
        if (op < 5) {
            CHECK_RC(fl_bitmap_set(b, off, len), 0);
            for (uint64_t x = off; x < off + len; x++)
                model[x / g] = 1;
        } else if (op < 9) {
            uint64_t g0 = (off + g - 1) / g;
            uint64_t g1 = off + len == size ? ng : (off + len) / g;
            CHECK_RC(fl_bitmap_reset(b, off, len), 0);
            for (uint64_t x = g0; len > 0 && x < g1; x++)
                model[x] = 0;
        } else {
            CHECK_RC(fl_bitmap_set(o, off, len), 0);
            for (uint64_t x = off; x < off + len; x++)
                model2[x / g] = 1;
            CHECK_RC(fl_bitmap_merge(b, o), 0);
            for (uint64_t x = 0; x < ng; x++)
                model[x] |= model2[x];
        }
        if (it % 7 == 0 || it > 3990) {
            /* count */
            uint64_t want = 0;
            for (uint64_t x = 0; x < ng; x++)
                if (model[x])
                    want += x + 1 == ng ? size - x * g : g;
            CHECK(fl_bitmap_count(b) == want);
            /* extents of a random window, compared byte run by run */
            uint64_t woff = (uint64_t)rand_r(&seed) % size;
            uint64_t wlen = (uint64_t)rand_r(&seed) % (2 * size);
            struct ext e[64];
            size_t n = extents(b, woff, wlen, e, 64);
            uint64_t pos = woff, wend = woff + wlen > size ? size : woff + wlen;
            CHECK(n >= 1);
            for (size_t i = 0; i < n; i++) {
                CHECK(e[i].len > 0);
                if (i > 0)
                    CHECK(e[i].flags != e[i - 1].flags);    /* merged */
                for (uint64_t x = pos; x < pos + e[i].len;
                     x = (x / g + 1) * g)
                    CHECK(model[x / g] == e[i].flags);
                pos += e[i].len;
            }
            CHECK(pos == wend || n == 64);
            if (pos < wend)
                CHECK(model[pos / g] != e[n - 1].flags);
        }
    }
    fl_bitmap_close(o, 0);
    fl_bitmap_close(b, 0);
}

/* ---- persistence -------------------------------------------------------- */

struct hdr_view {
    char magic[8];
    uint32_t version, hdr_size;
    uint64_t disk_size, granularity, flags, checksum, word_bytes;
};

static void read_hdr(const char *path, struct hdr_view *h)
{
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    CHECK(pread(fd, h, sizeof(*h), 0) == (ssize_t)sizeof(*h));
    close(fd);
}

static uint64_t file_fnv(const char *path, uint64_t bytes)
{
    uint8_t *buf = malloc(bytes);
    uint64_t h = 0xcbf29ce484222325ull;
    int fd = open(path, O_RDONLY);

    CHECK(fd >= 0 && buf != NULL);
    CHECK(pread(fd, buf, bytes, 4096) == (ssize_t)bytes);
    for (uint64_t i = 0; i < bytes; i++) {
        h ^= buf[i];
        h *= 0x100000001b3ull;
    }
    close(fd);
    free(buf);
    return h;
}

static void test_persist(void)
{
    char path[4096];
    struct hdr_view h;
    fl_bitmap *b, *b2;
    struct stat st;
    int rec = -1, fd;

    tmp_path(path, "persist");
    CHECK_RC(fl_bitmap_open(path, SZ, G, 1, &b, &rec), 0);
    CHECK(rec == 0);
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600 &&
          st.st_size == 4096 + 8);
    read_hdr(path, &h);
    CHECK(memcmp(h.magic, "FLDIRTY", 8) == 0 && h.version == 1 &&
          h.hdr_size == 4096 && h.disk_size == SZ && h.granularity == G &&
          h.flags == 1 && h.word_bytes == 8);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 1, &b2, NULL), -EEXIST);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b2, NULL), -EBUSY);
    CHECK_RC(fl_bitmap_set(b, G, 1), 0);
    CHECK_RC(fl_bitmap_set(b, SZ - 1, 1), 0);
    CHECK_RC(fl_bitmap_sync(b), 0);
    fl_bitmap_close(b, 1);
    read_hdr(path, &h);
    CHECK(h.flags == 0 && h.checksum == file_fnv(path, 8));

    /* Round trip. */
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), 0);
    CHECK(rec == 0 && fl_bitmap_count(b) == G + 1000);
    read_hdr(path, &h);
    CHECK(h.flags == 1);                  /* in use from open on */
    /* Killed with it open (not clean): all dirty next time. */
    fl_bitmap_close(b, 0);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), 0);
    CHECK(rec == 1 && fl_bitmap_count(b) == SZ);
    fl_bitmap_clear(b);
    CHECK_RC(fl_bitmap_set(b, 0, 1), 0);
    fl_bitmap_close(b, 1);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), 0);
    CHECK(rec == 0 && fl_bitmap_count(b) == G);
    fl_bitmap_close(b, 1);

    /* Checksum mismatch: a flipped bit. */
    fd = open(path, O_RDWR);
    CHECK(fd >= 0 && pwrite(fd, "\x04", 1, 4096) == 1);
    close(fd);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), 0);
    CHECK(rec == 2 && fl_bitmap_count(b) == SZ);
    fl_bitmap_close(b, 1);
    /* Bits past the last granule (checksum recomputed to match). */
    fd = open(path, O_RDWR);
    CHECK(fd >= 0 && pwrite(fd, "\xff\xff", 2, 4096) == 2);
    close(fd);
    {
        uint64_t sum = file_fnv(path, 8);
        fd = open(path, O_RDWR);
        CHECK(pwrite(fd, &sum, 8, 40) == 8);
        close(fd);
    }
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), 0);
    CHECK(rec == 2 && fl_bitmap_count(b) == SZ);
    fl_bitmap_close(b, 1);

    /* Torn length, header intact: repaired, all dirty. */
    CHECK(truncate(path, 4096 + 3) == 0);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), 0);
    CHECK(rec == 2 && fl_bitmap_count(b) == SZ);
    CHECK(stat(path, &st) == 0 && st.st_size == 4096 + 8);
    fl_bitmap_close(b, 1);
    CHECK(truncate(path, 4096) == 0);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), 0);
    CHECK(rec == 2);
    fl_bitmap_close(b, 1);

    /* Not ours: -EINVAL, file untouched. */
    CHECK_RC(fl_bitmap_open(path, SZ, G * 2, 0, &b, &rec), -EINVAL);
    fd = open(path, O_RDWR);
    CHECK(pwrite(fd, "X", 1, 0) == 1);
    close(fd);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), -EINVAL);
    CHECK(truncate(path, 100) == 0);                /* short header */
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), -EINVAL);
    CHECK(truncate(path, 0) == 0);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), -EINVAL);
    unlink(path);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &b, &rec), -ENOENT);
    CHECK_RC(fl_bitmap_open(test_tmpdir(), SZ, G, 0, &b, &rec), -EISDIR);
    /* A larger one: several words, pages. */
    CHECK_RC(fl_bitmap_open(path, (uint64_t)1 << 40, G, 1, &b, &rec), 0);
    CHECK_RC(fl_bitmap_set(b, ((uint64_t)1 << 40) - 1, 1), 0);
    CHECK_RC(fl_bitmap_set(b, 12345678, 99999999), 0);
    fl_bitmap_close(b, 1);
    CHECK_RC(fl_bitmap_open(path, (uint64_t)1 << 40, G, 0, &b, &rec), 0);
    CHECK(rec == 0);
    CHECK(fl_bitmap_count(b) == G + (((12345678 + 99999999 - 1) / G) -
                                     12345678 / G + 1) * G);
    fl_bitmap_close(b, 1);
    unlink(path);
}

/* The dirty granules of B, one bit each (at most 64 granules). */
static uint64_t dirty_mask(fl_bitmap *b)
{
    uint64_t gran = fl_bitmap_granularity(b), size = fl_bitmap_size(b), m = 0;
    struct ext e[1];

    CHECK(size <= 64 * gran);
    for (uint64_t g = 0; g * gran < size; g++) {
        CHECK(extents(b, g * gran, 1, e, 1) == 1);
        if (e[0].flags)
            m |= (uint64_t)1 << g;
    }
    return m;
}

/* A disk resized while no daemon had its bitmap open (qemu-img resize):
 * the bitmap follows it, keeping the bits of the common part, with every
 * granule that covers bytes past the old end dirty; never smaller. */
static void test_resize(void)
{
    char path[4096];
    struct hdr_view h;
    struct stat st;
    fl_bitmap *b;
    int rec = -1, fd;
    const uint64_t s1 = 5 * G + 1000;          /* granules 0..5, 5 short */

    tmp_path(path, "resize");
    CHECK_RC(fl_bitmap_open(path, s1, G, 1, &b, &rec), 0);
    CHECK_RC(fl_bitmap_set(b, G, 1), 0);       /* granule 1 */
    CHECK_RC(fl_bitmap_set(b, 3 * G, G), 0);   /* granule 3 */
    fl_bitmap_close(b, 1);

    /* Grown to 40 granules: 1 and 3 kept; 5 (its tail is new) to 39 set. */
    CHECK_RC(fl_bitmap_open(path, 40 * G, G, 0, &b, &rec), 0);
    CHECK(rec == 3);
    CHECK(dirty_mask(b) == ((1u << 1) | (1u << 3) | (((uint64_t)1 << 40) - (1u << 5))));
    read_hdr(path, &h);
    CHECK(h.disk_size == 40 * G && h.word_bytes == 8 && h.flags == 1);
    fl_bitmap_close(b, 1);
    /* The resized file is a plain bitmap of the new size now. */
    CHECK_RC(fl_bitmap_open(path, 40 * G, G, 0, &b, &rec), 0);
    CHECK(rec == 0 && fl_bitmap_count(b) == 37 * G);
    CHECK_RC(fl_bitmap_reset(b, 0, 40 * G), 0);
    CHECK_RC(fl_bitmap_set(b, 2 * G, 1), 0);
    CHECK_RC(fl_bitmap_set(b, 30 * G, 1), 0);
    fl_bitmap_close(b, 1);

    /* Grown past one word: 65..129 granules, the new words dirty. */
    CHECK_RC(fl_bitmap_open(path, 130 * G, G, 0, &b, &rec), 0);
    CHECK(rec == 3 && fl_bitmap_count(b) == 2 * G + 90 * G);
    CHECK(stat(path, &st) == 0 && st.st_size == 4096 + 3 * 8);
    fl_bitmap_close(b, 1);

    /* Shrunk to 10.5 granules: what lies past the end goes, the rest stays. */
    CHECK_RC(fl_bitmap_open(path, 10 * G + G / 2, G, 0, &b, &rec), 0);
    CHECK(rec == 3 && dirty_mask(b) == (1u << 2));
    CHECK(stat(path, &st) == 0 && st.st_size == 4096 + 8);
    fl_bitmap_close(b, 1);
    CHECK_RC(fl_bitmap_open(path, 10 * G + G / 2, G, 0, &b, &rec), 0);
    CHECK(rec == 0 && dirty_mask(b) == (1u << 2));

    /* Left in use (a crash), then resized: all dirty. */
    fl_bitmap_close(b, 0);
    CHECK_RC(fl_bitmap_open(path, 20 * G, G, 0, &b, &rec), 0);
    CHECK(rec == 1 && fl_bitmap_count(b) == 20 * G);
    fl_bitmap_clear(b);
    fl_bitmap_close(b, 1);

    /* A bad checksum, then resized: all dirty. */
    fd = open(path, O_RDWR);
    CHECK(fd >= 0 && pwrite(fd, "\x01", 1, 4096) == 1);
    close(fd);
    CHECK_RC(fl_bitmap_open(path, 30 * G, G, 0, &b, &rec), 0);
    CHECK(rec == 2 && fl_bitmap_count(b) == 30 * G);
    fl_bitmap_clear(b);
    fl_bitmap_close(b, 1);

    /* A torn file (length wrong for its own size), then resized: all dirty. */
    CHECK(truncate(path, 4096 + 4) == 0);
    CHECK_RC(fl_bitmap_open(path, 3 * G, G, 0, &b, &rec), 0);
    CHECK(rec == 2 && fl_bitmap_count(b) == 3 * G);
    CHECK(stat(path, &st) == 0 && st.st_size == 4096 + 8);
    fl_bitmap_close(b, 1);

    /* Resized to nothing and back. */
    CHECK_RC(fl_bitmap_open(path, 0, G, 0, &b, &rec), 0);
    CHECK(rec == 3 && fl_bitmap_count(b) == 0);
    fl_bitmap_close(b, 1);
    CHECK_RC(fl_bitmap_open(path, 2 * G, G, 0, &b, &rec), 0);
    CHECK(rec == 3 && fl_bitmap_count(b) == 2 * G);
    fl_bitmap_close(b, 1);
    unlink(path);
}

/* ---- clean marks --------------------------------------------------------- */

static uint64_t hdr_flags(const char *path)
{
    struct hdr_view h;

    read_hdr(path, &h);
    return h.flags;
}

/* Every granule of A that is dirty is dirty in B, and the counts match. */
static void same_bits(fl_bitmap *a, fl_bitmap *b)
{
    uint64_t gran = fl_bitmap_granularity(a), size = fl_bitmap_size(a);
    struct ext ea[64], eb[64];

    CHECK(fl_bitmap_count(a) == fl_bitmap_count(b));
    for (uint64_t off = 0; off < size; off += gran) {
        CHECK(extents(a, off, 1, ea, 1) == 1 && extents(b, off, 1, eb, 1) == 1);
        CHECK(ea[0].flags == eb[0].flags);
    }
}

/* Reopen PATH after a "crash" (the owner closed it not clean): return
 * *recovered, the bitmap in *OUT. */
static int reopen(const char *path, fl_bitmap **out)
{
    int rec = -1;

    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, out, &rec), 0);
    return rec;
}

static void test_mark_clean(void)
{
    char path[4096], img[4096];
    fl_bitmap *b, *c, *t;
    fl_file *f;
    uint8_t *shadow;
    uint8_t buf[16] = { 0 };
    struct hdr_view h;

    /* Transient: a no-op. */
    CHECK_RC(fl_bitmap_open(NULL, SZ, G, 0, &t, NULL), 0);
    CHECK_RC(fl_bitmap_set(t, 0, 1), 0);
    CHECK_RC(fl_bitmap_mark_clean(t), 0);
    CHECK(fl_bitmap_count(t) == G);
    CHECK_RC(fl_bitmap_mark_clean(NULL), -EINVAL);

    tmp_path(path, "markclean");
    CHECK_RC(fl_bitmap_open(path, SZ, G, 1, &b, NULL), 0);
    CHECK_RC(fl_bitmap_set(b, G, 1), 0);
    CHECK_RC(fl_bitmap_set(b, SZ - 1, 1), 0);
    CHECK_RC(fl_bitmap_mark_clean(b), 0);
    read_hdr(path, &h);
    CHECK(h.flags == 0 && h.checksum == file_fnv(path, 8));
    CHECK_RC(fl_bitmap_mark_clean(b), 0);             /* idempotent */
    CHECK(hdr_flags(path) == 0);
    CHECK_RC(fl_bitmap_copy(b, &c), 0);
    /* Crash with no change since: clean, same bits. */
    fl_bitmap_close(b, 0);
    CHECK(reopen(path, &b) == 0);
    same_bits(b, c);
    CHECK(hdr_flags(path) == 1);                      /* open re-marks */

    /* A change after it re-arms before returning; a crash: all dirty. */
    CHECK_RC(fl_bitmap_mark_clean(b), 0);
    CHECK(hdr_flags(path) == 0);
    CHECK_RC(fl_bitmap_set(b, 0, 1), 0);
    CHECK(hdr_flags(path) == 1);
    fl_bitmap_close(b, 0);
    CHECK(reopen(path, &b) == 1 && fl_bitmap_count(b) == SZ);

    /* Marked again after the change: the change is in, clean again. */
    fl_bitmap_clear(b);
    CHECK_RC(fl_bitmap_set(b, 2 * G, 1), 0);
    CHECK_RC(fl_bitmap_mark_clean(b), 0);
    CHECK_RC(fl_bitmap_set(b, 3 * G, 1), 0);
    CHECK_RC(fl_bitmap_mark_clean(b), 0);
    fl_bitmap_close(b, 0);
    CHECK(reopen(path, &b) == 0 && fl_bitmap_count(b) == 2 * G);

    /* Every bit-changing call re-arms, and the durable header (the
     * shadow: what the msyncs wrote) has IN_USE when it returns.  A set
     * that finds its bit already set re-arms too (bitmap.c "Clean
     * mark": the bit may be another writer's unarmed change). */
    shadow = calloc(1, 4096 + 8);
    CHECK(shadow != NULL);
    fl__bitmap_test_shadow(b, shadow);
    for (int op = 0; op < 7; op++) {
        CHECK_RC(fl_bitmap_mark_clean(b), 0);
        CHECK(hdr_flags(path) == 0);
        memcpy(&h, shadow, sizeof(h));
        CHECK(h.flags == 0 && memcmp(h.magic, "FLDIRTY", 8) == 0);
        switch (op) {
        case 0: CHECK_RC(fl_bitmap_set(b, 2 * G, 1), 0); break;  /* was set */
        case 1: CHECK_RC(fl_bitmap_set(b, 4 * G, 1), 0); break;
        case 2: CHECK_RC(fl_bitmap_reset(b, 4 * G, G), 0); break;
        case 3: CHECK_RC(fl_bitmap_set_all(b), 0); break;
        case 4: CHECK_RC(fl_bitmap_clear(b), 0); break;
        case 5: CHECK_RC(fl_bitmap_merge(b, c), 0); break;
        case 6: CHECK_RC(fl_bitmap_merge(b, c), 0); break;  /* no change */
        }
        CHECK(hdr_flags(path) == 1);
        memcpy(&h, shadow, sizeof(h));
        CHECK(h.flags == 1);
    }
    /* Bits set before the mark are in the durable words. */
    CHECK_RC(fl_bitmap_mark_clean(b), 0);
    memcpy(&h, shadow, sizeof(h));
    CHECK(h.flags == 0 && h.checksum == file_fnv(path, 8) &&
          memcmp(shadow + 4096, &(uint64_t){ 0x22 }, 8) == 0);
    fl__bitmap_test_shadow(b, NULL);
    free(shadow);
    CHECK_RC(fl_bitmap_set(b, 5 * G, 1000), 0);      /* re-armed */
    fl_bitmap_close(b, 1);                            /* clean close */
    CHECK(reopen(path, &b) == 0 && fl_bitmap_count(b) == G + 1000);

    /* Attached: a guest write after the mark re-arms before its ack; a
     * write that lands nowhere new still re-arms; detach + mark is the
     * detach path. */
    make_image(img, SZ, NULL);
    CHECK_RC(fl_file_open(img, 0, &f), 0);
    CHECK_RC(fl_file_bitmap_attach(f, b), 0);
    CHECK_RC(fl_bitmap_mark_clean(b), 0);
    CHECK(hdr_flags(path) == 0);
    CHECK_RC(fl_file_write(f, buf, sizeof(buf), 0, 0), 0);
    CHECK(hdr_flags(path) == 1);
    CHECK_RC(fl_file_flush(f), 0);
    CHECK_RC(fl_bitmap_mark_clean(b), 0);
    CHECK(hdr_flags(path) == 0);
    CHECK_RC(fl_file_zero(f, 0, 16, 0), 0);           /* granule 0: set */
    CHECK(hdr_flags(path) == 1);
    CHECK_RC(fl_file_bitmap_detach(f, b), 0);
    CHECK_RC(fl_bitmap_mark_clean(b), 0);
    CHECK_RC(fl_file_write(f, buf, sizeof(buf), 2 * G, 0), 0); /* detached */
    CHECK(hdr_flags(path) == 0);
    fl_file_close(f);
    fl_bitmap_close(b, 0);
    CHECK(reopen(path, &b) == 0 && fl_bitmap_count(b) == 2 * G + 1000);
    fl_bitmap_close(b, 1);

    fl_bitmap_close(c, 0);
    fl_bitmap_close(t, 0);
    unlink(path);
    unlink(img);
}

/* Crash at a random point: a child process runs writers (random
 * granules, in bursts) and a thread looping fl_bitmap_mark_clean; the
 * parent SIGKILLs it.  Each writer records a granule in shared memory
 * after fl_bitmap_set returned (acknowledged).  Two crash models:
 *  - process crash: the file as the kill left it;
 *  - power cut: the shadow, i.e. for every byte the content it had when
 *    the last msync covering it started (the oldest a kernel could have
 *    written; later writeback could only add newer bytes).
 * Either load must be all dirty, or clean with every acknowledged bit.
 * Even rounds kill during the writes; odd rounds after the writers
 * finished and two more clean marks completed: those must load clean. */
#define SNG   65536                     /* granules: never saturated */
#define SGS   ((uint64_t)4096)
#define SSZ   (SNG * SGS - 100)
#define SNW   4
#define SMAP  (4096 + ((SNG + 63) / 64) * 8)

struct stress_shm {
    uint8_t acked[SNG];
    unsigned ready, writers_done, marks;
    uint8_t shadow[SMAP];
};

struct sw { fl_bitmap *b; struct stress_shm *m; unsigned seed; int ops; };

static void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    nanosleep(&ts, NULL);
}

static void *stress_writer(void *arg)
{
    struct sw *w = arg;

    for (int i = 0; w->ops < 0 || i < w->ops; i++) {
        uint64_t g = (uint64_t)rand_r(&w->seed) % SNG;
        uint64_t n = 1 + (uint64_t)(rand_r(&w->seed) % 16 == 0) * 70;
        uint64_t len;

        if (g + n > SNG)
            n = SNG - g;
        len = g + n == SNG ? SSZ - g * SGS : n * SGS;
        CHECK_RC(fl_bitmap_set(w->b, g * SGS + 1, len - 1), 0);
        for (uint64_t k = g; k < g + n; k++)
            __atomic_store_n(&w->m->acked[k], 1, __ATOMIC_SEQ_CST);
        if (rand_r(&w->seed) % 8 == 0)
            sleep_us(rand_r(&w->seed) % 300);
        if (rand_r(&w->seed) % 64 == 0)
            sleep_us(2000);                      /* a quiet spell */
    }
    __atomic_add_fetch(&w->m->writers_done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void *stress_marker(void *arg)
{
    struct sw *w = arg;

    for (;;) {
        CHECK_RC(fl_bitmap_mark_clean(w->b), 0);
        __atomic_add_fetch(&w->m->marks, 1, __ATOMIC_SEQ_CST);
        if (rand_r(&w->seed) % 4 == 0)
            sleep_us(rand_r(&w->seed) % 500);
    }
    return NULL;
}

static void stress_child(const char *path, struct stress_shm *m,
                         unsigned seed, int ops)
{
    static struct sw w[SNW + 1];
    pthread_t th[SNW + 1];
    fl_bitmap *b;
    int fd;

    CHECK_RC(fl_bitmap_open(path, SSZ, SGS, 1, &b, NULL), 0);
    fd = open(path, O_RDONLY);                   /* what create synced */
    CHECK(fd >= 0 && pread(fd, m->shadow, SMAP, 0) == SMAP);
    close(fd);
    fl__bitmap_test_shadow(b, m->shadow);
    for (int i = 0; i <= SNW; i++) {
        w[i] = (struct sw){ b, m, seed * 31 + (unsigned)i, ops };
        CHECK(pthread_create(&th[i], NULL,
                             i < SNW ? stress_writer : stress_marker,
                             &w[i]) == 0);
    }
    __atomic_store_n(&m->ready, 1, __ATOMIC_SEQ_CST);
    for (;;)
        pause();                                 /* until SIGKILL */
}

/* Load PATH after the crash: 0 when it loaded clean (then every acked
 * granule is dirty), else its *recovered (then it is all dirty). */
static int stress_check(const char *path, const uint8_t *acked)
{
    fl_bitmap *b;
    int rec = -1;

    CHECK_RC(fl_bitmap_open(path, SSZ, SGS, 0, &b, &rec), 0);
    if (rec != 0) {
        CHECK(fl_bitmap_count(b) == SSZ);
    } else {
        struct ext e[1];
        for (uint64_t g = 0; g < SNG; g++)
            if (acked[g])
                CHECK(extents(b, g * SGS, 1, e, 1) == 1 && e[0].flags == 1);
    }
    fl_bitmap_close(b, 0);
    return rec;
}

static void test_mark_clean_crash(void)
{
    unsigned seed = (unsigned)time(NULL);
    int counts[2][3] = { { 0 } };
    struct stress_shm *m;

    fprintf(stderr, "    seed %u\n", seed);
    m = mmap(NULL, sizeof(*m), PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    for (int round = 0; round < 24; round++) {
        char path[4096], cut[4096];
        uint8_t acked[SNG];
        unsigned r = seed + (unsigned)round;
        int quiet = round % 2, st, fd, rp, rc;
        pid_t pid;

        memset(m, 0, sizeof(*m));
        tmp_path(path, "stress");
        tmp_path(cut, "stress-cut");
        pid = fork();
        CHECK(pid >= 0);
        if (pid == 0)
            stress_child(path, m, r, quiet ? 300 : -1);
        while (!__atomic_load_n(&m->ready, __ATOMIC_SEQ_CST))
            sleep_us(100);
        if (quiet) {
            unsigned m0;
            while (__atomic_load_n(&m->writers_done, __ATOMIC_SEQ_CST) < SNW)
                sleep_us(100);
            m0 = __atomic_load_n(&m->marks, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&m->marks, __ATOMIC_SEQ_CST) < m0 + 2)
                sleep_us(100);
        } else {
            sleep_us(1000 + (long)(rand_r(&r) % 30000));
        }
        CHECK(kill(pid, SIGKILL) == 0);
        CHECK(waitpid(pid, &st, 0) == pid);
        CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        memcpy(acked, m->acked, sizeof(acked));

        rc = stress_check(path, acked);             /* process crash */
        fd = open(cut, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        CHECK(fd >= 0 && pwrite(fd, m->shadow, SMAP, 0) == SMAP);
        close(fd);
        rp = stress_check(cut, acked);               /* power cut */
        if (quiet)
            CHECK(rc == 0 && rp == 0);
        counts[0][rc]++;
        counts[1][rp]++;
        unlink(path);
        unlink(cut);
    }
    fprintf(stderr, "    recovered 0/1/2: process crash %d/%d/%d, "
            "power cut %d/%d/%d\n", counts[0][0], counts[0][1],
            counts[0][2], counts[1][0], counts[1][1], counts[1][2]);
    munmap(m, sizeof(*m));
}

/* ---- attachment ------------------------------------------------------------ */

static uint8_t pat(uint64_t i) { return (uint8_t)(i * 7 + 3); }

static void test_attach(void)
{
    char img[4096], path[4096];
    uint8_t buf[4096];
    fl_file *f;
    fl_bitmap *a, *t, *x;
    fl_session *s;
    struct fl_session_params p = { .cluster_size = G,
                                   .temp_dir = test_tmpdir() };
    int rec;

    make_image(img, SZ, pat);
    tmp_path(path, "attach");
    CHECK_RC(fl_file_open(img, 0, &f), 0);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 1, &a, NULL), 0);
    CHECK_RC(fl_bitmap_open(NULL, SZ, 4096, 0, &t, NULL), 0);
    CHECK_RC(fl_bitmap_open(NULL, SZ - 1, G, 0, &x, NULL), 0);
    CHECK_RC(fl_file_bitmap_attach(f, x), -EINVAL);
    CHECK_RC(fl_file_bitmap_detach(f, x), -ENOENT);
    CHECK_RC(fl_file_bitmap_attach(f, a), 0);
    CHECK_RC(fl_file_bitmap_attach(f, a), -EEXIST);
    CHECK_RC(fl_file_bitmap_attach(f, t), 0);

    memset(buf, 0x5d, sizeof(buf));
    CHECK_RC(fl_file_write(f, buf, 10, G - 5, 0), 0);      /* spans 0|1 */
    CHECK(fl_bitmap_count(a) == 2 * G && fl_bitmap_count(t) == 2 * 4096);
    CHECK_RC(fl_file_write(f, buf, 0, 3 * G, 0), 0);       /* empty */
    CHECK_RC(fl_file_write(f, buf, 1, SZ, 0), -EINVAL);    /* refused */
    CHECK(fl_bitmap_count(a) == 2 * G);
    CHECK_RC(fl_file_zero(f, 2 * G, 100, 0), 0);
    CHECK(fl_bitmap_count(a) == 3 * G);
    CHECK_RC(fl_file_trim(f, SZ - 10, 10), 0);
    CHECK(fl_bitmap_count(a) == 3 * G + 1000);
    CHECK(fl_bitmap_count(t) == 3 * 4096 + 1000);
    CHECK_RC(fl_file_flush(f), 0);

    /* FL_FAST refused before touching anything: no mark. */
    fl_bitmap_clear(a);
    CHECK_RC(fl_session_open(f, &p, &s), 0);
    CHECK_RC(fl_file_zero(f, 0, G, FL_FAST | FL_MAY_TRIM), -ENOTSUP);
    CHECK(fl_bitmap_count(a) == 0);
    fl_session_close(s);

    CHECK_RC(fl_file_bitmap_detach(f, t), 0);
    CHECK_RC(fl_file_bitmap_detach(f, t), -ENOENT);
    CHECK_RC(fl_file_write(f, buf, 1, 4 * G, 0), 0);
    CHECK(fl_bitmap_count(t) == 3 * 4096 + 1000);   /* not recording */
    CHECK(fl_bitmap_count(a) == G);

    /* The owner lets go while attached: the file keeps it alive and
     * recording; its clean close runs when the file drops it. */
    fl_bitmap_close(a, 1);
    CHECK_RC(fl_file_write(f, buf, 1, 0, 0), 0);
    fl_file_close(f);
    CHECK_RC(fl_bitmap_open(path, SZ, G, 0, &a, &rec), 0);
    CHECK(rec == 0 && fl_bitmap_count(a) == 2 * G);
    fl_bitmap_close(a, 1);
    fl_bitmap_close(t, 0);
    fl_bitmap_close(x, 0);
    unlink(path);
    unlink(img);
}

/* ---- checkpoints --------------------------------------------------------- */

static void test_checkpoint_scope(void)
{
    static const uint64_t css[] = { 4096, G, 4 * G };
    char img[4096];
    uint8_t buf[16];
    fl_file *f;
    fl_bitmap *old, *nw, *fr, *bad;
    fl_session *s;
    struct fl_session_stats st;
    int state;

    make_image(img, SZ, pat);
    CHECK_RC(fl_file_open(img, 0, &f), 0);
    memset(buf, 0xee, sizeof(buf));
    for (size_t k = 0; k < sizeof(css) / sizeof(css[0]); k++) {
        struct fl_session_params p = { .cluster_size = css[k],
                                       .temp_dir = test_tmpdir() };
        uint64_t cs = css[k];

        CHECK_RC(fl_bitmap_open(NULL, SZ, G, 0, &old, NULL), 0);
        CHECK_RC(fl_bitmap_open(NULL, SZ, G, 0, &nw, NULL), 0);
        CHECK_RC(fl_file_bitmap_attach(f, old), 0);
        CHECK_RC(fl_file_write(f, buf, 1, G + 7, 0), 0);     /* granule 1 */
        CHECK_RC(fl_file_write(f, buf, 1, SZ - 1, 0), 0);    /* granule 5 */
        CHECK_RC(fl_bitmap_set(nw, 0, 1), 0);                /* cleared */

        /* Bad parameters change nothing. */
        CHECK_RC(fl_bitmap_open(NULL, SZ + 1, G, 0, &bad, NULL), 0);
        p.checkpoint_since = old;
        p.checkpoint_new = bad;
        CHECK_RC(fl_session_open(f, &p, &s), -EINVAL);
        p.checkpoint_new = old;
        CHECK_RC(fl_session_open(f, &p, &s), -EINVAL);
        {
            uint64_t so = 0, sl = 1;
            p.checkpoint_new = nw;
            p.scope_off = &so;
            p.scope_len = &sl;
            p.n_scope = 1;
            CHECK_RC(fl_session_open(f, &p, &s), -EINVAL);
            p.n_scope = 0;
        }
        p.checkpoint_since = bad;
        CHECK_RC(fl_session_open(f, &p, &s), -EINVAL);
        fl_bitmap_close(bad, 0);
        CHECK(fl_bitmap_count(nw) == G);
        CHECK_RC(fl_file_write(f, buf, 1, 0, 0), 0);      /* OLD records */
        CHECK(fl_bitmap_count(old) == 2 * G + 1000);

        p.checkpoint_since = old;
        p.checkpoint_new = nw;
        CHECK_RC(fl_session_open(f, &p, &s), 0);
        CHECK(fl_bitmap_count(nw) == 0);
        CHECK_RC(fl_session_frozen_bitmap(s, &fr), 0);
        CHECK(fl_bitmap_count(fr) == 2 * G + 1000);
        /* Scope: exactly the clusters touching granules 0, 1, 5. */
        uint64_t in_scope = 0;
        for (uint64_t off = 0; off < SZ; off += cs) {
            uint64_t gi = off / G, ge = (off + cs - 1) / G;
            int want = 0;
            for (uint64_t x = gi; x <= ge && x < 6; x++)
                want |= x == 0 || x == 1 || x == 5;
            CHECK_RC(fl_session_cluster_state(s, off, &state), 0);
            CHECK(state == (want ? FL_NEEDED : FL_NOT_NEEDED));
            in_scope += (uint64_t)want;
        }
        CHECK_RC(fl_session_stats(s, &st), 0);
        CHECK(st.clusters_needed == in_scope);
        CHECK(st.clusters_total == (SZ + cs - 1) / cs);
        /* After the cut: NEW records, OLD not. */
        CHECK_RC(fl_file_write(f, buf, 1, 3 * G, 0), 0);
        CHECK(fl_bitmap_count(old) == 2 * G + 1000);
        CHECK(fl_bitmap_count(nw) == G);
        CHECK(fl_bitmap_count(fr) == 2 * G + 1000);
        CHECK_RC(fl_file_bitmap_detach(f, old), -ENOENT);  /* detached */
        fl_session_close(s);
        /* The frozen bitmap outlives the session with its reference. */
        CHECK(fl_bitmap_count(fr) == 2 * G + 1000);
        fl_bitmap_unref(fr);
        CHECK_RC(fl_file_bitmap_detach(f, nw), 0);
        fl_bitmap_close(old, 0);
        fl_bitmap_close(nw, 0);
    }
    /* No checkpoint: no frozen bitmap. */
    {
        struct fl_session_params p = { .cluster_size = G,
                                       .temp_dir = test_tmpdir() };
        CHECK_RC(fl_session_open(f, &p, &s), 0);
        CHECK_RC(fl_session_frozen_bitmap(s, &fr), -ENOENT);
        CHECK(fr == NULL);
        fl_session_close(s);
    }
    /* OLD not attached (a disabled bitmap) and NEW attached already. */
    {
        struct fl_session_params p = { .cluster_size = G,
                                       .temp_dir = test_tmpdir(),
                                       .cbw_timeout_ms = 5000 };
        CHECK_RC(fl_bitmap_open(NULL, SZ, 512, 0, &old, NULL), 0);
        CHECK_RC(fl_bitmap_open(NULL, SZ, G, 0, &nw, NULL), 0);
        CHECK_RC(fl_bitmap_set(old, 2 * G + 511, 2), 0);
        CHECK_RC(fl_file_bitmap_attach(f, nw), 0);
        CHECK_RC(fl_file_write(f, buf, 1, 0, 0), 0);
        p.checkpoint_since = old;
        p.checkpoint_new = nw;
        CHECK_RC(fl_session_open(f, &p, &s), 0);
        CHECK(fl_bitmap_count(nw) == 0);
        CHECK_RC(fl_session_cluster_state(s, 2 * G, &state), 0);
        CHECK(state == FL_NEEDED);
        CHECK_RC(fl_session_cluster_state(s, 0, &state), 0);
        CHECK(state == FL_NOT_NEEDED);
        CHECK_RC(fl_file_write(f, buf, 1, 0, 0), 0);
        CHECK(fl_bitmap_count(nw) == G);
        /* The file's last reference drops NEW, the session's frozen copy
         * goes with the session: no leak under ASan. */
        fl_bitmap_close(old, 0);
        fl_bitmap_close(nw, 0);
        fl_session_close(s);
    }
    fl_file_close(f);
    unlink(img);
}

/* The consistent cut, with writers racing the checkpoint: every write
 * that returned before the open started is in the frozen copy, every
 * write that started after the open returned is in NEW, and each
 * (single-write) granule is in exactly one of them. */
#define NW   4
#define NG   2048                      /* granules of 4 KiB */
#define GS   ((uint64_t)4096)
#define CSZ  (NG * GS - 100)           /* the last granule short */

static unsigned long seq;              /* atomic event counter */
static unsigned long progress;         /* atomic: writes done */

struct wr { uint64_t g; unsigned long begin, end; };
struct wctx { fl_file *f; int id; struct wr w[NG / NW]; size_t n; };

static unsigned long tick(void)
{
    return __atomic_add_fetch(&seq, 1, __ATOMIC_SEQ_CST);
}

static void *writer(void *arg)
{
    struct wctx *c = arg;
    uint8_t buf[GS];

    memset(buf, c->id + 1, sizeof(buf));
    for (uint64_t g = (uint64_t)c->id; g < NG; g += NW) {
        uint64_t off = g * GS, len = off + GS > CSZ ? CSZ - off : GS;
        struct wr *w = &c->w[c->n++];
        w->g = g;
        w->begin = tick();
        CHECK_RC(fl_file_write(c->f, buf, (size_t)len, off, 0), 0);
        w->end = tick();
        __atomic_add_fetch(&progress, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static int bit(fl_bitmap *b, uint64_t g)
{
    uint64_t lens[1];
    uint32_t flags[1];
    size_t n;

    CHECK_RC(fl_bitmap_extents(b, g * GS, 1, lens, flags, 1, &n), 0);
    CHECK(n == 1);
    return (int)flags[0];
}

static void test_consistent_cut(void)
{
    for (int round = 0; round < 8; round++) {
        char img[4096];
        fl_file *f;
        fl_bitmap *old, *nw, *fr;
        fl_session *s;
        pthread_t th[NW];
        static struct wctx ctx[NW];
        struct fl_session_params p = { .cluster_size = GS,
                                       .temp_dir = test_tmpdir(),
                                       .cbw_timeout_ms = round % 2 ? 10000 : 0 };
        unsigned long c0, c1;
        size_t before = 0, after = 0;

        make_image(img, CSZ, NULL);
        CHECK_RC(fl_file_open(img, 0, &f), 0);
        CHECK_RC(fl_bitmap_open(NULL, CSZ, GS, 0, &old, NULL), 0);
        CHECK_RC(fl_bitmap_open(NULL, CSZ, GS, 0, &nw, NULL), 0);
        CHECK_RC(fl_file_bitmap_attach(f, old), 0);
        __atomic_store_n(&progress, 0, __ATOMIC_SEQ_CST);
        for (int i = 0; i < NW; i++) {
            ctx[i].f = f;
            ctx[i].id = i;
            ctx[i].n = 0;
            CHECK(pthread_create(&th[i], NULL, writer, &ctx[i]) == 0);
        }
        /* Cut somewhere between 1/10 and 8/10 of the writes. */
        while (__atomic_load_n(&progress, __ATOMIC_SEQ_CST) <
               (unsigned long)NG * (unsigned)(round + 1) / 10)
            sched_yield();
        p.checkpoint_since = old;
        p.checkpoint_new = nw;
        c0 = tick();
        CHECK_RC(fl_session_open(f, &p, &s), 0);
        c1 = tick();
        for (int i = 0; i < NW; i++)
            CHECK(pthread_join(th[i], NULL) == 0);
        CHECK_RC(fl_session_frozen_bitmap(s, &fr), 0);
        for (int i = 0; i < NW; i++) {
            for (size_t k = 0; k < ctx[i].n; k++) {
                struct wr *w = &ctx[i].w[k];
                int in_old = bit(fr, w->g), in_new = bit(nw, w->g), state;
                CHECK(in_old + in_new == 1);
                if (w->end < c0) {
                    CHECK(in_old);
                    before++;
                }
                if (w->begin > c1) {
                    CHECK(in_new);
                    after++;
                }
                CHECK(bit(old, w->g) == in_old);   /* OLD stopped at the cut */
                CHECK_RC(fl_session_cluster_state(s, w->g * GS, &state), 0);
                CHECK(in_old ? state == FL_NEEDED : state == FL_NOT_NEEDED);
            }
        }
        CHECK(fl_bitmap_count(fr) + fl_bitmap_count(nw) == CSZ);
        fprintf(stderr, "    round %d: %zu before, %zu after the cut\n", round,
                before, after);
        fl_bitmap_unref(fr);
        fl_session_close(s);
        fl_bitmap_close(old, 0);
        fl_bitmap_close(nw, 0);
        fl_file_close(f);
        unlink(img);
    }
}

int main(void)
{
    fprintf(stderr, "test_bitmap\n");
    RUN(test_args);
    RUN(test_set_reset_extents);
    RUN(test_model);
    RUN(test_persist);
    RUN(test_resize);
    RUN(test_mark_clean);
    RUN(test_attach);
    RUN(test_checkpoint_scope);
    RUN(test_consistent_cut);
    RUN(test_mark_clean_crash);
    fprintf(stderr, "test_bitmap: OK\n");
    return 0;
}
