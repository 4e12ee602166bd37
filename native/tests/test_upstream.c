/* Unit tests of native/src/upstream.c: a disk's source that is an NBD
 * export, against a real nbdkit (file plugin over a scratch image, so its
 * data outlives the server: killed and started again at the same socket).
 * What the CBW engine needs of a source is checked through the same calls
 * the daemon makes: fl_file_read/write/zero/trim/flush/extents, a fleecing
 * session on top, and what a dead upstream does. */
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>

#include "check.h"
#include "fleeced.h"
#include "internal.h"

#define SZ ((uint64_t)8 << 20)
#define CS 65536u

extern char **environ;

static uint8_t pat(uint64_t i) { return (uint8_t)(i * 13 + (i >> 11)); }

struct server {
    pid_t pid;
    char sock[100];
    char uri[512];
};

/* Start nbdkit with ARGV at S->sock, and wait until it accepts. */
static void start_argv(struct server *s, char **argv)
{
    int fd;

    posix_spawn_file_actions_t fa;

    /* (its complaints about our readiness probe are noise) */
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    CHECK(posix_spawnp(&s->pid, "nbdkit", &fa, NULL, argv, environ) == 0);
    posix_spawn_file_actions_destroy(&fa);
    for (int i = 0; i < 500; i++) {
        struct sockaddr_un a = { .sun_family = AF_UNIX };

        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        CHECK(fd >= 0);
        snprintf(a.sun_path, sizeof(a.sun_path), "%s", s->sock);
        if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0) {
            close(fd);
            return;
        }
        close(fd);
        nanosleep(&(struct timespec){ 0, 10000000 }, NULL);
    }
    CHECK(!"nbdkit did not come up");
}

/* nbdkit serving IMG (read-only when RO) at S->sock. */
static void start(struct server *s, const char *img, int ro)
{
    char file[4200];
    char *rw[] = { "nbdkit", "-f", "--exit-with-parent", "-U", s->sock, "file", file, NULL };
    char *rdonly[] = { "nbdkit", "-f", "--exit-with-parent", "-r", "-U", s->sock, "file",
                       file, NULL };

    snprintf(file, sizeof(file), "file=%s", img);
    start_argv(s, ro ? rdonly : rw);
}

static void stop(struct server *s, int sig)
{
    int st;

    kill(s->pid, sig);
    CHECK(waitpid(s->pid, &st, 0) == s->pid);
    unlink(s->sock);
}

static void init(struct server *s, const char *tag)
{
    snprintf(s->sock, sizeof(s->sock), "%s/fleeced-up-%s-%d.sock", test_tmpdir(), tag,
             (int)getpid());
    snprintf(s->uri, sizeof(s->uri), "nbd+unix:///?socket=%s", s->sock);
    unlink(s->sock);
}

/* Until PID is stopped (SIGSTOP lands asynchronously). */
static void wait_stopped(pid_t pid)
{
    char path[64], st[512];

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    for (int i = 0; i < 1000; i++) {
        FILE *fp = fopen(path, "r");
        char *paren;

        CHECK(fp != NULL);
        CHECK(fgets(st, sizeof(st), fp) != NULL);
        fclose(fp);
        paren = strrchr(st, ')');
        if (paren != NULL && paren[2] == 'T')
            return;
        nanosleep(&(struct timespec){ 0, 1000000 }, NULL);
    }
    CHECK(!"the server did not stop");
}

static void check_pat(const uint8_t *b, uint64_t off, size_t n)
{
    for (size_t i = 0; i < n; i++)
        CHECK(b[i] == pat(off + i));
}

