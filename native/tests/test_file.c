/* Unit tests of native/src/file.c and io.c: bounds, short reads, zero,
 * trim, holes and extents on scratch files whose size is not a multiple
 * of the block size. */
#include <sys/mman.h>

#include "check.h"
#include "fleeced.h"

#define SZ ((uint64_t)3 * 65536 + 1234)

static uint8_t pat(uint64_t i) { return (uint8_t)(i * 7 + (i >> 12)); }

static void test_open_errors(void)
{
    fl_file *f = (fl_file *)1;

    CHECK_RC(fl_file_open("/nonexistent/fleeced", 1, &f), -ENOENT);
    CHECK(f == NULL);
    CHECK_RC(fl_file_open(test_tmpdir(), 1, &f), -EISDIR);
    CHECK_RC(fl_file_open("/dev/null", 1, &f), -EINVAL);
}

/* One source, one identity: a symlink and a hard link to the same file
 * give what the file gives, another file does not. */
static void test_identity(void)
{
    char path[4096], sym[4200], hard[4200], other[4096];
    fl_file *a, *b, *c, *d;
    uint64_t dev[4], ino[4];
    int blk[4];

    make_image(path, SZ, pat);
    make_image(other, 4096, pat);
    snprintf(sym, sizeof(sym), "%s.sym", path);
    snprintf(hard, sizeof(hard), "%s.hard", path);
    CHECK(symlink(path, sym) == 0);
    CHECK(link(path, hard) == 0);
    CHECK_RC(fl_file_open(path, 1, &a), 0);
    CHECK_RC(fl_file_open(sym, 0, &b), 0);
    CHECK_RC(fl_file_open(hard, 1, &c), 0);
    CHECK_RC(fl_file_open(other, 1, &d), 0);
    fl_file_identity(a, &blk[0], &dev[0], &ino[0]);
    fl_file_identity(b, &blk[1], &dev[1], &ino[1]);
    fl_file_identity(c, &blk[2], &dev[2], &ino[2]);
    fl_file_identity(d, &blk[3], &dev[3], &ino[3]);
    CHECK(blk[0] == 0 && ino[0] != 0);
    for (int i = 1; i < 3; i++)
        CHECK(blk[i] == blk[0] && dev[i] == dev[0] && ino[i] == ino[0]);
    CHECK(dev[3] != dev[0] || ino[3] != ino[0]);
    fl_file_close(a);
    fl_file_close(b);
    fl_file_close(c);
    fl_file_close(d);
    unlink(sym);
    unlink(hard);
    unlink(path);
    unlink(other);
}

static void test_read_write_bounds(void)
{
    char path[4096];
    fl_file *f;
    uint8_t buf[8192], back[8192];
    int hole = -1;

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK(fl_file_size(f) == SZ);
    CHECK_RC(fl_file_read(f, buf, sizeof(buf), SZ - sizeof(buf), &hole), 0);
    CHECK(hole == 0);
    for (size_t i = 0; i < sizeof(buf); i++)
        CHECK(buf[i] == pat(SZ - sizeof(buf) + i));
    CHECK_RC(fl_file_read(f, buf, 2, SZ - 1, NULL), -EINVAL);
    CHECK_RC(fl_file_read(f, buf, 1, UINT64_MAX, NULL), -EINVAL);
    CHECK_RC(fl_file_write(f, buf, 1, UINT64_MAX, 0), -EINVAL);
    CHECK_RC(fl_file_zero(f, 1, UINT64_MAX, 0), -EINVAL);
    CHECK_RC(fl_file_trim(f, SZ, 1), -EINVAL);
    CHECK_RC(fl_file_write(f, buf, 0, SZ, 0), 0);
    CHECK_RC(fl_file_write(f, buf, 1, 0, 0x80), -EINVAL);

    memset(buf, 0xab, sizeof(buf));
    CHECK_RC(fl_file_write(f, buf, sizeof(buf), 5000, FL_FUA), 0);
    CHECK_RC(fl_file_read(f, back, sizeof(back), 5000, NULL), 0);
    CHECK(memcmp(buf, back, sizeof(buf)) == 0);
    CHECK_RC(fl_file_flush(f), 0);
    CHECK_RC(fl_file_cache(f, 0, SZ), 0);

    /* The image shrinks under us: a read past the new EOF is -EIO. */
    CHECK(truncate(path, 4096) == 0);
    CHECK_RC(fl_file_read(f, back, 100, 8192, NULL), -EIO);
    fl_file_close(f);

    CHECK_RC(fl_file_open(path, 1, &f), 0);
    CHECK_RC(fl_file_write(f, buf, 1, 0, 0), -EROFS);
    CHECK_RC(fl_file_zero(f, 0, 1, 0), -EROFS);
    CHECK_RC(fl_file_trim(f, 0, 1), -EROFS);
    fl_file_close(f);
    unlink(path);
}

