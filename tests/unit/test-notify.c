/*
 * test-notify.c - notify.c against the documented protocols: datagrams to a path or abstract
 * NOTIFY_SOCKET, STATUS kept to one line, LISTEN_FDS adopted by name and only for our pid; and
 * policy.c's decisions for root, listed, unlisted and credential-less peers.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include "notify.h"
#include "policy.h"
#include "test.h"
#include "weightsd.h"

/* A bound datagram socket standing in for the service manager; \p name starting with '@' is
 * abstract. */
static int manager_socket(const char *name)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    socklen_t len;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);

    ASSERT(fd >= 0);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", name);
    len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(name) + (name[0] != '@'));
    if (name[0] == '@')
        sa.sun_path[0] = '\0';
    ASSERT_EQ(bind(fd, (struct sockaddr *)&sa, len), 0);
    return fd;
}

static void receive(int fd, char *buf, size_t size)
{
    ssize_t n = recv(fd, buf, size - 1, MSG_DONTWAIT);

    ASSERT_GT(n, 0);
    buf[n] = '\0';
}

TEST(ready_to_path_socket)
{
    char path[] = "/tmp/wsd-notify-XXXXXX", sock[64], buf[512];
    uv_loop_t loop;
    notify_t n;
    int fd;

    ASSERT(mkdtemp(path));
    snprintf(sock, sizeof(sock), "%s/notify", path);
    fd = manager_socket(sock);
    setenv("NOTIFY_SOCKET", sock, 1);
    ASSERT_EQ(uv_loop_init(&loop), 0);
    ASSERT_EQ(notify_init(&n, &loop), 0);
    ASSERT(getenv("NOTIFY_SOCKET") == NULL);
    notify_ready(&n, "serving 2 models\nREADY=0");
    receive(fd, buf, sizeof(buf));
    /* a newline in the status cannot smuggle in another key */
    ASSERT_STR_EQ(buf, "READY=1\nSTATUS=serving 2 models READY=0");
    notify_reloading(&n, "reloading");
    receive(fd, buf, sizeof(buf));
    ASSERT(strncmp(buf, "RELOADING=1\nMONOTONIC_USEC=", 27) == 0);
    ASSERT(strstr(buf, "\nSTATUS=reloading"));
    notify_extend_timeout(&n, 30000000);
    receive(fd, buf, sizeof(buf));
    ASSERT_STR_EQ(buf, "EXTEND_TIMEOUT_USEC=30000000");
    notify_stopping(&n, "bye");
    receive(fd, buf, sizeof(buf));
    ASSERT_STR_EQ(buf, "STOPPING=1\nSTATUS=bye");
    notify_close(&n);
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    ASSERT_EQ(uv_loop_close(&loop), 0);
    unlink(sock);
    rmdir(path);
    close(fd);
}

static void stop_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

TEST(abstract_socket_and_watchdog)
{
    uv_timer_t hold;
    char name[64], buf[512];
    uv_loop_t loop;
    notify_t n;
    int fd;

    snprintf(name, sizeof(name), "@wsd-notify-test-%d", (int)getpid());
    fd = manager_socket(name);
    setenv("NOTIFY_SOCKET", name, 1);
    setenv("WATCHDOG_USEC", "20000", 1);
    ASSERT_EQ(uv_loop_init(&loop), 0);
    ASSERT_EQ(notify_init(&n, &loop), 0);
    ASSERT_EQ(n.watchdog_usec, 20000);
    /* Pings every 10 ms. The watchdog does not hold the loop, so a 100 ms timer does: at
     * least two pings even on a loaded machine. */
    ASSERT_EQ(uv_timer_init(&loop, &hold), 0);
    ASSERT_EQ(uv_timer_start(&hold, stop_cb, 100, 0), 0);
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < 2; i++) {
        receive(fd, buf, sizeof(buf));
        ASSERT_STR_EQ(buf, "WATCHDOG=1");
    }
    uv_close((uv_handle_t *)&hold, NULL);
    notify_close(&n);
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    ASSERT_EQ(uv_loop_close(&loop), 0);
    close(fd);
}

