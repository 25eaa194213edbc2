/*
 * fault_alloc.c - the "malloc" injection point (RELIABILITY C9): with -DWSD_FAULT_INJECTION=ON
 * weightsd and libweightsd are linked with -Wl,--wrap for malloc, calloc, realloc, strdup and
 * strndup (wsd_wrap_allocations() in proto/CMakeLists.txt), so every allocation their own code
 * makes (and that of any library linked in statically) goes through here and can be failed
 * with WEIGHTSD_FAULT=malloc:N. Libraries linked dynamically keep their own allocations. Not
 * part of release builds.
 */
#include <errno.h>
#include <stddef.h>
#include <string.h>

#include "fault.h"

void *__real_malloc(size_t size);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t size);
char *__real_strdup(const char *s);
char *__real_strndup(const char *s, size_t n);

void *__wrap_malloc(size_t size);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t size);
char *__wrap_strdup(const char *s);
char *__wrap_strndup(const char *s, size_t n);

/* fault_hit() may allocate the first time it runs (it reads the environment once); those
 * allocations, on this thread, are never failed. */
static _Thread_local int inside;

static int fail_now(void)
{
    int hit;

    if (inside)
        return 0;
    inside = 1;
    hit = FAULT("malloc");
    inside = 0;
    if (hit)
        errno = ENOMEM;
    return hit;
}

void *__wrap_malloc(size_t size)
{
    return fail_now() ? NULL : __real_malloc(size);
}

void *__wrap_calloc(size_t n, size_t size)
{
    return fail_now() ? NULL : __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t size)
{
    return fail_now() ? NULL : __real_realloc(p, size);
}

char *__wrap_strdup(const char *s)
{
    return fail_now() ? NULL : __real_strdup(s);
}

char *__wrap_strndup(const char *s, size_t n)
{
    return fail_now() ? NULL : __real_strndup(s, n);
}
