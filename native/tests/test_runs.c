/* Unit tests of native/src/runs.c: byte vectors of NBD READ and WRITE
 * requests in, the exact reply bytes out (proto.md "Simple reply message",
 * "Structured reply chunk message"), where a run stops, and write runs
 * through the queue. */
#include <poll.h>
#include <sys/mman.h>

#include "check.h"
#include "fleeced.h"

#define SZ ((uint64_t)65536 + 4096)

static uint8_t pat(uint64_t i) { return (uint8_t)(i * 13 + (i >> 9)); }

/* NBD_CMD_READ, flags 0, cookie 01..08, offset 0x1000, length 0x10. */
static const uint8_t READ_1000_10[28] = {
    0x25, 0x60, 0x95, 0x13, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00,
    0x00, 0x00, 0x00, 0x10,
};

/* Its simple reply header: magic, error 0, cookie. */
static const uint8_t SIMPLE_1000_10[16] = {
    0x67, 0x44, 0x66, 0x98, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
};

/* Its structured reply: OFFSET_DATA chunk, flags DONE, length 8 + 16,
 * then the offset. */
static const uint8_t CHUNK_1000_10[28] = {
    0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x01,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    0x00, 0x00, 0x00, 0x18,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00,
};

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* A request like READ_1000_10 with cookie byte K, flags, type, offset and
 * length changed. */
static void request(uint8_t *r, uint8_t k, uint16_t flags, uint16_t type,
                    uint64_t off, uint32_t len)
{
    memcpy(r, READ_1000_10, 28);
    r[4] = (uint8_t)(flags >> 8);
    r[5] = (uint8_t)flags;
    r[6] = (uint8_t)(type >> 8);
    r[7] = (uint8_t)type;
    r[15] = k;
    put32(r + 16, (uint32_t)(off >> 32));
    put32(r + 20, (uint32_t)off);
    put32(r + 24, len);
}

static struct fl_run_rule rule(int structured)
{
    struct fl_run_rule r = {
        .size = SZ, .allowed_flags = 0x1 | 0x4, /* FUA | DF */
        .max_length = 8192, .min_block = 1, .structured = (uint32_t)structured,
    };
    return r;
}

/* READ_1000_10 under R: its reply is HDR (HLEN bytes), then the data, and
 * nothing after it. */
static void check_read_reply(fl_file *f, const struct fl_run_rule *r,
                             const uint8_t *hdr, size_t hlen)
{
    uint8_t out[64];
    struct fl_run run;

    memset(out, 0xee, sizeof(out));
    CHECK_RC(fl_file_read_run(f, READ_1000_10, 28, r, 16, out, sizeof(out), &run), 0);
    CHECK(run.count == 1 && run.consumed == 28 && run.out_len == hlen + 16 && run.data == 16);
    CHECK(memcmp(out, hdr, hlen) == 0);
    for (size_t i = 0; i < 16; i++)
        CHECK(out[hlen + i] == pat(0x1000 + i));
    CHECK(out[hlen + 16] == 0xee);
}

static void test_reply_bytes(void)
{
    char path[4096];
    fl_file *f;
    struct fl_run run;
    struct fl_run_rule simple = rule(0), chunked = rule(1);

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 1, &f), 0);

    check_read_reply(f, &simple, SIMPLE_1000_10, 16);
    check_read_reply(f, &chunked, CHUNK_1000_10, 28);

    /* The sizing pass: same counts, no output. */
    CHECK_RC(fl_file_read_run(f, READ_1000_10, 28, &chunked, 16, NULL, 0, &run), 0);
    CHECK(run.count == 1 && run.consumed == 28 && run.out_len == 44 && run.data == 16);
    fl_file_close(f);
    unlink(path);
}

