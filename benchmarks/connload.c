/* kmesh-connload: a new-connection load client whose clock includes connect().
 *
 * Why not wrk: wrk starts a request's clock once the socket is writable, i.e. after the TCP
 * handshake, so the connect() where our cgroup/connect4 program runs is outside its latency.
 * Here every request is: socket() + connect() + write(request) + read until EOF + close(),
 * timed with CLOCK_MONOTONIC around the whole cycle. A fixed number of threads (-c) each keep
 * one request in flight; the run stops after -n requests or -d seconds, whichever is first.
 * Every socket has 2 s send/receive timeouts, so a stuck peer cannot hang the run.
 *
 * Output: one line, "KMESH_CONNLOAD {json}", with exact percentiles in microseconds over the
 * successful requests, the request and error counts, and the wall time.
 *
 * Lockstep (-i FD -o FD, with -c 1): before each request, wait for one byte on FD -i; after it
 * (clock stopped), pass the byte on through FD -o. Two clients joined in a ring by two pipes
 * (for instance one in a cgroup with our programs and one in a cgroup without) then alternate
 * request by request on one CPU, so whatever the machine does meanwhile (other load, frequency
 * changes) falls on both alike and their ratio is paired sample by sample, not run by run. The
 * token passing is outside the timed cycle. End of file on -i (the peer exited) ends the run.
 *
 * Usage: kmesh-connload -a ADDR -p PORT [-c CONC] [-n COUNT] [-d SECONDS] [-r REQUEST]
 *                       [-e EXPECT_PREFIX] [-i TOKEN_IN_FD -o TOKEN_OUT_FD]
 * REQUEST may contain \r and \n escapes (default: an HTTP/1.1 GET with Connection: close).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONC 256
#define MAX_SAMPLES_PER_THREAD (1u << 21)

static struct sockaddr_in target;
static char request[1024];
static size_t request_len;
static char expect[64];
static size_t expect_len;
static long max_requests;
static uint64_t deadline_ns;
static atomic_long issued;
static int token_in = -1, token_out = -1; /* lockstep pipes, -1 when off */

struct worker {
    pthread_t thread;
    uint64_t *samples;
    size_t cap, n;
    long errors;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* One full cycle; 0 on success. */
static int one_request(void) {
    char buf[4096];
    size_t got = 0;
    int ok = 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {.tv_sec = 2, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* also bounds connect() */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) != 0)
        goto out;
    for (size_t off = 0; off < request_len;) {
        ssize_t w = write(fd, request + off, request_len - off);
        if (w <= 0)
            goto out;
        off += (size_t)w;
    }
    for (;;) {
        /* keep the first expect_len bytes for the check; later bytes overwrite each other */
        char *dst = buf + (got < expect_len ? got : expect_len);
        ssize_t r = read(fd, dst, sizeof buf - (size_t)(dst - buf));
        if (r < 0)
            goto out;
        if (r == 0)
            break;
        got += (size_t)r;
    }
    ok = got > 0 && got >= expect_len && memcmp(buf, expect, expect_len) == 0;
out:
    close(fd);
    return ok ? 0 : -1;
}

