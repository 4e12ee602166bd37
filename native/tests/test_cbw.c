/* Unit tests of native/src/cbw.c: the CBW invariants (QEMU image-fleecing
 * pattern table), discard, scope, failure policies, cache, extents and a
 * threaded stress test where the snapshot must always equal the original.
 * Images are sized so the tail cluster is short. */
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <time.h>

#include "check.h"
#include "fleeced.h"

#define CS ((uint64_t)65536)
#define SZ (5 * CS + 1000)

static uint8_t pat(uint64_t i) { return (uint8_t)(i * 13 + (i >> 16) + 1); }

struct fix {
    char path[4096];
    fl_file *f;
    fl_session *s;
};

static void params_init(struct fl_session_params *p, uint64_t cs)
{
    memset(p, 0, sizeof(*p));
    p->cluster_size = cs;
    p->temp_dir = test_tmpdir();
    p->cbw_timeout_ms = 10000;
}

static void fix_open(struct fix *x, uint64_t size,
                     const struct fl_session_params *p)
{
    make_image(x->path, size, pat);
    CHECK_RC(fl_file_open(x->path, 0, &x->f), 0);
    CHECK_RC(fl_session_open(x->f, p, &x->s), 0);
}

static void fix_close(struct fix *x)
{
    fl_session_close(x->s);
    fl_file_close(x->f);
    unlink(x->path);
}

static void check_snap_orig(fl_session *s, uint64_t off, uint64_t len)
{
    uint8_t *b = malloc(len);
    CHECK(b != NULL);
    CHECK_RC(fl_session_read(s, b, len, off, NULL), 0);
    for (uint64_t i = 0; i < len; i++)
        CHECK(b[i] == pat(off + i));
    free(b);
}

static void guest_write(fl_file *f, uint64_t off, uint64_t len, uint8_t v,
                        int want)
{
    uint8_t *b = malloc(len);
    CHECK(b != NULL);
    memset(b, v, len);
    CHECK_RC(fl_file_write(f, b, len, off, 0), want);
    free(b);
}

static void check_file(fl_file *f, uint64_t off, uint64_t len, int v)
{
    uint8_t *b = malloc(len);
    CHECK(b != NULL);
    CHECK_RC(fl_file_read(f, b, len, off, NULL), 0);
    for (uint64_t i = 0; i < len; i++)
        CHECK(v < 0 ? b[i] == pat(off + i) : b[i] == (uint8_t)v);
    free(b);
}

static int state_at(fl_session *s, uint64_t off)
{
    int st = -1;
    CHECK_RC(fl_session_cluster_state(s, off, &st), 0);
    return st;
}

static void test_params(void)
{
    struct fl_session_params p;
    struct fix x;
    fl_session *s2 = (fl_session *)1;
    uint64_t so = SZ, sl = 1;

    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    p.cluster_size = 3000;
    CHECK_RC(fl_session_open(x.f, &p, &s2), -EINVAL);
    CHECK(s2 == NULL);
    p.cluster_size = CS * 1024;
    CHECK_RC(fl_session_open(x.f, &p, &s2), -EINVAL);
    params_init(&p, CS);
    p.policy = 7;
    CHECK_RC(fl_session_open(x.f, &p, &s2), -EINVAL);
    params_init(&p, CS);
    p.scope_off = &so;
    p.scope_len = &sl;
    p.n_scope = 1;
    CHECK_RC(fl_session_open(x.f, &p, &s2), -EINVAL);
    params_init(&p, CS);
    p.temp_dir = "/nonexistent/fleeced";
    CHECK_RC(fl_session_open(x.f, &p, &s2), -ENOENT);
    {
        uint8_t b[4];
        CHECK_RC(fl_session_read(x.s, b, 4, SZ - 3, NULL), -EINVAL);
        CHECK_RC(fl_session_discard(x.s, UINT64_MAX, 2), -EINVAL);
        CHECK_RC(fl_session_cluster_state(x.s, SZ, &(int){0}), -EINVAL);
        CHECK_RC(fl_session_inject_error(x.s, 0, 1), -EINVAL);
    }
    fix_close(&x);
}

/* QEMU image-fleecing pattern table. */
static void test_patterns(void)
{
    static const struct { uint64_t off, len; } w[] = {
        { 0, CS },                 /* full overwrite */
        { CS + 100, 200 },         /* inside one cluster */
        { 2 * CS, 512 },           /* partial-left */
        { 3 * CS - 512, 512 },     /* partial-right (cluster 2) */
        { 4 * CS - 10, 20 },       /* crossing clusters 3/4 */
        { SZ - 300, 300 },         /* last (short) cluster */
    };
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    uint64_t i;

    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    CHECK(state_at(x.s, 0) == FL_NEEDED);
    for (i = 0; i < sizeof(w) / sizeof(w[0]); i++) {
        guest_write(x.f, w[i].off, w[i].len, (uint8_t)(0x10 + i), 0);
        check_file(x.f, w[i].off, w[i].len, (int)(0x10 + i));
        check_snap_orig(x.s, 0, SZ);
        CHECK(state_at(x.s, w[i].off) == FL_COPIED);
    }
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.clusters_total == 6 && st.clusters_copied == 6);
    CHECK(st.clusters_needed == 0);
    CHECK(st.cbw_count == 6 && st.cbw_bytes == SZ);
    CHECK(st.temp_bytes == SZ && st.temp_bytes_written == SZ);
    CHECK(st.read_temp_bytes > 0);
    CHECK(st.read_source_bytes > 0 && st.cache_bytes == 0 && !st.broken);
    /* Rewriting a copied cluster does not copy again. */
    guest_write(x.f, 0, CS, 0x77, 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cbw_count == 6);
    check_snap_orig(x.s, 0, SZ);
    fix_close(&x);

    /* zero and trim are guest writes too. */

    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    CHECK_RC(fl_file_zero(x.f, 100, CS, FL_MAY_TRIM), 0);
    CHECK_RC(fl_file_trim(x.f, 3 * CS, SZ - 3 * CS), 0);
    CHECK_RC(fl_file_zero(x.f, 2 * CS + 1, 10, 0), 0);
    check_snap_orig(x.s, 0, SZ);
    check_file(x.f, 100, CS, 0);
    fix_close(&x);
}