/* A run of answerable READs, then one request that must stop it. */
static void expect_stop(fl_file *f, const struct fl_run_rule *r,
                        const uint8_t *bad, size_t bad_len)
{
    uint8_t req[4 * 28], out[3 * (28 + 512)];
    struct fl_run run, sized;

    request(req, 1, 0, 0, 0, 512);
    request(req + 28, 2, 0x1 | 0x4, 0, SZ - 512, 512);
    memcpy(req + 56, bad, bad_len);
    /* never reached; none after an incomplete header (it would complete it) */
    size_t len = 56 + bad_len + (bad_len == 28 ? 28 : 0);

    request(req + 56 + bad_len, 3, 0, 0, 512, 512);
    CHECK_RC(fl_file_read_run(f, req, len, r, 16, NULL, 0, &sized), 0);
    CHECK_RC(fl_file_read_run(f, req, len, r, 16, out, sizeof(out), &run), 0);
    CHECK(run.count == 2 && run.consumed == 56 && run.data == 1024);
    CHECK(sized.count == 2 && sized.consumed == 56 && sized.out_len == run.out_len);
    CHECK(out[15] == 1);
    CHECK(out[run.out_len / 2 + 15] == 2); /* the second header */
}

static void test_stops_where_the_engine_decides(void)
{
    char path[4096];
    fl_file *f;
    uint8_t bad[28];
    struct fl_run_rule r = rule(1);

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 1, &f), 0);

    request(bad, 9, 0, 1, 0, 512); /* NBD_CMD_WRITE */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0, 3, 0, 0); /* NBD_CMD_FLUSH */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0, 0, 0, 512);
    bad[0] = 0x26; /* bad magic */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0x2, 0, 0, 512); /* NO_HOLE: not a READ flag */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0x8000, 0, 0, 512); /* unknown flag */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0, 0, 0, 0); /* zero length */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0, 0, 0, 8193); /* over max_length */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0, 0, SZ - 511, 512); /* past the end */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0, 0, UINT64_MAX - 100, 512); /* offset + length wraps */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0, 0, 0, 512);
    expect_stop(f, &r, bad, 27); /* incomplete header */

    r.min_block = 512;
    request(bad, 9, 0, 0, 100, 512); /* offset not aligned */
    expect_stop(f, &r, bad, 28);
    request(bad, 9, 0, 0, 0, 100); /* length not aligned */
    expect_stop(f, &r, bad, 28);

    r.allowed_flags = 0x1; /* no DF without structured replies */
    request(bad, 9, 0x4, 0, 0, 512);
    {
        uint8_t req[28 + 28], out[64];
        struct fl_run run;

        request(req, 1, 0, 0, 0, 8);
        memcpy(req + 28, bad, 28);
        r.min_block = 1;
        CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 16, out, sizeof(out), &run), 0);
        CHECK(run.count == 1 && run.consumed == 28);
    }
    fl_file_close(f);
    unlink(path);
}

static void test_bounds_of_a_run(void)
{
    char path[4096];
    fl_file *f;
    uint8_t req[4 * 28], out[4 * (28 + 512)];
    struct fl_run run;
    struct fl_run_rule r = rule(1);

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 1, &f), 0);
    for (int i = 0; i < 4; i++)
        request(req + 28 * i, (uint8_t)i, 0, 0, 512 * (uint64_t)i, 512);

    CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 3, out, sizeof(out), &run), 0);
    CHECK(run.count == 3 && run.consumed == 84); /* max_count */
    CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 16, out, 2 * 540 + 539, &run), 0);
    CHECK(run.count == 2 && run.out_len == 2 * 540); /* the third does not fit */
    CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 0, out, sizeof(out), &run), 0);
    CHECK(run.count == 0 && run.consumed == 0 && run.out_len == 0);
    CHECK_RC(fl_file_read_run(f, NULL, 0, &r, 16, out, sizeof(out), &run), 0);
    CHECK(run.count == 0);

    CHECK_RC(fl_file_read_run(f, req, sizeof(req), NULL, 16, out, sizeof(out), &run), -EINVAL);
    CHECK_RC(fl_file_read_run(f, NULL, 28, &r, 16, out, sizeof(out), &run), -EINVAL);
    CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 16, out, sizeof(out), NULL), -EINVAL);
    r.min_block = 3;
    CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 16, out, sizeof(out), &run), -EINVAL);
    r.min_block = 0;
    CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 16, out, sizeof(out), &run), -EINVAL);
    r.min_block = 1;
    r.structured = 2;
    CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 16, out, sizeof(out), &run), -EINVAL);
    fl_file_close(f);
    unlink(path);
}

/* Data not in the page cache stops the run before it (the caller's slow
 * path reads it).  Checked only where the cache can be dropped (mincore
 * says the page is gone; not on tmpfs). */
