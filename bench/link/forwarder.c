/*
 * forwarder.c - a small userspace link emulator between two TUN devices.
 *
 * Part of bench/link (see link.py, which builds this file with `cc -O2` on first use).
 * The kernel of our machines has no netem, so the emulated link is this process: it owns one
 * TUN device (L3, IFF_TUN|IFF_NO_PI) in network namespace A and one in namespace B, reads IP
 * packets from one and writes them to the other after impairment, independently per direction:
 *
 *   1. random loss: the packet is dropped with probability `loss` (deterministic PRNG, seeded);
 *   2. drop-tail queue: if the bytes still waiting to be serialized (the backlog) plus this
 *      packet exceed `queue_bytes`, the packet is dropped;
 *   3. rate: departure = max(now, previous departure) + size * 8 / rate  (size = the IP packet,
 *      headers included, no link-layer overhead);
 *   4. delay: the packet is written to the other side at departure + `delay` (one-way).
 *
 * Packets of one direction leave in the order they came (a FIFO, since departures increase and
 * the delay is constant). Time is CLOCK_MONOTONIC; the process sleeps in ppoll() until a packet
 * arrives or the next one is due, with its timer slack set to 1 ns. A packet due within
 * `slack_us` (default 200 us) is written at once: that saves wake-ups and CPU (the kernel
 * runs the receiving stack on small batches; at 100 Mbit/s this process costs ~40% less CPU
 * than with 20 us), never changes the rate, and moves a delivery at most 0.2 ms early.
 *
 * Counters: SIGUSR1 writes them as one JSON object to the --stats file (atomically: a temporary
 * file renamed over it; "seq" counts the dumps); SIGTERM/SIGINT/SIGHUP write them a last time
 * ("final": true) and exit 0. With --watch-stdin, the end of standard input (the parent, holding
 * the pipe's other end, has exited or closed it) does the same: the forwarder never outlives the
 * process that started it, whichever of its threads did.
 *
 * Usage:
 *   forwarder --ns-a /run/netns/A --ns-b /run/netns/B [--if-a NAME] [--if-b NAME]
 *             --a2b RATE_BPS,DELAY_US,QUEUE_BYTES,LOSS --b2a RATE_BPS,DELAY_US,QUEUE_BYTES,LOSS
 *             [--seed N] [--stats PATH] [--slack-us N] [--watch-stdin]
 *   forwarder --version
 * RATE_BPS 0 means no rate limit (and then no queue). Once both devices exist, the process prints
 * "ready IF_A IF_B" on stdout; the caller then gives them addresses and brings them up.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FORWARDER_VERSION "1.0"
#define MAX_PACKET 65536
#define BATCH 64 /* packets read from one device before looking at deliveries again */

/* ---------------------------------------------------------------- PRNG: splitmix64 */
static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static double uniform01(uint64_t *s) { return (splitmix64(s) >> 11) * (1.0 / 9007199254740992.0); }

/* ---------------------------------------------------------------- byte ring of packets */
/* Records are laid out one after the other: header + data, padded to 16 bytes. When a record
 * does not fit before the end, the writer wraps to 0 and `end` marks where the data stops. */
struct rec { int64_t due_ns; uint32_t len; uint32_t pad; };

struct ring {
    uint8_t *buf;
    size_t cap, rd, wr, end;
    int wrapped;
    uint64_t count;
};

static size_t rec_size(uint32_t len) { return (sizeof(struct rec) + len + 15) & ~(size_t)15; }

static int ring_empty(const struct ring *r) { return !r->wrapped && r->rd == r->wr; }

static uint8_t *ring_push(struct ring *r, int64_t due_ns, const uint8_t *data, uint32_t len) {
    size_t n = rec_size(len), at;
    if (!r->wrapped) {
        if (r->cap - r->wr >= n) at = r->wr;
        else if (r->rd >= n) { r->end = r->wr; r->wrapped = 1; at = 0; }
        else return NULL;
    } else {
        if (r->rd - r->wr >= n) at = r->wr;
        else return NULL;
    }
    struct rec *h = (struct rec *)(r->buf + at);
    h->due_ns = due_ns;
    h->len = len;
    memcpy(r->buf + at + sizeof *h, data, len);
    r->wr = at + n;
    r->count++;
    return r->buf + at;
}

