/* Unit tests of native/src/cbw.c: the CBW invariants (QEMU image-fleecing
 * pattern table), discard, scope, failure policies, cache, extents and a
 * threaded stress test where the snapshot must always equal the original.
 * Images are sized so the tail cluster is short. */
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
    make_image(x.path, SZ, NULL); /* all hole */
    CHECK_RC(fl_file_open(x.path, 0, &x.f), 0);
    CHECK_RC(fl_session_open(x.f, &p, &x.s), 0);
    guest_write(x.f, CS, 10, 1, 0); /* cluster 1 copied (a hole before) */
    guest_write(x.f, 3 * CS, 10, 1, 0);
    CHECK_RC(fl_session_discard(x.s, 3 * CS, CS), 0);
    CHECK_RC(fl_session_extents(x.s, 0, SZ, lens, flags, 8, &n), 0);
    CHECK(n == 5);
    CHECK(lens[0] == CS && flags[0] == (FL_EXT_HOLE | FL_EXT_ZERO));
    CHECK(lens[1] == CS && flags[1] == 0);
    CHECK(lens[2] == CS && flags[2] == (FL_EXT_HOLE | FL_EXT_ZERO));
    CHECK(lens[3] == CS && flags[3] == 0);
    CHECK(lens[4] == SZ - 4 * CS && flags[4] == (FL_EXT_HOLE | FL_EXT_ZERO));
    {
        uint8_t b[100];
        int hole = 0;
        CHECK_RC(fl_session_read(x.s, b, 100, 0, &hole), 0);
        CHECK(hole == 1);
        CHECK_RC(fl_session_read(x.s, b, 100, CS, &hole), 0);
        CHECK(hole == 0 && b[0] == 0 && b[99] == 0);
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

static void stress(uint64_t cs, uint64_t cache)
{
    struct fl_session_params p;
    struct fl_session_stats st;
    struct fix x;
    pthread_t th[8];
    struct stress t[8];
    uint64_t size = 40 * cs + 777;

    params_init(&p, cs);
    p.cache_bytes = cache;
    p.cbw_timeout_ms = 0;
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

/* Invariant 2: long snapshot reads of NEEDED ranges race paced small
 * guest writes; a write must never reach the source under a frozen read
 * (a reader would then see new data). */
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

    while (!__atomic_load_n(a->stop, __ATOMIC_ACQUIRE)) {
        uint64_t off = ((uint64_t)rnd(&a->seed) << 8 ^ rnd(&a->seed)) % a->size;
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
        CHECK_RC(fl_session_read(a->x->s, b, a->size, 0, NULL), 0);
        CHECK(memcmp(b, a->orig, a->size) == 0);
    }
    free(b);
    return NULL;
}

static void test_frozen_reads(void)
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
    p.cbw_timeout_ms = 0;
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

static void test_stress(void)
{
    stress(4096, 0);
    stress(4096, 8 * 4096);
    stress(CS, 0);
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
    RUN(test_stress);
    RUN(test_frozen_reads);
    fprintf(stderr, "test_cbw: OK\n");
    return 0;
}
