#!/usr/bin/env python3
"""hello.py: a portmux service in Python through libportmux and ctypes.

    python3 hello.py SPEC BODY        e.g. hello.py 'http://:8000/b?name=b' 'From B'

Claims SPEC, then answers every HTTP/1.1 request on every connection portmux
hands over with BODY (keep-alive honoured), one thread per connection. The
accept side is an event loop (selectors) on portmux_listener_fd(), as asyncio
or any other loop would use it. SIGTERM/SIGINT shut it down gracefully:
requests in progress finish, and each connection goes back to portmux
(portmux_give_back) as soon as it sits between requests, for the next
instance; then the listener is freed and the process exits.
libportmux.so is found through $PORTMUX_LIB, else the system's library path.
"""

import ctypes
import os
import select
import selectors
import signal
import socket
import sys
import threading

PORTMUX_OK = 0
PORTMUX_ERR_WOULD_BLOCK = -5


class ConnInfo(ctypes.Structure):
    """struct portmux_conn_info from portmux.h."""
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("proto", ctypes.c_int),
        ("peeked", ctypes.c_uint32),
        ("truncated", ctypes.c_int),
        ("peer", ctypes.c_char * 64),
        ("local", ctypes.c_char * 64),
        ("sni", ctypes.c_char * 256),
        ("alpn", ctypes.c_char * 256),
        ("host", ctypes.c_char * 256),
        ("path", ctypes.c_char * 4096),
        ("route", ctypes.c_char * 512),
    ]


def load():
    lib = ctypes.CDLL(os.environ.get("PORTMUX_LIB") or "libportmux.so.0")
    listener_p = ctypes.c_void_p
    lib.portmux_listen.argtypes = [ctypes.c_char_p, ctypes.POINTER(listener_p)]
    lib.portmux_listen.restype = ctypes.c_int
    lib.portmux_accept_nonblocking.argtypes = [listener_p, ctypes.POINTER(ConnInfo)]
    lib.portmux_accept_nonblocking.restype = ctypes.c_int
    lib.portmux_listener_fd.argtypes = [listener_p]
    lib.portmux_listener_fd.restype = ctypes.c_int
    lib.portmux_listener_free.argtypes = [listener_p]
    lib.portmux_listener_free.restype = None
    lib.portmux_strerror.argtypes = [ctypes.c_int]
    lib.portmux_strerror.restype = ctypes.c_char_p
    lib.portmux_last_error.argtypes = []
    lib.portmux_last_error.restype = ctypes.c_char_p
    lib.portmux_drain.argtypes = [listener_p]
    lib.portmux_drain.restype = ctypes.c_int
    for name in ("portmux_give_back", "portmux_close"):
        getattr(lib, name).argtypes = [listener_p, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.portmux_shutdown.argtypes = [listener_p, ctypes.c_uint]
    lib.portmux_shutdown.restype = ctypes.c_int
    return lib


def serve(lib, listener, sock, body, stopping):
    """Answers requests on one connection until the client is done; when the
    service shuts down, gives the connection back between requests."""
    try:
        if answer_requests(sock, body, stopping):
            if lib.portmux_give_back(listener, sock.detach()) != PORTMUX_OK:
                print(f"hello.py: give back: {lib.portmux_last_error().decode()}", file=sys.stderr, flush=True)
            return
    except (OSError, ValueError):  # the client went, or sent a bad Content-Length
        pass
    lib.portmux_close(listener, sock.detach())


def answer_requests(sock, body, stopping):
    """True when the service shuts down while the connection sits between requests."""
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n" % len(body)
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            # Between requests, shutting down wins: the next request, if it is
            # already there, stays unread and goes back with the connection.
            if not buf and stopping in select.select([sock, stopping], [], [])[0]:
                return True
            data = sock.recv(16384)
            if not data or len(buf) > 65536:
                return False
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(b":") for l in lines[1:])}
        skip = int(headers.get(b"content-length", b"0") or 0)
        close = lines[0].endswith(b"HTTP/1.0")
        if b"connection" in headers:
            close = headers[b"connection"].lower() == b"close"
        if b"transfer-encoding" in headers:  # a chunked body is not followed here: close
            close = True
        sock.sendall(answer + (b"connection: close\r\n\r\n" if close else b"\r\n") + body)
        if close:
            return False
        while skip > 0:  # a request body, so keep-alive stays in step
            if not buf:
                buf = sock.recv(min(skip, 16384))
                if not buf:
                    return False
            used = min(skip, len(buf))
            buf, skip = buf[used:], skip - used


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} SPEC BODY")
    spec, body = sys.argv[1], sys.argv[2].encode()
    lib = load()
    # Signals wake the loop through a pipe (set_wakeup_fd), so it stops
    # cleanly; taken before the route is claimed, so that a SIGTERM right
    # after "registered" is a graceful stop.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Readable once shutting down: wakes the connections waiting between requests.
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    listener = ctypes.c_void_p()
    rc = lib.portmux_listen(spec.encode(), ctypes.byref(listener))
    if rc != PORTMUX_OK:
        sys.exit(f"hello.py: cannot claim {spec}: {lib.portmux_last_error().decode()}")
    print(f"hello.py: registered {spec}", flush=True)

    sel = selectors.DefaultSelector()
    sel.register(lib.portmux_listener_fd(listener), selectors.EVENT_READ, "portmux")
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    running = True
    while running:
        for key, _ in sel.select():
            if key.data == "signal":
                running = False
                break
            while True:
                info = ConnInfo()
                fd = lib.portmux_accept_nonblocking(listener, ctypes.byref(info))
                if fd == PORTMUX_ERR_WOULD_BLOCK:
                    break
                if fd < 0:
                    print(f"hello.py: accept: {lib.portmux_strerror(fd).decode()} "
                          f"({lib.portmux_last_error().decode()})", file=sys.stderr, flush=True)
                    break
                conn = socket.socket(fileno=fd)
                threading.Thread(target=serve, args=(lib, listener, conn, body, stop_r), daemon=True).start()
    sel.close()
    # No new connections here (portmux queues them for the next instance),
    # then wake the connections waiting between requests.
    if lib.portmux_drain(listener) != PORTMUX_OK:
        print(f"hello.py: drain: {lib.portmux_last_error().decode()}", file=sys.stderr, flush=True)
    os.write(stop_w, b"x")
    if lib.portmux_shutdown(listener, 10000) == PORTMUX_OK:
        lib.portmux_listener_free(listener)
    else:  # Threads may still use the listener: it lives until the exit.
        print(f"hello.py: shutdown: {lib.portmux_last_error().decode()}", file=sys.stderr, flush=True)
    print("hello.py: stopped", flush=True)


if __name__ == "__main__":
    main()