static void test_discard_scope(void)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    uint8_t b[16];
    uint64_t so[2] = { CS + 5, 4 * CS }, sl[2] = { 10, 1 };

    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    guest_write(x.f, CS, 2 * CS, 0x55, 0); /* clusters 1, 2 copied */
    /* Inward rounding: [CS+1, 3CS-1) holds no whole cluster, so nothing
     * is dropped; [CS, 3CS) drops clusters 1 and 2. */
    CHECK_RC(fl_session_discard(x.s, CS + 1, 2 * CS - 2), 0);
    CHECK(state_at(x.s, CS) == FL_COPIED);
    CHECK_RC(fl_session_discard(x.s, CS, 2 * CS), 0);
    CHECK(state_at(x.s, CS) == FL_NOT_NEEDED);
    CHECK(state_at(x.s, 2 * CS) == FL_NOT_NEEDED);
    CHECK_RC(fl_session_read(x.s, b, 16, CS + 10, NULL), -EPERM);
    CHECK_RC(fl_session_read(x.s, b, 16, CS - 8, NULL), -EPERM);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.temp_bytes == 0 && st.clusters_discarded == 2);
    CHECK(st.discarded_bytes == 2 * CS);
    /* Tail cluster counts as whole when the range reaches the end. */
    CHECK_RC(fl_session_discard(x.s, 5 * CS, 10), 0);
    CHECK(state_at(x.s, 5 * CS) == FL_NEEDED);
    CHECK_RC(fl_session_discard(x.s, 5 * CS, SZ - 5 * CS), 0);
    CHECK(state_at(x.s, 5 * CS) == FL_NOT_NEEDED);
    /* Writes there no longer copy. */
    guest_write(x.f, CS, 10, 1, 0);
    guest_write(x.f, SZ - 10, 10, 1, 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cbw_count == 2);
    check_snap_orig(x.s, 0, CS);
    fix_close(&x);

    params_init(&p, CS);
    p.scope_off = so;
    p.scope_len = sl;
    p.n_scope = 2;
    fix_open(&x, SZ, &p);
    CHECK(state_at(x.s, 0) == FL_NOT_NEEDED);
    CHECK(state_at(x.s, CS) == FL_NEEDED);
    CHECK(state_at(x.s, 4 * CS) == FL_NEEDED);
    CHECK(state_at(x.s, 5 * CS) == FL_NOT_NEEDED);
    guest_write(x.f, 0, SZ, 0x99, 0);
    check_snap_orig(x.s, CS, CS);
    check_snap_orig(x.s, 4 * CS, CS);
    CHECK_RC(fl_session_read(x.s, b, 16, 0, NULL), -EPERM);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cbw_count == 2 && st.temp_bytes == 2 * CS);
    /* readable: the whole range is checked, as a read would find it. */
    CHECK_RC(fl_session_readable(x.s, CS, CS), 0);
    CHECK_RC(fl_session_readable(x.s, CS + 7, 10), 0);
    CHECK_RC(fl_session_readable(x.s, 4 * CS, CS), 0);
    CHECK_RC(fl_session_readable(x.s, CS, 2 * CS), -EPERM);    /* cluster 2 */
    CHECK_RC(fl_session_readable(x.s, CS - 1, 2), -EPERM);     /* cluster 0 */
    CHECK_RC(fl_session_readable(x.s, 4 * CS, CS + 1), -EPERM); /* cluster 5 */
    CHECK_RC(fl_session_readable(x.s, 4 * CS, 0), 0);
    CHECK_RC(fl_session_readable(x.s, SZ, 1), -EINVAL);
    CHECK_RC(fl_session_readable(x.s, UINT64_MAX, 2), -EINVAL);
    fix_close(&x);
}

static void test_policies(void)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    uint8_t b[16];
    int pol;

    for (pol = 0; pol < 2; pol++) {
        /* max_temp: room for one cluster only. */
        params_init(&p, CS);
        p.max_temp = CS + 10;
        p.policy = pol;
        fix_open(&x, SZ, &p);
        guest_write(x.f, 0, 10, 0x11, 0);
        guest_write(x.f, CS, 10, 0x22, pol ? -ENOSPC : 0);
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        if (pol) {
            check_file(x.f, CS, 10, -1);
            CHECK(!st.broken && state_at(x.s, CS) == FL_NEEDED);
            check_snap_orig(x.s, 0, SZ);
        } else {
            check_file(x.f, CS, 10, 0x22);
            CHECK(st.broken && st.broken_errno == ENOSPC);
            CHECK(st.temp_bytes == 0);
            CHECK_RC(fl_session_read(x.s, b, 16, 0, NULL), -EIO);
            CHECK_RC(fl_session_read(x.s, b, 16, 3 * CS, NULL), -EIO);
            CHECK_RC(fl_session_readable(x.s, 0, SZ), -EIO);
            guest_write(x.f, 2 * CS, 10, 0x33, 0); /* no more CBW */
            CHECK_RC(fl_session_stats(x.s, &st), 0);
            CHECK(st.cbw_count == 1);
        }
        fix_close(&x);

        /* Injected temp-store error, cache and file. */
        for (int cache = 0; cache < 2; cache++) {
            params_init(&p, CS);
            p.policy = pol;
            p.cache_bytes = cache ? 4 * CS : 0;
            fix_open(&x, SZ, &p);
            CHECK_RC(fl_session_inject_error(x.s, EIO, 1), 0);
            guest_write(x.f, CS, 10, 0x22, pol ? -EIO : 0);
            CHECK_RC(fl_session_stats(x.s, &st), 0);
            CHECK(st.broken == !pol);
            if (pol) {
                check_file(x.f, CS, 10, -1);
                guest_write(x.f, CS, 10, 0x22, 0); /* hook used up */
                check_snap_orig(x.s, 0, SZ);
            } else {
                CHECK(st.broken_errno == EIO);
                check_file(x.f, CS, 10, 0x22);
                CHECK_RC(fl_session_read(x.s, b, 16, 0, NULL), -EIO);
            }
            fix_close(&x);
        }
    }
}

static void test_cache(void)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;

    params_init(&p, CS);
    p.cache_bytes = 2 * CS;
    fix_open(&x, SZ, &p);
    guest_write(x.f, 0, 2 * CS, 0x44, 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cache_bytes == 2 * CS && st.temp_bytes_written == 0);
    guest_write(x.f, 2 * CS, 10, 0x44, 0); /* over budget: temp file */
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cache_bytes == 2 * CS && st.temp_bytes == CS);
    check_snap_orig(x.s, 0, SZ);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.read_cache_bytes == 2 * CS && st.read_temp_bytes == CS);
    CHECK(st.read_source_bytes == SZ - 3 * CS);
    CHECK_RC(fl_session_discard(x.s, 0, CS), 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cache_bytes == CS);
    guest_write(x.f, SZ - 1, 1, 0x44, 0); /* short tail cluster fits */
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cache_bytes == CS + (SZ - 5 * CS));
    check_snap_orig(x.s, CS, SZ - CS);
    fix_close(&x);
}

static void test_extents(void)
{
    struct fl_session_params p;
    struct fix x;
    uint64_t lens[8];
    uint32_t flags[8];
    size_t n;

    params_init(&p, CS);
    make_image(x.path, SZ, NULL); /* all hole but one byte of cluster 1 */
    CHECK_RC(fl_file_open(x.path, 0, &x.f), 0);
    guest_write(x.f, CS, 1, 0x5a, 0);
    CHECK_RC(fl_session_open(x.f, &p, &x.s), 0);
    guest_write(x.f, CS, 10, 1, 0);     /* cluster 1 copied (data) */
    guest_write(x.f, 2 * CS, 10, 1, 0); /* cluster 2 was a hole: ZERO */
    guest_write(x.f, 3 * CS, 10, 1, 0);
    CHECK_RC(fl_session_discard(x.s, 3 * CS, CS), 0);
    CHECK(state_at(x.s, CS) == FL_COPIED);
    CHECK(state_at(x.s, 2 * CS) == FL_ZERO);
    CHECK_RC(fl_session_extents(x.s, 0, SZ, lens, flags, 8, &n), 0);
    CHECK(n == 5);
    CHECK(lens[0] == CS && flags[0] == (FL_EXT_HOLE | FL_EXT_ZERO));
    CHECK(lens[1] == CS && flags[1] == 0);
    CHECK(lens[2] == CS && flags[2] == (FL_EXT_HOLE | FL_EXT_ZERO));
    /* discarded: nothing there, reads fail EPERM: a hole, not zeros */
    CHECK(lens[3] == CS && flags[3] == (FL_EXT_HOLE | FL_EXT_UNREADABLE));
    CHECK(lens[4] == SZ - 4 * CS && flags[4] == (FL_EXT_HOLE | FL_EXT_ZERO));
    {
        uint8_t b[100];
        int hole = 0;
        CHECK_RC(fl_session_read(x.s, b, 100, 0, &hole), 0);
        CHECK(hole == 1);
        CHECK_RC(fl_session_read(x.s, b, 100, CS, &hole), 0);
        CHECK(hole == 0 && b[0] == 0x5a && b[1] == 0 && b[99] == 0);
        CHECK_RC(fl_session_read(x.s, b, 100, 2 * CS, &hole), 0);
        CHECK(hole == 1 && b[0] == 0 && b[99] == 0);
    }
    fix_close(&x);
}