static void check_zeros(fl_file *f, uint64_t off, uint64_t len)
{
    uint8_t *b = malloc(len);
    CHECK(b != NULL);
    CHECK_RC(fl_file_read(f, b, len, off, NULL), 0);
    for (uint64_t i = 0; i < len; i++)
        CHECK(b[i] == 0);
    free(b);
}

static void test_zero_trim_extents(void)
{
    char path[4096];
    fl_file *f;
    uint64_t lens[16];
    uint32_t flags[16];
    size_t n;
    uint8_t buf[4096];
    int hole = -1;

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_file_extents(f, 0, SZ, lens, flags, 16, &n), 0);
    CHECK(n == 1 && lens[0] == SZ && flags[0] == 0);

    CHECK_RC(fl_file_zero(f, 65536, 65536, FL_MAY_TRIM), 0);
    check_zeros(f, 65536, 65536);
    CHECK_RC(fl_file_read(f, buf, sizeof(buf), 65536 + 4096, &hole), 0);
    CHECK(hole == 1);
    CHECK_RC(fl_file_extents(f, 0, SZ, lens, flags, 16, &n), 0);
    CHECK(n == 3);
    CHECK(lens[0] == 65536 && flags[0] == 0);
    CHECK(lens[1] == 65536 && flags[1] == (FL_EXT_HOLE | FL_EXT_ZERO));
    CHECK(lens[2] == SZ - 131072 && flags[2] == 0);
    /* max reached: the answer stops early. */
    CHECK_RC(fl_file_extents(f, 0, SZ, lens, flags, 2, &n), 0);
    CHECK(n == 2 && lens[0] + lens[1] == 131072);
    CHECK_RC(fl_file_extents(f, 0, SZ, lens, flags, 0, &n), -EINVAL);

    CHECK_RC(fl_file_zero(f, 1000, 3000, 0), 0); /* ZERO_RANGE, unaligned */
    check_zeros(f, 1000, 3000);
    CHECK_RC(fl_file_read(f, buf, 1, 999, NULL), 0);
    CHECK(buf[0] == pat(999));
    CHECK_RC(fl_file_zero(f, 190000, SZ - 190000, FL_FAST | FL_FUA), 0);
    check_zeros(f, 190000, SZ - 190000);
    CHECK_RC(fl_file_trim(f, 150000, 10000), 0);
    check_zeros(f, 150000, 10000);
    CHECK(fl_file_size(f) == SZ); /* KEEP_SIZE everywhere */
    fl_file_close(f);
    unlink(path);
}

/* A failed fdatasync is remembered: a FUA that consumed a writeback error
 * must not let a later FLUSH (or FUA) report success.  Sticky until the
 * image is reopened. */
