/*
 * fault.c - the injection points of fault.h and WEIGHTSD_FAULT parsing. Compiled only with
 * -DWSD_FAULT_INJECTION=ON. An unknown point name in WEIGHTSD_FAULT is refused loudly on
 * stderr (and arms nothing) rather than silently testing nothing.
 */
#include "fault.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Every point a call site may name; FAULT() with another name is a bug (it never fires). */
static const char *const points[] = {
    "host.memfd",     /* memfd_create of a model arena: ENOMEM */
    "host.ftruncate", /* sizing the arena: ENOSPC */
    "host.mmap",      /* mapping the arena for the copy: ENOMEM */
    "source.open",    /* opening a checkpoint file: EMFILE */
    "source.pread",   /* reading a checkpoint: EIO */
    "fdpass.sendmsg", /* sending a frame (with its fds): ETOOMANYREFS */
    "fdpass.send.short",  /* a send takes one byte only (the rest must be queued) */
    "fdpass.recv.short",  /* a receive returns one byte only (frames come in pieces) */
    "fdpass.recv.eagain", /* a receive finds nothing after poll said readable */
    "wire.alloc",     /* the decoder's counting allocator: NULL */
    "gpu.hostalloc",  /* pinning a staging buffer: cudaErrorMemoryAllocation (E_PIN_FAILED) */
    "gpu.sticky",     /* a host-to-device copy: cudaErrorIllegalAddress (device degraded) */
    "gpu.upload.stall", /* not a failure: an upload to more devices (registry.c) waits 2 s
                         * (or until cancelled) before it starts, so tests can act meanwhile */
    "malloc",         /* any allocation by weightsd's own code (fault_alloc.c): NULL, ENOMEM */
    "syscall.eintr",  /* sendmsg, recvmsg and a checkpoint's pread are interrupted: EINTR */
    "source.pread.short", /* a checkpoint pread returns half of what was asked */
};
#define NPOINTS (sizeof(points) / sizeof(points[0]))

static struct {
    unsigned long every[NPOINTS]; /* POINT:%K: every Kth call fails instead (0 = not that) */
    unsigned long nth[NPOINTS]; /* first failing call; 0 = not armed */
    unsigned long last[NPOINTS]; /* last failing call; ULONG_MAX = every one from nth on */
    atomic_ulong calls[NPOINTS];
    char spec[256];
    bool armed;
    bool quiet; /* armed by fault_arm(): the caller asks fault_calls() instead */
} st;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int point_index(const char *name, size_t len)
{
    for (size_t i = 0; i < NPOINTS; i++)
        if (strlen(points[i]) == len && memcmp(points[i], name, len) == 0)
            return (int)i;
    return -1;
}

/* Arms what \p env names (see fault.h), or nothing; counters restart at zero. */
static void arm(const char *env)
{
    unsigned long nth[NPOINTS] = {0}, last[NPOINTS] = {0}, every[NPOINTS] = {0};
    const char *p = env;

    st.armed = false;
    for (size_t i = 0; i < NPOINTS; i++)
        atomic_store(&st.calls[i], 0);
    if (!env || !*env)
        return;
    while (*p) {
        size_t len = strcspn(p, ":,");
        int i = point_index(p, len);
        unsigned long n = 1, m = 1, k = 0;

        if (i < 0) {
            fprintf(stderr, "WEIGHTSD_FAULT: unknown point '%.*s'; nothing armed\n", (int)len, p);
            return;
        }
        p += len;
        if (*p == ':') {
            char *end;

            if (p[1] == '*') {
                n = 1;
                m = (unsigned long)-1;
                end = (char *)(uintptr_t)(p + 2);
            } else if (p[1] == '%') {
                k = strtoul(p + 2, &end, 10);
                n = k;
                m = (unsigned long)-1;
            } else {
                n = m = strtoul(p + 1, &end, 10);
                if (*end == '-')
                    m = strtoul(end + 1, &end, 10);
            }
            if (n == 0 || m < n || (*end && *end != ',') || (p[1] == '%' && k < 2)) {
                fprintf(stderr, "WEIGHTSD_FAULT: bad count after '%s'; nothing armed\n",
                        points[i]);
                return;
            }
            p = end;
        }
        nth[i] = n;
        last[i] = m;
        every[i] = k;
        if (*p == ',')
            p++;
    }
    memcpy(st.nth, nth, sizeof(nth));
    memcpy(st.last, last, sizeof(last));
    memcpy(st.every, every, sizeof(every));
    snprintf(st.spec, sizeof(st.spec), "%s", env);
    st.armed = true;
}

static void parse(void)
{
    arm(getenv("WEIGHTSD_FAULT"));
}

void fault_arm(const char *spec)
{
    (void)pthread_once(&once, parse);
    arm(spec);
    st.quiet = true;
}

unsigned long fault_calls(const char *point)
{
    int i = point_index(point, strlen(point));

    return i < 0 ? 0 : atomic_load(&st.calls[i]);
}

bool fault_hit(const char *point)
{
    int i;
    unsigned long c;

    (void)pthread_once(&once, parse);
    if (!st.armed)
        return false;
    i = point_index(point, strlen(point));
    if (i < 0 || st.nth[i] == 0)
        return false;
    c = atomic_fetch_add(&st.calls[i], 1) + 1;
    if (c < st.nth[i] || c > st.last[i] || (st.every[i] && c % st.every[i] != 0))
        return false;
    /* Said on stderr so a test knows the call was reached; write(2), since the caller may be
     * the allocator itself. */
    if (c == st.nth[i] && !st.quiet) {
        char line[96];
        int n = snprintf(line, sizeof(line), "WEIGHTSD_FAULT: injected at %s, call %lu\n",
                         points[i], c);

        if (n > 0)
            (void)!write(STDERR_FILENO, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line));
    }
    return true;
}

const char *fault_armed(void)
{
    (void)pthread_once(&once, parse);
    return st.armed ? st.spec : NULL;
}
