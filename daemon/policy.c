/*
 * policy.c - the access decision for each accepted connection, made once, from the credentials
 * the kernel recorded at connect(): a peer that changes uid or groups afterwards keeps the
 * verdict it got, and a socket handed to another process carries its connector's identity.
 */
#include "policy.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "weightsd.h"

#define PEER_GROUPS_MAX 256

void policy_default(policy_t *p)
{
    memset(p, 0, sizeof(*p));
    p->client_default_group = true;
}

int policy_ids_add(policy_ids_t *ids, unsigned id)
{
    for (unsigned i = 0; i < ids->n; i++)
        if (ids->v[i] == id)
            return 0;
    if (ids->n >= POLICY_IDS_MAX)
        return -E2BIG;
    ids->v[ids->n++] = id;
    return 0;
}

static bool ids_have(const policy_ids_t *ids, unsigned id)
{
    for (unsigned i = 0; i < ids->n; i++)
        if (ids->v[i] == id)
            return true;
    return false;
}

/*
 * The peer's supplementary groups. SO_PEERGROUPS (Linux 4.13) gives the ones it held at
 * connect(), which is what its credentials mean; the group database is the fallback, and only
 * says what the peer's user could hold.
 */
static int peer_groups(int fd, uid_t uid, gid_t *groups, int max)
{
    socklen_t len = (socklen_t)(max * (int)sizeof(gid_t));
    struct passwd pw, *res = NULL;
    char buf[4096];
    int n = max;

    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == 0)
        return (int)(len / sizeof(gid_t));
    if (errno != ENOPROTOOPT)
        return errno == ERANGE ? max : 0; /* ERANGE: more than we look at; the first max count */
    if (getpwuid_r(uid, &pw, buf, sizeof(buf), &res) != 0 || !res)
        return 0;
    if (getgrouplist(pw.pw_name, pw.pw_gid, groups, &n) < 0)
        n = max;
    return n;
}

static bool groups_match(const policy_ids_t *configured, bool default_group, int fd,
                         const struct ucred *cred)
{
    const policy_ids_t *allowed = configured;
    policy_ids_t with_default;
    gid_t groups[PEER_GROUPS_MAX];
    int n;

    if (default_group) {
        struct group *g = getgrnam("weightsd");

        with_default = *configured;
        if (g)
            (void)policy_ids_add(&with_default, (unsigned)g->gr_gid);
        allowed = &with_default;
    }
    if (!allowed->n)
        return false;
    if (ids_have(allowed, (unsigned)cred->gid))
        return true;
    n = peer_groups(fd, cred->uid, groups, PEER_GROUPS_MAX);
    for (int i = 0; i < n; i++)
        if (ids_have(allowed, (unsigned)groups[i]))
            return true;
    return false;
}

bool policy_allows(const policy_ids_t *users, const policy_ids_t *groups, int fd,
                   const struct ucred *cred)
{
    if (cred->uid == (uid_t)-1)
        return false;
    return cred->uid == 0 || cred->uid == geteuid() || ids_have(users, (unsigned)cred->uid) ||
           groups_match(groups, false, fd, cred);
}

int policy_check(const policy_t *p, int fd, const struct ucred *cred, bool admin)
{
    bool ok;

    /* No credentials (SO_PEERCRED failed, or a peer outside our pid namespace with unmapped
     * ids) means no identity to allow. */
    if (cred->uid == (uid_t)-1)
        ok = false;
    else if (cred->uid == 0 || cred->uid == geteuid())
        ok = true;
    else if (admin)
        ok = ids_have(&p->admin_users, (unsigned)cred->uid) ||
             groups_match(&p->admin_groups, false, fd, cred);
    else
        ok = ids_have(&p->client_users, (unsigned)cred->uid) ||
             groups_match(&p->client_groups, p->client_default_group, fd, cred);
    if (ok)
        return 0;
    log_ratelimit_warning("access denied on the %s socket: pid %d uid %u gid %u is not in the %s "
                          "policy", admin ? "admin" : "client", (int)cred->pid,
                          (unsigned)cred->uid, (unsigned)cred->gid, admin ? "admin" : "client");
    return WSD_EDENIED;
}