TEST(watchdog_of_another_pid_and_bad_addresses_are_ignored)
{
    uv_loop_t loop;
    notify_t n;

    setenv("NOTIFY_SOCKET", "@wsd-nobody-listens", 1);
    setenv("WATCHDOG_USEC", "20000", 1);
    setenv("WATCHDOG_PID", "1", 1);
    ASSERT_EQ(uv_loop_init(&loop), 0);
    ASSERT_EQ(notify_init(&n, &loop), 0);
    ASSERT_EQ(n.watchdog_usec, 0);
    notify_close(&n);

    setenv("NOTIFY_SOCKET", "vsock:2:1234", 1);
    ASSERT_EQ(notify_init(&n, &loop), 0);
    ASSERT_EQ(n.fd, -1);
    ASSERT_EQ(notify_send(&n, "READY=1"), 0); /* a no-op, not an error */
    notify_close(&n);
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    ASSERT_EQ(uv_loop_close(&loop), 0);
}

static int listener(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);

    ASSERT(fd >= 0);
    /* autobind: an abstract address of the kernel's choosing */
    ASSERT_EQ(bind(fd, (struct sockaddr *)&sa, sizeof(sa_family_t)), 0);
    ASSERT_EQ(listen(fd, 1), 0);
    return fd;
}

/* Puts listening sockets at fd 3, 4, ... as a service manager would. */
static void inherit(int n)
{
    for (int i = 0; i < n; i++) {
        int l = listener();
        int fd = fcntl(l, F_DUPFD, 100); /* out of the way of 3, 4, ... */

        close(l);
        ASSERT_EQ(dup2(fd, NOTIFY_LISTEN_FDS_START + i), NOTIFY_LISTEN_FDS_START + i);
        close(fd);
    }
}

static void set_listen_env(const char *pid, const char *nfds, const char *names)
{
    char mine[32];

    snprintf(mine, sizeof(mine), "%d", (int)getpid());
    setenv("LISTEN_PID", pid ? pid : mine, 1);
    setenv("LISTEN_FDS", nfds, 1);
    if (names)
        setenv("LISTEN_FDNAMES", names, 1);
    else
        unsetenv("LISTEN_FDNAMES");
}

TEST(listen_fds_by_name)
{
    int c, a;
    char err[256];

    inherit(2);
    set_listen_env(NULL, "2", "admin:client");
    ASSERT_EQ(notify_listen_fds(&c, &a, NULL, NULL, err, sizeof(err)), 0);
    ASSERT_EQ(c, 4);
    ASSERT_EQ(a, 3);
    ASSERT(fcntl(c, F_GETFL) & O_NONBLOCK);
    ASSERT(fcntl(a, F_GETFD) & FD_CLOEXEC);
    ASSERT(getenv("LISTEN_FDS") == NULL && getenv("LISTEN_PID") == NULL);
}

TEST(listen_fds_unnamed_in_order_and_extra_closed)
{
    int c, a;
    char err[256];

    inherit(3);
    set_listen_env(NULL, "3", "::stray");
    ASSERT_EQ(notify_listen_fds(&c, &a, NULL, NULL, err, sizeof(err)), 0);
    ASSERT_EQ(c, 3);
    ASSERT_EQ(a, 4);
    ASSERT_EQ(fcntl(5, F_GETFD), -1); /* "stray" is not ours: closed */
}

TEST(listen_fds_for_another_pid_are_left_alone)
{
    int c, a;
    char err[256];

    inherit(1);
    set_listen_env("1", "1", "client");
    ASSERT_EQ(notify_listen_fds(&c, &a, NULL, NULL, err, sizeof(err)), 0);
    ASSERT_EQ(c, -1);
    ASSERT_EQ(a, -1);
    ASSERT(fcntl(3, F_GETFD) >= 0);
}

TEST(listen_fds_reject_a_non_listener)
{
    int c, a, sv[2];
    char err[256];

    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    ASSERT_EQ(dup2(sv[0], 3), 3);
    set_listen_env(NULL, "1", "client");
    ASSERT_EQ(notify_listen_fds(&c, &a, NULL, NULL, err, sizeof(err)), -EINVAL);
    ASSERT_STR_CONTAINS(err, "not a listening AF_UNIX stream socket");
    ASSERT_EQ(c, -1);
}