static void test_source_ops(void)
{
    char img[4096];
    struct server s;
    fl_file *f;
    static uint8_t buf[2 << 20], back[2 << 20];
    uint64_t lens[16];
    uint32_t fl[16];
    size_t n;
    int hole = -1, fd;

    make_image(img, SZ, pat);
    /* a hole in the middle: 1 MiB at 4 MiB */
    fd = open(img, O_RDWR);
    CHECK(fd >= 0 && fallocate(fd, 3 /* PUNCH_HOLE|KEEP_SIZE */, 4 << 20, 1 << 20) == 0);
    close(fd);
    init(&s, "ops");
    start(&s, img, 0);
    CHECK_RC(fl_file_open_nbd(s.uri, 0, &f), 0);
    CHECK(fl_file_size(f) == SZ && fl_file_is_upstream(f));
    CHECK(fl_file_source_error(f) == 0);

    CHECK_RC(fl_file_read(f, buf, 100000, 12345, &hole), 0);
    CHECK(hole == 0);
    check_pat(buf, 12345, 100000);
    /* nbdkit sends a hole's zeros as data (QEMU's server sends a hole
     * chunk, which says hole = 1): either way, zeros. */
    CHECK_RC(fl_file_read(f, buf, 65536, 4 << 20, &hole), 0);
    CHECK(buf[0] == 0 && buf[65535] == 0);
    CHECK_RC(fl_file_read(f, buf, 1, SZ, NULL), -EINVAL);
    CHECK_RC(fl_file_read_nowait(f, buf, 4096, 0, NULL), -EAGAIN); /* no page cache */

    memset(buf, 0x5a, sizeof(buf));
    CHECK_RC(fl_file_write(f, buf, 3 << 19, 1000, FL_FUA), 0);
    CHECK_RC(fl_file_read(f, back, 3 << 19, 1000, NULL), 0);
    CHECK(memcmp(buf, back, 3 << 19) == 0);
    CHECK_RC(fl_file_zero(f, 2000, 5000, 0), 0);
    CHECK_RC(fl_file_read(f, back, 5000, 2000, NULL), 0);
    for (int i = 0; i < 5000; i++)
        CHECK(back[i] == 0);
    CHECK_RC(fl_file_trim(f, 6 << 20, 1 << 20), 0);
    CHECK_RC(fl_file_flush(f), 0);
    CHECK_RC(fl_file_cache(f, 0, SZ), 0);

    /* Extents: data, the hole, data (nbdkit's file plugin reports holes). */
    CHECK_RC(fl_file_extents(f, 3 << 20, 3 << 20, lens, fl, 16, &n), 0);
    CHECK(n >= 2);
    {
        uint64_t pos = 3 << 20, at_hole = 0;
        for (size_t i = 0; i < n; i++) {
            if (pos <= (4u << 20) && (4u << 20) < pos + lens[i])
                at_hole = fl[i];
            pos += lens[i];
        }
        CHECK(pos == 6u << 20);
        CHECK(at_hole & FL_EXT_HOLE);
    }
    fl_file_close(f);

    /* The data is in the image: the same bytes through the file. */
    fd = open(img, O_RDONLY);
    CHECK(pread(fd, back, 3 << 19, 1000) == 3 << 19);
    CHECK(back[0] == 0x5a && back[999] == 0x5a && back[1000] == 0 && back[5999] == 0);
    CHECK(back[6000] == 0x5a);
    close(fd);
    stop(&s, SIGTERM);

    /* A read-only export is refused read-write, taken read-only. */
    start(&s, img, 1);
    CHECK_RC(fl_file_open_nbd(s.uri, 0, &f), -EROFS);
    CHECK_RC(fl_file_open_nbd(s.uri, 1, &f), 0);
    CHECK_RC(fl_file_write(f, buf, 1, 0, 0), -EROFS);
    fl_file_close(f);
    stop(&s, SIGTERM);
    CHECK(fl_file_open_nbd(s.uri, 1, &f) < 0);      /* nobody there */
    CHECK(fl_file_open_nbd("nbd+unix:///x?socket=", 1, &f) < 0);
    CHECK_RC(fl_file_open_nbd("http://x/", 1, &f), -EINVAL);
    unlink(img);
}

/* A fleecing session over an upstream: copy-before-write reads the old
 * data through it, holes cost no temp bytes. */
