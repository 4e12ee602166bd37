/* fleeced native data path: what the rooms of a native connection share.
 *
 * A connection is four files, each with its own design notes and lock
 * table: conn.c (the object: start, references, shutdown, abort, stats),
 * conn_recv.c (the receive thread: reading, checking, flow control),
 * conn_dispatch.c (running a request: inline or in a worker, each
 * command) and conn_reply.c (replies: the send lock, the out-queue,
 * streamed READs).  Nothing here is public: fleeced.h has the API.
 */
#ifndef FLEECED_CONN_H
#define FLEECED_CONN_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

#include "internal.h"

#define REQUEST_MAGIC   0x25609513u
#define SIMPLE_MAGIC    0x67446698u
#define STRUCT_MAGIC    0x668e33efu
#define REQ_SIZE        28u
#define MAX_PAYLOAD     (32u << 20)   /* engine.py MAX_PAYLOAD */
#define RBUF_SIZE       (256u << 10)
#define PIECE           (1u << 20)    /* connection.py STREAM_PIECE */
#define MAX_IN_FLIGHT   64u
#define BUDGET          (4u << 20)
#define MAX_EXTENTS     1024u
/* Smaller READs are not asked whether they read a hole (one lseek less
 * each; the reply is data, zeros included, as the loop's runs send it). */
#define HOLE_MIN        (128u << 10)
#define INLINE_WRITE_MAX (64u << 10)
#define MAX_MESSAGE     4096u
#define DRAIN_MS        5000          /* replies left at a close */
#define LINGER_MS       500           /* what the client sends after the end */
#define SNAP_NICE       19            /* queue.c's, for the same reason */
/* READs up to CACHED_MAX are tried on the receive thread from the page
 * cache first (preadv2 RWF_NOWAIT, never blocks); their replies gather in
 * a batch of up to BATCH_CAP bytes, sent with one write. */
#define CACHED_MAX      (128u << 10)
#define BATCH_CAP       (512u << 10)
/* READs of the image from SENDFILE_MIN up go out with sendfile(2): no
 * copy in the server (never for a snapshot: queue.c sendfile_reply has
 * why). */
#define SENDFILE_MIN    (64u << 10)

enum { CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE,
       CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, CMD_COUNT };

#define F_FUA       1u
#define F_NO_HOLE   2u
#define F_DF        4u
#define F_REQ_ONE   8u
#define F_FAST_ZERO 16u

#define REPLY_DONE  1u
#define T_OFFSET_DATA 1u
#define T_OFFSET_HOLE 2u
#define T_BLOCK_STATUS 5u
#define T_ERROR     32769u

/* NBD error values (proto.md "Error values"). */
#define N_EPERM 1u
#define N_EIO 5u
#define N_ENOMEM 12u
#define N_EINVAL 22u
#define N_ENOSPC 28u
#define N_EOVERFLOW 75u
#define N_ENOTSUP 95u
#define N_ESHUTDOWN 108u

enum { MODE_RUN, MODE_SHUTDOWN, MODE_REPLAY };

struct stream;

struct outq {
    struct outq *next;
    uint8_t *a;             /* owned */
    size_t alen;
    uint8_t *b;             /* owned, may be NULL */
    size_t blen;
    size_t pos;             /* bytes of a + b sent */
    /* A READ sent a piece at a time: A and B hold its current piece, made
     * by the receive thread when the last one is out (only it touches a
     * stream entry's fields; others only link entries behind it). */
    struct stream *st;
};

struct req {
    fl_conn *c;
    uint16_t flags, cmd;
    uint64_t cookie, off;
    uint32_t len;
    uint8_t *payload;       /* WRITE: owned when handed to a worker */
};

struct stream {
    struct req r;
    uint64_t done;          /* data bytes made into pieces so far */
    int over;               /* its last piece (or its error) is made */
    uint8_t hdr[32];
    uint8_t *buf;           /* PIECE bytes, reused */
};

