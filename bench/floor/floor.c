/*
 * The floor of a per-connection handoff: the least a process can do to accept
 * a connection and pass it to another process (SCM_RIGHTS over a Unix
 * SOCK_SEQPACKET socket), against the same server accepting it itself.
 * No peek, no routing, no ack, no limits: whatever portmux adds is above this.
 *
 *   floor direct PORT            a server: accept, read the request, answer, close
 *   floor pass PORT SOCKET       accept on PORT, send each fd to SOCKET, close it
 *   floor serve SOCKET           the same server, taking its connections from SOCKET
 *
 * Each mode runs THREADS threads (environment, default 2), blocking calls only.
 * With PEEK=1 the passer first peeks at the request (recv MSG_PEEK), as
 * portmux does to route by Host; with ACK=1 (give it to both sides) it keeps
 * its copy of each fd until the server acks it (8 bytes back on the same
 * socket, read and closed by a thread of its own), as portmux keeps its
 * copy until the service's Ack so that a dying service loses nothing.
 * bench/floor/run builds it and compares the two paths with wrk.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static const char answer[] = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n";

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* Reads one request head (until a blank line), answers it and closes. */
static void serve_one(int fd) {
    char buf[4096];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n <= 0)
            goto out;
        have += (size_t)n;
        buf[have] = 0;
        if (strstr(buf, "\r\n\r\n"))
            break;
        if (have == sizeof buf - 1)
            goto out;
    }
    if (write(fd, answer, sizeof answer - 1) < 0) {
        /* The client left; nothing to do. */
    }
out:
    close(fd);
}

static int tcp_listener(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    int one = 1, secs = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* As portmux sets it on ports whose clients speak first. */
    setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &secs, sizeof secs);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    if (listen(fd, 4096) < 0)
        die("listen");
    return fd;
}

static struct sockaddr_un unix_addr(const char *path) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) {
        fprintf(stderr, "socket path too long: %s\n", path);
        exit(1);
    }
    strcpy(a.sun_path, path);
    return a;
}

static int listen_fd, passer_fd, peek, ack;

static int flag(const char *name) {
    const char *v = getenv(name);
    return v && !strcmp(v, "1");
}

static void *direct_thread(void *unused) {
    (void)unused;
    for (;;) {
        int c = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0)
            serve_one(c);
        else if (errno != EINTR && errno != ECONNABORTED)
            die("accept");
    }
    return NULL;
}

static void *pass_thread(void *unused) {
    (void)unused;
    for (;;) {
        int c = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            die("accept");
        }
        if (peek) {
            char head[2048];
            if (recv(c, head, sizeof head, MSG_PEEK) <= 0) {
                close(c);
                continue;
            }
        }
        /* The id is the fd's number: unique while the passer holds it open. */
        long id = c;
        struct iovec iov = {.iov_base = &id, .iov_len = sizeof id};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } u;
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &c, sizeof c);
        if (sendmsg(passer_fd, &m, MSG_NOSIGNAL) < 0)
            die("sendmsg");
        if (!ack)
            close(c);
    }
    return NULL;
}

/* ACK=1: closes the passer's copy of each fd the server acked. */
static void *ack_thread(void *unused) {
    (void)unused;
    for (;;) {
        long id;
        ssize_t n = recv(passer_fd, &id, sizeof id, 0);
        if (n == 0)
            exit(0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("recv ack");
        }
        close((int)id);
    }
    return NULL;
}

static void *serve_thread(void *arg) {
    int from = (int)(long)arg;
    for (;;) {
        long id;
        struct iovec iov = {.iov_base = &id, .iov_len = sizeof id};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } u;
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
        ssize_t n = recvmsg(from, &m, MSG_CMSG_CLOEXEC);
        if (n == 0)
            exit(0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("recvmsg");
        }
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        if (!cm || cm->cmsg_type != SCM_RIGHTS) {
            fprintf(stderr, "a message without an fd\n");
            exit(1);
        }
        int c;
        memcpy(&c, CMSG_DATA(cm), sizeof c);
        if (ack && send(from, &id, sizeof id, MSG_NOSIGNAL) < 0)
            die("send ack");
        serve_one(c);
    }
    return NULL;
}

static void run_threads(void *(*f)(void *), void *arg) {
    const char *t = getenv("THREADS");
    int n = t ? atoi(t) : 2;
    if (n < 1)
        n = 1;
    pthread_t th[64];
    for (int i = 0; i < n && i < 64; i++)
        if (pthread_create(&th[i], NULL, f, arg) != 0)
            die("pthread_create");
    for (int i = 0; i < n && i < 64; i++)
        pthread_join(th[i], NULL);
}

int main(int argc, char **argv) {
    peek = flag("PEEK");
    ack = flag("ACK");
    if (argc == 3 && !strcmp(argv[1], "direct")) {
        listen_fd = tcp_listener(atoi(argv[2]));
        run_threads(direct_thread, NULL);
    } else if (argc == 4 && !strcmp(argv[1], "pass")) {
        listen_fd = tcp_listener(atoi(argv[2]));
        passer_fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        struct sockaddr_un a = unix_addr(argv[3]);
        if (passer_fd < 0 || connect(passer_fd, (struct sockaddr *)&a, sizeof a) < 0)
            die("connect to the server's socket");
        pthread_t acks;
        if (ack && pthread_create(&acks, NULL, ack_thread, NULL) != 0)
            die("pthread_create");
        run_threads(pass_thread, NULL);
    } else if (argc == 3 && !strcmp(argv[1], "serve")) {
        int l = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        struct sockaddr_un a = unix_addr(argv[2]);
        unlink(argv[2]);
        if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 16) < 0)
            die("the server's socket");
        int from = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (from < 0)
            die("accept the passer");
        run_threads(serve_thread, (void *)(long)from);
    } else {
        fprintf(stderr, "usage: floor direct PORT | floor pass PORT SOCKET | floor serve SOCKET\n");
        return 2;
    }
    return 0;
}
