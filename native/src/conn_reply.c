/* fleeced native data path: a native connection's replies.
 *
 * Design notes.  The thread that completed a request writes its reply
 * (nbdkit's shape): under send_lock, with MSG_DONTWAIT, so no thread ever
 * waits for a slow client while holding anything.  What the socket does
 * not take goes to the connection's out-queue (the data buffer moves
 * there, no copy), which only the receive thread drains, on POLLOUT.
 * Replies are whole units on the wire: a partly sent reply is always the
 * out-queue's head, and nothing is sent directly while the queue is not
 * empty.
 *
 * Streams: a READ longer than PIECE goes to the out-queue's tail as a
 * stream entry; the receive thread reads and sends it a piece at a time
 * as the socket drains (engine.py PieceReply's wire form), so no more
 * than a piece of it is ever held and the client that does not read pays
 * with its own connection only.  The stream counts as one READ in the
 * file's stats: its later pieces add bytes only (fl__file_read).
 *
 * sendfile(2) for READs of the image: no copy in the server.  Never for a
 * snapshot: the socket would hold page references, and a guest write
 * landing before the client reads them would reach the backup.  It
 * counts its READ in the file's stats (fl__file_count, atomics) when the
 * data went out or was read for the rest, as fl_file_read would.
 *
 * Locks (conn.c has the table):
 *   send_lock  the out-queue, its byte count, `torn`, `fd`; held for each
 *              non-blocking write.  One exception: when the socket took
 *              part of a sendfile reply, the rest is read (pread of the
 *              page cache, usually) with send_lock held, since nothing
 *              may be sent before it; only this connection's repliers
 *              wait meanwhile.
 *   lock       never taken here, but through fl__conn_reason and
 *              fl__conn_req_done_bytes, always without send_lock held.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "conn.h"

void fl__conn_free_entry(struct outq *e)
{
    if (e->st != NULL) {
        free(e->st->buf);
        free(e->st);
        e->a = NULL;        /* the stream's own header */
        e->b = NULL;        /* its buffer, freed above */
    }
    free(e->a);
    free(e->b);
    free(e);
}

/* errors.py to_nbd_errno: an OS errno (positive) as an NBD error value. */
static uint32_t nbd_errno(int err, uint16_t flags)
{
    switch (err) {
    case EPERM: case EROFS: return N_EPERM;
    case EIO: case ETIMEDOUT: return N_EIO;
    case ENOMEM: return N_ENOMEM;
    case ENOSPC: case EDQUOT: case EFBIG: return N_ENOSPC;
    case ESHUTDOWN: return N_ESHUTDOWN;
    case EOVERFLOW: return (flags & F_DF) ? N_EOVERFLOW : N_EINVAL;
    case ENOTSUP: return (flags & F_FAST_ZERO) ? N_ENOTSUP : N_EINVAL;
    default: return N_EINVAL;
    }
}

static void stream_over(fl_conn *c, struct stream *st);

/* With send_lock held: write the out-queue's head entries while the
 * socket takes them, up to a stream entry whose current piece is out (the
 * caller makes its next one).  0, or -errno of a torn send. */
static int drain_locked(fl_conn *c)
{
    struct outq *e;

    while ((e = c->oq_head) != NULL) {
        struct iovec iov[2];
        int n = 0;
        ssize_t r;
        size_t total = e->alen + e->blen;

        if (e->pos < total) {
            if (e->pos < e->alen) {
                iov[n].iov_base = e->a + e->pos;
                iov[n++].iov_len = e->alen - e->pos;
                if (e->blen) {
                    iov[n].iov_base = e->b;
                    iov[n++].iov_len = e->blen;
                }
            } else {
                iov[n].iov_base = e->b + (e->pos - e->alen);
                iov[n++].iov_len = total - e->pos;
            }
            r = fl__send_nowait(c->fd, iov, n);
            if (r < 0)
                return (int)r;
            e->pos += (size_t)r;
            c->oq_bytes -= (uint64_t)r;
            if (e->pos < total)
                return 0;
        }
        if (e->st != NULL && !e->st->over)
            return 0;       /* its next piece is the caller's to make */
        c->oq_head = e->next;
        if (c->oq_head == NULL)
            c->oq_tail = NULL;
        if (e->st != NULL) {
            /* in flight until its last piece is out */
            pthread_mutex_unlock(&c->send_lock);
            stream_over(c, e->st);
            pthread_mutex_lock(&c->send_lock);
        }
        fl__conn_free_entry(e);
    }
    return 0;
}