static void *run_worker(void *arg) {
    struct worker *w = arg;
    char token = 'k';
    for (;;) {
        if (token_in >= 0 && read(token_in, &token, 1) != 1)
            break; /* the peer is gone (or the pipe broke): stop with what we have */
        if (max_requests > 0 && atomic_fetch_add(&issued, 1) >= max_requests)
            break;
        uint64_t t0 = now_ns();
        if (deadline_ns && t0 >= deadline_ns)
            break;
        int rc = one_request();
        uint64_t dt = now_ns() - t0;
        if (token_out >= 0 && write(token_out, &token, 1) != 1)
            token_out = -1; /* the peer is gone: go on alone until the bound */
        if (rc != 0)
            w->errors++;
        else if (w->n < w->cap)
            w->samples[w->n++] = dt;
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double pct_us(const uint64_t *xs, size_t n, double p) {
    if (n == 0)
        return 0.0;
    size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    return (double)xs[i < n ? i : n - 1] / 1000.0;
}

static void unescape(char *dst, size_t cap, const char *src, size_t *len) {
    size_t n = 0;
    for (; *src && n + 1 < cap; src++) {
        if (src[0] == '\\' && src[1] == 'r') {
            dst[n++] = '\r';
            src++;
        } else if (src[0] == '\\' && src[1] == 'n') {
            dst[n++] = '\n';
            src++;
        } else {
            dst[n++] = *src;
        }
    }
    dst[n] = 0;
    *len = n;
}

static void usage(const char *msg) {
    fprintf(stderr, "kmesh-connload: %s\nusage: kmesh-connload -a ADDR -p PORT [-c CONC] [-n COUNT] "
                    "[-d SECONDS] [-r REQUEST] [-e EXPECT_PREFIX] [-i TOKEN_IN_FD -o TOKEN_OUT_FD]\n", msg);
    exit(2);
}

int main(int argc, char **argv) {
    const char *addr = NULL, *req = "GET / HTTP/1.1\\r\\nHost: bench\\r\\nConnection: close\\r\\n\\r\\n";
    const char *exp = "HTTP/1.1 200";
    int port = 0, conc = 1, opt;
    double duration = 0;
    while ((opt = getopt(argc, argv, "a:p:c:n:d:r:e:i:o:")) != -1) {
        switch (opt) {
        case 'a': addr = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': conc = atoi(optarg); break;
        case 'n': max_requests = atol(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'r': req = optarg; break;
        case 'e': exp = optarg; break;
        case 'i': token_in = atoi(optarg); break;
        case 'o': token_out = atoi(optarg); break;
        default: usage("unknown option");
        }
    }
    if (!addr || port <= 0 || port > 65535)
        usage("-a ADDR and -p PORT are required");
    if (conc < 1 || conc > MAX_CONC)
        usage("-c must be 1..256");
    if (max_requests <= 0 && duration <= 0)
        usage("give -n COUNT or -d SECONDS (the run must be bounded)");
    if (duration > 600)
        usage("-d must be <= 600");
    if ((token_in >= 0) != (token_out >= 0))
        usage("lockstep needs both -i and -o");
    if (token_in >= 0 && conc != 1)
        usage("lockstep (-i/-o) runs one request at a time: use -c 1");
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, addr, &target.sin_addr) != 1)
        usage("-a must be an IPv4 address");
    signal(SIGPIPE, SIG_IGN); /* a closed peer (socket or lockstep pipe) is an error, not death */
    unescape(request, sizeof request, req, &request_len);
    unescape(expect, sizeof expect, exp, &expect_len);

    size_t cap = MAX_SAMPLES_PER_THREAD;
    if (max_requests > 0 && (size_t)max_requests < cap)
        cap = (size_t)max_requests;
    struct worker workers[MAX_CONC];
    memset(workers, 0, sizeof workers);
    uint64_t start = now_ns();
    deadline_ns = duration > 0 ? start + (uint64_t)(duration * 1e9) : 0;
    for (int i = 0; i < conc; i++) {
        workers[i].cap = cap;
        workers[i].samples = malloc(cap * sizeof(uint64_t));
        if (!workers[i].samples || pthread_create(&workers[i].thread, NULL, run_worker, &workers[i]) != 0) {
            fprintf(stderr, "kmesh-connload: cannot start worker %d: %s\n", i, strerror(errno));
            return 1;
        }
    }
    size_t total = 0;
    long errors = 0;
    for (int i = 0; i < conc; i++) {
        pthread_join(workers[i].thread, NULL);
        total += workers[i].n;
        errors += workers[i].errors;
    }
    uint64_t wall = now_ns() - start;
    uint64_t *all = malloc((total ? total : 1) * sizeof(uint64_t));
    if (!all) {
        fprintf(stderr, "kmesh-connload: out of memory\n");
        return 1;
    }
    size_t k = 0;
    double sum = 0;
    for (int i = 0; i < conc; i++)
        for (size_t j = 0; j < workers[i].n; j++) {
            all[k++] = workers[i].samples[j];
            sum += (double)workers[i].samples[j];
        }
    qsort(all, total, sizeof(uint64_t), cmp_u64);
    printf("KMESH_CONNLOAD {\"requests\":%zu,\"errors\":%ld,\"duration_us\":%.1f,\"concurrency\":%d,"
           "\"min_us\":%.3f,\"p50_us\":%.3f,\"p90_us\":%.3f,\"p99_us\":%.3f,\"p999_us\":%.3f,"
           "\"max_us\":%.3f,\"mean_us\":%.3f}\n",
           total, errors, (double)wall / 1000.0, conc, total ? (double)all[0] / 1000.0 : 0.0,
           pct_us(all, total, 50), pct_us(all, total, 90), pct_us(all, total, 99),
           pct_us(all, total, 99.9), total ? (double)all[total - 1] / 1000.0 : 0.0,
           total ? sum / (double)total / 1000.0 : 0.0);
    return errors && !total ? 1 : 0;
}