static int page_resident(const char *path, off_t off)
{
    unsigned char resident[1];
    int fd = open(path, O_RDONLY);
    void *map;

    CHECK(fd >= 0);
    map = mmap(NULL, SZ, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(map != MAP_FAILED);
    CHECK(mincore((uint8_t *)map + off, 4096, resident) == 0);
    CHECK(munmap(map, SZ) == 0);
    close(fd);
    return resident[0] & 1;
}

static void test_uncached_data_stops_the_run(void)
{
    char path[4096];
    fl_file *f;
    uint8_t req[28], out[28 + 4096];
    struct fl_run run;
    struct fl_run_rule r = rule(1);
    int fd, checked = 0;

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 1, &f), 0);
    request(req, 1, 0, 0, 8192, 4096);
    /* Only a page that was out of the cache before the call and is still
     * out after it proves anything: something else on the machine (a
     * reader, readahead) may bring it back in between, then try again. */
    for (int tries = 0; tries < 5 && !checked; tries++) {
        fd = open(path, O_RDONLY);
        CHECK(fd >= 0);
        CHECK(fdatasync(fd) == 0);
        CHECK(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0);
        close(fd);
        if (page_resident(path, 8192))
            continue;
        CHECK_RC(fl_file_read_run(f, req, sizeof(req), &r, 16, out, sizeof(out), &run), 0);
        if (page_resident(path, 8192))
            continue;
        CHECK(run.count == 0 && run.consumed == 0 && run.out_len == 0);
        checked = 1;
    }
    if (!checked)
        fprintf(stderr, "    (page cache not droppable here: not checked)\n");
    fl_file_close(f);
    unlink(path);
}

/* NBD_CMD_WRITE, flags FUA, cookie 01..08, offset 0x200, length 4, payload
 * "wxyz". */
static const uint8_t WRITE_200_4[32] = {
    0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00,
    0x00, 0x00, 0x00, 0x04, 'w', 'x', 'y', 'z',
};

static void test_write_run_check(void)
{
    uint8_t req[4 * 32], acks[4 * 16];
    struct fl_run run;
    struct fl_run_rule r = rule(0);

    memcpy(req, WRITE_200_4, 32);
    memcpy(req + 32, WRITE_200_4, 32);
    req[32 + 15] = 9; /* second cookie */
    memset(acks, 0xee, sizeof(acks));
    CHECK_RC(fl_write_run_check(req, 64, &r, 16, acks, sizeof(acks), &run), 0);
    CHECK(run.count == 2 && run.consumed == 64 && run.data == 8 && run.out_len == 32);
    CHECK(memcmp(acks, SIMPLE_1000_10, 16) == 0); /* same cookie: same reply */
    CHECK(memcmp(acks + 16, SIMPLE_1000_10, 15) == 0 && acks[31] == 9);
    CHECK(acks[32] == 0xee);

    /* Stops: payload incomplete, no room for the ack, max_count, a READ,
     * a flag, past the end, unaligned (the engine's WRITE errors). */
    CHECK_RC(fl_write_run_check(req, 63, &r, 16, acks, sizeof(acks), &run), 0);
    CHECK(run.count == 1 && run.consumed == 32);
    CHECK_RC(fl_write_run_check(req, 64, &r, 16, acks, 31, &run), 0);
    CHECK(run.count == 1);
    CHECK_RC(fl_write_run_check(req, 64, &r, 1, acks, sizeof(acks), &run), 0);
    CHECK(run.count == 1);
    memcpy(req + 32, READ_1000_10, 28);
    CHECK_RC(fl_write_run_check(req, 60, &r, 16, acks, sizeof(acks), &run), 0);
    CHECK(run.count == 1 && run.consumed == 32);
    memcpy(req + 32, WRITE_200_4, 32);
    req[32 + 5] = 0x2; /* NO_HOLE: not a WRITE flag */
    CHECK_RC(fl_write_run_check(req, 64, &r, 16, acks, sizeof(acks), &run), 0);
    CHECK(run.count == 1);
    r.size = 0x203; /* the first ends past it */
    CHECK_RC(fl_write_run_check(req, 64, &r, 16, acks, sizeof(acks), &run), 0);
    CHECK(run.count == 0 && run.consumed == 0);
    r.size = SZ;
    r.min_block = 512; /* length 4 is not aligned */
    CHECK_RC(fl_write_run_check(req, 64, &r, 16, acks, sizeof(acks), &run), 0);
    CHECK(run.count == 0);
    r.min_block = 1;
    r.max_length = 3;
    CHECK_RC(fl_write_run_check(req, 64, &r, 16, acks, sizeof(acks), &run), 0);
    CHECK(run.count == 0);
    CHECK_RC(fl_write_run_check(req, 64, &r, 16, NULL, 0, &run), -EINVAL);
    r.min_block = 6;
    CHECK_RC(fl_write_run_check(req, 64, &r, 16, acks, sizeof(acks), &run), -EINVAL);
}