struct fl_conn {
    unsigned refs;                  /* atomic */
    int fd;                         /* ours; closed by the receive thread */
    int wake_fd, done_fd;           /* eventfds, closed with the last ref */
    fl_queue *q;
    fl_file *file;                  /* one of the two, referenced */
    fl_session *session;
    uint64_t size;
    uint32_t min_block, structured, trim;
    struct fl_conn_rule rules[CMD_COUNT];
    uint32_t n_ctx;
    uint32_t ctx_id[FL_CONN_MAX_CTX], ctx_kind[FL_CONN_MAX_CTX];
    fl_bitmap *ctx_bitmap[FL_CONN_MAX_CTX];
    pthread_t thread;
    /* receive buffer and reply batch: only the receive thread */
    uint8_t *rbuf;
    size_t rstart, rend;
    uint8_t *batch;
    size_t batch_len;
    int cached;                     /* immutable: page-cache reads possible */
    int eof;
    /* guarded by lock */
    pthread_mutex_t lock;
    uint32_t in_flight;
    uint64_t inflight_bytes;
    int mode, ended, aborted, waiting;
    struct fl_conn_stats stats;
    /* guarded by send_lock */
    pthread_mutex_t send_lock;
    struct outq *oq_head, *oq_tail;
    uint64_t oq_bytes;
    int torn;
};

/* ---- small helpers ----------------------------------------------------- */

/* Counters are atomic: the hot path takes no lock for them. */
static inline void stat_add(uint64_t *v, uint64_t n)
{
    __atomic_add_fetch(v, n, __ATOMIC_RELAXED);
}

static inline void kick(int efd)
{
    uint64_t one = 1;
    ssize_t n;

    do
        n = write(efd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
}

static inline void drain_efd(int efd)
{
    uint64_t v;
    ssize_t n = read(efd, &v, sizeof v);

    (void)n;
}

static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static inline void simple_hdr(uint8_t *h, uint32_t err, uint64_t cookie)
{
    put32(h, SIMPLE_MAGIC);
    put32(h + 4, err);
    put64(h + 8, cookie);
}

static inline void chunk_hdr(uint8_t *h, uint16_t flags, uint16_t type, uint64_t cookie,
                      uint32_t len)
{
    put32(h, STRUCT_MAGIC);
    put16(h + 4, flags);
    put16(h + 6, type);
    put64(h + 8, cookie);
    put32(h + 16, len);
}

/* ---- between the rooms ------------------------------------------------- */

/* conn.c */
void fl__conn_ref(fl_conn *c);
void fl__conn_unref(fl_conn *c);
void fl__conn_reason(fl_conn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* conn_recv.c */
void *fl__conn_recv_thread(void *arg);

/* conn_dispatch.c */
void fl__conn_dispatch(fl_conn *c, struct req *r, int more_waiting);
int fl__conn_try_cached(fl_conn *c, uint16_t flags, uint64_t cookie, uint64_t off,
                        uint32_t len);
void fl__conn_req_done_bytes(fl_conn *c, uint64_t bytes);

/* conn_reply.c */
void fl__conn_free_entry(struct outq *e);
int fl__conn_send(fl_conn *c, const uint8_t *a, size_t alen, uint8_t *b, size_t blen,
                  int own_b);
void fl__conn_reply_ok(fl_conn *c, uint64_t cookie);
void fl__conn_reply_error(fl_conn *c, uint64_t cookie, uint32_t err, const char *msg);
void fl__conn_reply_failed(fl_conn *c, const struct req *r, int rc);
int fl__conn_sendfile(fl_conn *c, const struct req *r, const uint8_t *h, size_t hlen);
void fl__conn_flush_batch(fl_conn *c);
void fl__conn_drain_out(fl_conn *c);
void fl__conn_drop_queue(fl_conn *c);
void fl__conn_queue_stream(fl_conn *c, const struct req *r);

#endif