static void test_two_sessions(void)
{
    struct fl_session_params p;
    struct fix x;
    fl_session *s2;
    uint8_t b[CS];

    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    guest_write(x.f, 0, CS, 0xa1, 0);
    CHECK_RC(fl_session_open(x.f, &p, &s2), 0);
    guest_write(x.f, 0, CS, 0xa2, 0);
    check_snap_orig(x.s, 0, SZ);
    CHECK_RC(fl_session_read(s2, b, CS, 0, NULL), 0);
    for (size_t i = 0; i < CS; i++)
        CHECK(b[i] == 0xa1);
    fl_session_close(s2);
    fix_close(&x);
}


/* ---- cbw_timeout bounds the copy itself (copier threads) ------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* Wait (bounded) until no cluster (of size CSZ) of [off, off+len) is
 * COPYING. */
static void wait_settled(fl_session *s, uint64_t off, uint64_t len,
                         uint64_t csz)
{
    int64_t t0 = now_ms();

    for (uint64_t o = off; o < off + len; o += csz) {
        while (state_at(s, o) == FL_COPYING) {
            CHECK(now_ms() - t0 < 10000);
            sleep_ms(2);
        }
    }
}

/* 1 while some descriptor of this process is open on PATH (even after
 * unlink: "PATH (deleted)"). */
static int path_open(const char *path)
{
    size_t n = strlen(path);
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    char lnk[4096 + 32];
    int found = 0;

    CHECK(d != NULL);
    while (!found && (de = readdir(d)) != NULL) {
        ssize_t r = readlinkat(dirfd(d), de->d_name, lnk, sizeof(lnk) - 1);
        if (r <= 0)
            continue;
        lnk[r] = '\0';
        found = strncmp(lnk, path, n) == 0 && (lnk[n] == '\0' || lnk[n] == ' ');
    }
    closedir(d);
    return found;
}

/* Wait (bounded) until the image's descriptor is closed: the file's last
 * reference is gone, so the session's is too (it holds one on the file). */
static void wait_freed(const char *path)
{
    int64_t t0 = now_ms();

    while (path_open(path)) {
        CHECK(now_ms() - t0 < 10000);
        sleep_ms(5);
    }
}

/* inject_delay 1000 ms, cbw_timeout 100 ms: the write's own copy times
 * out, the policy applies at once, and the late copy is dropped. */
static void test_timeout_bounds_copy(void)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    uint8_t *b = malloc(CS);
    int64_t t0, took;

    CHECK(b != NULL);
    memset(b, 0x5a, CS);
    for (int pol = 0; pol < 2; pol++) {
        params_init(&p, CS);
        p.cbw_timeout_ms = 100;
        p.policy = pol;
        fix_open(&x, SZ, &p);
        CHECK_RC(fl_session_inject_delay(x.s, 1000), 0);
        t0 = now_ms();
        CHECK_RC(fl_file_write(x.f, b, CS, CS, 0), pol ? -ETIMEDOUT : 0);
        took = now_ms() - t0;
        CHECK(took < 900); /* did not wait for the copy */
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        if (pol == FL_BREAK_SNAPSHOT) {
            CHECK(st.broken && st.broken_errno == ETIMEDOUT);
            check_file(x.f, CS, CS, 0x5a);
        } else {
            CHECK(!st.broken);
            check_file(x.f, CS, CS, -1); /* source untouched */
            /* The late copy still owns the cluster (it cannot settle
             * before 1000 ms). */
            int st1 = state_at(x.s, CS);
            if (now_ms() - t0 < 950)
                CHECK(st1 == FL_COPYING);
        }
        wait_settled(x.s, CS, CS, CS);
        CHECK(state_at(x.s, CS) == FL_NEEDED);
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        CHECK(st.temp_bytes == 0 && st.temp_bytes_allocated == 0);
        CHECK(st.clusters_copied == 0 && st.cbw_count == 0);
        CHECK(st.clusters_needed == st.clusters_total);
        if (pol == FL_BREAK_GUEST_WRITE) {
            CHECK(!st.broken);
            check_snap_orig(x.s, 0, SZ);
            CHECK_RC(fl_session_inject_delay(x.s, 0), 0);
            CHECK_RC(fl_file_write(x.f, b, CS, CS, 0), 0);
            CHECK(state_at(x.s, CS) == FL_COPIED);
            check_file(x.f, CS, CS, 0x5a);
            check_snap_orig(x.s, 0, SZ);
            CHECK_RC(fl_session_stats(x.s, &st), 0);
            CHECK(st.temp_bytes == CS && st.cbw_count == 1);
            CHECK(st.temp_bytes_allocated >= CS);
        }
        fix_close(&x);
    }
    free(b);
}

struct tw {
    fl_file *f;
    uint64_t off;
    int rc;
    int64_t took;
};

static void *timed_write(void *arg)
{
    struct tw *t = arg;
    uint8_t v[4096];
    int64_t t0 = now_ms();

    memset(v, 0x77, sizeof(v));
    t->rc = fl_file_write(t->f, v, sizeof(v), t->off, 0);
    t->took = now_ms() - t0;
    return NULL;
}

/* More timed-out writers than copiers (break-guest-write): the jobs still
 * queued are given back at once, the running ones settle late; the owner
 * closes everything while the late copies run, and the last copier frees
 * the session and the file. */
static void test_timeout_queued_jobs(void)
{
    enum { NW = 6 };
    struct fl_session_params p;
    struct fix x;
    pthread_t th[NW];
    struct tw t[NW];
    int copying = 0, needed = 0;
    int64_t t0;

    params_init(&p, CS);
    p.cbw_timeout_ms = 100;
    p.policy = FL_BREAK_GUEST_WRITE;
    fix_open(&x, (NW + 1) * CS, &p);
    CHECK_RC(fl_session_inject_delay(x.s, 1000), 0);
    t0 = now_ms();
    for (int i = 0; i < NW; i++) {
        t[i] = (struct tw){ x.f, (uint64_t)i * CS, 1, 0 };
        CHECK(pthread_create(&th[i], NULL, timed_write, &t[i]) == 0);
    }
    for (int i = 0; i < NW; i++) {
        CHECK(pthread_join(th[i], NULL) == 0);
        CHECK(t[i].rc == -ETIMEDOUT && t[i].took < 900);
    }
    for (int i = 0; i < NW; i++) {
        int st = state_at(x.s, (uint64_t)i * CS);
        copying += st == FL_COPYING;
        needed += st == FL_NEEDED;
    }
    /* At most 4 copiers run jobs (and cannot settle them before 1000
     * ms); the others were never started and went back at once. */
    if (now_ms() - t0 < 950)
        CHECK(copying <= 4 && needed >= NW - 4 && copying + needed == NW);
    check_file(x.f, 0, (NW + 1) * CS, -1);
    CHECK(path_open(x.path));
    fix_close(&x);
    wait_freed(x.path); /* the copiers drop the last references */
}

/* ---- holes are not copied -------------------------------------------- */

