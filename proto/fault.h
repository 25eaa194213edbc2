/*
 * fault.h - build-time fault injection (RELIABILITY C9). With -DWSD_FAULT_INJECTION=ON, a call
 * site written as `if (FAULT("host.memfd")) { errno = ENOMEM; ... }` fails when the environment
 * variable WEIGHTSD_FAULT names its point:
 *
 *     WEIGHTSD_FAULT=POINT[:N[-M]|:*|:%K][,POINT...]
 *
 * N (default 1) is which call fails: the Nth call at that point, counted from process start;
 * N-M fails calls N to M; "*" fails every call; "%K" every Kth (K >= 2), so that a retry loop
 * sees the failure and then the success, at every site. Without the option FAULT() is the constant false and nothing of this is
 * compiled in, so release builds carry no hook. Points are listed in fault.c (and README).
 * Thread-safe: counters are atomic, the variable is read once.
 */
#ifndef WSD_FAULT_H
#define WSD_FAULT_H

#include <stdbool.h>

#ifdef WSD_FAULT_INJECTION
/* True when this call at \p point must fail (see above). */
bool fault_hit(const char *point);
/* The armed specification, or NULL when none (or when no point in it is known). */
const char *fault_armed(void);
/* For in-process tests: arm \p spec (WEIGHTSD_FAULT's syntax; NULL disarms) in place of the
 * environment's, with every counter back at zero, and without the stderr line per injection.
 * Not thread-safe against fault_hit(). */
void fault_arm(const char *spec);
/* Calls counted at \p point since it was last armed (only armed points count). */
unsigned long fault_calls(const char *point);
#define FAULT(point) fault_hit(point)
#else
#define FAULT(point) false
static inline const char *fault_armed(void)
{
    return 0;
}
#endif

#endif /* WSD_FAULT_H */
