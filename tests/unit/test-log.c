/*
 * test-log.c - the log rate limiter (log.h) on a clock the test moves: the burst, the count of
 * what was suppressed, the one summary line when the window has passed (from the next line or
 * from log_ratelimit_flush()), separate sites, and no limiting at debug level. Also the level
 * names the command line and the config file share.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "test.h"

static uint64_t fake_now;

static uint64_t fake_clock(void)
{
    return fake_now;
}

static FILE *captured;
static int saved_stderr = -1;

/* stderr into a temporary file, until capture_text(). */
static void capture_resume(void)
{
    fflush(stderr);
    ASSERT(ftruncate(fileno(captured), 0) == 0);
    ASSERT_EQ(lseek(fileno(captured), 0, SEEK_SET), 0);
    ASSERT(dup2(fileno(captured), STDERR_FILENO) >= 0);
}

/* Lines in journal format ("<4>text"): no timestamps to strip. */
static void capture_start(int level)
{
    setenv("JOURNAL_STREAM", "8:1", 1);
    captured = tmpfile();
    ASSERT(captured);
    saved_stderr = dup(STDERR_FILENO);
    ASSERT(saved_stderr >= 0);
    log_set_level(level);
    log_ratelimit_set_clock(fake_clock);
    fake_now = 1000000;
    capture_resume();
}

/* Everything logged since the capture (re)started, with stderr back where it was so a failed
 * assertion can be read; the caller frees it and calls capture_resume() to log more. */
static char *capture_text(void)
{
    struct stat st;
    char *buf;

    fflush(stderr);
    ASSERT(dup2(saved_stderr, STDERR_FILENO) >= 0);
    ASSERT_EQ(fstat(fileno(captured), &st), 0);
    buf = calloc(1, (size_t)st.st_size + 1);
    ASSERT(buf);
    ASSERT_EQ(pread(fileno(captured), buf, (size_t)st.st_size, 0), st.st_size);
    return buf;
}