static void test_holes_not_copied(void)
{
    const uint64_t big = (uint64_t)64 << 20;
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    uint64_t lens[4];
    uint32_t flags[4];
    size_t n;
    uint8_t *b = malloc(4 << 20);
    int hole;

    CHECK(b != NULL);
    for (int inl = 0; inl < 2; inl++) {
        /* 64 MiB of write-zeroes over a sparse disk, max_temp 16 MiB. */
        params_init(&p, CS);
        p.max_temp = (uint64_t)16 << 20;
        p.cache_bytes = inl ? 0 : 4 * CS;
        p.cbw_timeout_ms = inl ? 0 : 10000;
        make_image(x.path, big, NULL);
        CHECK_RC(fl_file_open(x.path, 0, &x.f), 0);
        CHECK_RC(fl_session_open(x.f, &p, &x.s), 0);
        CHECK_RC(fl_file_zero(x.f, 0, big, 0), 0);
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        CHECK(!st.broken && st.temp_bytes == 0 && st.cache_bytes == 0);
        CHECK(st.temp_bytes_written == 0 && st.temp_bytes_allocated == 0);
        CHECK(st.clusters_zero == big / CS && st.clusters_copied == 0);
        CHECK(st.clusters_needed == 0 && st.cbw_count == 0);
        CHECK(state_at(x.s, big - 1) == FL_ZERO);
        for (uint64_t off = 0; off < big; off += (uint64_t)20 << 20) {
            memset(b, 0xff, 4 << 20);
            CHECK_RC(fl_session_read(x.s, b, 4 << 20, off, &hole), 0);
            CHECK(hole == 1 && b[0] == 0 && b[(4 << 20) - 1] == 0);
        }
        CHECK_RC(fl_session_extents(x.s, 0, big, lens, flags, 4, &n), 0);
        CHECK(n == 1 && lens[0] == big &&
              flags[0] == (FL_EXT_HOLE | FL_EXT_ZERO));
        /* Discard of ZERO clusters has nothing to release. */
        CHECK_RC(fl_session_discard(x.s, 0, CS), 0);
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        CHECK(st.clusters_zero == big / CS - 1 && st.temp_bytes == 0);
        CHECK(state_at(x.s, 0) == FL_NOT_NEEDED);
        fix_close(&x);
    }

    /* Plain writes of data over holes: only the data cluster is stored,
     * so a max_temp of one cluster is enough. */
    params_init(&p, CS);
    p.max_temp = CS;
    make_image(x.path, SZ, NULL);
    CHECK_RC(fl_file_open(x.path, 0, &x.f), 0);
    guest_write(x.f, 2 * CS + 7, 1, 0x42, 0);
    CHECK_RC(fl_session_open(x.f, &p, &x.s), 0);
    guest_write(x.f, 0, SZ, 0x99, 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(!st.broken && st.temp_bytes == CS && st.cbw_count == 1);
    CHECK(st.clusters_copied == 1 && st.clusters_zero == 5);
    CHECK(state_at(x.s, 2 * CS) == FL_COPIED);
    CHECK(state_at(x.s, SZ - 1) == FL_ZERO); /* short tail cluster */
    CHECK_RC(fl_session_read(x.s, b, SZ, 0, &hole), 0);
    CHECK(hole == 0);
    for (uint64_t i = 0; i < SZ; i++)
        CHECK(b[i] == (i == 2 * CS + 7 ? 0x42 : 0));
    CHECK_RC(fl_session_read(x.s, b, 2 * CS, 0, &hole), 0);
    CHECK(hole == 1);
    CHECK_RC(fl_session_read(x.s, b, SZ - 3 * CS, 3 * CS, &hole), 0);
    CHECK(hole == 1);
    CHECK_RC(fl_session_extents(x.s, 0, SZ, lens, flags, 4, &n), 0);
    CHECK(n == 3);
    CHECK(lens[0] == 2 * CS && flags[0] == (FL_EXT_HOLE | FL_EXT_ZERO));
    CHECK(lens[1] == CS && flags[1] == 0);
    CHECK(lens[2] == SZ - 3 * CS && flags[2] == (FL_EXT_HOLE | FL_EXT_ZERO));
    /* Discarding the data cluster releases its bytes. */
    CHECK_RC(fl_session_discard(x.s, 2 * CS, CS), 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.temp_bytes == 0 && st.temp_bytes_allocated == 0);
    fix_close(&x);
    free(b);
}

/* ---- a failed or broken copy leaves no temp data behind --------------- */

static void test_failed_copy_punched(void)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;

    for (int pol = 0; pol < 2; pol++) {
        for (int inl = 0; inl < 2; inl++) {
            /* A torn temp write (first half lands, then EIO) over a run
             * of three clusters. */
            params_init(&p, CS);
            p.policy = pol;
            p.cbw_timeout_ms = inl ? 0 : 10000;
            fix_open(&x, SZ, &p);
            guest_write(x.f, 4 * CS, 10, 0x11, 0); /* something stored */
            CHECK_RC(fl_session_inject_error(x.s, EIO, 1), 0);
            guest_write(x.f, 0, 3 * CS, 0x22, pol ? -EIO : 0);
            CHECK_RC(fl_session_stats(x.s, &st), 0);
            CHECK(st.broken == !pol);
            if (pol) {
                CHECK(st.temp_bytes == CS);
                /* No torn leftovers (they would add 96 KiB). */
                CHECK(st.temp_bytes_allocated >= CS &&
                      st.temp_bytes_allocated < 2 * CS);
                CHECK(state_at(x.s, 0) == FL_NEEDED);
                CHECK(state_at(x.s, 2 * CS) == FL_NEEDED);
                CHECK(st.clusters_copied == 1);
                check_file(x.f, 0, 3 * CS, -1);
                check_snap_orig(x.s, 0, SZ);
            } else {
                CHECK(st.temp_bytes == 0 && st.temp_bytes_allocated == 0);
                /* The map tells the truth: nothing is stored. */
                CHECK(st.clusters_copied == 0 && st.clusters_zero == 0);
                CHECK(st.clusters_needed == st.clusters_total);
                CHECK(state_at(x.s, 4 * CS) == FL_NEEDED);
            }
            fix_close(&x);
        }
    }

    /* Break through max_temp after copies (and a ZERO cluster). */
    params_init(&p, CS);
    p.max_temp = 2 * CS;
    make_image(x.path, SZ, pat);
    CHECK_RC(fl_file_open(x.path, 0, &x.f), 0);
    CHECK_RC(fl_file_trim(x.f, 3 * CS, CS), 0); /* cluster 3: a hole */
    CHECK_RC(fl_session_open(x.f, &p, &x.s), 0);
    guest_write(x.f, 0, 2 * CS, 0x33, 0);
    guest_write(x.f, 3 * CS, 10, 0x33, 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.clusters_copied == 2 && st.clusters_zero == 1);
    CHECK(st.temp_bytes == 2 * CS && st.temp_bytes_allocated >= 2 * CS);
    guest_write(x.f, 4 * CS, 10, 0x33, 0); /* over max_temp: breaks */
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.broken && st.broken_errno == ENOSPC);
    CHECK(st.clusters_copied == 0 && st.clusters_zero == 0);
    CHECK(st.clusters_needed == st.clusters_total);
    CHECK(st.temp_bytes == 0 && st.temp_bytes_allocated == 0);
    CHECK(st.cbw_count == 2); /* a history counter: stays */
    fix_close(&x);
}

/* ---- FAST_ZERO refuses before any CBW --------------------------------- */