static struct rec *ring_peek(struct ring *r) {
    if (ring_empty(r)) return NULL;
    return (struct rec *)(r->buf + r->rd);
}

static void ring_pop(struct ring *r) {
    struct rec *h = (struct rec *)(r->buf + r->rd);
    r->rd += rec_size(h->len);
    r->count--;
    if (r->wrapped && r->rd == r->end) { r->rd = 0; r->wrapped = 0; }
    if (!r->wrapped && r->rd == r->wr) r->rd = r->wr = 0;
}

/* ---------------------------------------------------------------- one direction */
struct counters {
    uint64_t rx_packets, rx_bytes;          /* read from the source device */
    uint64_t packets, bytes;                /* written to the destination device */
    uint64_t dropped_loss, dropped_loss_bytes;
    uint64_t dropped_queue, dropped_queue_bytes;
    uint64_t dropped_other, dropped_other_bytes; /* not IPv4, or no room left in the ring */
    uint64_t write_errors;
    uint64_t max_packet, max_backlog_bytes;
};

struct direction {
    const char *name;
    int src, dst;
    double rate_bps, loss;
    int64_t delay_ns, queue_bytes;
    double ns_per_byte;   /* 0 when there is no rate limit */
    double last_dep_ns;   /* departure (end of serialization) of the last accepted packet */
    uint64_t rng;
    struct ring ring;
    struct counters c;
};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void accept_packet(struct direction *d, const uint8_t *pkt, uint32_t len, int64_t now) {
    struct counters *c = &d->c;
    c->rx_packets++;
    c->rx_bytes += len;
    if (len > c->max_packet) c->max_packet = len;
    if (len < 20 || (pkt[0] >> 4) != 4) { /* IPv4 only: nothing else should cross this link */
        c->dropped_other++;
        c->dropped_other_bytes += len;
        return;
    }
    if (d->loss > 0 && uniform01(&d->rng) < d->loss) {
        c->dropped_loss++;
        c->dropped_loss_bytes += len;
        return;
    }
    double start = (double)now;
    if (d->ns_per_byte > 0) {
        double backlog_ns = d->last_dep_ns - start;
        double backlog = backlog_ns > 0 ? backlog_ns / d->ns_per_byte : 0;
        if (backlog + len > (double)d->queue_bytes) {
            c->dropped_queue++;
            c->dropped_queue_bytes += len;
            return;
        }
        if ((uint64_t)(backlog + len) > c->max_backlog_bytes) c->max_backlog_bytes = (uint64_t)(backlog + len);
        if (d->last_dep_ns > start) start = d->last_dep_ns;
        d->last_dep_ns = start + len * d->ns_per_byte;
        start = d->last_dep_ns;
    }
    if (!ring_push(&d->ring, (int64_t)start + d->delay_ns, pkt, len)) {
        c->dropped_other++;
        c->dropped_other_bytes += len;
    }
}

/* Writes every packet due by `until`; returns the due time of the next one, or INT64_MAX. */
static int64_t deliver(struct direction *d, int64_t until) {
    struct rec *h;
    while ((h = ring_peek(&d->ring)) != NULL) {
        if (h->due_ns > until) return h->due_ns;
        ssize_t w = write(d->dst, (uint8_t *)h + sizeof *h, h->len);
        if (w == (ssize_t)h->len) {
            d->c.packets++;
            d->c.bytes += h->len;
        } else {
            d->c.write_errors++;
        }
        ring_pop(&d->ring);
    }
    return INT64_MAX;
}

/* ---------------------------------------------------------------- stats */
static struct direction dirs[2];
static const char *stats_path;
static uint64_t stats_seq, seed;
static int64_t t_start;