static void test_sticky_flush_error(void)
{
    char path[4096];
    fl_file *f;
    uint8_t buf[4096];

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_file_inject_flush_error(f, 0, 1), -EINVAL);
    CHECK_RC(fl_file_inject_flush_error(f, EIO, -1), -EINVAL);
    CHECK_RC(fl_file_inject_flush_error(f, EIO, 1), 0);
    CHECK_RC(fl_file_inject_flush_error(f, EIO, 0), 0); /* disabled */
    CHECK_RC(fl_file_flush(f), 0);
    CHECK(fl_file_flush_error(f) == 0);

    /* The FUA of a write consumes the error... */
    CHECK_RC(fl_file_inject_flush_error(f, ENOSPC, 1), 0);
    memset(buf, 0x3c, sizeof(buf));
    CHECK_RC(fl_file_write(f, buf, sizeof(buf), 0, FL_FUA), -ENOSPC);
    CHECK(fl_file_flush_error(f) == ENOSPC);
    /* ...and every later flush and FUA still fails (the hook is used up,
     * so these would succeed without the sticky error). */
    CHECK_RC(fl_file_flush(f), -EIO);
    CHECK_RC(fl_file_flush(f), -EIO);
    CHECK_RC(fl_file_write(f, buf, sizeof(buf), 0, FL_FUA), -EIO);
    CHECK_RC(fl_file_write(f, buf, 0, 0, FL_FUA), -EIO);
    CHECK_RC(fl_file_zero(f, 0, 4096, FL_FUA), -EIO);
    CHECK_RC(fl_file_zero(f, 0, 4096, FL_FUA | FL_MAY_TRIM), -EIO);
    /* Writes without FUA, trims and reads are not affected. */
    CHECK_RC(fl_file_write(f, buf, sizeof(buf), 0, 0), 0);
    CHECK_RC(fl_file_trim(f, 0, 4096), 0);
    CHECK_RC(fl_file_read(f, buf, sizeof(buf), 8192, NULL), 0);
    CHECK(fl_file_flush_error(f) == ENOSPC); /* the first errno stays */
    fl_file_close(f);

    /* Reopened: a fresh start.  A failed FLUSH with nothing written since
     * the last good one loses nothing: not sticky.  After a write it is
     * sticky the same way, and so is the FUA of a write-zeroes. */
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK(fl_file_flush_error(f) == 0);
    CHECK_RC(fl_file_flush(f), 0);
    CHECK_RC(fl_file_inject_flush_error(f, EIO, 1), 0);
    CHECK_RC(fl_file_flush(f), -EIO);
    CHECK(fl_file_flush_error(f) == 0);
    CHECK_RC(fl_file_flush(f), 0);
    CHECK_RC(fl_file_write(f, buf, 1, 0, 0), 0);
    CHECK_RC(fl_file_inject_flush_error(f, EIO, 1), 0);
    CHECK_RC(fl_file_flush(f), -EIO);
    CHECK(fl_file_flush_error(f) == EIO);
    CHECK_RC(fl_file_write(f, buf, 1, 0, FL_FUA), -EIO);
    fl_file_close(f);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_file_inject_flush_error(f, EROFS, 1), 0);
    CHECK_RC(fl_file_zero(f, 0, 4096, FL_FUA), -EROFS);
    CHECK_RC(fl_file_flush(f), -EIO);
    CHECK(fl_file_flush_error(f) == EROFS);
    fl_file_close(f);
    unlink(path);
}

/* Whether every page of [off, off+len) of PATH is in the page cache (1),
 * none is (0), or some are (-1). */
static int cached(const char *path, uint64_t off, uint64_t len)
{
    int fd = open(path, O_RDONLY);
    long pg = sysconf(_SC_PAGESIZE);
    size_t n = (size_t)((len + (uint64_t)pg - 1) / (uint64_t)pg), in = 0;
    unsigned char *vec = calloc(n, 1);
    void *m;

    CHECK(fd >= 0 && vec != NULL);
    m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, (off_t)off);
    CHECK(m != MAP_FAILED);
    CHECK(mincore(m, len, vec) == 0);
    for (size_t i = 0; i < n; i++)
        in += vec[i] & 1;
    munmap(m, len);
    close(fd);
    free(vec);
    return in == n ? 1 : in == 0 ? 0 : -1;
}

static void test_direct(void)
{
    char path[4096];
    fl_file *f;
    uint8_t *buf = malloc(65536 + 1), *back = malloc(65536);
    int rc;

    CHECK(buf != NULL && back != NULL);
    make_image(path, 4 << 20, NULL);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    rc = fl_file_set_direct(f, 1);
    if (rc == -EINVAL) {    /* this filesystem has no O_DIRECT */
        fprintf(stderr, "  (no O_DIRECT in %s: skipped)\n", test_tmpdir());
        goto out;
    }
    CHECK_RC(rc, 0);
    CHECK(fl_file_is_direct(f) == 1);
    /* Whole blocks from an unaligned buffer: written around the cache. */
    memset(buf + 1, 0x5a, 65536);
    CHECK_RC(fl_file_write(f, buf + 1, 65536, 1 << 20, 0), 0);
    CHECK(cached(path, 1 << 20, 65536) == 0);
    CHECK_RC(fl_file_read(f, back, 65536, 1 << 20, NULL), 0);
    CHECK(memcmp(back, buf + 1, 65536) == 0);
    CHECK(cached(path, 1 << 20, 65536) == 0);
    /* An odd range goes buffered, and a direct read sees it. */
    CHECK_RC(fl_file_write(f, (const uint8_t *)"odd", 3, (1 << 20) + 100, 0), 0);
    CHECK_RC(fl_file_read(f, back, 4096, 1 << 20, NULL), 0);
    CHECK(memcmp(back + 100, "odd", 3) == 0 && back[99] == 0x5a && back[103] == 0x5a);
    /* The page-cache paths refuse while direct. */
    CHECK_RC(fl_file_read_nowait(f, back, 4096, 1 << 20, NULL), -EAGAIN);
    /* writeback again: the cache fills. */
    CHECK_RC(fl_file_set_direct(f, 0), 0);
    CHECK(fl_file_is_direct(f) == 0);
    CHECK_RC(fl_file_write(f, buf + 1, 65536, 2 << 20, 0), 0);
    CHECK(cached(path, 2 << 20, 65536) == 1);
out:
    fl_file_close(f);
    unlink(path);
    free(buf);
    free(back);
}