static unsigned count(const char *hay, const char *needle)
{
    unsigned n = 0;

    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

static log_ratelimit_t site_a = {.interval_usec = 5000000, .burst = 3};
static log_ratelimit_t site_b = {.interval_usec = 5000000, .burst = 3};

TEST(burst_then_summary_with_the_next_line)
{
    char *text;

    capture_start(LOG_LVL_INFO);
    for (int i = 0; i < 10; i++) {
        log_ratelimited(&site_a, LOG_LVL_WARNING, "denied %d", i);
        fake_now += 100000; /* 10 lines in 1 s */
    }
    text = capture_text();
    ASSERT_STR_CONTAINS(text, "<4>denied 0\n<4>denied 1\n<4>denied 2\n");
    ASSERT_EQ(count(text, "denied"), 3);
    ASSERT_EQ(count(text, "suppressed"), 0);
    free(text);
    capture_resume();

    /* Still inside the window: counted, not logged. */
    fake_now = 1000000 + 4999999;
    log_ratelimited(&site_a, LOG_LVL_WARNING, "denied %d", 10);
    /* The window has passed: the summary first, quoting the latest dropped line, then a new
     * burst. */
    fake_now = 1000000 + 5000000;
    log_ratelimited(&site_a, LOG_LVL_WARNING, "denied %d", 11);
    text = capture_text();
    ASSERT_STR_EQ(text, "<4>8 similar messages suppressed in the last 5 s; the latest: denied 10\n"
                        "<4>denied 11\n");
    ASSERT_EQ(count(text, "suppressed"), 1);
    free(text);
}

TEST(flush_reports_a_flood_that_stopped)
{
    char *text;

    capture_start(LOG_LVL_INFO);
    for (int i = 0; i < 4; i++)
        log_ratelimited(&site_a, LOG_LVL_WARNING, "violation %d", i);
    /* Before the window has passed the sweep says nothing ... */
    fake_now += 1000000;
    log_ratelimit_flush(false);
    text = capture_text();
    ASSERT_EQ(count(text, "suppressed"), 0);
    free(text);
    capture_resume();
    /* ... after it, one summary, and only once. */
    fake_now += 4500000;
    log_ratelimit_flush(false);
    log_ratelimit_flush(false);
    text = capture_text();
    ASSERT_STR_CONTAINS(text, "<4>1 similar message suppressed in the last 6 s; the latest: "
                              "violation 3\n");
    ASSERT_EQ(count(text, "suppressed"), 1);
    free(text);
    capture_resume();
    /* The next line opens a fresh window with a full burst. */
    for (int i = 0; i < 3; i++)
        log_ratelimited(&site_a, LOG_LVL_WARNING, "again %d", i);
    text = capture_text();
    ASSERT_EQ(count(text, "again"), 3);
    free(text);
}

TEST(flush_all_at_exit_does_not_wait_for_the_window)
{
    char *text;

    capture_start(LOG_LVL_INFO);
    for (int i = 0; i < 5; i++)
        log_ratelimited(&site_a, LOG_LVL_ERR, "limit %d", i);
    log_ratelimit_flush(true);
    text = capture_text();
    /* Same level as the site's lines; under a second rounds up to 1 s. */
    ASSERT_STR_CONTAINS(text, "<3>2 similar messages suppressed in the last 1 s; the latest: "
                              "limit 4\n");
    free(text);
}

TEST(sites_are_limited_separately)
{
    char *text;

    capture_start(LOG_LVL_INFO);
    for (int i = 0; i < 6; i++) {
        log_ratelimited(&site_a, LOG_LVL_WARNING, "a%d", i);
        log_ratelimited(&site_b, LOG_LVL_NOTICE, "b%d", i);
    }
    text = capture_text();
    ASSERT_STR_CONTAINS(text, "<4>a2\n<5>b2\n");
    ASSERT_EQ(count(text, "<4>a"), 3);
    ASSERT_EQ(count(text, "<5>b"), 3);
    free(text);
    capture_resume();
    fake_now += 5000000;
    log_ratelimit_flush(false);
    text = capture_text();
    ASSERT_STR_CONTAINS(text, "3 similar messages suppressed in the last 5 s; the latest: a5\n");
    ASSERT_STR_CONTAINS(text, "3 similar messages suppressed in the last 5 s; the latest: b5\n");
    free(text);
}

TEST(the_macro_keeps_one_state_per_call_site)
{
    char *text;

    capture_start(LOG_LVL_INFO);
    for (unsigned i = 0; i < 2 * LOG_RATELIMIT_BURST; i++) {
        log_ratelimit_warning("first site %u", i);
        log_ratelimit_warning("second site %u", i);
    }
    text = capture_text();
    ASSERT_EQ(count(text, "first site"), LOG_RATELIMIT_BURST);
    ASSERT_EQ(count(text, "second site"), LOG_RATELIMIT_BURST);
    free(text);
    capture_resume();
    fake_now += LOG_RATELIMIT_INTERVAL_USEC;
    log_ratelimit_flush(false);
    text = capture_text();
    ASSERT_EQ(count(text, "similar messages suppressed"), 2);
    free(text);
}

TEST(debug_level_suppresses_nothing)
{
    char *text;

    capture_start(LOG_LVL_DEBUG);
    for (int i = 0; i < 20; i++)
        log_ratelimited(&site_a, LOG_LVL_WARNING, "line %d", i);
    log_ratelimit_flush(true);
    text = capture_text();
    ASSERT_EQ(count(text, "<4>line"), 20);
    ASSERT_EQ(count(text, "suppressed"), 0);
    free(text);
}

TEST(lines_below_the_level_are_not_counted)
{
    char *text;

    capture_start(LOG_LVL_WARNING);
    for (int i = 0; i < 20; i++)
        log_ratelimited(&site_a, LOG_LVL_INFO, "chatter %d", i);
    log_ratelimited(&site_a, LOG_LVL_WARNING, "shown");
    log_ratelimit_flush(true);
    text = capture_text();
    ASSERT_EQ(count(text, "chatter"), 0);
    ASSERT_STR_CONTAINS(text, "<4>shown\n");
    ASSERT_EQ(count(text, "suppressed"), 0);
    free(text);
}

TEST(level_names)
{
    ASSERT_EQ(log_level_from_name("err"), LOG_LVL_ERR);
    ASSERT_EQ(log_level_from_name("error"), LOG_LVL_ERR);
    ASSERT_EQ(log_level_from_name("warning"), LOG_LVL_WARNING);
    ASSERT_EQ(log_level_from_name("notice"), LOG_LVL_NOTICE);
    ASSERT_EQ(log_level_from_name("info"), LOG_LVL_INFO);
    ASSERT_EQ(log_level_from_name("debug"), LOG_LVL_DEBUG);
    ASSERT_EQ(log_level_from_name("verbose"), -EINVAL);
    ASSERT_EQ(log_level_from_name(""), -EINVAL);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
