/* The floor of a fan-out pass in C: one send() per connection, against the same sends
 * handed to the kernel in batches through io_uring (one system call for up to 4,096).
 *
 * The C counterpart of `python -m loadtest sendfloor` (loadtest/sendfloor.py), made to
 * answer one question: how much of a pass is the system call itself, the one part of a
 * send a server could still batch (docs/benchmarks.md, "The floor, and the receivers'
 * acknowledgements"). Not part of the gateway; build and run by hand (Debian:
 * liburing-dev):
 *
 *     cc -O2 -o /tmp/sendfloor_uring loadtest/sendfloor_uring.c -luring
 *     /tmp/sendfloor_uring [clients=5000] [rounds=200] [rate=10] [payload=200]
 *
 * The sender runs on CPU 0, a forked reader on CPU 1 (epoll, reads and discards), over
 * loopback TCP with TCP_NODELAY. Rounds alternate between the two ways (so each way
 * sees the same machine); the first 32 rounds (16 segments per connection, the
 * receivers' quick acknowledgements) are reported apart from the rest.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WARM_UP 32

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *values, int n) {
    if (n <= 0) return 0;
    qsort(values, n, sizeof *values, by_value);
    return values[n / 2];
}

static void read_all(int *fds, int *theirs, int n) {
    pin(1);
    for (int i = 0; i < n; i++) close(theirs[i]);  /* the sender's ends: EOF when it closes */
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
    }
    static char buf[65536];
    struct epoll_event ready[512];
    for (;;) {
        int k = epoll_wait(ep, ready, 512, -1);
        for (int i = 0; i < k; i++)
            if (read(ready[i].data.fd, buf, sizeof buf) == 0) _exit(0);
    }
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 5000, rounds = argc > 2 ? atoi(argv[2]) : 200;
    double rate = argc > 3 ? atof(argv[3]) : 10;
    int len = argc > 4 ? atoi(argv[4]) : 200, one = 1, failed = 0;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    socklen_t addr_len = sizeof addr;
    bind(listener, (void *)&addr, sizeof addr);
    getsockname(listener, (void *)&addr, &addr_len);
    listen(listener, 4096);
    int *client = malloc(n * sizeof(int)), *server = malloc(n * sizeof(int));
    for (int i = 0; i < n; i++) {
        client[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(client[i], (void *)&addr, sizeof addr)) return perror("connect"), 1;
        server[i] = accept(listener, 0, 0);
        setsockopt(server[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(server[i], F_SETFL, O_NONBLOCK);
    }
    pid_t reader = fork();
    if (reader == 0) read_all(client, server, n);
    pin(0);
    for (int i = 0; i < n; i++) close(client[i]);
    char *payload = malloc(len);
    memset(payload, 'x', len);
    struct io_uring ring;
    if (io_uring_queue_init(4096, &ring, 0)) return perror("io_uring_queue_init"), 1;
    double *took[2][2];  /* [way][warm-up or after] */
    int count[2][2] = {{0}};
    for (int w = 0; w < 2; w++)
        for (int p = 0; p < 2; p++) took[w][p] = malloc(rounds * sizeof(double));
    for (int r = 0; r < rounds; r++) {
        usleep((useconds_t)(1e6 / rate));
        int way = r % 2, phase = r >= WARM_UP;
        double started = now();
        if (way == 0) {
            for (int i = 0; i < n; i++)
                if (send(server[i], payload, len, MSG_DONTWAIT | MSG_NOSIGNAL) != len) failed++;
        } else {
            for (int i = 0, done = 0; done < n;) {
                int queued = 0;
                for (; i < n && queued < 4096; i++, queued++)
                    io_uring_prep_send(io_uring_get_sqe(&ring), server[i], payload, len,
                                       MSG_DONTWAIT | MSG_NOSIGNAL);
                io_uring_submit_and_wait(&ring, queued);
                struct io_uring_cqe *cqe;
                unsigned head, seen = 0;
                io_uring_for_each_cqe(&ring, head, cqe) {
                    if (cqe->res != len) failed++;
                    seen++;
                }
                io_uring_cq_advance(&ring, seen);
                done += seen;
            }
        }
        took[way][phase][count[way][phase]++] = (now() - started) * 1e3;
    }
    for (int w = 0; w < 2; w++) {
        double warm = median(took[w][0], count[w][0]), after = median(took[w][1], count[w][1]);
        printf("%-9s first %d rounds: %.2f ms a pass (%.2f us a send); after: %.2f ms (%.2f us)\n",
               w ? "io_uring" : "send()", count[w][0], warm, warm * 1e3 / n, after,
               after * 1e3 / n);
    }
    printf("%d connections, %d rounds at %g/s, %d-byte messages, %d short sends\n", n, rounds,
           rate, len, failed);
    fflush(stdout);
    for (int i = 0; i < n; i++) close(server[i]);
    waitpid(reader, 0, 0);
    return failed != 0;
}