/* Every entry point counts its call, its bytes when it succeeded, its
 * errno when not; writes and flushes land in their histograms. */
static void test_stats(void)
{
    char path[4096];
    fl_file *f;
    struct fl_file_stats st;
    uint8_t buf[4096];
    uint64_t lens[4], n_ext = 0, sum = 0;
    uint32_t flags[4];
    size_t n;

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    fl_file_stats(f, &st);
    for (int i = 0; i < FL_CMDS; i++)
        CHECK(st.requests[i] == 0 && st.bytes[i] == 0);
    memset(buf, 1, sizeof(buf));
    CHECK_RC(fl_file_write(f, buf, sizeof(buf), 0, 0), 0);
    CHECK_RC(fl_file_write(f, buf, 512, 8192, FL_FUA), 0);
    CHECK_RC(fl_file_write(f, buf, 1, SZ, 0), -EINVAL);
    CHECK_RC(fl_file_read(f, buf, sizeof(buf), 0, NULL), 0);
    CHECK_RC(fl_file_read_nowait(f, buf, 100, 0, NULL), 0);
    CHECK_RC(fl_file_zero(f, 65536, 65536, 0), 0);
    CHECK_RC(fl_file_trim(f, 0, 4096), 0);
    CHECK_RC(fl_file_flush(f), 0);
    CHECK_RC(fl_file_cache(f, 0, 4096), 0);
    CHECK_RC(fl_file_extents(f, 0, SZ, lens, flags, 4, &n), 0);
    fl_file_stats(f, &st);
    CHECK(st.requests[FL_CMD_WRITE] == 3 && st.bytes[FL_CMD_WRITE] == 4096 + 512);
    CHECK(st.requests[FL_CMD_READ] == 2 && st.bytes[FL_CMD_READ] == 4096 + 100);
    CHECK(st.requests[FL_CMD_WRITE_ZEROES] == 1 && st.bytes[FL_CMD_WRITE_ZEROES] == 65536);
    CHECK(st.requests[FL_CMD_TRIM] == 1 && st.bytes[FL_CMD_TRIM] == 4096);
    CHECK(st.requests[FL_CMD_FLUSH] == 1 && st.bytes[FL_CMD_FLUSH] == 0);
    CHECK(st.requests[FL_CMD_CACHE] == 1 && st.requests[FL_CMD_BLOCK_STATUS] == 1);
    CHECK(st.errors[EINVAL] == 1);
    for (int i = 0; i < FL_ERRNO_SLOTS; i++)
        n_ext += st.errors[i];
    CHECK(n_ext == 1);
    CHECK(st.write_latency.count == 3 && st.flush_latency.count == 1);
    for (int i = 0; i < FL_LAT_BUCKETS; i++)
        sum += st.write_latency.buckets[i];
    CHECK(sum == 3 && st.write_latency.sum_ns > 0);
    fl_file_close(f);
    unlink(path);
}

int main(void)
{
    fprintf(stderr, "test_file\n");
    RUN(test_open_errors);
    RUN(test_identity);
    RUN(test_read_write_bounds);
    RUN(test_zero_trim_extents);
    RUN(test_sticky_flush_error);
    RUN(test_direct);
    RUN(test_stats);
    fprintf(stderr, "test_file: OK\n");
    return 0;
}
