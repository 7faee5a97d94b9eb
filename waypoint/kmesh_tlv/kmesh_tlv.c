// SPDX-License-Identifier: Apache-2.0
//
// kmesh_tlv: an Envoy listener filter, built as an Envoy dynamic module (ABI v0.2.0, Envoy 1.40),
// that reads the hand-off header our kernel writes in front of a via-waypoint connection:
//
//   u8 0x01 | u32 BE length (6 = IPv4, 18 = IPv6) | address | port (network order) | u8 0xfe | u32 0
//
// 16 bytes for IPv4, 28 for IPv6. The filter reads the header from the start of the connection
// (straight from the socket at accept time when it is already there, else from Envoy's peeked
// buffer as it arrives, possibly in several pieces), restores the connection's local address to
// the original destination (so filter-chain matching, use_original_dst and ORIGINAL_DST clusters
// see the VIP:port), removes the header so nothing upstream ever sees it, and continues. Handing the original destination on
// to an internal listener is done by Envoy's stock set_filter_state listener filter placed after
// this one (see waypoint/envoycfg.py): the module ABI's filter-state setters cannot share a value
// with the upstream connection.
//
// A bad header (wrong type, bad length, missing end marker), an oversized one, and one that does
// not complete within timeout_ms (peer sends a few bytes and waits, or closes) close that
// connection only and count it in Envoy stats. The timeout is enforced by one timer thread per
// filter config; it never touches a connection itself: it only posts the event to the
// connection's worker thread through the ABI scheduler (a thread-safe dispatcher post).
//
// Written for this project from the ABI's documented contract; the declarations below are our own
// and every one of them is exercised by tests/waypoint against the real Envoy 1.40 binary.

#include <arpa/inet.h>
#include <sys/socket.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

// ---------------------------------------------------------------------------------------------
// ABI types (x86-64 / aarch64 SysV): buffers are {ptr, length} structs passed by value.
// ---------------------------------------------------------------------------------------------
typedef struct {
    const char *ptr;
    size_t length;
} km_buf;

enum { KM_STATUS_CONTINUE = 0, KM_STATUS_STOP = 1 };
enum { KM_LOG_DEBUG = 1, KM_LOG_INFO = 2, KM_LOG_WARN = 3 };

// Callbacks provided by Envoy (resolved at dlopen time from the envoy binary).
extern bool envoy_dynamic_module_callback_listener_filter_get_buffer_chunk(void *fenv, km_buf *out);
extern bool envoy_dynamic_module_callback_listener_filter_drain_buffer(void *fenv, size_t n);
extern bool envoy_dynamic_module_callback_listener_filter_restore_local_address(void *fenv, km_buf ip,
                                                                              uint32_t port, bool is_ipv6);
extern void envoy_dynamic_module_callback_listener_filter_close_socket(void *fenv, km_buf details);
extern void envoy_dynamic_module_callback_listener_filter_continue_filter_chain(void *fenv, bool success);
extern void *envoy_dynamic_module_callback_listener_filter_scheduler_new(void *fenv);
extern void envoy_dynamic_module_callback_listener_filter_scheduler_commit(void *sched, uint64_t id);
extern void envoy_dynamic_module_callback_listener_filter_scheduler_delete(void *sched);
extern int envoy_dynamic_module_callback_listener_filter_config_define_counter(void *cenv, km_buf name,
                                                                             size_t *id_out);
extern int envoy_dynamic_module_callback_listener_filter_config_increment_counter(void *cenv, size_t id,
                                                                                uint64_t value);
extern bool envoy_dynamic_module_callback_listener_filter_set_filter_state_typed(void *fenv, km_buf key,
                                                                               km_buf value);
extern int64_t envoy_dynamic_module_callback_listener_filter_get_socket_fd(void *fenv);
extern bool envoy_dynamic_module_callback_log_enabled(int level);
extern void envoy_dynamic_module_callback_log(int level, km_buf msg);

// ---------------------------------------------------------------------------------------------
// Header format
// ---------------------------------------------------------------------------------------------
#define TLV_TYPE_ORIG_DST 0x01
#define TLV_TYPE_END 0xfe
#define TLV_LEN_V4 6
#define TLV_LEN_V6 18
#define TLV_HDR 5                              // type + u32 length
#define TLV_TOTAL(len) (TLV_HDR + (len) + TLV_HDR)  // value, then the end marker record
#define TLV_MAX TLV_TOTAL(TLV_LEN_V6)          // 28: the peek cap