TEST(fdstore_passes_the_fd_and_names)
{
    char name[64], buf[512], fdname[300], back[300];
    char ctl[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf) - 1};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                        .msg_controllen = sizeof(ctl)};
    struct cmsghdr *cm;
    uv_loop_t loop;
    notify_t n;
    int fd, pfd[2], got;
    ssize_t len;

    snprintf(name, sizeof(name), "@wsd-fdstore-test-%d", (int)getpid());
    fd = manager_socket(name);
    setenv("NOTIFY_SOCKET", name, 1);
    ASSERT_EQ(uv_loop_init(&loop), 0);
    ASSERT_EQ(notify_init(&n, &loop), 0);
    ASSERT_EQ(pipe(pfd), 0);

    ASSERT_EQ(notify_fdname(fdname, sizeof(fdname), "m.", "org/llama:8b%"), 0);
    ASSERT_STR_EQ(fdname, "m.org/llama%3A8b%25");
    ASSERT_EQ(notify_fdname_decode(back, sizeof(back), "m.", fdname), 0);
    ASSERT_STR_EQ(back, "org/llama:8b%");
    ASSERT_EQ(notify_fdname_decode(back, sizeof(back), "m.", "m.bad%3"), -EINVAL);
    ASSERT_EQ(notify_fdname_decode(back, sizeof(back), "x.", fdname), -EINVAL);
    ASSERT_EQ(notify_fdstore(&n, "has:colon", pfd[0]), -EINVAL);

    ASSERT_EQ(notify_fdstore(&n, fdname, pfd[0]), 0);
    len = recvmsg(fd, &mh, MSG_DONTWAIT);
    ASSERT_GT(len, 0);
    buf[len] = '\0';
    ASSERT_STR_EQ(buf, "FDSTORE=1\nFDNAME=m.org/llama%3A8b%25");
    cm = CMSG_FIRSTHDR(&mh);
    ASSERT(cm && cm->cmsg_type == SCM_RIGHTS);
    memcpy(&got, CMSG_DATA(cm), sizeof(int));
    /* the manager's copy reads what the daemon's end writes */
    ASSERT_EQ(write(pfd[1], "x", 1), 1);
    ASSERT_EQ(read(got, buf, 1), 1);
    close(got);

    ASSERT_EQ(notify_fdstore_remove(&n, fdname), 0);
    receive(fd, buf, sizeof(buf));
    ASSERT_STR_EQ(buf, "FDSTOREREMOVE=1\nFDNAME=m.org/llama%3A8b%25");
    notify_close(&n);
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    ASSERT_EQ(uv_loop_close(&loop), 0);
    close(pfd[0]);
    close(pfd[1]);
    close(fd);
}

static int stored_cb(void *data, const char *name, int fd)
{
    int *seen = data;

    if (strcmp(name, "m.a") != 0)
        return -1;
    *seen = fd;
    return 0;
}

TEST(listen_fds_hand_stored_fds_over)
{
    int c, a, seen = -1, pfd[2];
    char err[256];

    inherit(2);
    ASSERT_EQ(pipe(pfd), 0);
    ASSERT_EQ(dup2(pfd[0], 5), 5);
    ASSERT_EQ(dup2(pfd[1], 6), 6);
    /* a stored fd is never mistaken for a socket, whatever its name */
    set_listen_env(NULL, "4", "client:admin:m.a:stored");
    ASSERT_EQ(notify_listen_fds(&c, &a, stored_cb, &seen, err, sizeof(err)), 0);
    ASSERT_EQ(c, 3);
    ASSERT_EQ(a, 4);
    ASSERT_EQ(seen, 5);
    ASSERT_EQ(fcntl(6, F_GETFD), -1); /* declined by the callback: closed */
}

TEST(policy_decisions)
{
    policy_t p;
    struct ucred root = {.pid = 1, .uid = 0, .gid = 0};
    struct ucred other = {.pid = 2, .uid = 4321, .gid = 4321};
    struct ucred none = {.pid = 3, .uid = (uid_t)-1, .gid = (gid_t)-1};
    int sv[2];

    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    policy_default(&p);
    ASSERT_EQ(policy_check(&p, sv[0], &root, true), 0);
    ASSERT_EQ(policy_check(&p, sv[0], &none, false), WSD_EDENIED);
    if (geteuid() != 4321)
        ASSERT_EQ(policy_check(&p, sv[0], &other, false), WSD_EDENIED);
    ASSERT_EQ(policy_ids_add(&p.client_users, 4321), 0);
    ASSERT_EQ(policy_check(&p, sv[0], &other, false), 0);
    if (geteuid() != 4321)
        ASSERT_EQ(policy_check(&p, sv[0], &other, true), WSD_EDENIED);
    /* the peer's primary group counts */
    ASSERT_EQ(policy_ids_add(&p.admin_groups, 4321), 0);
    ASSERT_EQ(policy_check(&p, sv[0], &other, true), 0);
    close(sv[0]);
    close(sv[1]);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