static void test_fast_zero(void)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    int rc;

    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    CHECK_RC(fl_file_zero(x.f, 0, CS, FL_FAST | FL_MAY_TRIM), -ENOTSUP);
    CHECK_RC(fl_file_zero(x.f, 10, 1, FL_FAST), -ENOTSUP);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cbw_count == 0 && st.temp_bytes_written == 0);
    CHECK(state_at(x.s, 0) == FL_NEEDED);
    check_file(x.f, 0, SZ, -1);
    /* Once copied, fast zeroing goes on (unless the filesystem itself
     * cannot zero fast). */
    guest_write(x.f, 0, CS, 0x44, 0);
    rc = fl_file_zero(x.f, 0, CS, FL_FAST | FL_MAY_TRIM);
    CHECK(rc == 0 || rc == -ENOTSUP);
    if (rc == 0)
        check_file(x.f, 0, CS, 0);
    /* A range reaching into a NEEDED cluster is refused whole. */
    CHECK_RC(fl_file_zero(x.f, CS - 10, 20, FL_FAST), -ENOTSUP);
    check_file(x.f, CS - 10, 10, rc == 0 ? 0 : 0x44);
    check_file(x.f, CS, 10, -1);
    /* Discarded clusters need no copy. */
    CHECK_RC(fl_session_discard(x.s, CS, CS), 0);
    rc = fl_file_zero(x.f, CS, CS, FL_FAST | FL_MAY_TRIM);
    CHECK(rc == 0 || rc == -ENOTSUP);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.cbw_count == 1);
    check_snap_orig(x.s, 0, CS);
    fix_close(&x);

    /* A broken session does no CBW, so it does not stop fast zeroing. */
    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    CHECK_RC(fl_session_inject_error(x.s, EIO, 1), 0);
    guest_write(x.f, 0, 10, 0x55, 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.broken);
    rc = fl_file_zero(x.f, 2 * CS, CS, FL_FAST | FL_MAY_TRIM);
    CHECK(rc == 0 || rc == -ENOTSUP);
    fix_close(&x);
}

/* ---- threads -------------------------------------------------------- */

struct stress {
    struct fix *x;
    unsigned seed;
    int writer;
    uint64_t size;
};

static unsigned rnd(unsigned *s)
{
    *s = *s * 1103515245u + 12345u;
    return (*s >> 8) & 0xffffff;
}

static void *stress_thread(void *arg)
{
    struct stress *t = arg;
    uint8_t *b = malloc(3 * CS);

    CHECK(b != NULL);
    for (int i = 0; i < 300; i++) {
        uint64_t off = rnd(&t->seed) % t->size;
        uint64_t len = 1 + rnd(&t->seed) % (3 * CS);
        if (off + len > t->size)
            len = t->size - off;
        if (t->writer) {
            memset(b, (int)(rnd(&t->seed) & 0xff), len);
            if (i % 7 == 0)
                CHECK_RC(fl_file_zero(t->x->f, off, len, FL_MAY_TRIM), 0);
            else
                CHECK_RC(fl_file_write(t->x->f, b, len, off, 0), 0);
        } else {
            CHECK_RC(fl_session_read(t->x->s, b, len, off, NULL), 0);
            for (uint64_t k = 0; k < len; k++)
                CHECK(b[k] == pat(off + k));
        }
    }
    free(b);
    return NULL;
}

static void stress(uint64_t cs, uint64_t cache, int64_t timeout_ms)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    pthread_t th[8];
    struct stress t[8];
    uint64_t size = 40 * cs + 777;

    params_init(&p, cs);
    p.cache_bytes = cache;
    p.cbw_timeout_ms = timeout_ms;
    fix_open(&x, size, &p);
    for (int i = 0; i < 8; i++) {
        t[i] = (struct stress){ &x, (unsigned)(i * 7919 + 1), i % 2, size };
        CHECK(pthread_create(&th[i], NULL, stress_thread, &t[i]) == 0);
    }
    for (int i = 0; i < 8; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    check_snap_orig(x.s, 0, size);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(!st.broken && st.cbw_count > 0);
    CHECK(st.clusters_copied + st.clusters_needed == st.clusters_total);
    fix_close(&x);
}

/* Invariant 2: long snapshot reads and block-status queries of NEEDED
 * ranges race paced small guest writes and punching zero writes, which
 * do not wait for them: a reader must never return new data, and block
 * status must never report a hole the snapshot does not have (the image
 * has none), whether the copies run inline or in the copier threads. */
struct frozen_arg {
    struct fix *x;
    const uint8_t *orig;
    uint64_t size;
    unsigned seed;
    int *stop;
};

static void *frozen_writer(void *arg)
{
    struct frozen_arg *a = arg;
    const struct timespec pause = { 0, 50000 };
    uint8_t v = 0xee;

    for (unsigned i = 0; !__atomic_load_n(a->stop, __ATOMIC_ACQUIRE); i++) {
        uint64_t off = ((uint64_t)rnd(&a->seed) << 8 ^ rnd(&a->seed)) % a->size;
        if (i % 4 == 3 && off + 8192 <= a->size)   /* punches the source */
            CHECK_RC(fl_file_zero(a->x->f, off & ~(uint64_t)4095, 8192,
                                  FL_MAY_TRIM), 0);
        else
            CHECK_RC(fl_file_write(a->x->f, &v, 1, off, 0), 0);
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static void *frozen_reader(void *arg)
{
    struct frozen_arg *a = arg;
    uint8_t *b = malloc(a->size);

    CHECK(b != NULL);
    for (int i = 0; i < 40; i++) {
        uint64_t lens[64];
        uint32_t flags[64];
        size_t n;

        CHECK_RC(fl_session_read(a->x->s, b, a->size, 0, NULL), 0);
        CHECK(memcmp(b, a->orig, a->size) == 0);
        CHECK_RC(fl_session_extents(a->x->s, 0, a->size, lens, flags, 64, &n),
                 0);
        for (size_t k = 0; k < n; k++)
            CHECK((flags[k] & FL_EXT_HOLE) == 0);
    }
    free(b);
    return NULL;
}

static void frozen_reads(int copiers)
{
    struct fl_session_params p;
    struct fix x;
    pthread_t w[2], r[2];
    struct frozen_arg aw[2], ar;
    int stop = 0;
    uint64_t size = ((uint64_t)64 << 20) + 777;
    uint8_t *orig = malloc(size);

    CHECK(orig != NULL);
    for (uint64_t k = 0; k < size; k++)
        orig[k] = pat(k);
    params_init(&p, 4096);
    p.cbw_timeout_ms = copiers ? 10000 : 0;
    fix_open(&x, size, &p);
    ar = (struct frozen_arg){ &x, orig, size, 0, &stop };
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&r[i], NULL, frozen_reader, &ar) == 0);
    for (int i = 0; i < 2; i++) {
        aw[i] = (struct frozen_arg){ &x, orig, size, (unsigned)(i * 31 + 5), &stop };
        CHECK(pthread_create(&w[i], NULL, frozen_writer, &aw[i]) == 0);
    }
    for (int i = 0; i < 2; i++)
        CHECK(pthread_join(r[i], NULL) == 0);
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 2; i++)
        CHECK(pthread_join(w[i], NULL) == 0);
    fix_close(&x);
    free(orig);
}

static void test_frozen_reads(void)
{
    frozen_reads(0);
    frozen_reads(1);
}

/* A guest write never waits for a snapshot read of the same
 * clusters (with the backup's workers at a low priority that wait was a
 * priority inversion).  The read is held for 2 s after its source read;
 * the write must finish meanwhile, and the read must notice it and
 * return the old data from the temp store. */
struct slow_read {
    struct fix *x;
    uint8_t *buf;
    int started, done;
};