static void test_session_over_upstream(void)
{
    char img[4096];
    struct server s;
    struct fl_session_params p;
    struct fl_session_stats st;
    fl_file *f;
    fl_session *sess;
    static uint8_t buf[4 * CS], back[4 * CS];
    int fd;

    make_image(img, SZ, pat);
    fd = open(img, O_RDWR);
    CHECK(fd >= 0 && fallocate(fd, 3, 2 * CS, CS) == 0);   /* cluster 2: a hole */
    close(fd);
    init(&s, "cbw");
    start(&s, img, 0);
    CHECK_RC(fl_file_open_nbd(s.uri, 0, &f), 0);
    memset(&p, 0, sizeof(p));
    p.cluster_size = CS;
    p.temp_dir = test_tmpdir();
    CHECK_RC(fl_session_open(f, &p, &sess), 0);
    memset(buf, 0xee, sizeof(buf));
    CHECK_RC(fl_file_write(f, buf, 3 * CS, CS / 2, 0), 0);   /* clusters 0-3 */
    CHECK_RC(fl_session_read(sess, back, 4 * CS, 0, NULL), 0);
    for (uint64_t i = 0; i < 4 * CS; i++)
        CHECK(back[i] == (i >= 2 * CS && i < 3 * CS ? 0 : pat(i)));
    CHECK_RC(fl_session_stats(sess, &st), 0);
    CHECK(st.cbw_count > 0 && st.clusters_zero == 1);
    CHECK(st.temp_bytes_allocated <= 3 * CS);               /* not the hole */
    CHECK_RC(fl_file_read(f, back, 3 * CS, CS / 2, NULL), 0);
    CHECK(memcmp(back, buf, 3 * CS) == 0);
    fl_session_close(sess);
    fl_file_close(f);
    stop(&s, SIGTERM);
    unlink(img);
}

/* A dead upstream fails requests (never hangs them), says so, and a new
 * server at the same socket is used again without anyone telling. */
static void test_dead_and_back(void)
{
    char img[4096];
    struct server s;
    fl_file *f;
    static uint8_t buf[65536];
    struct timespec t0, t1;

    make_image(img, SZ, pat);
    init(&s, "dead");
    start(&s, img, 0);
    CHECK_RC(fl_file_open_nbd(s.uri, 0, &f), 0);
    CHECK_RC(fl_file_read(f, buf, 4096, 0, NULL), 0);
    stop(&s, SIGKILL);
    CHECK_RC(fl_file_read(f, buf, 4096, 0, NULL), -EIO);
    CHECK(fl_file_source_error(f) != 0);
    CHECK(fl_file_write(f, buf, 4096, 0, 0) < 0);
    start(&s, img, 0);
    CHECK_RC(fl_file_read(f, buf, 4096, 8192, NULL), 0);
    check_pat(buf, 8192, 4096);
    CHECK(fl_file_source_error(f) == 0);

    /* A hung server: the command gives up at the bound (a short one here). */
    fl__upstream_set_timeout(f, 300);
    kill(s.pid, SIGSTOP);
    wait_stopped(s.pid);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK_RC(fl_file_read(f, buf, 4096, 0, NULL), -ETIMEDOUT);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK(t1.tv_sec - t0.tv_sec < 5);
    CHECK(fl_file_source_error(f) == ETIMEDOUT);
    kill(s.pid, SIGCONT);
    fl__upstream_set_timeout(f, 30000);
    CHECK_RC(fl_file_read(f, buf, 4096, 0, NULL), 0);
    CHECK(fl_file_source_error(f) == 0);
    fl_file_close(f);
    stop(&s, SIGTERM);
    unlink(img);
}

/* A lazy upstream (a VM's node, exported only once the VM's device left
 * it): requests fail until the export is there, then work; an export of
 * another size is not taken for it. */
static void test_lazy(void)
{
    char img[4096], small[4096];
    struct server s;
    fl_file *f;
    static uint8_t buf[65536];

    make_image(img, SZ, pat);
    make_image(small, SZ / 2, pat);
    init(&s, "lazy");
    CHECK_RC(fl_file_open_nbd_lazy(s.uri, SZ, 0, &f), 0);
    CHECK(fl_file_size(f) == SZ);
    CHECK_RC(fl_file_read(f, buf, 4096, 0, NULL), -EIO);
    CHECK(fl_file_source_error(f) != 0);
    start(&s, small, 0);
    CHECK_RC(fl_file_read(f, buf, 4096, 0, NULL), -EIO);   /* not our size */
    stop(&s, SIGTERM);
    start(&s, img, 0);
    CHECK_RC(fl_file_read(f, buf, 4096, 4096, NULL), 0);
    check_pat(buf, 4096, 4096);
    CHECK_RC(fl_file_zero(f, 0, 8192, FL_MAY_TRIM), 0);    /* caps learnt late */
    CHECK_RC(fl_file_read(f, buf, 8192, 0, NULL), 0);
    CHECK(buf[0] == 0 && buf[8191] == 0);
    CHECK(fl_file_source_error(f) == 0);
    fl_file_close(f);
    stop(&s, SIGTERM);
    unlink(img);
    unlink(small);
}

