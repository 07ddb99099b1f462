/* LD_PRELOAD shim that makes storage syscalls fail on demand (tests only).
 *
 * Nothing changes until the trigger file named by an environment variable
 * exists, so a server starts and recovers normally and the test decides when
 * the disk "breaks" by creating the file:
 *
 *   KVS_FAULT_FSYNC_TRIGGER  path: while it exists, fsync() and fdatasync()
 *                            fail with EIO (the data is really written; the
 *                            caller must not be able to tell that).
 *   KVS_FAULT_WRITE_TRIGGER  path: while it exists, write() fails with ENOSPC;
 *                            the first failing call first writes half of its
 *                            buffer and reports that short count, as a disk
 *                            that fills up mid-record does.
 *   KVS_FAULT_SLOW_FSYNC_TRIGGER  path: while it exists, fsync() and fdatasync()
 *                            first sleep KVS_FAULT_SLOW_FSYNC_MS milliseconds
 *                            (a slow or stalled disk), then succeed.
 *   KVS_FAULT_PATH_PREFIX    only descriptors whose /proc/self/fd target starts
 *                            with this prefix are affected (sockets, stderr and
 *                            everything outside the data dir keep working).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int armed(const char *env_name) {
    const char *path = getenv(env_name);
    if (path == NULL || *path == '\0') return 0;
    int saved = errno;
    int exists = access(path, F_OK) == 0;
    errno = saved;
    return exists;
}

static int targeted(int fd) {
    const char *prefix = getenv("KVS_FAULT_PATH_PREFIX");
    if (prefix == NULL || *prefix == '\0') return 1;
    char link[64];
    char target[4096];
    int saved = errno;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    errno = saved;
    if (n < 0) return 0;
    target[n] = '\0';
    return strncmp(target, prefix, strlen(prefix)) == 0;
}

static void maybe_slow(void) {
    if (!armed("KVS_FAULT_SLOW_FSYNC_TRIGGER")) return;
    const char *ms = getenv("KVS_FAULT_SLOW_FSYNC_MS");
    long delay = ms ? atol(ms) : 1000;
    struct timespec ts = {delay / 1000, (delay % 1000) * 1000000L};
    int saved = errno;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
    errno = saved;
}

int fsync(int fd) {
    static int (*real)(int);
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (armed("KVS_FAULT_FSYNC_TRIGGER") && targeted(fd)) {
        errno = EIO;
        return -1;
    }
    if (targeted(fd)) maybe_slow();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (armed("KVS_FAULT_FSYNC_TRIGGER") && targeted(fd)) {
        errno = EIO;
        return -1;
    }
    if (targeted(fd)) maybe_slow();
    return real(fd);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    static int short_write_done;
    if (real == NULL) real = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    if (armed("KVS_FAULT_WRITE_TRIGGER") && targeted(fd)) {
        if (!__atomic_exchange_n(&short_write_done, 1, __ATOMIC_SEQ_CST) && count > 1) {
            return real(fd, buf, count / 2);
        }
        errno = ENOSPC;
        return -1;
    }
    return real(fd, buf, count);
}