static void *slow_reader(void *arg)
{
    struct slow_read *r = arg;

    __atomic_store_n(&r->started, 1, __ATOMIC_RELEASE);
    CHECK_RC(fl_session_read(r->x->s, r->buf, 65536, 0, NULL), 0);
    __atomic_store_n(&r->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void test_write_never_waits_for_a_snapshot_read(void)
{
    struct fl_session_params p;
    struct fix x;
    struct fl_session_stats st;
    struct slow_read r = { &x, NULL, 0, 0 };
    pthread_t th;
    const struct timespec settle = { 0, 100000000 };
    static uint8_t wbuf[4096], rbuf[65536];

    params_init(&p, 65536);
    fix_open(&x, 1 << 20, &p);
    r.buf = rbuf;
    CHECK_RC(fl_session_inject_read_delay(x.s, 2000), 0);
    CHECK(pthread_create(&th, NULL, slow_reader, &r) == 0);
    while (!__atomic_load_n(&r.started, __ATOMIC_ACQUIRE))
        ;
    nanosleep(&settle, NULL);   /* the reader is in its 2 s nap */
    memset(wbuf, 0xee, sizeof wbuf);
    CHECK_RC(fl_file_write(x.f, wbuf, sizeof wbuf, 4096, 0), 0);
    CHECK(!__atomic_load_n(&r.done, __ATOMIC_ACQUIRE)); /* did not wait */
    CHECK(pthread_join(th, NULL) == 0);
    for (uint64_t k = 0; k < sizeof rbuf; k++)
        CHECK(rbuf[k] == pat(k));
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.read_retries >= 1 && st.read_temp_bytes > 0);
    fix_close(&x);
}

/* Copies slower than the timeout under break-guest-write: writers and
 * snapshot readers keep timing out while jobs run, queue, are abandoned
 * and settle late; the snapshot must never show new data, and a guest
 * write that failed must not have reached the source. */
static void *timeout_stress_thread(void *arg)
{
    struct stress *t = arg;
    uint8_t *b = malloc(3 * CS);

    CHECK(b != NULL);
    for (int i = 0; i < 60; i++) {
        uint64_t off = rnd(&t->seed) % t->size;
        uint64_t len = 1 + rnd(&t->seed) % (2 * 4096);
        int rc;
        if (off + len > t->size)
            len = t->size - off;
        if (t->writer) {
            /* Copies of 0..5 ms against a 3 ms timeout: some make it. */
            CHECK_RC(fl_session_inject_delay(t->x->s, (int)(rnd(&t->seed) % 6)),
                     0);
            memset(b, 0xee, len);
            rc = fl_file_write(t->x->f, b, len, off, 0);
            CHECK(rc == 0 || rc == -ETIMEDOUT);
            if (getenv("FLEECED_TEST_VERBOSE") && rc)
                fprintf(stderr, "w");
        } else {
            rc = fl_session_read(t->x->s, b, len, off, NULL);
            CHECK(rc == 0 || rc == -ETIMEDOUT);
            if (getenv("FLEECED_TEST_VERBOSE") && rc)
                fprintf(stderr, "r");
            for (uint64_t k = 0; rc == 0 && k < len; k++)
                CHECK(b[k] == pat(off + k));
        }
    }
    free(b);
    return NULL;
}

static void test_timeout_stress(void)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    pthread_t th[8];
    struct stress t[8];
    uint64_t size = 64 * 4096 + 777;
    uint8_t *b = malloc(size);

    CHECK(b != NULL);
    params_init(&p, 4096);
    p.cbw_timeout_ms = 3;
    p.policy = FL_BREAK_GUEST_WRITE;
    p.cache_bytes = 8 * 4096;
    fix_open(&x, size, &p);
    for (int i = 0; i < 8; i++) {
        t[i] = (struct stress){ &x, (unsigned)(i * 7919 + 3), i % 2, size };
        CHECK(pthread_create(&th[i], NULL, timeout_stress_thread, &t[i]) == 0);
    }
    for (int i = 0; i < 8; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    CHECK_RC(fl_session_inject_delay(x.s, 0), 0);
    wait_settled(x.s, 0, size, 4096);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(!st.broken);
    CHECK(st.clusters_copied + st.clusters_needed == st.clusters_total);
    CHECK(st.temp_bytes + st.cache_bytes == st.clusters_copied * 4096 ||
          st.temp_bytes + st.cache_bytes ==
              (st.clusters_copied - 1) * 4096 + 777); /* short tail */
    check_snap_orig(x.s, 0, size);
    /* Every byte of the source is either original or a write that
     * succeeded (0xee): a failed write never landed. */
    CHECK_RC(fl_file_read(x.f, b, size, 0, NULL), 0);
    for (uint64_t k = 0; k < size; k++) {
        static int st1;
        if ((k & 4095) == 0)
            st1 = state_at(x.s, k);
        CHECK(b[k] == pat(k) || (b[k] == 0xee && st1 == FL_COPIED));
    }
    /* Close with copies possibly in flight; the copiers free it all. */
    CHECK_RC(fl_session_inject_delay(x.s, 50), 0);
    memset(b, 0xdd, 4096);
    for (int i = 0; i < 4; i++) {
        int rc = fl_file_write(x.f, b, 4096, (uint64_t)i * 4096 * 16, 0);
        CHECK(rc == 0 || rc == -ETIMEDOUT);
    }
    fix_close(&x);
    wait_freed(x.path);
    free(b);
}

static void test_stress(void)
{
    stress(4096, 0, 0);
    stress(4096, 8 * 4096, 0);
    stress(CS, 0, 0);
    stress(4096, 8 * 4096, 30000); /* every copy through the copiers */
    stress(CS, 0, 30000);
}

/* cbw_timeout bounds a guest write's whole copy-before-write, not each
 * session's part of it: with two sessions whose copies both take 2 s and a
 * 300 ms timeout, the write returns after about 300 ms, not 600 ms (the
 * deadline used to start per session). */
static void test_timeout_spans_sessions(void)
{
    char path[4096];
    fl_file *f;
    fl_session *a, *b;
    struct fl_session_params p = { .cluster_size = 65536,
                                   .temp_dir = test_tmpdir(),
                                   .cbw_timeout_ms = 300,
                                   .policy = FL_BREAK_SNAPSHOT };
    struct fl_session_stats st;
    static uint8_t buf[4096];
    int64_t t0, took;

    make_image(path, 1 << 20, pat);
    CHECK_RC(fl_file_open(path, 0, &f), 0);
    CHECK_RC(fl_session_open(f, &p, &a), 0);
    CHECK_RC(fl_session_open(f, &p, &b), 0);
    CHECK_RC(fl_session_inject_delay(a, 2000), 0);
    CHECK_RC(fl_session_inject_delay(b, 2000), 0);
    memset(buf, 0x22, sizeof buf);
    t0 = now_ms();
    CHECK_RC(fl_file_write(f, buf, sizeof buf, 0, 0), 0);
    took = now_ms() - t0;
    CHECK(took < 550);          /* one timeout, not one per session */
    CHECK_RC(fl_session_stats(a, &st), 0);
    CHECK(st.broken && st.broken_errno == ETIMEDOUT);
    CHECK_RC(fl_session_stats(b, &st), 0);
    CHECK(st.broken && st.broken_errno == ETIMEDOUT);
    fl_session_close(a);
    fl_session_close(b);
    fl_file_close(f);
    unlink(path);
}

/* Another process's copy-before-write (fl_session_put_old): it hands the
 * session the old data, then overwrites the image behind fleeced's back. */
static void external_write(const char *path, uint64_t off, uint64_t len, uint8_t v)
{
    uint8_t *b = malloc(len);
    int fd = open(path, O_WRONLY);

    CHECK(b != NULL && fd >= 0);
    memset(b, v, len);
    CHECK((uint64_t)pwrite(fd, b, len, (off_t)off) == len);
    close(fd);
    free(b);
}

static uint8_t *orig(uint64_t off, uint64_t len)
{
    uint8_t *b = malloc(len);

    CHECK(b != NULL);
    for (uint64_t i = 0; i < len; i++)
        b[i] = pat(off + i);
    return b;
}

static void test_put_old(void)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    uint8_t *old, b[16];

    for (int cache = 0; cache < 2; cache++) {
        params_init(&p, CS);
        p.cbw_timeout_ms = 0;
        p.cache_bytes = cache ? CS : 0;
        fix_open(&x, SZ, &p);
        /* Clusters 1-2 at once (temp), then the short tail cluster. */
        old = orig(CS, 2 * CS);
        CHECK_RC(fl_session_put_old(x.s, old, 2 * CS, CS), 0);
        free(old);
        external_write(x.path, CS, 2 * CS, 0x5a);
        old = orig(5 * CS, SZ - 5 * CS);
        CHECK_RC(fl_session_put_old(x.s, old, SZ - 5 * CS, 5 * CS), 0);
        free(old);
        external_write(x.path, 5 * CS, SZ - 5 * CS, 0x5b);
        CHECK(state_at(x.s, CS) == FL_COPIED && state_at(x.s, SZ - 1) == FL_COPIED);
        /* A cluster kept already is left alone. */
        memset(b, 0xee, sizeof b);
        CHECK_RC(fl_session_put_old(x.s, NULL, CS, CS), 0);
        CHECK(state_at(x.s, CS) == FL_COPIED);
        /* Zeros: nothing stored, reads as zeros. */
        CHECK_RC(fl_session_put_old(x.s, NULL, CS, 3 * CS), 0);
        external_write(x.path, 3 * CS, CS, 0x5c);
        CHECK(state_at(x.s, 3 * CS) == FL_ZERO);
        check_snap_orig(x.s, 0, CS);
        check_snap_orig(x.s, CS, 2 * CS);
        check_snap_orig(x.s, 5 * CS, SZ - 5 * CS);
        CHECK_RC(fl_session_read(x.s, b, 16, 3 * CS + 100, NULL), 0);
        for (size_t i = 0; i < sizeof b; i++)
            CHECK(b[i] == 0);
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        CHECK(st.cbw_count == 3 && !st.broken);
        CHECK(st.cbw_bytes == 2 * CS + (SZ - 5 * CS));
        CHECK(cache ? st.cache_bytes == SZ - 5 * CS : st.cache_bytes == 0);
        CHECK_RC(fl_session_put_old(x.s, b, 16, SZ), -EINVAL);
        /* Part of a cluster still needed: the rest never comes. */
        CHECK_RC(fl_session_put_old(x.s, b, 16, 4 * CS), 0);
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        CHECK(st.broken && st.broken_errno == EINVAL);
        CHECK_RC(fl_session_read(x.s, b, 16, 0, NULL), -EIO);
        fix_close(&x);
    }

    /* Broken from outside (the copier's connection went away). */
    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    CHECK_RC(fl_session_break(x.s, 0), -EINVAL);
    CHECK_RC(fl_session_break(x.s, ENOTCONN), 0);
    CHECK_RC(fl_session_stats(x.s, &st), 0);
    CHECK(st.broken && st.broken_errno == ENOTCONN);
    CHECK_RC(fl_session_read(x.s, b, 16, 0, NULL), -EIO);
    fix_close(&x);

    /* No room: the policy decides (the writer fails, or the snapshot). */
    for (int pol = 0; pol < 2; pol++) {
        params_init(&p, CS);
        p.cbw_timeout_ms = 0;
        p.max_temp = CS;
        p.policy = pol;
        fix_open(&x, SZ, &p);
        old = orig(0, 2 * CS);
        CHECK_RC(fl_session_put_old(x.s, old, 2 * CS, 0), pol ? -ENOSPC : 0);
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        if (pol) {
            CHECK(!st.broken && st.temp_bytes == 0 && state_at(x.s, 0) == FL_NEEDED);
            CHECK_RC(fl_session_put_old(x.s, old, CS, 0), 0);  /* one fits */
            check_snap_orig(x.s, 0, SZ);
        } else {
            CHECK(st.broken && st.broken_errno == ENOSPC);
        }
        free(old);
        fix_close(&x);
    }

    /* A failing store: punched, and the policy. */
    for (int pol = 0; pol < 2; pol++) {
        params_init(&p, CS);
        p.cbw_timeout_ms = 0;
        p.policy = pol;
        fix_open(&x, SZ, &p);
        CHECK_RC(fl_session_inject_error(x.s, EIO, 1), 0);
        old = orig(0, CS);
        CHECK_RC(fl_session_put_old(x.s, old, CS, 0), pol ? -EIO : 0);
        CHECK_RC(fl_session_stats(x.s, &st), 0);
        CHECK(st.broken == !pol && st.temp_bytes == 0);
        if (pol) {
            CHECK_RC(fl_session_put_old(x.s, old, CS, 0), 0);
            external_write(x.path, 0, CS, 0x77);
            check_snap_orig(x.s, 0, SZ);
        }
        free(old);
        fix_close(&x);
    }
}

