/*
 * policy.h - who may connect to which socket, decided from the peer's credentials at connect
 * time (SO_PEERCRED, SO_PEERGROUPS). File modes on the sockets are a first fence; this is the
 * one that holds when they are misconfigured (RELIABILITY.md I1, I2).
 *
 * Root and the daemon's own uid are always allowed on both sockets. The client socket also
 * admits the configured users and groups (default: group "weightsd", when it exists); the admin
 * socket only the configured admin users and groups (default: nobody else).
 */
#ifndef WSD_POLICY_H
#define WSD_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

#define POLICY_IDS_MAX 64

typedef struct policy_ids {
    unsigned n;
    unsigned v[POLICY_IDS_MAX];   /* uids or gids */
} policy_ids_t;

typedef struct policy {
    policy_ids_t client_users, client_groups;
    policy_ids_t admin_users, admin_groups;
    bool client_default_group;    /* also group "weightsd", looked up when a peer needs it */
} policy_t;

/* The default policy: group "weightsd" on the client socket if that group exists. The group is
 * looked up only for peers that are neither root nor the daemon's uid, so a daemon serving only
 * those never loads NSS modules. */
void policy_default(policy_t *p);

/* Adds \p id to \p ids. \retval 0 or -E2BIG. */
int policy_ids_add(policy_ids_t *ids, unsigned id);

/*
 * Decides for a peer accepted on \p fd with credentials \p cred (the admin socket when \p admin).
 * Supplementary groups are the peer's own at connect time (SO_PEERGROUPS), falling back to the
 * group database for its uid on kernels without it. A denial is logged, with uid and pid.
 * \retval 0 allowed, or WSD_EDENIED.
 */
int policy_check(const policy_t *p, int fd, const struct ucred *cred, bool admin);

/*
 * A per-model allowlist: root and the daemon's own user always pass; anyone else must be in
 * \p users or hold one of \p groups (primary or supplementary, as for the sockets).
 */
bool policy_allows(const policy_ids_t *users, const policy_ids_t *groups, int fd,
                   const struct ucred *cred);

#endif /* WSD_POLICY_H */