/* Send one reply: A (copied if it must wait) then B (LEN BLEN; taken over
 * when OWN_B, else copied if it must wait).  Never waits for the client.
 * Returns 0, or -ENOMEM when it could not even be queued (the stream
 * would be torn: the connection ends). */
int fl__conn_send(fl_conn *c, const uint8_t *a, size_t alen, uint8_t *b,
                      size_t blen, int own_b)
{
    struct iovec iov[2] = { { (void *)a, alen }, { b, blen } };
    struct outq *e;
    size_t sent = 0;
    ssize_t r;
    int wake = 0, rc = 0;

    pthread_mutex_lock(&c->send_lock);
    if (c->torn || c->fd < 0) {
        pthread_mutex_unlock(&c->send_lock);
        if (own_b)
            free(b);
        return 0;
    }
    if (c->oq_head == NULL) {
        r = fl__send_nowait(c->fd, iov, blen ? 2 : 1);
        if (r < 0) {
            c->torn = 1;
            pthread_mutex_unlock(&c->send_lock);
            fl__conn_reason(c, "send failed: %s", strerror((int)-r));
            if (own_b)
                free(b);
            kick(c->wake_fd);
            return 0;
        }
        sent = (size_t)r;
        if (sent == alen + blen) {
            pthread_mutex_unlock(&c->send_lock);
            if (own_b)
                free(b);
            return 0;
        }
    }
    /* The rest waits in the out-queue, in order. */
    e = calloc(1, sizeof *e);
    if (e != NULL) {
        e->alen = alen;
        e->blen = blen;
        e->pos = sent;
        e->a = malloc(alen ? alen : 1);
        if (blen && !own_b) {
            e->b = malloc(blen);
            if (e->b != NULL)
                memcpy(e->b, b, blen);
        } else {
            e->b = b;
            own_b = 0;
        }
    }
    if (e == NULL || e->a == NULL || (blen && e->b == NULL)) {
        if (e != NULL) {
            free(e->a);
            free(e->b);
            free(e);
        }
        c->torn = 1;
        rc = -ENOMEM;
    } else {
        memcpy(e->a, a, alen);
        wake = c->oq_head == NULL;
        if (c->oq_tail != NULL)
            c->oq_tail->next = e;
        else
            c->oq_head = e;
        c->oq_tail = e;
        c->oq_bytes += alen + blen - sent;
    }
    pthread_mutex_unlock(&c->send_lock);
    if (own_b)
        free(b);
    if (wake || rc < 0)
        kick(c->wake_fd);
    return rc;
}

void fl__conn_reply_ok(fl_conn *c, uint64_t cookie)
{
    uint8_t h[16];

    simple_hdr(h, 0, cookie);
    fl__conn_send(c, h, sizeof h, NULL, 0, 0);
}

void fl__conn_reply_error(fl_conn *c, uint64_t cookie, uint32_t err, const char *msg)
{
    uint8_t buf[20 + 6 + MAX_MESSAGE];
    size_t m;

    if (!c->structured) {
        simple_hdr(buf, err, cookie);
        fl__conn_send(c, buf, 16, NULL, 0, 0);
        return;
    }
    m = strlen(msg);
    if (m > MAX_MESSAGE)
        m = MAX_MESSAGE;
    chunk_hdr(buf, REPLY_DONE, (uint16_t)T_ERROR, cookie, (uint32_t)(6 + m));
    put32(buf + 20, err);
    put16(buf + 24, (uint16_t)m);
    memcpy(buf + 26, msg, m);
    fl__conn_send(c, buf, 26 + m, NULL, 0, 0);
}