#define DEFAULT_TIMEOUT_MS 5000
#define EVENT_TIMEOUT 1

enum counter {
    C_OK,          // header read, address restored
    C_MALFORMED,   // wrong type, length, end marker or address
    C_OVERSIZED,   // declared length larger than any address we know
    C_TIMEOUT,     // header incomplete after timeout_ms
    C_TRUNCATED,   // peer closed before the header was complete
    C_REJECTED,    // sum of the four above: one number to alert on
    C_COUNT,
};
static const char *const COUNTER_NAMES[C_COUNT] = {
    "header_ok", "header_malformed", "header_oversized", "header_timeout", "header_truncated",
    "header_rejected",
};

struct pending;

struct config {
    void *envoy;  // config_envoy pointer, valid as long as this config
    uint64_t timeout_ms;
    bool typed_filter_state;  // probe: also set original_dst.local_ip through the module ABI
    size_t counters[C_COUNT];
    // timer thread: a list of connections waiting for their header, each with a deadline
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    bool thread_started;
    bool stopping;
    bool free_on_exit;  // config destroyed on the timer thread itself: the thread frees it
    struct pending *head;
};

enum fstate { S_WAITING, S_DONE };

// One connection waiting for its header. Heap-allocated and reference-counted (the filter holds
// one reference, the timer thread one more while it commits), because the filter can be
// destroyed on any thread at any moment, including *inside* scheduler_commit on the timer thread
// (seen on Envoy 1.40: the last strong reference to the Envoy-side filter can be dropped there).
struct pending {
    struct pending *prev, *next;
    struct timespec deadline;
    void *sched;  // Envoy scheduler bound to the connection's worker dispatcher
    int refs;     // guarded by config.mu
    bool listed;  // in config.head; guarded by config.mu
    bool fired;   // committed once; guarded by config.mu
};

struct filter {
    struct config *cfg;
    void *envoy;
    enum fstate state;
    struct pending *timer;
};

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------
static void km_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void km_log(int level, const char *fmt, ...) {
    if (!envoy_dynamic_module_callback_log_enabled(level))
        return;
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line)
        n = sizeof line - 1;
    envoy_dynamic_module_callback_log(level, (km_buf){line, (size_t)n});
}