/* An export without multi-conn (QEMU's writable ones): writes from many
 * threads still go over several connections, and a sync flushes each one
 * that wrote; a connection lost with unflushed writes fails the next sync. */
struct writer_arg {
    fl_file *f;
    int idx;
};

static void *writer(void *p)
{
    struct writer_arg *a = p;
    static const uint8_t data[4096];

    for (int i = 0; i < 64; i++)
        CHECK_RC(fl_file_write(a->f, data, 4096, ((uint64_t)a->idx * 64 + i) * 4096, 0), 0);
    return NULL;
}

/* Connection numbers that did OP ("Write", "Flush"), as bits. */
static uint64_t conns_doing(const char *log, const char *op)
{
    FILE *fp = fopen(log, "r");
    char line[1024];
    uint64_t bits = 0;

    CHECK(fp != NULL);
    while (fgets(line, sizeof line, fp) != NULL) {
        char *c = strstr(line, "connection="), want[32];
        int n;

        snprintf(want, sizeof want, " %s id=", op);
        if (c != NULL && strstr(line, want) != NULL && sscanf(c, "connection=%d", &n) == 1 &&
            n > 0 && n < 64)
            bits |= (uint64_t)1 << n;
    }
    fclose(fp);
    return bits;
}

static void test_no_multi_conn(void)
{
    char img[4096], file[4200], log[4200], logarg[4300];
    struct server s;
    fl_file *f;
    pthread_t t[8];
    struct writer_arg a[8];
    uint64_t wrote, flushed;
    int n = 0;
    char *argv[] = { "nbdkit", "-f", "--exit-with-parent", "-U", NULL, "--filter=log",
                     "--filter=multi-conn", "file", file, "multi-conn-mode=disable",
                     logarg, NULL };

    make_image(img, SZ, pat);
    init(&s, "nomc");
    argv[4] = s.sock;
    snprintf(file, sizeof file, "file=%s", img);
    snprintf(log, sizeof log, "%s.log", img);
    snprintf(logarg, sizeof logarg, "logfile=%s", log);
    unlink(log);
    start_argv(&s, argv);
    CHECK_RC(fl_file_open_nbd(s.uri, 0, &f), 0);
    for (int i = 0; i < 8; i++) {
        a[i] = (struct writer_arg){ f, i };
        CHECK(pthread_create(&t[i], NULL, writer, &a[i]) == 0);
    }
    for (int i = 0; i < 8; i++)
        pthread_join(t[i], NULL);
    CHECK_RC(fl_file_flush(f), 0);
    wrote = conns_doing(log, "Write");
    flushed = conns_doing(log, "Flush");
    for (uint64_t b = wrote; b; b &= b - 1)
        n++;
    CHECK(n > 1);                       /* in parallel, not taking turns */
    CHECK((wrote & ~flushed) == 0);     /* every one that wrote, flushed */

    CHECK_RC(fl_file_write(f, (const uint8_t *)"lost?", 5, 0, 0), 0);
    stop(&s, SIGKILL);
    start_argv(&s, argv);
    CHECK_RC(fl_file_flush(f), -EIO);   /* that write may be gone */
    fl_file_close(f);
    stop(&s, SIGTERM);
    unlink(log);
    unlink(img);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    fprintf(stderr, "test_upstream\n");
    RUN(test_source_ops);
    RUN(test_session_over_upstream);
    RUN(test_dead_and_back);
    RUN(test_lazy);
    RUN(test_no_multi_conn);
    fprintf(stderr, "test_upstream: OK\n");
    return 0;
}