/* The message of a failed request (exports' error_message): a snapshot's
 * own reasons, else strerror. */
static void error_message(fl_conn *c, int err, char *out, size_t cap)
{
    if (c->session != NULL && err == EPERM) {
        snprintf(out, cap, "outside the snapshot's scope or already discarded");
        return;
    }
    if (c->session != NULL && err == EIO) {
        struct fl_session_stats st;

        if (fl_session_stats(c->session, &st) == 0 && st.broken) {
            snprintf(out, cap, "snapshot is broken: %s",
                     strerror(st.broken_errno ? st.broken_errno : EIO));
            return;
        }
    }
    snprintf(out, cap, "%s", strerror(err));
}

void fl__conn_reply_failed(fl_conn *c, const struct req *r, int rc)
{
    char msg[256];

    error_message(c, -rc, msg, sizeof msg);
    stat_add(&c->stats.errors, 1);
    fl__conn_reply_error(c, r->cookie, nbd_errno(-rc, r->flags), msg);
}

static void stream_over(fl_conn *c, struct stream *st)
{
    (void)st;
    fl__conn_req_done_bytes(c, PIECE);
}

/* A READ of the image with its data sent straight from the page cache
 * (sendfile), when the out-queue is empty.  Returns 1 when the reply is
 * taken care of (sent whole, or its rest queued as the out-queue's head,
 * or dropped on a torn connection), 0 when nothing was sent (the caller
 * reads and sends it the usual way).  The rest of a reply the socket took
 * only in part is read with send_lock held (nothing may go before it):
 * only then, when the socket filled up in mid-reply. */
int fl__conn_sendfile(fl_conn *c, const struct req *r, const uint8_t *h, size_t hlen)
{
    fl_file *f = c->file;
    size_t total = hlen + r->len, sent = 0;
    struct iovec iov = { (void *)h, hlen };
    off_t pos = (off_t)r->off;
    struct outq *e;
    ssize_t n;
    int rc = 0;

    pthread_mutex_lock(&c->send_lock);
    if (c->torn || c->fd < 0) {
        pthread_mutex_unlock(&c->send_lock);
        return 1;
    }
    if (c->oq_head != NULL) {
        pthread_mutex_unlock(&c->send_lock);
        return 0;
    }
    n = fl__send_nowait(c->fd, &iov, 1);
    if (n < 0) {
        c->torn = 1;
        pthread_mutex_unlock(&c->send_lock);
        kick(c->wake_fd);
        return 1;
    }
    sent = (size_t)n;
    while (sent == hlen + (size_t)(pos - (off_t)r->off) && sent < total) {
        n = sendfile(c->fd, f->fd, &pos, total - sent);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;      /* full, or no splice here: the rest from memory */
        sent += (size_t)n;
    }
    if (sent == total || sent == 0) {
        pthread_mutex_unlock(&c->send_lock);
        if (sent == total)
            fl__file_count(f, FL_CMD_READ, r->len, 0);
        return sent == total;
    }
    e = calloc(1, sizeof *e);
    if (e != NULL) {
        size_t from = sent > hlen ? sent - hlen : 0;

        e->alen = sent < hlen ? hlen - sent : 0;
        e->a = malloc(e->alen ? e->alen : 1);
        e->blen = r->len - from;
        e->b = malloc(e->blen);
        if (e->a != NULL && e->b != NULL) {
            memcpy(e->a, h + (sent < hlen ? sent : hlen), e->alen);
            rc = fl__full_pread(f->fd, e->b, e->blen, r->off + from);
        } else {
            rc = -ENOMEM;
        }
    }
    fl__file_count(f, FL_CMD_READ, r->len, e == NULL ? -ENOMEM : rc);
    if (e == NULL || rc < 0) {
        if (e != NULL)
            fl__conn_free_entry(e);
        c->torn = 1;    /* half a reply is out: the stream cannot go on */
        pthread_mutex_unlock(&c->send_lock);
        fl__conn_reason(c, "READ failed in mid-reply");
        kick(c->wake_fd);
        return 1;
    }
    c->oq_head = c->oq_tail = e;
    c->oq_bytes += e->alen + e->blen;
    pthread_mutex_unlock(&c->send_lock);
    kick(c->wake_fd);
    return 1;
}

