/* hello.c: a portmux service in C, the twin of the Rust client's `hello`.
 *
 *   hello SPEC BODY      e.g. hello 'http://:8000/a?name=a' 'From A'
 *
 * Claims SPEC, then answers every HTTP/1.1 request on every connection portmux
 * hands over with BODY (keep-alive honoured), one thread per connection. The
 * main thread is an event loop over portmux_listener_fd() and a signalfd.
 * SIGTERM/SIGINT shut it down gracefully: portmux sends nothing new, requests
 * in progress finish, and each connection goes back to portmux as soon as it
 * sits between requests (portmux_give_back), for the next instance; then the
 * listener is freed and the process exits.
 * Build: cc -o hello hello.c $(pkg-config --cflags --libs portmux) -lpthread
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "portmux.h"

static const char *body;
static portmux_listener *l;
static int stop_fd; /* readable once shutting down */

/* Waits for the next request on `fd`: 1 when bytes are there, 0 when the
 * service shuts down first (the connection then sits between requests). */
static int next_request(int fd) {
    struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        return p[1].revents ? 0 : 1;
    }
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The value of header `name` in the head [head, end), or NULL. */
static const char *header(const char *head, const char *end, const char *name, size_t *len) {
    size_t n = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line && line + 2 < end; line = strstr(line + 2, "\r\n")) {
        const char *h = line + 2;
        if ((size_t)(end - h) > n && strncasecmp(h, name, n) == 0 && h[n] == ':') {
            const char *v = h + n + 1;
            while (*v == ' ' || *v == '\t') v++;
            const char *e = strstr(v, "\r\n");
            *len = (size_t)((e ? e : end) - v);
            return v;
        }
    }
    return NULL;
}

/* Serves one connection: requests in, BODY out, until the client is done. */
static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    char buf[16384];
    size_t have = 0;
    char answer[1024];
    /* On an https:// route portmux terminated TLS: say what the handshake settled. */
    char facts[600] = "";
    portmux_tls_info tls;
    if (portmux_conn_tls(l, fd, &tls) == 1)
        snprintf(facts, sizeof facts, "x-portmux-tls: version=%s; cipher=%s; sni=%s; alpn=%s; client-certs=%u\r\n",
                 tls.version, tls.cipher, tls.sni[0] ? tls.sni : "-", tls.alpn[0] ? tls.alpn : "-", tls.client_certs);
    int head_len = snprintf(answer, sizeof answer,
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %zu\r\n%s", strlen(body),
                            facts);
    for (;;) {
        buf[have] = 0;
        char *end = strstr(buf, "\r\n\r\n");
        if (!end) {
            if (have == sizeof buf - 1) break; /* head too large: give up on this client */
            if (have == 0 && !next_request(fd)) {
                /* Between requests while shutting down: back to portmux, for the next instance. */
                if (portmux_give_back(l, fd) != PORTMUX_OK)
                    fprintf(stderr, "hello.c: give back: %s\n", portmux_last_error());
                return NULL;
            }
            ssize_t r = recv(fd, buf + have, sizeof buf - 1 - have, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            have += (size_t)r;
            continue;
        }
        end += 4;
        size_t len;
        const char *v;
        /* Skip a request body (Content-Length framed), so keep-alive stays in step. */
        size_t skip = 0;
        if ((v = header(buf, end, "content-length", &len))) skip = strtoul(v, NULL, 10);
        const char *eol = strstr(buf, "\r\n"); /* the request line ends the HTTP version */
        int close_after = eol - buf >= 8 && strncmp(eol - 8, "HTTP/1.0", 8) == 0;
        if ((v = header(buf, end, "connection", &len))) close_after = len == 5 && strncasecmp(v, "close", 5) == 0;
        /* A chunked body is not followed here: answer, then close. */
        if (header(buf, end, "transfer-encoding", &len)) close_after = 1;
        const char *conn = close_after ? "connection: close\r\n\r\n" : "\r\n";
        if (write_all(fd, answer, (size_t)head_len) || write_all(fd, conn, strlen(conn)) ||
            write_all(fd, body, strlen(body)) || close_after)
            break;
        size_t used = (size_t)(end - buf);
        size_t in_buf = have - used < skip ? have - used : skip;
        used += in_buf;
        skip -= in_buf;
        memmove(buf, buf + used, have - used);
        have -= used;
        while (skip > 0) {
            ssize_t r = recv(fd, buf, skip < sizeof buf - 1 ? skip : sizeof buf - 1, 0);
            if (r <= 0) goto done;
            skip -= (size_t)r;
        }
    }
done:
    portmux_close(l, fd);
    return NULL;
}

