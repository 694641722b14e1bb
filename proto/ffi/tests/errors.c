/* errors.c: libportmux's error paths, driven by tests/it/ffi.rs (also under
 * valgrind). Each mode prints "ok" at the end, or the check that failed.
 *
 *   errors offline              NULL arguments, bad specs, strerror, no portmux running
 *   errors refused SPEC HOLDER  a route another service holds: REFUSED, naming HOLDER
 *   errors fdlimit SPEC         a connection arriving while the fd table is full
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "portmux.h"

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            printf("FAILED line %d: %s (last error: %s)\n", __LINE__, #cond,         \
                   portmux_last_error());                                            \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

static int open_fds(void) {
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    while (readdir(d)) n++;
    closedir(d);
    return n;
}

static void offline(void) {
    portmux_listener *l = (portmux_listener *)&l; /* garbage that must be overwritten */
    CHECK(portmux_listen(NULL, &l) == PORTMUX_ERR_NULL);
    CHECK(l == NULL);
    CHECK(strstr(portmux_last_error(), "route_spec") != NULL);
    CHECK(portmux_listen("tcp://:9", NULL) == PORTMUX_ERR_NULL);
    CHECK(portmux_accept(NULL, NULL) == PORTMUX_ERR_NULL);
    CHECK(portmux_accept_nonblocking(NULL, NULL) == PORTMUX_ERR_NULL);
    CHECK(portmux_listener_fd(NULL) == PORTMUX_ERR_NULL);
    CHECK(strstr(portmux_last_error(), "listener") != NULL);
    portmux_listener_free(NULL);

    CHECK(portmux_listen("ftp://:21", &l) == PORTMUX_ERR_SPEC);
    CHECK(l == NULL);
    CHECK(strstr(portmux_last_error(), "ftp") != NULL);
    CHECK(portmux_listen("http://:8000/a?name=has space", &l) == PORTMUX_ERR_SPEC);
    CHECK(portmux_listen("\xff\xfe", &l) == PORTMUX_ERR_SPEC);
    CHECK(strstr(portmux_last_error(), "UTF-8") != NULL);

    /* PORTMUX_CONTROL points nowhere (set by the test). */
    CHECK(portmux_listen("tcp://:9", &l) == PORTMUX_ERR_NOT_RUNNING);
    CHECK(l == NULL);
    CHECK(strstr(portmux_last_error(), getenv("PORTMUX_CONTROL")) != NULL);
    CHECK(strstr(portmux_last_error(), "portmux run") != NULL);

    int codes[] = {PORTMUX_OK, PORTMUX_ERR_NULL, PORTMUX_ERR_SPEC, PORTMUX_ERR_NOT_RUNNING, PORTMUX_ERR_REFUSED,
                   PORTMUX_ERR_WOULD_BLOCK, PORTMUX_ERR_FD_LIMIT, PORTMUX_ERR_PROTOCOL, PORTMUX_ERR_IO,
                   PORTMUX_ERR_INTERNAL};
    const char *unknown = portmux_strerror(12345);
    CHECK(unknown != NULL && strstr(unknown, "unknown") != NULL);
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *text = portmux_strerror(codes[i]);
        CHECK(text != NULL && *text != 0 && strcmp(text, unknown) != 0);
    }
}

static void refused(const char *spec, const char *holder) {
    portmux_listener *l;
    CHECK(portmux_listen(spec, &l) == PORTMUX_ERR_REFUSED);
    CHECK(l == NULL);
    CHECK(strstr(portmux_last_error(), holder) != NULL);
}

static void fdlimit(const char *spec) {
    int baseline = open_fds();
    portmux_listener *l;
    CHECK(portmux_listen(spec, &l) == PORTMUX_OK);

    /* Fill the fd table: a soft limit just above what is open, then dups. */
    struct rlimit old, low;
    CHECK(getrlimit(RLIMIT_NOFILE, &old) == 0);
    int fillers[1024], n = 0, highest = 0;
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while ((e = readdir(d))) {
        int fd = atoi(e->d_name);
        /* (valgrind keeps its own fds above the limit it shows the program) */
        if (fd > highest && (rlim_t)fd < old.rlim_cur) highest = fd;
    }
    closedir(d);
    low = old;
    low.rlim_cur = (rlim_t)highest + 8;
    CHECK(setrlimit(RLIMIT_NOFILE, &low) == 0);
    for (int fd; n < 1024 && (fd = dup(0)) >= 0;) fillers[n++] = fd;
    CHECK(dup(0) < 0);
    printf("full\n");
    fflush(stdout);

    portmux_conn_info info;
    int rc = portmux_accept(l, &info);
    CHECK(rc == PORTMUX_ERR_FD_LIMIT);
    CHECK(strstr(portmux_last_error(), "file descriptors") != NULL);
    printf("fd limit reported\n");
    fflush(stdout);

    while (n > 0) close(fillers[--n]);
    CHECK(setrlimit(RLIMIT_NOFILE, &old) == 0);
    int fd = portmux_accept(l, &info); /* the same connection, delivered again */
    CHECK(fd >= 0);
    CHECK(info.proto == PORTMUX_PROTO_HTTP);
    CHECK(strcmp(info.path, "/fd") == 0);
    const char answer[] = "HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nrecovered";
    CHECK(send(fd, answer, sizeof answer - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof answer - 1));
    close(fd);
    portmux_listener_free(l);
    CHECK(open_fds() == baseline);
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "offline") == 0) {
        offline();
    } else if (argc == 4 && strcmp(argv[1], "refused") == 0) {
        refused(argv[2], argv[3]);
    } else if (argc == 3 && strcmp(argv[1], "fdlimit") == 0) {
        fdlimit(argv[2]);
    } else {
        fprintf(stderr, "usage: %s offline | refused SPEC HOLDER | fdlimit SPEC\n", argv[0]);
        return 2;
    }
    printf("ok\n");
    return 0;
}