static void count(struct config *cfg, enum counter c) {
    envoy_dynamic_module_callback_listener_filter_config_increment_counter(cfg->envoy, cfg->counters[c], 1);
    if (c != C_OK)
        envoy_dynamic_module_callback_listener_filter_config_increment_counter(cfg->envoy,
                                                                            cfg->counters[C_REJECTED], 1);
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int ts_cmp(const struct timespec *a, const struct timespec *b) {
    if (a->tv_sec != b->tv_sec)
        return a->tv_sec < b->tv_sec ? -1 : 1;
    if (a->tv_nsec != b->tv_nsec)
        return a->tv_nsec < b->tv_nsec ? -1 : 1;
    return 0;
}

// Parse {"timeout_ms": N, "typed_filter_state": true} (a JSON object, or empty for defaults).
// Deliberately tiny: only these two keys exist; anything else is rejected so a typo is loud.
static bool parse_config(const char *p, size_t n, struct config *cfg) {
    cfg->timeout_ms = DEFAULT_TIMEOUT_MS;
    cfg->typed_filter_state = false;
    char buf[512];
    if (n >= sizeof buf)
        return false;
    memcpy(buf, p, n);
    buf[n] = 0;
    char *s = buf;
    while (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r')
        s++;
    if (*s == 0)
        return true;
    if (*s++ != '{')
        return false;
    for (;;) {
        while (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r' || *s == ',')
            s++;
        if (*s == '}')
            return true;
        if (*s++ != '"')
            return false;
        char *key = s;
        char *end = strchr(s, '"');
        if (!end)
            return false;
        *end = 0;
        s = end + 1;
        while (*s == ' ')
            s++;
        if (*s++ != ':')
            return false;
        while (*s == ' ')
            s++;
        if (strcmp(key, "timeout_ms") == 0) {
            errno = 0;
            char *num_end;
            double v = strtod(s, &num_end);  // a Struct carries numbers as doubles ("5000.0")
            if (num_end == s || errno || v < 1 || v > 3600000)
                return false;
            cfg->timeout_ms = (uint64_t)v;
            s = num_end;
        } else if (strcmp(key, "typed_filter_state") == 0) {
            if (strncmp(s, "true", 4) == 0) {
                cfg->typed_filter_state = true;
                s += 4;
            } else if (strncmp(s, "false", 5) == 0) {
                s += 5;
            } else {
                return false;
            }
        } else {
            return false;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Timer thread
// ---------------------------------------------------------------------------------------------
static void pending_release(struct pending *p) {
    envoy_dynamic_module_callback_listener_filter_scheduler_delete(p->sched);
    free(p);
}

#define FIRE_BATCH 64

// Never holds config.mu while calling into Envoy: scheduler_commit may run the filter's destroy
// hook on this very thread, and that hook takes config.mu.
static void *timer_main(void *arg) {
    struct config *cfg = arg;
    struct pending *batch[FIRE_BATCH];
    pthread_mutex_lock(&cfg->mu);
    while (!cfg->stopping) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        struct pending *earliest = NULL;
        int n = 0;
        for (struct pending *p = cfg->head; p; p = p->next) {
            if (p->fired)
                continue;
            if (ts_cmp(&p->deadline, &now) <= 0) {
                if (n < FIRE_BATCH) {
                    p->fired = true;
                    p->refs++;
                    batch[n++] = p;
                }
            } else if (!earliest || ts_cmp(&p->deadline, &earliest->deadline) < 0) {
                earliest = p;
            }
        }
        if (n) {
            pthread_mutex_unlock(&cfg->mu);
            // Posts to the worker's dispatcher; the worker then runs on_scheduled for the filter
            // (or nothing, if the filter is gone by then).
            for (int i = 0; i < n; i++)
                envoy_dynamic_module_callback_listener_filter_scheduler_commit(batch[i]->sched, EVENT_TIMEOUT);
            pthread_mutex_lock(&cfg->mu);
            int dead = 0;
            for (int i = 0; i < n; i++)
                if (--batch[i]->refs == 0)
                    batch[dead++] = batch[i];
            pthread_mutex_unlock(&cfg->mu);
            for (int i = 0; i < dead; i++)
                pending_release(batch[i]);
            pthread_mutex_lock(&cfg->mu);
            continue;  // re-scan: more may have expired meanwhile
        }
        if (earliest)
            pthread_cond_timedwait(&cfg->cv, &cfg->mu, &earliest->deadline);
        else
            pthread_cond_wait(&cfg->cv, &cfg->mu);
    }
    bool free_cfg = cfg->free_on_exit;
    pthread_mutex_unlock(&cfg->mu);
    if (free_cfg) {
        pthread_cond_destroy(&cfg->cv);
        pthread_mutex_destroy(&cfg->mu);
        free(cfg);
    }
    return NULL;
}

static void timer_arm(struct filter *f) {
    struct config *cfg = f->cfg;
    struct pending *p = calloc(1, sizeof *p);
    if (!p)
        return;  // the listener's own listener_filters_timeout still applies
    p->sched = envoy_dynamic_module_callback_listener_filter_scheduler_new(f->envoy);
    if (!p->sched) {
        free(p);
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &p->deadline);
    p->deadline.tv_sec += (time_t)(cfg->timeout_ms / 1000);
    p->deadline.tv_nsec += (long)(cfg->timeout_ms % 1000) * 1000000L;
    if (p->deadline.tv_nsec >= 1000000000L) {
        p->deadline.tv_sec++;
        p->deadline.tv_nsec -= 1000000000L;
    }
    p->refs = 1;
    pthread_mutex_lock(&cfg->mu);
    p->prev = NULL;
    p->next = cfg->head;
    if (cfg->head)
        cfg->head->prev = p;
    cfg->head = p;
    p->listed = true;
    pthread_cond_signal(&cfg->cv);
    pthread_mutex_unlock(&cfg->mu);
    f->timer = p;
}

static void timer_disarm(struct filter *f) {
    struct config *cfg = f->cfg;
    struct pending *p = f->timer;
    if (!p)
        return;
    f->timer = NULL;
    pthread_mutex_lock(&cfg->mu);
    if (p->listed) {
        if (p->prev)
            p->prev->next = p->next;
        else
            cfg->head = p->next;
        if (p->next)
            p->next->prev = p->prev;
        p->listed = false;
    }
    bool last = --p->refs == 0;
    pthread_mutex_unlock(&cfg->mu);
    if (last)
        pending_release(p);
}

// ---------------------------------------------------------------------------------------------
// Header parsing
// ---------------------------------------------------------------------------------------------
enum verdict { V_NEED_MORE, V_OK, V_MALFORMED, V_OVERSIZED };

struct orig_dst {
    char ip[INET6_ADDRSTRLEN];
    uint32_t port;
    bool v6;
    size_t header_len;
};

// Decide as early as the bytes allow: a wrong type or length fails on the first 5 bytes.
static enum verdict parse_header(const unsigned char *d, size_t n, struct orig_dst *out, const char **why) {
    if (n < 1)
        return V_NEED_MORE;
    if (d[0] != TLV_TYPE_ORIG_DST) {
        *why = "kmesh_tlv.bad_type";
        return V_MALFORMED;
    }
    if (n < TLV_HDR)
        return V_NEED_MORE;
    uint32_t len = be32(d + 1);
    if (len > TLV_LEN_V6) {
        *why = "kmesh_tlv.oversized";
        return V_OVERSIZED;
    }
    if (len != TLV_LEN_V4 && len != TLV_LEN_V6) {
        *why = "kmesh_tlv.bad_length";
        return V_MALFORMED;
    }
    size_t total = TLV_TOTAL(len);
    if (n < total)
        return V_NEED_MORE;
    const unsigned char *end = d + TLV_HDR + len;
    if (end[0] != TLV_TYPE_END || be32(end + 1) != 0) {
        *why = "kmesh_tlv.bad_end_marker";
        return V_MALFORMED;
    }
    const unsigned char *addr = d + TLV_HDR;
    size_t alen = len - 2;
    out->v6 = len == TLV_LEN_V6;
    out->port = ((uint32_t)addr[alen] << 8) | addr[alen + 1];
    out->header_len = total;
    if (!inet_ntop(out->v6 ? AF_INET6 : AF_INET, addr, out->ip, sizeof out->ip)) {
        *why = "kmesh_tlv.bad_address";
        return V_MALFORMED;
    }
    if (out->port == 0) {
        *why = "kmesh_tlv.bad_port";
        return V_MALFORMED;
    }
    return V_OK;
}

static void reject(struct filter *f, enum counter c, const char *why) {
    f->state = S_DONE;
    count(f->cfg, c);
    km_log(KM_LOG_DEBUG, "kmesh_tlv: closing connection: %s", why);
    envoy_dynamic_module_callback_listener_filter_close_socket(f->envoy, (km_buf){why, strlen(why)});
}

// ---------------------------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------------------------
EXPORT const char *envoy_dynamic_module_on_program_init(void) { return "v0.2.0"; }

EXPORT const void *envoy_dynamic_module_on_listener_filter_config_new(void *config_envoy, km_buf name,
                                                                      km_buf config) {
    (void)name;
    struct config *cfg = calloc(1, sizeof *cfg);
    if (!cfg)
        return NULL;
    if (!parse_config(config.ptr ? config.ptr : "", config.ptr ? config.length : 0, cfg)) {
        km_log(KM_LOG_WARN, "kmesh_tlv: bad filter_config (want {\"timeout_ms\": N}): %.*s",
               (int)(config.length > 200 ? 200 : config.length), config.ptr ? config.ptr : "");
        free(cfg);
        return NULL;
    }
    cfg->envoy = config_envoy;
    for (int i = 0; i < C_COUNT; i++) {
        const char *n = COUNTER_NAMES[i];
        if (envoy_dynamic_module_callback_listener_filter_config_define_counter(
                config_envoy, (km_buf){n, strlen(n)}, &cfg->counters[i]) != 0) {
            free(cfg);
            return NULL;
        }
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&cfg->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&cfg->mu, NULL);
    if (pthread_create(&cfg->thread, NULL, timer_main, cfg) != 0) {
        pthread_cond_destroy(&cfg->cv);
        pthread_mutex_destroy(&cfg->mu);
        free(cfg);
        return NULL;
    }
    cfg->thread_started = true;
    return cfg;
}

EXPORT void envoy_dynamic_module_on_listener_filter_config_destroy(const void *config) {
    struct config *cfg = (struct config *)config;
    if (!cfg)
        return;
    if (cfg->thread_started) {
        pthread_mutex_lock(&cfg->mu);
        cfg->stopping = true;
        pthread_cond_signal(&cfg->cv);
        if (pthread_equal(pthread_self(), cfg->thread)) {
            // The last filter of a removed listener was destroyed inside scheduler_commit on our
            // timer thread, taking the config with it: cannot join ourselves; the thread frees
            // the config once it is back in its loop.
            cfg->free_on_exit = true;
            pthread_mutex_unlock(&cfg->mu);
            pthread_detach(cfg->thread);
            return;
        }
        pthread_mutex_unlock(&cfg->mu);
        pthread_join(cfg->thread, NULL);
    }
    pthread_cond_destroy(&cfg->cv);
    pthread_mutex_destroy(&cfg->mu);
    free(cfg);
}

EXPORT const void *envoy_dynamic_module_on_listener_filter_new(const void *config, void *filter_envoy) {
    struct filter *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    f->cfg = (struct config *)config;
    f->envoy = filter_envoy;
    f->state = S_WAITING;
    return f;
}

// Decide on the first n bytes of the connection. Returns KM_STATUS_CONTINUE when the header was
// read and the address restored (the caller then removes header_len bytes from the socket),
// KM_STATUS_STOP when more bytes are needed (*need_more) or the connection was rejected.
static int handle_bytes(struct filter *f, void *fenv, const unsigned char *d, size_t n, struct orig_dst *od,
                        bool *need_more) {
    const char *why = "kmesh_tlv.malformed";
    *need_more = false;
    switch (parse_header(d, n, od, &why)) {
    case V_NEED_MORE:
        if (n >= TLV_MAX) {  // cannot happen for a well-formed prefix; be safe at the peek cap
            reject(f, C_MALFORMED, "kmesh_tlv.malformed");
            return KM_STATUS_STOP;
        }
        *need_more = true;
        return KM_STATUS_STOP;
    case V_MALFORMED:
        reject(f, C_MALFORMED, why);
        return KM_STATUS_STOP;
    case V_OVERSIZED:
        reject(f, C_OVERSIZED, why);
        return KM_STATUS_STOP;
    case V_OK:
        break;
    }
    if (!envoy_dynamic_module_callback_listener_filter_restore_local_address(
            fenv, (km_buf){od->ip, strlen(od->ip)}, od->port, od->v6)) {
        reject(f, C_MALFORMED, "kmesh_tlv.bad_address");
        return KM_STATUS_STOP;
    }
    if (f->cfg->typed_filter_state) {
        char text[INET6_ADDRSTRLEN + 10];
        int tn = snprintf(text, sizeof text, od->v6 ? "[%s]:%u" : "%s:%u", od->ip, od->port);
        static const char key[] = "envoy.filters.listener.original_dst.local_ip";
        bool ok = envoy_dynamic_module_callback_listener_filter_set_filter_state_typed(
            fenv, (km_buf){key, sizeof key - 1}, (km_buf){text, (size_t)tn});
        km_log(KM_LOG_DEBUG, "kmesh_tlv: typed filter state %s -> %d", text, ok);
    }
    return KM_STATUS_CONTINUE;
}

static void accepted(struct filter *f, const struct orig_dst *od, const char *path) {
    f->state = S_DONE;
    count(f->cfg, C_OK);
    km_log(KM_LOG_DEBUG, "kmesh_tlv: original destination %s%s%s:%u (%s)", od->v6 ? "[" : "", od->ip,
           od->v6 ? "]" : "", od->port, path);
}

// Fast path: when the header is already in the socket at accept time (always, with the
// listener's TCP_DEFER_ACCEPT and a client that writes at once), read it straight from the
// socket and continue without a listener-filter buffer. Envoy 1.40's buffer treats a pending
// FIN (EPOLLRDHUP) as "peer closed" before it peeks, which would drop a client that writes once
// and half-closes at once; on this path Envoy never waits, so the FIN reaches the connection.
EXPORT int envoy_dynamic_module_on_listener_filter_on_accept(void *filter_envoy, const void *filter) {
    struct filter *f = (struct filter *)filter;
    f->envoy = filter_envoy;
    int64_t fd = envoy_dynamic_module_callback_listener_filter_get_socket_fd(filter_envoy);
    if (fd >= 0) {
        unsigned char buf[TLV_MAX];
        ssize_t n = recv((int)fd, buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT);
        if (n > 0) {
            struct orig_dst od;
            bool need_more;
            int st = handle_bytes(f, filter_envoy, buf, (size_t)n, &od, &need_more);
            if (st == KM_STATUS_CONTINUE) {
                ssize_t got = recv((int)fd, buf, od.header_len, MSG_DONTWAIT);
                if (got != (ssize_t)od.header_len) {  // peeked bytes vanished: cannot happen
                    reject(f, C_MALFORMED, "kmesh_tlv.read_failed");
                    return KM_STATUS_STOP;
                }
                accepted(f, &od, "accept");
                return KM_STATUS_CONTINUE;
            }
            if (!need_more)
                return KM_STATUS_STOP;  // rejected and closed
        }
    }
    if (!f->timer)
        timer_arm(f);
    return KM_STATUS_STOP;  // wait for the rest in on_data
}

EXPORT int envoy_dynamic_module_on_listener_filter_on_data(void *filter_envoy, const void *filter,
                                                           size_t data_length) {
    struct filter *f = (struct filter *)filter;
    f->envoy = filter_envoy;
    if (f->state != S_WAITING)
        return KM_STATUS_STOP;
    km_buf chunk = {0};
    if (!envoy_dynamic_module_callback_listener_filter_get_buffer_chunk(filter_envoy, &chunk))
        return KM_STATUS_STOP;
    size_t n = chunk.length < data_length ? chunk.length : data_length;
    km_log(KM_LOG_DEBUG, "kmesh_tlv: on_data %zu bytes (chunk %zu)", data_length, chunk.length);
    struct orig_dst od;
    bool need_more;
    if (handle_bytes(f, filter_envoy, (const unsigned char *)chunk.ptr, n, &od, &need_more) != KM_STATUS_CONTINUE)
        return KM_STATUS_STOP;
    if (!envoy_dynamic_module_callback_listener_filter_drain_buffer(filter_envoy, od.header_len)) {
        reject(f, C_MALFORMED, "kmesh_tlv.read_failed");
        return KM_STATUS_STOP;
    }
    accepted(f, &od, "data");
    return KM_STATUS_CONTINUE;
}

EXPORT void envoy_dynamic_module_on_listener_filter_on_close(void *filter_envoy, const void *filter) {
    struct filter *f = (struct filter *)filter;
    (void)filter_envoy;
    if (f->state == S_WAITING) {
        f->state = S_DONE;
        count(f->cfg, C_TRUNCATED);
        km_log(KM_LOG_DEBUG, "kmesh_tlv: peer closed before the header was complete");
    }
}

EXPORT size_t envoy_dynamic_module_on_listener_filter_get_max_read_bytes(void *filter_envoy,
                                                                         const void *filter) {
    (void)filter_envoy;
    (void)filter;
    return TLV_MAX;
}

EXPORT void envoy_dynamic_module_on_listener_filter_scheduled(void *filter_envoy, const void *filter,
                                                              uint64_t event_id) {
    struct filter *f = (struct filter *)filter;
    if (event_id != EVENT_TIMEOUT || f->state != S_WAITING)
        return;
    f->envoy = filter_envoy;
    reject(f, C_TIMEOUT, "kmesh_tlv.timeout");
    // The filter holds the chain (StopIteration); release it as failed so Envoy drops the socket.
    envoy_dynamic_module_callback_listener_filter_continue_filter_chain(filter_envoy, false);
}

EXPORT void envoy_dynamic_module_on_listener_filter_destroy(const void *filter) {
    struct filter *f = (struct filter *)filter;
    if (!f)
        return;
    if (f->cfg->thread_started && pthread_equal(pthread_self(), f->cfg->thread))
        km_log(KM_LOG_DEBUG, "kmesh_tlv: filter destroyed on the timer thread (inside scheduler_commit)");
    timer_disarm(f);
    if (f->state == S_WAITING) {
        // Envoy gave up first (e.g. its listener_filters_timeout is shorter than ours).
        count(f->cfg, C_TIMEOUT);
    }
    free(f);
}
