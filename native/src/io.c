/* fleeced native data path: low-level I/O helpers.
 *
 * Design notes:
 * - full_pread/full_pwrite loop until the whole buffer is done, retrying
 *   EINTR and short transfers; a read that hits EOF early is -EIO (the
 *   caller checked the range against the size fixed at open, so EOF means
 *   the image shrank under us).  Model: nbdkit common/utils/full-rw.c.
 * - Hole detection uses SEEK_DATA/SEEK_HOLE, which never move data; any
 *   lseek failure (old filesystem, block device) is reported as data, the
 *   safe answer for block status.
 * - send_nowait never waits for a peer (MSG_DONTWAIT | MSG_NOSIGNAL): a
 *   worker or receive thread writing a reply under a send lock must not
 *   stall the others behind a client that does not read.
 * - Latency histograms (fl__lat_add): log2 buckets of microseconds, so
 *   an observation costs a clz and three adds (relaxed atomics when the
 *   histogram has concurrent writers and no lock, as an fl_file's).
 * - No state here: every helper works on the fd or histogram it is given.
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

uint64_t fl__now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void fl__lat_add(struct fl_latency *l, uint64_t ns, int atomic)
{
    uint64_t us = ns / 1000;
    unsigned i = us == 0 ? 0 : 64u - (unsigned)__builtin_clzll(us);

    if (i > FL_LAT_BUCKETS - 1)
        i = FL_LAT_BUCKETS - 1;
    if (atomic) {
        __atomic_add_fetch(&l->buckets[i], 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&l->sum_ns, ns, __ATOMIC_RELAXED);
        __atomic_add_fetch(&l->count, 1, __ATOMIC_RELAXED);
    } else {
        l->buckets[i]++;
        l->sum_ns += ns;
        l->count++;
    }
}

int fl__range_ok(uint64_t off, uint64_t len, uint64_t size)
{
    uint64_t end;

    if (__builtin_add_overflow(off, len, &end) || end > size)
        return -EINVAL;
    /* off_t is signed 64-bit: keep every byte address representable. */
    if (end > (uint64_t)INT64_MAX)
        return -EINVAL;
    return 0;
}

int fl__full_pread(int fd, void *buf, size_t len, uint64_t off)
{
    uint8_t *p = buf;

    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

int fl__full_pwrite(int fd, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

int fl__range_is_hole(int fd, int is_blk, uint64_t off, uint64_t len)
{
    off_t d;

    if (is_blk || len == 0)
        return 0;
    d = lseek(fd, (off_t)off, SEEK_DATA);
    if (d < 0)
        return errno == ENXIO; /* no data from off to EOF */
    return (uint64_t)d >= off + len;
}

int fl__punch(int fd, uint64_t off, uint64_t len)
{
    if (len == 0)
        return 0;
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                  (off_t)len) < 0)
        return -errno;
    return 0;
}

int fl__ext_add(struct fl__ext *e, uint64_t len, uint32_t flags)
{
    if (len == 0)
        return 0;
    if (e->n > 0 && e->flags[e->n - 1] == flags) {
        e->lens[e->n - 1] += len;
        return 0;
    }
    if (e->n >= e->max)
        return 1;
    e->lens[e->n] = len;
    e->flags[e->n] = flags;
    e->n++;
    return 0;
}

int fl__fd_extents(int fd, int is_blk, uint64_t off, uint64_t len,
                   struct fl__ext *e)
{
    uint64_t pos = off, end = off + len;

    if (is_blk)
        return fl__ext_add(e, len, 0);
    while (pos < end) {
        off_t d = lseek(fd, (off_t)pos, SEEK_DATA);
        uint64_t next;

        if (d < 0) {
            if (errno == ENXIO) /* hole up to EOF */
                return fl__ext_add(e, end - pos, FL_EXT_HOLE | FL_EXT_ZERO);
            return fl__ext_add(e, end - pos, 0);
        }
        if ((uint64_t)d > pos) {
            next = (uint64_t)d < end ? (uint64_t)d : end;
            if (fl__ext_add(e, next - pos, FL_EXT_HOLE | FL_EXT_ZERO))
                return 1;
            pos = next;
            continue;
        }
        d = lseek(fd, (off_t)pos, SEEK_HOLE);
        if (d < 0 || (uint64_t)d <= pos)
            next = end;
        else
            next = (uint64_t)d < end ? (uint64_t)d : end;
        if (fl__ext_add(e, next - pos, 0))
            return 1;
        pos = next;
    }
    return 0;
}

ssize_t fl__send_nowait(int fd, struct iovec *iov, int iovcnt)
{
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)iovcnt };
    ssize_t total = 0;

    while (m.msg_iovlen > 0) {
        ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return total;
            return -errno;
        }
        total += n;
        while (m.msg_iovlen > 0 && (n > 0 || m.msg_iov->iov_len == 0)) {
            if ((size_t)n >= m.msg_iov->iov_len) {
                n -= (ssize_t)m.msg_iov->iov_len;
                m.msg_iov->iov_len = 0;
                m.msg_iov++;
                m.msg_iovlen--;
            } else {
                m.msg_iov->iov_base = (uint8_t *)m.msg_iov->iov_base + n;
                m.msg_iov->iov_len -= (size_t)n;
                n = 0;
            }
        }
    }
    return total;
}