/* The batch of cached READ replies goes out (receive thread). */
void fl__conn_flush_batch(fl_conn *c)
{
    if (c->batch_len) {
        fl__conn_send(c, c->batch, c->batch_len, NULL, 0, 0);
        c->batch_len = 0;
    }
}

/* Make the next piece of stream ST (the head of the out-queue, its last
 * piece out): read it (I/O, no lock held) and give it the wire form of
 * engine.py PieceReply.  A failure before the first piece is an ordinary
 * error reply; after it, an ERROR chunk where the wire form can carry one,
 * else the connection must end (returns -1). */
static int next_piece(fl_conn *c, struct outq *e)
{
    struct stream *st = e->st;
    const struct req *r = &st->r;
    uint32_t n = (uint32_t)(r->len - st->done < PIECE ? r->len - st->done : PIECE);
    int hole = 0, rc = 0, df = (r->flags & F_DF) != 0;
    int last = st->done + n == r->len;
    size_t alen = 0, blen = 0;
    uint8_t *h = st->hdr;

    if (st->buf == NULL)
        st->buf = malloc(PIECE);    /* also where an error reply is made */
    if (st->buf == NULL) {
        fl__conn_reason(c, "out of memory");
        return -1;
    }
    if (st->done == 0 && c->session != NULL)
        rc = fl_session_readable(c->session, r->off, r->len);
    if (rc == 0) {
        if (c->file != NULL)
            rc = fl__file_closed(c->file) ? -ESHUTDOWN
                 : fl__file_read(c->file, st->buf, n, r->off + st->done, &hole,
                                 st->done > 0);
        else
            rc = fl__session_closed(c->session) ? -ESHUTDOWN
                 : fl_session_read(c->session, st->buf, n, r->off + st->done, &hole);
    }
    if (rc < 0) {
        char msg[256];
        size_t m;

        if (st->done > 0 && (!c->structured || df)) {
            /* The header said success: the wire cannot carry it. */
            fl__conn_reason(c, "READ failed after its first piece: %s", strerror(-rc));
            return -1;
        }
        error_message(c, -rc, msg, sizeof msg);
        stat_add(&c->stats.errors, 1);
        /* The piece buffer holds the error reply: nothing else needs it. */
        if (!c->structured) {
            simple_hdr(st->buf, nbd_errno(-rc, r->flags), r->cookie);
            blen = 16;
        } else {
            m = strlen(msg);
            chunk_hdr(st->buf, REPLY_DONE, (uint16_t)T_ERROR, r->cookie, (uint32_t)(6 + m));
            put32(st->buf + 20, nbd_errno(-rc, r->flags));
            put16(st->buf + 24, (uint16_t)m);
            memcpy(st->buf + 26, msg, m);
            blen = 26 + m;
        }
        st->over = 1;
    } else {
        if (!c->structured) {
            if (st->done == 0) {
                simple_hdr(h, 0, r->cookie);
                alen = 16;
            }
        } else if (df) {
            if (st->done == 0) {
                chunk_hdr(h, REPLY_DONE, T_OFFSET_DATA, r->cookie, 8 + r->len);
                put64(h + 20, r->off);
                alen = 28;
            }
        } else if (hole) {
            chunk_hdr(h, last ? REPLY_DONE : 0, T_OFFSET_HOLE, r->cookie, 12);
            put64(h + 20, r->off + st->done);
            put32(h + 28, n);
            alen = 32;
        } else {
            chunk_hdr(h, last ? REPLY_DONE : 0, T_OFFSET_DATA, r->cookie, 8 + n);
            put64(h + 20, r->off + st->done);
            alen = 28;
        }
        if (!(c->structured && !df && hole))
            blen = n;       /* a hole here is zeros in the buffer */
        st->done += n;
        if (last) {
            st->over = 1;
            stat_add(&c->stats.bytes_read, r->len);
        }
    }
    pthread_mutex_lock(&c->send_lock);
    e->a = h;
    e->alen = alen;
    e->b = st->buf;
    e->blen = blen;
    e->pos = 0;
    c->oq_bytes += alen + blen;
    pthread_mutex_unlock(&c->send_lock);
    return 0;
}