static void dump_counters(FILE *f, const struct direction *d) {
    const struct counters *c = &d->c;
    fprintf(f,
            "{\"rx_packets\": %llu, \"rx_bytes\": %llu, \"packets\": %llu, \"bytes\": %llu, "
            "\"dropped_loss\": %llu, \"dropped_loss_bytes\": %llu, "
            "\"dropped_queue\": %llu, \"dropped_queue_bytes\": %llu, "
            "\"dropped_other\": %llu, \"dropped_other_bytes\": %llu, \"write_errors\": %llu, "
            "\"max_packet\": %llu, \"max_backlog_bytes\": %llu, \"in_flight_packets\": %llu, "
            "\"rate_bps\": %.0f, \"delay_us\": %lld, \"queue_bytes\": %lld, \"loss\": %.6g}",
            (unsigned long long)c->rx_packets, (unsigned long long)c->rx_bytes,
            (unsigned long long)c->packets, (unsigned long long)c->bytes,
            (unsigned long long)c->dropped_loss, (unsigned long long)c->dropped_loss_bytes,
            (unsigned long long)c->dropped_queue, (unsigned long long)c->dropped_queue_bytes,
            (unsigned long long)c->dropped_other, (unsigned long long)c->dropped_other_bytes,
            (unsigned long long)c->write_errors, (unsigned long long)c->max_packet,
            (unsigned long long)c->max_backlog_bytes, (unsigned long long)d->ring.count,
            d->rate_bps, (long long)(d->delay_ns / 1000), (long long)d->queue_bytes, d->loss);
}

static void write_stats(int final) {
    if (!stats_path) return;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", stats_path);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror("forwarder: stats"); return; }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    fprintf(f, "{\"version\": \"%s\", \"seq\": %llu, \"final\": %s, \"pid\": %d, \"seed\": %llu, "
               "\"elapsed_s\": %.6f, \"cpu_s\": %.6f, \"a_to_b\": ",
            FORWARDER_VERSION, (unsigned long long)++stats_seq, final ? "true" : "false", (int)getpid(),
            (unsigned long long)seed, (now_ns() - t_start) / 1e9, cpu);
    dump_counters(f, &dirs[0]);
    fprintf(f, ", \"b_to_a\": ");
    dump_counters(f, &dirs[1]);
    fprintf(f, "}\n");
    if (fclose(f) != 0 || rename(tmp, stats_path) != 0) perror("forwarder: stats");
}