/* Progress vectors: each read (or discard/extents, which count nothing)
 * of a 6-cluster image whose tail cluster holds 1000 bytes, and the read
 * bytes expected after it.  A cluster counts whole once any byte of it was
 * read by a read that succeeded; the tail counts its own 1000 bytes. */
enum { P_READ, P_DISCARD, P_EXTENTS, P_ZERO };
struct pvec {
    int op;
    uint64_t off, len;
    int rc;             /* expected result */
    uint64_t read;      /* read bytes after it */
};

static void run_pvecs(fl_session *s, const struct pvec *v, size_t n,
                      uint64_t total)
{
    uint8_t *b = malloc(SZ);
    uint64_t lens[16], r, t;
    uint32_t flags[16];
    size_t ne;

    CHECK(b != NULL);
    for (size_t i = 0; i < n; i++) {
        int rc = v[i].op == P_READ
                     ? fl_session_read(s, b, v[i].len, v[i].off, NULL)
                 : v[i].op == P_DISCARD
                     ? fl_session_discard(s, v[i].off, v[i].len)
                 : v[i].op == P_ZERO
                     ? fl_session_note_zero(s, v[i].off, v[i].len)
                     : fl_session_extents(s, v[i].off, v[i].len, lens, flags,
                                          16, &ne);
        if (rc != v[i].rc || fl_session_progress(s, &r, &t) != 0 ||
            r != v[i].read || t != total) {
            fprintf(stderr, "progress vector %zu: rc %d read %llu total %llu, "
                    "want rc %d read %llu total %llu\n", i, rc,
                    (unsigned long long)r, (unsigned long long)t, v[i].rc,
                    (unsigned long long)v[i].read, (unsigned long long)total);
            abort();
        }
    }
    free(b);
}

/* Vectors V on a fresh session of the whole disk, or (SCOPED) of the scope
 * clusters 1 and 4 (CS+5..CS+15, 4CS) and the tail: 2 * CS + 1000 bytes. */