static void reap(fl_queue *q, uint64_t want, int32_t *rc)
{
    uint64_t id;
    int32_t bits;
    size_t n = 0;
    struct pollfd p = { .fd = fl_queue_fd(q), .events = POLLIN };

    while (n == 0) {
        CHECK(poll(&p, 1, 10000) == 1);
        CHECK_RC(fl_queue_reap(q, &id, rc, &bits, 1, &n), 0);
    }
    CHECK(id == want);
}

static void test_write_run_in_a_worker(void)
{
    char path[4096];
    fl_file *f;
    fl_queue *q;
    uint8_t req[3 * 32], back[4];
    int32_t rcs[3] = { 99, 99, 99 }, rc;

    make_image(path, SZ, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_queue_open(2, &q), 0);
    for (int i = 0; i < 3; i++) {
        memcpy(req + 32 * i, WRITE_200_4, 32);
        req[32 * i + 23] = (uint8_t)(0x10 * i); /* offsets 0x200, 0x210, 0x220 */
        req[32 * i + 28] = (uint8_t)('a' + i);
    }
    CHECK_RC(fl_queue_submit_write_run(q, 7, f, req, sizeof(req), 3, rcs), 0);
    reap(q, 7, &rc);
    CHECK(rc == 0 && rcs[0] == 0 && rcs[1] == 0 && rcs[2] == 0);
    for (int i = 0; i < 3; i++) {
        CHECK_RC(fl_file_read(f, back, 4, 0x200 + 0x10 * (uint64_t)i, NULL), 0);
        CHECK(back[0] == 'a' + i && memcmp(back + 1, "xyz", 3) == 0);
    }

    /* A failing write (past the end: the check would never pass it) does
     * not stop the others; a request cut short refuses the rest. */
    req[32 + 16] = 0x7f;
    req[28] = 'A';
    req[64 + 28] = 'C';
    CHECK_RC(fl_queue_submit_write_run(q, 8, f, req, sizeof(req), 3, rcs), 0);
    reap(q, 8, &rc);
    CHECK(rc == -EINVAL && rcs[0] == 0 && rcs[1] == -EINVAL && rcs[2] == 0);
    CHECK_RC(fl_file_read(f, back, 1, 0x200, NULL), 0);
    CHECK(back[0] == 'A');
    CHECK_RC(fl_file_read(f, back, 1, 0x220, NULL), 0);
    CHECK(back[0] == 'C');
    rcs[0] = rcs[1] = rcs[2] = 99;
    req[32 + 16] = 0;
    CHECK_RC(fl_queue_submit_write_run(q, 9, f, req, 32 + 31, 3, rcs), 0);
    reap(q, 9, &rc);
    CHECK(rc == -EINVAL && rcs[0] == 0 && rcs[1] == -EINVAL && rcs[2] == -EINVAL);

    CHECK_RC(fl_queue_submit_write_run(q, 10, f, req, sizeof(req), 0, rcs), -EINVAL);
    CHECK_RC(fl_queue_submit_write_run(q, 10, f, NULL, sizeof(req), 1, rcs), -EINVAL);
    CHECK_RC(fl_queue_submit_write_run(q, 10, f, req, sizeof(req), 1, NULL), -EINVAL);
    fl_queue_close(q);
    fl_file_close(f);
    unlink(path);
}

int main(void)
{
    fprintf(stderr, "test_runs\n");
    RUN(test_reply_bytes);
    RUN(test_stops_where_the_engine_decides);
    RUN(test_bounds_of_a_run);
    RUN(test_uncached_data_stops_the_run);
    RUN(test_write_run_check);
    RUN(test_write_run_in_a_worker);
    fprintf(stderr, "test_runs: OK\n");
    return 0;
}
