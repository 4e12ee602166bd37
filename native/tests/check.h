/* Tiny test harness for the native unit tests: CHECK aborts with the
 * location on failure; helpers make scratch images in $TMPDIR. */
#ifndef FLEECED_TEST_CHECK_H
#define FLEECED_TEST_CHECK_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHECK(cond)                                                       \
    do {                                                                  \
        if (!(cond)) {                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__,        \
                    __LINE__, #cond);                                     \
            abort();                                                      \
        }                                                                 \
    } while (0)

#define CHECK_RC(expr, want)                                              \
    do {                                                                  \
        int rc_ = (expr);                                                 \
        if (rc_ != (want)) {                                              \
            fprintf(stderr, "%s:%d: %s = %d (%s), want %d\n", __FILE__,   \
                    __LINE__, #expr, rc_, strerror(rc_ < 0 ? -rc_ : 0),   \
                    (want));                                              \
            abort();                                                      \
        }                                                                 \
    } while (0)

#define RUN(fn)                                                           \
    do {                                                                  \
        fprintf(stderr, "  %s\n", #fn);                                   \
        fn();                                                             \
    } while (0)

static inline const char *test_tmpdir(void)
{
    const char *d = getenv("TMPDIR");
    return d != NULL && d[0] != '\0' ? d : "/tmp";
}

/* Create a scratch file of SIZE bytes filled by fill(i) (or sparse when
 * fill is NULL); writes its path to PATH (at least 4096 bytes). */
static inline void make_image(char *path, uint64_t size,
                              uint8_t (*fill)(uint64_t))
{
    int fd;

    snprintf(path, 4096, "%s/fleeced-test-XXXXXX", test_tmpdir());
    fd = mkstemp(path);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)size) == 0);
    if (fill != NULL) {
        uint8_t *buf = malloc(size ? size : 1);
        CHECK(buf != NULL);
        for (uint64_t i = 0; i < size; i++)
            buf[i] = fill(i);
        CHECK(pwrite(fd, buf, size, 0) == (ssize_t)size);
        free(buf);
    }
    CHECK(close(fd) == 0);
}

#endif
