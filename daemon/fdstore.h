/*
 * fdstore.h - keeping models across daemon restarts in the service manager's fd store
 * (FDSTORE=1 / LISTEN_FDNAMES; FileDescriptorStoreMax= in the unit). See fdstore.c.
 */
#ifndef WSD_FDSTORE_H
#define WSD_FDSTORE_H

#include <stdbool.h>
#include <stddef.h>

#include "notify.h"
#include "registry.h"

/* Stored fds handed back at start, at most this many (two per model, and one per GPU copy). */
#define FDSTORE_PENDING_MAX 1024u

typedef struct fdstore {
    notify_t *notify;            /* where FDSTORE=1 goes; not owned */
    struct {
        char name[256];          /* FDNAME as stored */
        int fd;                  /* owned until adopted or closed */
        bool keep;               /* left in the store at purge (adoption ran out of memory) */
    } pending[FDSTORE_PENDING_MAX];
    size_t npending;
} fdstore_t;

void fdstore_init(fdstore_t *fs, notify_t *n);
/* Closes whatever was collected and not adopted. */
void fdstore_done(fdstore_t *fs);

/* notify_stored_fn for notify_listen_fds(): keeps the fds this module stored (data = fs). */
int fdstore_collect_cb(void *data, const char *name, int fd);

/* Re-adopts every complete (arena, record) pair into \p r. Needs no notify socket, so it can
 * run before the configured preloads start. \retval number of models adopted. */
unsigned fdstore_adopt_all(fdstore_t *fs, registry_t *r);

/* Asks the manager (fs->notify, set by now) to drop what was not adopted; closes it all. */
void fdstore_purge(fdstore_t *fs, registry_t *r);

/* From now on, ready models are stored and evicted ones removed. */
void fdstore_attach(fdstore_t *fs, registry_t *r);

#endif /* WSD_FDSTORE_H */