/* ---------------------------------------------------------------- setup */
static volatile sig_atomic_t want_dump, want_stop;
static void on_signal(int sig) {
    if (sig == SIGUSR1) want_dump = 1;
    else want_stop = 1;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* Creates a TUN device inside the network namespace at `ns_path` (e.g. /run/netns/NAME): the
 * device belongs to the namespace the task was in when it opened /dev/net/tun. */
static int open_tun(const char *ns_path, char *ifname) {
    int self = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    int ns = open(ns_path, O_RDONLY | O_CLOEXEC);
    if (self < 0) die("forwarder: /proc/self/ns/net");
    if (ns < 0) die(ns_path);
    if (setns(ns, CLONE_NEWNET) != 0) die("forwarder: setns");
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) die("forwarder: /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) != 0) die("forwarder: TUNSETIFF");
    memcpy(ifname, ifr.ifr_name, IFNAMSIZ);
    ifname[IFNAMSIZ - 1] = 0;
    if (setns(self, CLONE_NEWNET) != 0) die("forwarder: setns back");
    close(ns);
    close(self);
    return fd;
}

static void parse_dir(struct direction *d, const char *spec) {
    double rate, delay_us, queue, loss;
    if (sscanf(spec, "%lf,%lf,%lf,%lf", &rate, &delay_us, &queue, &loss) != 4 || rate < 0 || delay_us < 0 ||
        queue < 0 || loss < 0 || loss > 1) {
        fprintf(stderr, "forwarder: bad direction spec '%s' (want RATE_BPS,DELAY_US,QUEUE_BYTES,LOSS)\n", spec);
        exit(2);
    }
    d->rate_bps = rate;
    d->delay_ns = (int64_t)(delay_us * 1000);
    d->queue_bytes = (int64_t)queue;
    d->loss = loss;
    d->ns_per_byte = rate > 0 ? 8e9 / rate : 0;
}

static void usage(void) {
    fprintf(stderr, "usage: forwarder --ns-a PATH --ns-b PATH [--if-a NAME] [--if-b NAME] "
                    "--a2b RATE_BPS,DELAY_US,QUEUE_BYTES,LOSS --b2a ... [--seed N] [--stats PATH] "
                    "[--slack-us N] [--watch-stdin] | --version\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *ns_a = NULL, *ns_b = NULL, *a2b = NULL, *b2a = NULL;
    char if_a[IFNAMSIZ] = "acc0", if_b[IFNAMSIZ] = "acc0";
    int64_t slack_ns = 200000;
    int watch_stdin = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--version")) { printf("%s\n", FORWARDER_VERSION); return 0; }
        if (!strcmp(a, "--watch-stdin")) { watch_stdin = 1; continue; }
        if (!v) usage();
        if (!strcmp(a, "--ns-a")) ns_a = v;
        else if (!strcmp(a, "--ns-b")) ns_b = v;
        else if (!strcmp(a, "--if-a")) snprintf(if_a, sizeof if_a, "%s", v);
        else if (!strcmp(a, "--if-b")) snprintf(if_b, sizeof if_b, "%s", v);
        else if (!strcmp(a, "--a2b")) a2b = v;
        else if (!strcmp(a, "--b2a")) b2a = v;
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--stats")) stats_path = v;
        else if (!strcmp(a, "--slack-us")) slack_ns = (int64_t)(atof(v) * 1000);
        else usage();
        i++;
    }
    if (!ns_a || !ns_b || !a2b || !b2a) usage();

    /* Signals stay blocked except inside ppoll(), so a flag is never missed between checks. */
    sigset_t block, waitmask;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGHUP);
    sigprocmask(SIG_BLOCK, &block, &waitmask);
    sigdelset(&waitmask, SIGUSR1);
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);
    sigdelset(&waitmask, SIGHUP);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1UL);

    parse_dir(&dirs[0], a2b);
    parse_dir(&dirs[1], b2a);
    int fd_a = open_tun(ns_a, if_a), fd_b = open_tun(ns_b, if_b);
    dirs[0].name = "a_to_b"; dirs[0].src = fd_a; dirs[0].dst = fd_b;
    dirs[1].name = "b_to_a"; dirs[1].src = fd_b; dirs[1].dst = fd_a;
    for (int i = 0; i < 2; i++) {
        struct direction *d = &dirs[i];
        uint64_t s = seed * 2 + (uint64_t)i; /* one independent stream per direction */
        d->rng = splitmix64(&s);
        /* Room for everything that can be in flight: a full queue plus `delay` worth of packets
         * at the line rate, with headroom for record headers on small packets. */
        double in_flight = d->rate_bps > 0 ? d->rate_bps / 8 * (d->delay_ns + slack_ns + 1e6) / 1e9 : 32e6;
        d->ring.cap = (size_t)(3 * (in_flight + (double)d->queue_bytes)) + 4 * MAX_PACKET;
        d->ring.cap = (d->ring.cap + 15) & ~(size_t)15;
        d->ring.buf = malloc(d->ring.cap);
        if (!d->ring.buf) die("forwarder: malloc");
        d->last_dep_ns = 0;
    }
    t_start = now_ns();
    printf("ready %s %s\n", if_a, if_b);
    fflush(stdout);

    static uint8_t pkt[MAX_PACKET];
    struct pollfd pfd[3] = {{.fd = fd_a, .events = POLLIN}, {.fd = fd_b, .events = POLLIN},
                            {.fd = watch_stdin ? 0 : -1, .events = POLLIN}};
    while (!want_stop) {
        if (want_dump) { want_dump = 0; write_stats(0); }
        int64_t now = now_ns();
        int64_t next = deliver(&dirs[0], now + slack_ns);
        int64_t next_b = deliver(&dirs[1], now + slack_ns);
        if (next_b < next) next = next_b;
        struct timespec ts, *tsp = NULL;
        if (next != INT64_MAX) {
            int64_t wait = next - now_ns();
            if (wait < 0) wait = 0;
            ts.tv_sec = wait / 1000000000LL;
            ts.tv_nsec = wait % 1000000000LL;
            tsp = &ts;
        }
        int n = ppoll(pfd, 3, tsp, &waitmask);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("forwarder: ppoll");
        }
        if (pfd[2].revents) {  /* stdin: EOF or hang-up means the parent is gone */
            char c;
            if (read(0, &c, 1) <= 0) break;
        }
        for (int i = 0; i < 2 && n > 0; i++) {
            if (pfd[i].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                fprintf(stderr, "forwarder: device %s failed\n", i ? if_b : if_a);
                want_stop = 1;
            }
            if (!(pfd[i].revents & POLLIN)) continue;
            for (int k = 0; k < BATCH; k++) {
                ssize_t r = read(dirs[i].src, pkt, sizeof pkt);
                if (r <= 0) break;
                accept_packet(&dirs[i], pkt, (uint32_t)r, now_ns());
            }
        }
    }
    write_stats(1);
    return 0;
}