/* The whole of a small file, NUL-terminated; NULL if unreadable. */
static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *text = calloc(1, 65536);
    size_t n = text ? fread(text, 1, 65535, f) : 0;
    fclose(f);
    if (text && n == 0) {
        free(text);
        return NULL;
    }
    return text;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 5) {
        fprintf(stderr, "usage: %s SPEC BODY [CHAIN.pem KEY.pem]\n", argv[0]);
        return 2;
    }
    body = argv[2];
    stop_fd = eventfd(0, EFD_CLOEXEC);
    /* Signals are taken before the route is claimed: a SIGTERM right after
     * "registered" is a graceful stop, not the default death. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL); /* inherited by every thread started later */
    int sfd = signalfd(-1, &stop, SFD_CLOEXEC);
    int rc;
    if (argc == 5) {
        /* portmux terminates TLS for the https:// route with this certificate. */
        char *chain = slurp(argv[3]), *key = slurp(argv[4]);
        if (!chain || !key) {
            fprintf(stderr, "hello.c: cannot read %s or %s\n", argv[3], argv[4]);
            return 1;
        }
        rc = portmux_listen_tls(argv[1], chain, key, &l);
        memset(key, 0, strlen(key));
        free(chain);
        free(key);
    } else {
        rc = portmux_listen(argv[1], &l);
    }
    if (rc != PORTMUX_OK) {
        fprintf(stderr, "hello.c: cannot claim %s: %s\n", argv[1], portmux_last_error());
        return 1;
    }
    printf("hello.c: registered %s\n", argv[1]);
    fflush(stdout);

    int lfd = portmux_listener_fd(l);
    if (sfd < 0 || lfd < 0 || stop_fd < 0) {
        fprintf(stderr, "hello.c: cannot set up the event loop: %s\n", lfd < 0 ? portmux_last_error() : strerror(errno));
        portmux_listener_free(l);
        return 1;
    }
    struct pollfd fds[2] = {{.fd = lfd, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            perror("hello.c: poll");
            break;
        }
        if (fds[1].revents) break; /* SIGTERM or SIGINT */
        if (!fds[0].revents) continue;
        for (;;) {
            portmux_conn_info info;
            int fd = portmux_accept_nonblocking(l, &info);
            if (fd == PORTMUX_ERR_WOULD_BLOCK) break;
            if (fd < 0) {
                /* PORTMUX_ERR_FD_LIMIT and the like: the connection is not lost, portmux retries. */
                fprintf(stderr, "hello.c: accept: %s (%s)\n", portmux_strerror(fd), portmux_last_error());
                break;
            }
            pthread_t t;
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&t, &attr, serve, (void *)(intptr_t)fd) != 0) portmux_close(l, fd);
            pthread_attr_destroy(&attr);
        }
    }
    /* No new connections here (portmux queues them for the next instance),
     * then wake the connection threads waiting between requests, and wait
     * (10 s at most) for every connection to be given back or closed. */
    if (portmux_drain(l) != PORTMUX_OK) fprintf(stderr, "hello.c: drain: %s\n", portmux_last_error());
    uint64_t one = 1;
    if (write(stop_fd, &one, sizeof one) < 0) perror("hello.c: wake");
    rc = portmux_shutdown(l, 10000);
    if (rc == PORTMUX_OK) {
        portmux_listener_free(l);
    } else {
        /* Threads may still use the listener: it lives until the exit. */
        fprintf(stderr, "hello.c: shutdown: %s\n", portmux_last_error());
    }
    close(sfd);
    close(stop_fd);
    printf("hello.c: stopped\n");
    return 0;
}