/* Send what waits in the out-queue as far as the socket takes it, making
 * the pieces of streamed READs as they come to the head.  Receive thread
 * only. */
void fl__conn_drain_out(fl_conn *c)
{
    for (;;) {
        struct outq *e;
        int rc;

        pthread_mutex_lock(&c->send_lock);
        if (c->torn) {
            pthread_mutex_unlock(&c->send_lock);
            return;
        }
        rc = drain_locked(c);
        if (rc < 0)
            c->torn = 1;
        e = c->oq_head;
        if (rc < 0 || e == NULL || e->st == NULL || e->pos < e->alen + e->blen) {
            pthread_mutex_unlock(&c->send_lock);
            if (rc < 0)
                fl__conn_reason(c, "send failed: %s", strerror(-rc));
            return;     /* done, or the socket is full */
        }
        pthread_mutex_unlock(&c->send_lock);
        if (next_piece(c, e) < 0) {
            pthread_mutex_lock(&c->send_lock);
            c->torn = 1;
            pthread_mutex_unlock(&c->send_lock);
            return;
        }
    }
}

/* The stream is torn: what waits in the out-queue is dropped, and the
 * streamed READs in it are over. */
void fl__conn_drop_queue(fl_conn *c)
{
    struct outq *e, *next;

    pthread_mutex_lock(&c->send_lock);
    e = c->oq_head;
    c->oq_head = c->oq_tail = NULL;
    c->oq_bytes = 0;
    pthread_mutex_unlock(&c->send_lock);
    for (; e != NULL; e = next) {
        next = e->next;
        if (e->st != NULL)
            stream_over(c, e->st);
        fl__conn_free_entry(e);
    }
}

/* A READ longer than PIECE goes to the out-queue's tail as a stream: its
 * pieces are made as the socket drains, so the receive thread goes on
 * reading requests meanwhile, and no more than a piece is held. */
void fl__conn_queue_stream(fl_conn *c, const struct req *r)
{
    struct stream *st = calloc(1, sizeof *st);
    struct outq *e = calloc(1, sizeof *e);

    stat_add(&c->stats.requests, 1);
    pthread_mutex_lock(&c->lock);
    c->in_flight++;
    c->inflight_bytes += PIECE;
    pthread_mutex_unlock(&c->lock);
    if (st == NULL || e == NULL) {
        free(st);
        free(e);
        fl__conn_reply_failed(c, r, -ENOMEM);
        fl__conn_req_done_bytes(c, PIECE);
        return;
    }
    st->r = *r;
    e->st = st;
    pthread_mutex_lock(&c->send_lock);
    if (c->torn) {
        pthread_mutex_unlock(&c->send_lock);
        fl__conn_free_entry(e);
        fl__conn_req_done_bytes(c, PIECE);
        return;
    }
    if (c->oq_tail != NULL)
        c->oq_tail->next = e;
    else
        c->oq_head = e;
    c->oq_tail = e;
    pthread_mutex_unlock(&c->send_lock);
    fl__conn_drain_out(c);
}