static void run_progress(const struct pvec *v, size_t n, int scoped)
{
    uint64_t so[3] = { CS + 5, 4 * CS, SZ - 3 }, sl[3] = { 10, 1, 1 };
    struct fl_session_params p;
    struct fix x;

    params_init(&p, CS);
    if (scoped) {
        p.scope_off = so;
        p.scope_len = sl;
        p.n_scope = 3;
    }
    fix_open(&x, SZ, &p);
    run_pvecs(x.s, v, n, scoped ? 2 * CS + 1000 : SZ);
    fix_close(&x);
}

static void test_progress(void)
{
    static const struct pvec whole[] = {
        { P_READ, 0, 0, 0, 0 },                      /* nothing read */
        { P_EXTENTS, 0, SZ, 0, 0 },                  /* block status: no */
        { P_READ, 10, 1, 0, CS },                    /* one byte: cluster 0 */
        { P_READ, 0, CS, 0, CS },                    /* again: once */
        { P_READ, CS - 1, 2, 0, 2 * CS },            /* straddles 0|1 */
        { P_READ, SZ - 1, 1, 0, 2 * CS + 1000 },     /* short tail */
        { P_READ, SZ, 1, -EINVAL, 2 * CS + 1000 },   /* failed: nothing */
        { P_DISCARD, 2 * CS, CS, 0, 2 * CS + 1000 }, /* discard: no */
        { P_READ, 2 * CS, 1, -EPERM, 2 * CS + 1000 },
        { P_READ, 3 * CS, 2 * CS, 0, 4 * CS + 1000 },
        { P_READ, 0, SZ, -EPERM, 4 * CS + 1000 },    /* cluster 2 gone */
    };
    /* Scope: clusters 1 and 4 (CS+5..CS+15, 4CS) and the tail. */
    static const struct pvec scoped[] = {
        { P_READ, 0, 1, -EPERM, 0 },
        { P_READ, CS, CS, 0, CS },
        { P_READ, 4 * CS + 100, SZ - 4 * CS - 100, 0, 2 * CS + 1000 },
        { P_READ, CS, 1, 0, 2 * CS + 1000 },
    };
    /* Zeros a base:allocation reply told of: whole clusters only (the
     * tail when the range reaches the end), once, in the scope only. */
    static const struct pvec zeros[] = {
        { P_ZERO, 10, CS, 0, 0 },                    /* no whole cluster */
        { P_ZERO, 0, CS, 0, CS },
        { P_ZERO, CS, CS + 5, 0, 2 * CS },           /* 1, not 2 */
        { P_READ, 2 * CS, 1, 0, 3 * CS },
        { P_ZERO, 4 * CS, SZ - 4 * CS, 0, 4 * CS + 1000 }, /* 4 + tail */
        { P_ZERO, 0, SZ, 0, 5 * CS + 1000 },         /* only 3 is new */
        { P_ZERO, SZ, 1, -EINVAL, 5 * CS + 1000 },
    };
    static const struct pvec scoped_zeros[] = {
        { P_ZERO, 0, CS, 0, 0 },                     /* outside the scope */
        { P_ZERO, 0, SZ, 0, 2 * CS + 1000 },         /* 1, 4 and the tail */
    };
    struct fl_session_params p;
    fl_bitmap *old;
    struct fix x;
    uint64_t r, t;

    params_init(&p, CS);
    fix_open(&x, SZ, &p);
    CHECK_RC(fl_session_progress(x.s, &r, NULL), -EINVAL);
    fix_close(&x);
    run_progress(whole, sizeof(whole) / sizeof(whole[0]), 0);
    run_progress(scoped, sizeof(scoped) / sizeof(scoped[0]), 1);
    run_progress(zeros, sizeof(zeros) / sizeof(zeros[0]), 0);
    run_progress(scoped_zeros, sizeof(scoped_zeros) / sizeof(scoped_zeros[0]), 1);

    /* Incremental: the scope is checkpoint_since's dirty runs, here a
     * 4 KiB granule in cluster 3 only. */
    params_init(&p, CS);
    make_image(x.path, SZ, pat);
    CHECK_RC(fl_file_open(x.path, 0, &x.f), 0);
    CHECK_RC(fl_bitmap_open(NULL, SZ, 4096, 0, &old, NULL), 0);
    CHECK_RC(fl_bitmap_set(old, 3 * CS + 4096, 4096), 0);
    p.checkpoint_since = old;
    CHECK_RC(fl_session_open(x.f, &p, &x.s), 0);
    CHECK_RC(fl_session_progress(x.s, &r, &t), 0);
    CHECK(r == 0 && t == CS);
    check_snap_orig(x.s, 3 * CS, 10);
    CHECK_RC(fl_session_progress(x.s, &r, &t), 0);
    CHECK(r == CS && t == CS);
    fl_bitmap_close(old, 0);
    fix_close(&x);
}

/* Many readers of overlapping ranges, a guest writer copying under them:
 * every cluster is counted exactly once (the read bytes end at the size). */
struct preader {
    fl_session *s;
    unsigned seed;
};

static void *progress_reader(void *arg)
{
    struct preader *pr = arg;
    uint8_t *b = malloc(8 * CS);

    CHECK(b != NULL);
    for (int i = 0; i < 2000; i++) {
        uint64_t off = rnd(&pr->seed) % (64 * CS + 1000);
        uint64_t len = 1 + rnd(&pr->seed) % (8 * CS);
        if (off + len > 64 * CS + 1000)
            len = 64 * CS + 1000 - off;
        CHECK_RC(fl_session_read(pr->s, b, len, off, NULL), 0);
    }
    free(b);
    return NULL;
}

static void test_progress_threads(void)
{
    struct fl_session_params p;
    struct preader pr[4];
    pthread_t th[4];
    uint8_t *b = malloc(64 * CS + 1000);
    struct fix x;
    uint64_t r, t;

    CHECK(b != NULL);
    params_init(&p, CS);
    make_image(x.path, 64 * CS + 1000, pat);
    CHECK_RC(fl_file_open(x.path, 0, &x.f), 0);
    CHECK_RC(fl_session_open(x.f, &p, &x.s), 0);
    for (unsigned i = 0; i < 4; i++) {
        pr[i].s = x.s;
        pr[i].seed = 7 + i;
        CHECK(pthread_create(&th[i], NULL, progress_reader, &pr[i]) == 0);
    }
    for (uint64_t c = 0; c < 64; c += 3)
        guest_write(x.f, c * CS, 100, 0x42, 0);
    for (unsigned i = 0; i < 4; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    CHECK_RC(fl_session_progress(x.s, &r, &t), 0);
    CHECK(t == 64 * CS + 1000 && r <= t);
    CHECK_RC(fl_session_read(x.s, b, 64 * CS + 1000, 0, NULL), 0);
    CHECK_RC(fl_session_progress(x.s, &r, &t), 0);
    CHECK(r == t);
    free(b);
    fix_close(&x);
}

int main(void)
{
    fprintf(stderr, "test_cbw\n");
    RUN(test_params);
    RUN(test_patterns);
    RUN(test_discard_scope);
    RUN(test_policies);
    RUN(test_cache);
    RUN(test_extents);
    RUN(test_two_sessions);
    RUN(test_timeout_bounds_copy);
    RUN(test_timeout_queued_jobs);
    RUN(test_timeout_spans_sessions);
    RUN(test_holes_not_copied);
    RUN(test_failed_copy_punched);
    RUN(test_fast_zero);
    RUN(test_stress);
    RUN(test_timeout_stress);
    RUN(test_frozen_reads);
    RUN(test_write_never_waits_for_a_snapshot_read);
    RUN(test_put_old);
    RUN(test_progress);
    RUN(test_progress_threads);
    fprintf(stderr, "test_cbw: OK\n");
    return 0;
}
