/* fleeced native data path: runs of NBD READs answered from the page cache,
 * and runs of NBD WRITEs checked on the event loop and written by a worker.
 *
 * Design notes:
 * - Why: at queue depth 16 a 4 KiB READ answered inline on the event loop
 *   cost about 6 us of Python (parse, validate, pread, reply header) on top
 *   of the loop's own work; bench/loop_floor.py measures a bare uvloop
 *   server at half fleeced's CPU per read.  fl_file_read_run does that work
 *   for a whole run of consecutive READs in one call: the loop pays one
 *   crossing per received batch instead of a dozen calls per request.
 * - What it is not: a second NBD engine.  It only *accepts* a request that
 *   the Python engine (daemon/fleeced/nbd/engine.py, _next_request) would
 *   accept and answer with data, under the engine's own READ rule passed
 *   in struct fl_run_rule (allowed flags, size, maximum length, minimum
 *   block, structured replies).  At the first request it does not accept
 *   for any reason -- another command, a bad magic, a flag, a range, an
 *   alignment, a length, no room left in OUT, data not in the page cache,
 *   an I/O error -- it stops *before* that request and leaves it unread:
 *   the engine then parses it and gives the error reply or the slow path.
 *   So it never writes an error reply and never decides a protocol error.
 * - Checks, in the engine's order (proto.md "Request message", "Block
 *   size constraints", "NBD_CMD_READ"): request magic 0x25609513; type
 *   NBD_CMD_READ (0); no flag outside rule->allowed_flags; length > 0;
 *   offset + length <= size (overflow-safe); length <= rule->max_length;
 *   offset and length multiples of rule->min_block.
 * - Replies (proto.md "Simple reply message", "Structured reply chunk
 *   message", "NBD_REPLY_TYPE_OFFSET_DATA"): simple: magic 0x67446698,
 *   error 0, the request's cookie, then the data.  Structured: one
 *   OFFSET_DATA chunk with NBD_REPLY_FLAG_DONE: magic 0x668e33ef, flags 1,
 *   type 1, cookie, length 8 + data, offset, then the data; one chunk
 *   covering the whole range also satisfies NBD_CMD_FLAG_DF.  The cookie
 *   is copied as received (8 opaque bytes).
 * - Reads: preadv2(RWF_NOWAIT) straight into OUT after the header, as
 *   fl_file_read_nowait: never blocks on I/O, so the event loop may call
 *   it.  No hole detection (lseek(SEEK_DATA) takes the inode lock, see
 *   fl_file_read_nowait); holes have no cached pages and stop the run.
 * - Each READ answered counts in the file's stats (fl__file_count,
 *   relaxed atomics), as fl_file_read_nowait would; the sizing pass
 *   counts nothing.
 * - Output: the caller sizes OUT with a first call with out == NULL, which
 *   only checks the requests and sums header + data of the ones it would
 *   answer (no I/O).  The second call may stop earlier (page cache).
 * - WRITE runs, the same idea in two halves.  fl_write_run_check runs on
 *   the event loop (no I/O): it accepts consecutive WRITEs whose payload
 *   is complete in the buffer, under the engine's WRITE rule (same checks
 *   as for a READ, with NBD_CMD_WRITE; an export the engine refuses writes
 *   on is never offered), and writes their success replies (simple
 *   replies: proto.md lets a server answer any command but a READ with
 *   one, and the engine's reply_ok does).  The caller copies the requests
 *   it accepted into a buffer of its own and queues one FL_OP_WRITE_RUN
 *   (queue.c), whose worker runs fl__file_write_run: one fl_file_write
 *   (copy-before-write, bitmaps, FUA) per request, in order, each result
 *   in rcs[i].  A failed write does not stop the others: every request
 *   gets its own reply, as if each had been queued alone (NBD orders no
 *   two requests in flight).  The caller replies with the checked acks
 *   when all succeeded, else per request.
 * - Lifetime: a direct call on the caller's reference to F; keeps no
 *   pointer after it returns (the write run is a queue op: queue.c holds
 *   F, the caller keeps REQ and RCS until it is reaped).  No globals, no
 *   locks of its own (the fd and size are immutable; the read takes none
 *   of the file's locks, like fl_file_read_nowait; fl_file_write takes
 *   its own).
 */
#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#include "internal.h"

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define CMD_READ 0u
#define CMD_WRITE 1u
#define CMD_FLAG_FUA 1u
#define REPLY_FLAG_DONE 1u
#define REPLY_TYPE_OFFSET_DATA 1u
#define REQ_SIZE 28u
#define SIMPLE_HDR 16u
#define CHUNK_HDR 28u /* chunk header (20) + the OFFSET_DATA offset (8) */

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint16_t get_be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint64_t get_be64(const uint8_t *p)
{
    return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

static void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

/* 1 if the request at REQ (REQ_SIZE bytes) is of TYPE and accepted by the
 * engine under RULE; its offset and length then in *off, *len. */
static int acceptable(const uint8_t *req, uint16_t want, const struct fl_run_rule *rule,
                      uint64_t *off, uint32_t *len)
{
    uint16_t flags = get_be16(req + 4);
    uint16_t type = get_be16(req + 6);

    if (get_be32(req) != REQUEST_MAGIC || type != want)
        return 0;
    if (flags & ~rule->allowed_flags)
        return 0;
    *off = get_be64(req + 16);
    *len = get_be32(req + 24);
    if (*len == 0 || *len > rule->max_length)
        return 0;
    if (fl__range_ok(*off, *len, rule->size) < 0)
        return 0;
    if (((*off | *len) & (uint64_t)(rule->min_block - 1)) != 0)
        return 0;
    return 1;
}

static void put_simple(uint8_t *p, const uint8_t *req)
{
    put_be32(p, SIMPLE_REPLY_MAGIC);
    put_be32(p + 4, 0);
    memcpy(p + 8, req + 8, 8);
}

static void put_header(uint8_t *p, const uint8_t *req, uint64_t off,
                       uint32_t len, int structured)
{
    if (!structured) {
        put_simple(p, req);
        return;
    }
    put_be32(p, STRUCTURED_REPLY_MAGIC);
    put_be16(p + 4, REPLY_FLAG_DONE);
    put_be16(p + 6, REPLY_TYPE_OFFSET_DATA);
    memcpy(p + 8, req + 8, 8);
    put_be32(p + 16, 8 + len);
    put_be64(p + 20, off);
}

int fl_file_read_run(fl_file *f, const uint8_t *req, size_t len,
                     const struct fl_run_rule *rule, uint32_t max_count,
                     uint8_t *out, size_t cap, struct fl_run *run)
{
    size_t hdr;

    if (f == NULL || rule == NULL || run == NULL || (req == NULL && len > 0))
        return -EINVAL;
    if (rule->min_block == 0 || (rule->min_block & (rule->min_block - 1)) ||
        rule->structured > 1)
        return -EINVAL;
    memset(run, 0, sizeof(*run));
    if (fl_file_is_upstream(f) || fl_file_is_direct(f))
        return 0;       /* no page cache to answer from: the engine's path */
    hdr = rule->structured ? CHUNK_HDR : SIMPLE_HDR;
    while (run->count < max_count && len - run->consumed >= REQ_SIZE) {
        const uint8_t *r = req + run->consumed;
        uint64_t off;
        uint32_t n;
        struct iovec iov;
        ssize_t got;

        if (!acceptable(r, CMD_READ, rule, &off, &n))
            break;
        if (out == NULL) { /* sizing pass: no I/O */
            run->out_len += hdr + n;
        } else {
            if (cap - run->out_len < hdr + n)
                break;
            iov.iov_base = out + run->out_len + hdr;
            iov.iov_len = n;
            do
                got = preadv2(f->fd, &iov, 1, (off_t)off, RWF_NOWAIT);
            while (got < 0 && errno == EINTR);
            if (got != (ssize_t)n)
                break; /* not cached, short, or failed: the engine's path */
            put_header(out + run->out_len, r, off, n, rule->structured);
            run->out_len += hdr + n;
            fl__file_count(f, FL_CMD_READ, n, 0);
        }
        run->consumed += REQ_SIZE;
        run->count++;
        run->data += n;
    }
    return 0;
}

int fl_write_run_check(const uint8_t *req, size_t len,
                       const struct fl_run_rule *rule, uint32_t max_count,
                       uint8_t *acks, size_t cap, struct fl_run *run)
{
    if (rule == NULL || run == NULL || acks == NULL || (req == NULL && len > 0))
        return -EINVAL;
    if (rule->min_block == 0 || (rule->min_block & (rule->min_block - 1)))
        return -EINVAL;
    memset(run, 0, sizeof(*run));
    while (run->count < max_count && len - run->consumed >= REQ_SIZE) {
        const uint8_t *r = req + run->consumed;
        uint64_t off;
        uint32_t n;

        if (!acceptable(r, CMD_WRITE, rule, &off, &n))
            break;
        if (len - run->consumed - REQ_SIZE < n || cap - run->out_len < SIMPLE_HDR)
            break; /* payload not all here yet, or no room for the ack */
        put_simple(acks + run->out_len, r);
        run->out_len += SIMPLE_HDR;
        run->consumed += REQ_SIZE + n;
        run->count++;
        run->data += n;
    }
    return 0;
}

int fl__file_write_run(fl_file *f, const uint8_t *req, size_t len,
                       uint32_t count, int32_t *rcs)
{
    size_t pos = 0;
    int first = 0;

    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *r = req + pos;
        uint32_t n;
        int rc;

        if (len - pos < REQ_SIZE || len - pos - REQ_SIZE < get_be32(r + 24)) {
            /* Not what fl_write_run_check accepted: refuse the rest. */
            for (; i < count; i++)
                rcs[i] = -EINVAL;
            return -EINVAL;
        }
        n = get_be32(r + 24);
        rc = fl_file_write(f, r + REQ_SIZE, n, get_be64(r + 16),
                           (get_be16(r + 4) & CMD_FLAG_FUA) ? FL_FUA : 0);
        rcs[i] = rc;
        if (rc < 0 && first == 0)
            first = rc;
        pos += REQ_SIZE + n;
    }
    return first;
}
