#!/usr/bin/env python3
"""The portmux benchmark harness (run it with bench/run).

Every system serves the very same bytes from the same server, the client
crate's `hello` example (directly, handed off by portmux, or behind a proxy),
and is measured with identical wrk parameters, one after the other, in
interleaved rounds; the tables give medians. Results: bench/results/latest.md,
latest.png and latest.json. Every process started here is stopped here, by PID; only
loopback is used.
"""

import argparse
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
PORTMUX = os.path.join(RELEASE, "portmux")
HELLO = os.path.join(RELEASE, "examples", "hello")
TLSLOAD = os.path.join(RELEASE, "examples", "tlsload")
PEERS = os.path.join(ROOT, "bench", "peers")
ALTERNATE = os.path.join(PEERS, "alternate.lua")  # wrk: /a/x and /b/x in turn
RESULTS = os.path.join(ROOT, "bench", "results")
TICK = os.sysconf("SC_CLK_TCK")
THREADS = 2  # wrk threads, and every proxy's workers/threads
# Every proxy gets the same fd limit: the hard limit bench/run could reach. A
# relayed connection costs a proxy two fds (HAProxy also keeps up to 200 splice
# pipes, two fds each), so the idle scenario opens as many as fit under it with
# 1000 to spare (10 000 wherever the hard limit allows 21 000 or more).
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
if NOFILE == resource.RLIM_INFINITY:
    NOFILE = 1 << 20
MAXCONN = (NOFILE - 1000) // 2
IDLE = min(10_000, MAXCONN)

PEER_SYSTEMS = ("haproxy-tcp", "haproxy-http", "nginx-stream", "nginx-http", "sniproxy")
TERMINATING = ("portmux-terminate", "haproxy-terminate", "nginx-terminate")
# Per-request routing by path (/a to backend A, /b to backend B): plain HTTP/1.1,
# or HTTP/2 over TLS in the l7-h2 scenario (bench/peers/*-l7.*).
L7 = ("portmux-l7", "nginx-l7", "haproxy-l7")
# Every peer, for the "× best peer" column: in a scenario only those it runs count.
ALL_PEERS = PEER_SYSTEMS + TERMINATING[1:] + L7[1:]

SCENARIOS = [
    dict(key="ka", short="keep-alive", title="keep-alive, small responses", body="hello", size=None, conns=50, close=False, tls=False,
         systems=("direct", "portmux-handoff", "portmux-lend", "portmux-forward", "portmux-forward-user") + PEER_SYSTEMS),
    dict(key="close", short="new connection each", title="new connection per request", body="hello", size=None, conns=50, close=True, tls=False,
         systems=("direct", "portmux-handoff", "portmux-lend", "portmux-forward", "portmux-forward-user") + PEER_SYSTEMS),
    dict(key="1m", short="1 MiB bodies", title="1 MiB bodies", body="x", size=1 << 20, conns=8, close=False, tls=False,
         systems=("direct", "portmux-handoff", "portmux-forward", "portmux-forward-user") + PEER_SYSTEMS),
    dict(key="16m", short="16 MiB bodies", title="16 MiB bodies", body="x", size=16 << 20, conns=4, close=False, tls=False,
         systems=("direct", "portmux-handoff", "portmux-forward", "portmux-forward-user") + PEER_SYSTEMS),
    dict(key="tls", short="TLS passthrough", title="TLS passthrough by SNI", body="hello", size=None, conns=50, close=False, tls=True,
         systems=("direct", "portmux-handoff", "portmux-forward", "portmux-forward-user", "haproxy-tcp", "nginx-stream",
                  "sniproxy")),
    dict(key="term-ka", short="TLS terminated, keep-alive", title="TLS terminated, keep-alive (ECDSA P-256)", body="hello",
         size=None, conns=50, close=False, term=True, systems=("direct",) + TERMINATING),
    dict(key="term-new", short="TLS terminated, full handshakes", title="TLS terminated, a new connection per request, full handshakes",
         body="hello", size=None, conns=50, close=True, term=True, loader="tlsload", systems=("direct",) + TERMINATING),
    dict(key="term-resume", short="TLS terminated, resumed", title="TLS terminated, a new connection per request, resumed (tickets)",
         body="hello", size=None, conns=50, close=True, term=True, loader="tlsload", resume=True,
         systems=("direct",) + TERMINATING),
    dict(key="l7-ka", short="per-request, keep-alive", title="per-request routing by path (/a, /b), keep-alive",
         body="hello A", body_b="hello B", size=None, conns=50, close=False, l7=True, systems=("direct",) + L7),
    dict(key="l7-close", short="per-request, new connection each",
         title="per-request routing by path (/a, /b), a new connection per request", body="hello A", body_b="hello B",
         size=None, conns=50, close=True, l7=True, systems=("direct",) + L7),
    dict(key="l7-h2", short="per-request, HTTP/2 over TLS", title="per-request routing by path (/a, /b), HTTP/2 over TLS",
         body="hello A", body_b="hello B", size=None, conns=16, streams=10, close=False, l7=True, h2=True,
         loader="h2load", systems=L7),
    dict(key="idle", title=f"{IDLE:,} idle connections (memory)".replace(",", " "), idle=IDLE, body="hello",
         systems=("portmux-handoff", "portmux-forward", "portmux-forward-user", "haproxy-tcp", "nginx-stream")),
]

_next_port = 18100


def free_port():
    global _next_port
    while True:
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", _next_port))
                return _next_port
            except OSError:
                continue


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


class Procs:
    """Processes started here; stopped here, by PID."""

    def __init__(self):
        self.procs = []

    def start(self, args, ready=None, **kw):
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        if ready:
            deadline = time.time() + 20
            while time.time() < deadline:
                line = p.stdout.readline().decode()
                if ready in line:
                    return p, line
                if not line and p.poll() is not None:
                    break
            raise RuntimeError(f"{args[0]} did not start")
        return p, ""

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def descendants(pid):
    """pid and every process below it (nginx's workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def memory_kib(pids, field):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def established(port):
    """Established TCP connections whose local port is `port` (the backend's side)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def parse_duration(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def parse_size(text):
    m = re.match(r"([\d.]+)([KMG]?B)", text)
    return float(m.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(2)]


def tlsload(port, conns, duration, resume):
    """A new TLS connection per request (full handshakes, or resumed ones), with the repo's loader."""
    cmd = [TLSLOAD, f"127.0.0.1:{port}", "localhost", "--conns", str(conns), "--duration", str(duration)]
    if resume:
        cmd.append("--resume")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    try:
        r = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"tlsload failed: {' '.join(cmd)}\n{out}")
    shown = [os.path.relpath(cmd[0], ROOT)] + cmd[1:]
    return dict(cmd=" ".join(shown), rps=r["rps"], requests=r["requests"], errors=r["errors"], non2xx=0,
                p50=r["p50"], p99=r["p99"], resumed=r["resumed"])


def wrk(url, conns, duration, close, script=None):
    cmd = ["wrk", "--latency", f"-t{THREADS}", f"-c{conns}", f"-d{duration}s", "--timeout", "10s"]
    if url.startswith("http://"):
        cmd += ["-H", "Host: localhost"]  # sniproxy routes by Host
    if close:
        cmd += ["-H", "Connection: close"]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    result = dict(cmd=" ".join(os.path.relpath(a, ROOT) if a == script else a for a in cmd), errors=0, non2xx=0)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(line.split()[1])
        elif line.startswith("Transfer/sec:"):
            result["bps"] = parse_size(line.split()[1])
        elif line.startswith("50%"):
            result["p50"] = parse_duration(line.split()[1])
        elif line.startswith("99%"):
            result["p99"] = parse_duration(line.split()[1])
        elif "requests in" in line:
            result["requests"] = int(line.split()[0])
        elif line.startswith("Socket errors:"):
            result["errors"] = sum(int(n) for n in re.findall(r"\d+", line))
        elif line.startswith("Non-2xx"):
            result["non2xx"] = int(line.split()[-1])
    if "rps" not in result:
        raise RuntimeError(f"wrk failed: {' '.join(cmd)}\n{out}")
    return result


def h2load_cmd(port, conns, streams, duration):
    """HTTP/2 over TLS, ALPN h2 only (no fallback to HTTP/1.1): `conns` connections with `streams`
    concurrent streams each, asking for /a/x and /b/x in turn; SNI and :authority localhost, connected
    to 127.0.0.1 (h2load does not verify the certificate)."""
    return ["h2load", f"-t{THREADS}", f"-c{conns}", f"-m{streams}", f"-D{duration}", "--npn-list=h2",
            f"--connect-to=127.0.0.1:{port}", f"https://localhost:{port}/a/x", f"https://localhost:{port}/b/x"]


def h2load(port, conns, streams, duration):
    cmd = h2load_cmd(port, conns, streams, duration)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = run.stdout
    result = dict(cmd=" ".join(cmd), errors=0, non2xx=0)
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"finished in [\d.]+\w+, ([\d.]+) req/s, ([\d.]+[KMG]?B)/s", line)
        if m:
            result["rps"], result["bps"] = float(m.group(1)), parse_size(m.group(2))
        elif line.startswith("requests:"):
            counts = {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", line)}
            # failed: every request that did not succeed; errored: those without an HTTP status
            # (connection failures, resets), a subset of failed.
            result["requests"] = counts.get("done", 0)
            result["errors"] = counts.get("errored", 0)
            result["non2xx"] = counts.get("failed", 0) - counts.get("errored", 0)
        elif line.startswith("status codes:"):
            result["status"] = line.split(":", 1)[1].strip()
    if "rps" not in result or "requests" not in result:
        raise RuntimeError(f"h2load failed: {' '.join(cmd)}\n{out}{run.stderr}")
    return result


class Bench:
    def __init__(self, quick):
        self.quick = quick
        self.rounds = 1 if quick else 3
        self.duration = 2 if quick else 6
        self.tmp = tempfile.mkdtemp(prefix="portmux-bench-")
        self.procs = Procs()
        self.cert, self.key = self.make_cert()
        # HAProxy takes the certificate and its key in one file.
        self.pem = os.path.join(self.tmp, "localhost.pem")
        with open(self.pem, "w") as out:
            out.write(open(self.cert).read() + open(self.key).read())
        self.commands = []
        self.holders = {}
        # What each portmux system's status said about where it relays.
        self.relays = {}

    def make_cert(self):
        cert, key = os.path.join(self.tmp, "localhost.crt"), os.path.join(self.tmp, "localhost.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-keyout", key, "-out", cert], check=True, capture_output=True)
        return cert, key

    def hello_args(self, sc, body=None):
        args = [body or sc["body"]]
        if sc.get("size"):
            args += ["--size", str(sc["size"])]
        if sc.get("tls"):
            args += ["--tls-cert", self.cert, "--tls-key", self.key]
        return args

    def backend(self, sc, body=None):
        port = free_port()
        self.procs.start([HELLO, "--listen", f"127.0.0.1:{port}"] + self.hello_args(sc, body), ready="listening on")
        return port

    def start_system(self, system, sc, backend, backend_b=None):
        """Starts `system` in front of `backend` (per-request scenarios: /a to `backend`, /b to
        `backend_b`); returns (port, pid whose tree to measure or None).
        `self.holders[port]` counts the connections the server behind `port` holds."""
        d = tempfile.mkdtemp(dir=self.tmp)
        tls, idle = sc.get("tls"), sc.get("idle")
        b = f"127.0.0.1:{backend}"
        at_backend = established(backend)
        self.holders.setdefault(backend, lambda: established(backend) - at_backend)
        if system == "direct":
            if sc.get("term"):
                # The same hello terminating TLS itself: the baseline without a proxy.
                port = free_port()
                self.procs.start([HELLO, "--listen", f"127.0.0.1:{port}", sc["body"], "--tls-cert", self.cert,
                                  "--tls-key", self.key], ready="listening on")
                return port, None
            return backend, None
        if system.startswith("portmux"):
            control, admin = os.path.join(d, "control.sock"), os.path.join(d, "admin.sock")
            # portmux-forward relays established flows in the kernel where it
            # may (auto), portmux-forward-user in user space (the fallback);
            # the others run as portmux does by default (user: no BPF loaded).
            relay = "auto" if system == "portmux-forward" else "user"
            p, _ = self.procs.start([PORTMUX, "run", "--bind", "127.0.0.1", "--workers", str(THREADS), "--control",
                                     control, "--log", "warn", "--max-conns-per-ip", "1000000",
                                     "--max-conns", str(MAXCONN), "--cert-dir", self.tmp, "--relay", relay],
                                    ready=" ready: ")
            status = subprocess.run([PORTMUX, "status", "--json", "--admin", admin], capture_output=True, text=True)
            if status.returncode == 0:
                self.relays[system] = json.loads(status.stdout).get("status", {}).get("relay", "?")
            port = free_port()
            if sc.get("l7"):
                # Two routes on one port, one per path prefix, each to its own backend.
                for path, to in (("/a", b), ("/b", f"127.0.0.1:{backend_b}")):
                    spec = (f"https://localhost:{port}{path}?cert={self.cert}&key={self.key}" if sc.get("h2")
                            else f"http://:{port}{path}")
                    subprocess.run([PORTMUX, "route", "add", spec, "--backend", to, "--admin", admin],
                                   check=True, capture_output=True)
                wait_port(port)
                self.holders[port] = lambda: established(backend) - at_backend
                return port, p.pid
            # The peers here relay whole connections (TCP mode, or terminate
            # and relay): so does portmux (mode=connection); the l7-*
            # scenarios measure the per-request engine.
            if system == "portmux-terminate":
                spec = f"https://localhost:{port}?cert={self.cert}&key={self.key}&mode=connection"
            elif idle:
                spec = f"tcp://:{port}"
            elif tls:
                spec = f"tls://localhost:{port}"
            elif system == "portmux-handoff":
                spec = f"http://:{port}"
            elif system == "portmux-lend":
                # The port's one service accepts from portmux's listening socket itself.
                spec = f"http://:{port}?lend"
            else:
                spec = f"http://:{port}?mode=connection"
            if system in ("portmux-handoff", "portmux-lend"):
                env = dict(os.environ, PORTMUX_CONTROL=control)
                service, _ = self.procs.start([HELLO, spec] + self.hello_args(sc), ready="registered", env=env)
                fds = open_fds(service.pid)
                self.holders[port] = lambda: open_fds(service.pid) - fds
            else:
                subprocess.run([PORTMUX, "route", "add", spec, "--backend", b, "--admin", admin],
                               check=True, capture_output=True)
                self.holders[port] = lambda: established(backend) - at_backend
            wait_port(port)
            return port, p.pid
        if sc.get("l7"):
            return self.start_l7_peer(system, sc, d, b, f"127.0.0.1:{backend_b}", at_backend, backend)
        ports = dict(tcp_port=free_port(), http_port=free_port(), tls_port=free_port())
        ports["term_port"] = free_port()
        fill = dict(ports, dir=d, cert=self.cert, key=self.key, pem=self.pem, nofile=NOFILE, maxconn=MAXCONN, worker_connections=NOFILE - 200, backend=b, tls_backend=b, backend_sp=b.replace(":", " "),
                    tls_backend_sp=b.replace(":", " "))
        kind = system.split("-")[0]
        template = {"haproxy": "haproxy.cfg", "nginx": "nginx.conf", "sniproxy": "sniproxy.conf"}[kind]
        p = self.start_peer(kind, template, fill, d)
        port = {
            "haproxy-tcp": ports["tls_port"] if tls else ports["tcp_port"],
            "haproxy-http": ports["http_port"],
            "nginx-stream": ports["tls_port"] if tls else ports["tcp_port"],
            "nginx-http": ports["http_port"],
            "sniproxy": ports["tls_port"] if tls else ports["http_port"],
            "haproxy-terminate": ports["term_port"],
            "nginx-terminate": ports["term_port"],
        }[system]
        wait_port(port)
        self.holders[port] = lambda: established(backend) - at_backend
        return port, p.pid

    def start_peer(self, kind, template, fill, d):
        """Renders bench/peers/`template` with `fill` into `d` and starts `kind` (haproxy, nginx, sniproxy) on it."""
        with open(os.path.join(PEERS, template)) as f:
            config = f.read()
        for k, v in fill.items():
            config = config.replace("{" + k + "}", str(v))
        path = os.path.join(d, template)
        with open(path, "w") as f:
            f.write(config)
        if kind == "haproxy":
            p, _ = self.procs.start(["haproxy", "-f", path])
        elif kind == "nginx":
            p, _ = self.procs.start(["nginx", "-c", path, "-p", d])
        else:
            p, _ = self.procs.start(["sniproxy", "-f", "-c", path])
        return p

    def start_l7_peer(self, system, sc, d, backend_a, backend_b, at_backend, backend):
        """nginx or HAProxy routing /a/ to `backend_a` and the rest (/b/) to `backend_b`, per request,
        with pooled backend connections: plain HTTP/1.1, or (l7-h2) behind TLS offering h2 and http/1.1."""
        kind = system.split("-")[0]
        template = {"haproxy": "haproxy-l7.cfg", "nginx": "nginx-l7.conf"}[kind]
        fill = dict(http_port=free_port(), h2_port=free_port(), dir=d, cert=self.cert, key=self.key, pem=self.pem,
                    nofile=NOFILE, maxconn=MAXCONN, worker_connections=NOFILE - 200, backend_a=backend_a,
                    backend_b=backend_b)
        p = self.start_peer(kind, template, fill, d)
        port = fill["h2_port"] if sc.get("h2") else fill["http_port"]
        wait_port(port)
        self.holders[port] = lambda: established(backend) - at_backend
        return port, p.pid

    def check_routes(self, sc, system, port):
        """One request for /a/x and one for /b/x (HTTP/1.1; over TLS in l7-h2): each must be answered by
        its own backend (A's body, B's), or the proxy does not route by path and its numbers mean nothing."""
        for path, body in (("/a/x", sc["body"]), ("/b/x", sc["body_b"])):
            if sc.get("h2"):
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                ctx.set_alpn_protocols(["http/1.1"])
                conn = http.client.HTTPSConnection("localhost", port, timeout=5, context=ctx)
            else:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", path, headers={"Host": "localhost"})
                answer = conn.getresponse()
                got = f"{answer.status} {answer.read().decode(errors='replace')}"
            except (OSError, http.client.HTTPException) as e:
                got = str(e)
            finally:
                conn.close()
            if got != f"200 {body}":
                raise RuntimeError(f"{system} on port {port}: {path} got {got!r}, not 200 {body!r}")

    def run_scenario(self, sc):
        results = {s: [] for s in sc["systems"]}
        backend = self.backend(sc)
        backend_b = self.backend(sc, sc["body_b"]) if sc.get("l7") else None
        started = {}
        for system in sc["systems"]:
            started[system] = self.start_system(system, sc, backend, backend_b)
            if sc.get("l7") and system != "direct":
                self.check_routes(sc, system, started[system][0])
        base = "https://localhost" if sc.get("tls") or sc.get("term") else "http://127.0.0.1"
        try:
            if sc.get("idle"):
                for system, (port, pid) in started.items():
                    results[system].append(self.idle(sc["idle"], port, pid))
                return results
            for r in range(self.rounds):
                for system in sc["systems"]:
                    port, pid = started[system]
                    pids = descendants(pid) if pid else []
                    before = cpu_seconds(pids)
                    if sc.get("loader") == "tlsload":
                        res = tlsload(port, sc["conns"], self.duration, sc.get("resume"))
                    elif sc.get("loader") == "h2load":
                        res = h2load(port, sc["conns"], sc["streams"], self.duration)
                    else:
                        # Per-request scenarios: /a/x and /b/x in turn; direct sends both to backend A.
                        res = wrk(f"{base}:{port}/", sc["conns"], self.duration, sc["close"],
                                  ALTERNATE if sc.get("l7") else None)
                    res["cpu_ms_per_1k"] = (cpu_seconds(pids) - before) * 1e6 / max(res.get("requests", 1), 1) if pid else None
                    res["rss_mib"] = memory_kib(descendants(pid), "VmHWM") / 1024 if pid else None
                    results[system].append(res)
                    if r == 0:
                        self.commands.append(res["cmd"])
                    print(f"  {sc['key']:6} {system:16} round {r + 1}: {res['rps']:>10.0f} req/s  "
                          f"p99 {res.get('p99', 0):7.2f} ms  errors {res['errors']}", flush=True)
        finally:
            self.procs.stop_all()
        return results

    def idle(self, count, port, pid):
        """Opens `count` connections that send nothing, 250 at a time, each batch
        waited for until the server behind the proxy holds it (at most 5 s); the
        proxy's memory then."""
        base = memory_kib(descendants(pid), "VmRSS")
        held = self.holders[port]
        socks = []
        while len(socks) < count:
            for _ in range(min(250, count - len(socks))):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                socks.append(s)
            deadline = time.time() + 5
            while held() < len(socks) and time.time() < deadline:
                time.sleep(0.02)
        time.sleep(1)
        reached = held()
        rss = memory_kib(descendants(pid), "VmRSS")
        hwm = memory_kib(descendants(pid), "VmHWM")
        for s in socks:
            s.close()
        print(f"  idle   port {port}: {reached} held by the server; RSS {base / 1024:.1f} -> {rss / 1024:.1f} MiB, "
              f"peak {hwm / 1024:.1f} MiB", flush=True)
        return dict(rss_mib=rss / 1024, hwm_mib=hwm / 1024, base_mib=base / 1024, reached=reached)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)

    def version(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return [
        f"{platform.system()} {platform.release()}, {os.cpu_count()} × {cpu}, {mem:.0f} GiB",
        f"portmux {commit} (release build), {version(['wrk', '-v'])}",
        f"{version(['haproxy', '-v'])}; {version(['nginx', '-v'])}; {version(['sniproxy', '-V'])}; "
        f"{version(['h2load', '--version'])}",
    ]


def profile_portmux(bench, sc_key, system="portmux-forward"):
    """A cpu-clock profile of portmux as `system` under scenario `sc_key`'s load."""
    if not shutil.which("perf"):
        return "perf is not installed; no profile."
    sc = next(s for s in SCENARIOS if s["key"] == sc_key)
    backend = bench.backend(sc)
    backend_b = bench.backend(sc, sc["body_b"]) if sc.get("l7") else None
    port, pid = bench.start_system(system, sc, backend, backend_b)
    data = os.path.join(bench.tmp, "perf.data")
    if sc.get("loader") == "tlsload":
        cmd = [TLSLOAD, f"127.0.0.1:{port}", "localhost", "--conns", str(sc["conns"]), "--duration", "6"]
        cmd += ["--resume"] if sc.get("resume") else []
    elif sc.get("loader") == "h2load":
        cmd = h2load_cmd(port, sc["conns"], sc["streams"], 6)
    else:
        scheme = "https://localhost" if sc.get("term") or sc.get("tls") else "http://127.0.0.1"
        cmd = ["wrk", f"-t{THREADS}", f"-c{sc['conns']}", "-d6s"]
        if sc.get("l7"):
            cmd += ["-H", "Host: localhost", "-s", ALTERNATE] + (["-H", "Connection: close"] if sc["close"] else [])
        cmd.append(f"{scheme}:{port}/")
    load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    time.sleep(1)
    subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", "2000", "-g", "-p", str(pid), "-o", data, "--",
                    "sleep", "3"], capture_output=True)
    load.wait()
    bench.procs.stop_all()
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "symbol", "--stdio", "-g", "none"],
                            capture_output=True, text=True).stdout
    lines = [l for l in report.splitlines() if l.strip() and not l.startswith("#")][:20]
    return "\n".join(lines) or "perf recorded nothing (perf_event_paranoid?)"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one short round of each (under 4 minutes)")
    ap.add_argument("--only", metavar="KEYS", help="comma-separated scenarios to run: "
                    + ",".join(sc["key"] for sc in SCENARIOS if not sc.get("na")))
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    for tool in (PORTMUX, HELLO, TLSLOAD):
        if not os.path.exists(tool):
            sys.exit(f"{tool} is missing: run bench/run (it builds release first)")
    if (not only or "l7-h2" in only) and not shutil.which("h2load"):
        sys.exit("h2load is missing (Debian's nghttp2-client): run bench/run (it installs it)")
    bench = Bench(args.quick)
    started = time.time()
    all_results = {}
    try:
        for sc in SCENARIOS:
            if sc.get("na") or (only and sc["key"] not in only):
                continue
            print(f"{sc['title']}:", flush=True)
            began = time.time()
            all_results[sc["key"]] = bench.run_scenario(sc)
            print(f"  ({time.time() - began:.0f} s)", flush=True)
        report = write_report(bench, all_results, time.time() - started)
    finally:
        bench.procs.stop_all()
    print(report)
    shutil.rmtree(bench.tmp, ignore_errors=True)


def summarize(results):
    out = {}
    for system, runs in results.items():
        out[system] = {k: median([r.get(k) for r in runs]) for k in
                       ("rps", "bps", "p50", "p99", "cpu_ms_per_1k", "rss_mib", "hwm_mib", "base_mib", "reached",
                        "resumed", "requests")}
        out[system]["errors"] = sum(r.get("errors", 0) + r.get("non2xx", 0) for r in runs)
    return out


def write_report(bench, all_results, elapsed):
    lines = ["# portmux benchmark", ""]
    lines += [f"- {m}" for m in machine()]
    mode = "quick: 1 round of 2 s" if bench.quick else f"{bench.rounds} rounds of {bench.duration} s, medians"
    lines += [f"- {mode}; wrk with {THREADS} threads; every proxy with {THREADS} workers/threads (sniproxy has one "
              f"event loop); the same backend (the client crate's `hello`) everywhere; run took {elapsed / 60:.1f} min",
              "- portmux-handoff: `hello` claims `http://:PORT`, portmux peeks and hands each connection over; "
              "portmux-lend: it claims `http://:PORT?lend`, and accepts from portmux's listening socket itself", ""]
    summary = {k: summarize(v) for k, v in all_results.items()}
    for sc in SCENARIOS:
        lines.append(f"## {sc['title']}")
        lines.append("")
        if sc.get("na"):
            lines += [f"Not measured: {sc['na']}.", ""]
            continue
        if sc["key"] not in summary:
            lines += ["Not run this time (`--only`).", ""]
            continue
        s = summary[sc["key"]]
        if sc.get("idle"):
            lines += [f"{sc['idle']} connections opened 250 at a time, sending nothing, each batch waited for until "
                      f"the server behind the proxy held it (at most 5 s); memory measured 1 s after the last.", "",
                      "| system | connections the server holds | RSS before | RSS with the connections | peak RSS |",
                      "|---|---|---|---|---|"]
            for system, v in s.items():
                lines.append(f"| {system} | {fmt(v['reached'], '.0f')} | {fmt(v['base_mib'], '.1f')} MiB | "
                             f"{fmt(v['rss_mib'], '.1f')} MiB | {fmt(v['hwm_mib'], '.1f')} MiB |")
            if sc["idle"] < 10_000:
                lines += ["", f"(10 000 did not fit: the hard limit on open files here is {NOFILE}, and a relayed "
                          "connection costs a proxy two.)"]
            lines.append("")
            continue
        direct = s.get("direct", {}).get("rps")
        best_peer = max((v["rps"] for k, v in s.items() if k in ALL_PEERS), default=None)
        lines += ["| system | req/s | × direct | × best peer | p50 | p99 | MiB/s | proxy CPU ms / 1000 req | "
                  "proxy peak RSS | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
        for system, v in s.items():
            lines.append(
                f"| {system} | {v['rps']:.0f} | {fmt(v['rps'] / direct if direct else None, '.2f')} | "
                f"{fmt(v['rps'] / best_peer if best_peer else None, '.2f')} | {fmt(v['p50'], '.2f')} ms | "
                f"{fmt(v['p99'], '.2f')} ms | {fmt(v['bps'] / (1 << 20) if v['bps'] else None, '.1f')} | "
                f"{fmt(v['cpu_ms_per_1k'], '.1f')} | {fmt(v['rss_mib'], '.1f')} MiB | {v['errors']} |")
        lines.append("")
        relays = [f"{k} relayed {bench.relays[k]}" for k in s if k in bench.relays and k.startswith("portmux-forward")]
        if relays:
            lines += ["Relay in force: " + "; ".join(relays) + ".", ""]
        if sc.get("loader") == "tlsload":
            kinds = ", ".join(f"{k} {fmt(v.get('resumed'), '.0f')} of {fmt(v.get('requests'), '.0f')}" for k, v in s.items())
            lines += [f"Each request is a new TLS connection (bench's `tlsload`), so the CPU column is per 1000 "
                      f"handshakes. Resumed handshakes (median round): {kinds}.", ""]
        if sc.get("l7"):
            how = (f"h2load, {THREADS} threads, {sc['conns']} connections with {sc['streams']} concurrent streams "
                   "each, ALPN h2 only, asks for /a/x and /b/x in turn on every connection (h2load gives no latency "
                   "percentiles; errors counts every request that failed, with an HTTP status or without)"
                   if sc.get("h2") else
                   "wrk asks for /a/x and /b/x in turn (bench/peers/alternate.lua), so every connection carries "
                   "requests for both routes; direct is the same wrk straight at backend A, which answers both")
            lines += [f"Two backends (A answers `{sc['body']}`, B `{sc['body_b']}`); portmux (two route specs with "
                      "--backend, one port), nginx and HAProxy (bench/peers/nginx-l7.conf, haproxy-l7.cfg) route "
                      "/a to A and /b to B per request, with pooled keep-alive connections to both. Each proxy's "
                      "/a/x and /b/x were checked to come from A and B before the rounds (with HTTP/1.1"
                      f"{', over TLS' if sc.get('h2') else ''}). {how}.", ""]
            failed = [f"{k} {v['errors']}" for k, v in s.items() if v["errors"]]
            if failed:
                lines += [f"**Requests that failed** (all rounds): {', '.join(failed)}.", ""]

    def ratio(key, system, other="direct"):
        s = summary.get(key, {})
        if system not in s or other not in s or not s[other]["rps"]:
            return None
        return s[system]["rps"] / s[other]["rps"]

    def best_peer(key):
        s = summary.get(key, {})
        return max((v["rps"] for k, v in s.items() if k in PEER_SYSTEMS), default=None)

    def cpu(key, system):
        return summary.get(key, {}).get(system, {}).get("cpu_ms_per_1k")

    targets = []
    ka_peer = best_peer("ka")
    fwd_ka = summary.get("ka", {}).get("portmux-forward", {}).get("rps")
    hap_close, pm_close = cpu("close", "haproxy-tcp"), cpu("close", "portmux-handoff")
    hap_ka, pm_ka = cpu("ka", "haproxy-tcp"), cpu("ka", "portmux-forward")
    idle_rss = summary.get("idle", {}).get("portmux-forward", {}).get("hwm_mib")

    def over_terminating_peers(key):
        s = summary.get(key, {})
        peers = [s[k]["rps"] for k in ("haproxy-terminate", "nginx-terminate") if k in s and s[k]["rps"]]
        pm = s.get("portmux-terminate", {}).get("rps")
        return pm / max(peers) if pm and peers else None

    def over_l7_peers(key, field="rps"):
        """portmux-l7's req/s over the better peer's (nginx-l7, haproxy-l7), or its CPU over the lower peer's."""
        s = summary.get(key, {})
        peers = [s[k][field] for k in L7[1:] if k in s and s[k][field]]
        pm = s.get("portmux-l7", {}).get(field)
        if not pm or not peers:
            return None
        return pm / (max(peers) if field == "rps" else min(peers))
    targets.append(("handoff, keep-alive ≥ 0.97 × direct", ratio("ka", "portmux-handoff"), 0.97, "≥"))
    targets.append(("handoff, new connection per request ≥ 0.9 × direct", ratio("close", "portmux-handoff"), 0.9, "≥"))
    targets.append(("handoff of a lent port (?lend), new connection per request ≥ 0.9 × direct",
                    ratio("close", "portmux-lend"), 0.9, "≥"))
    targets.append(("handoff CPU per 1000 connections ≤ 0.5 × HAProxy TCP's",
                    pm_close / hap_close if pm_close and hap_close else None, 0.5, "≤"))
    targets.append(("forward, keep-alive small ≥ 1.3 × best peer", fwd_ka / ka_peer if fwd_ka and ka_peer else None, 1.3, "≥"))
    def over_best_peer(key):
        pm, peer = summary.get(key, {}).get("portmux-forward", {}).get("rps"), best_peer(key)
        return pm / peer if pm and peer else None
    targets.append(("forward, 1 MiB bodies ≥ 1.3 × best peer", over_best_peer("1m"), 1.3, "≥"))
    targets.append(("forward, 16 MiB bodies ≥ 1.3 × best peer", over_best_peer("16m"), 1.3, "≥"))
    targets.append(("forward, TLS passthrough ≥ 1.3 × best peer", over_best_peer("tls"), 1.3, "≥"))
    targets.append(("forward CPU per 1000 keep-alive requests ≤ 0.5 × HAProxy TCP's",
                    pm_ka / hap_ka if pm_ka and hap_ka else None, 0.5, "≤"))
    targets.append((f"peak RSS with {IDLE} idle forwarded connections < 64 MiB", idle_rss, 64, "<"))
    targets.append(("terminate, new connection per request, full handshakes ≥ 1.2 × the better of HAProxy and nginx",
                    over_terminating_peers("term-new"), 1.2, "≥"))
    targets.append(("terminate, new connection per request, resumed ≥ 1.2 × the better of HAProxy and nginx",
                    over_terminating_peers("term-resume"), 1.2, "≥"))
    targets.append(("terminate, keep-alive ≥ 1.0 × the better of HAProxy and nginx",
                    over_terminating_peers("term-ka"), 1.0, "≥"))
    targets.append(("per-request, keep-alive ≥ 1.2 × the better of nginx and HAProxy",
                    over_l7_peers("l7-ka"), 1.2, "≥"))
    targets.append(("per-request CPU per 1000 keep-alive requests ≤ 0.8 × the lower of nginx's and HAProxy's",
                    over_l7_peers("l7-ka", "cpu_ms_per_1k"), 0.8, "≤"))
    targets.append(("per-request, new connection per request ≥ 1.0 × the better of nginx and HAProxy",
                    over_l7_peers("l7-close"), 1.0, "≥"))
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    missed = []
    for name, value, bound, op in targets:
        if value is None:
            met = "not measured"
        else:
            ok = value >= bound if op == "≥" else value <= bound if op == "≤" else value < bound
            met = "yes" if ok else "**no**"
            if not ok:
                missed.append(name)
        lines.append(f"| {name} | {fmt(value, '.2f')} | {met} |")
    h2 = over_l7_peers("l7-h2")
    lines.append(f"| per-request, HTTP/2 over TLS: × the better of nginx and HAProxy | {fmt(h2, '.2f')} | "
                 f"{'no target set' if h2 is not None else 'not measured'} |")
    lines.append("")
    term_missed = [m for m in missed if m.startswith("terminate")]
    l7_missed = [m for m in missed if m.startswith("per-request")]
    missed = [m for m in missed if not m.startswith(("terminate", "per-request"))]
    if term_missed:
        lines += ["Missed: " + "; ".join(term_missed) + ".", ""]
        key = "term-resume" if any("resumed" in m for m in term_missed) else "term-new"
        lines += [f"Where portmux's time goes terminating TLS ({key}; perf, cpu-clock, self time by symbol):", "", "```",
                  profile_portmux(bench, key, "portmux-terminate"), "```", ""]
        lines += [
            "Reading it: the handshake's cryptography (X25519 for the key exchange, which resumed TLS 1.3 "
            "handshakes keep: psk_dhe_ke; the SHA-384 key schedule of the AES-256 suite the client asks for first) "
            "and the scheduler (wakeups: the load generator, the backend and the proxy share 2 cores) lead. portmux "
            "also opens a backend connection per client connection (connection-level relay), where HAProxy and "
            "nginx reuse pooled ones: the per-request engine (issue 13) pools them.", ""]
    if l7_missed:
        lines += ["Missed: " + "; ".join(l7_missed) + ".", ""]
        key = "l7-close" if all("new connection" in m for m in l7_missed) else "l7-ka"
        lines += [f"Where portmux's time goes routing each request ({key}; perf, cpu-clock, self time by symbol):",
                  "", "```", profile_portmux(bench, key, "portmux-l7"), "```", ""]
    if missed:
        lines += ["Missed: " + "; ".join(missed) + ".", ""]
        lines += ["Where portmux's time goes while forwarding small keep-alive requests (perf, cpu-clock, "
                  "self time by symbol):", "", "```", profile_portmux(bench, "ka"), "```", ""]
        lines += [
            "Reading it: almost all of portmux's time is in the kernel, and most of that is the scheduler "
            "(`finish_task_switch`, `_raw_spin_unlock_irqrestore` are wakeups and context switches: wrk, the "
            "backend and the proxy share 2 cores) and the TCP stack (4 socket system calls per relayed request); "
            "portmux's own code is a few percent. Every proxy pays that on loopback, which is why they are all "
            "near half of direct. The in-kernel relay (portmux-forward, `--relay auto`) removes portmux's "
            "wakeups and system calls but measured slower here: the kernel sends every redirected skb through "
            "a workqueue (a kworker wake-up per message; docs/ARCHITECTURE.md). Handoff, new connections: portmux "
            f"spends {fmt(pm_close, '.0f')} µs per handed-off connection (accept, peek, SCM_RIGHTS send, the "
            "Acks read on the control thread, close), two thirds of it in the kernel and the scheduler, and the "
            "service pays a receive with an fd (and a share of an Acks: one per wake) where a direct server pays "
            "one accept. On 2 cores shared with wrk every µs of that is throughput: 0.9 × direct leaves portmux "
            "and the service about 4 µs per connection beyond what the direct server spends, less than the "
            "accept and the SCM_RIGHTS send alone. What would reach it: a port's sole service accepting from "
            "portmux's listening socket itself (portmux keeps it, and the queue, across the service's restarts).",
            ""]
    lines += ["## Commands", "", "```"] + sorted(set(bench.commands)) + ["```", ""]
    lines += ["Peers' configurations (and the per-request scenarios' wrk script): bench/peers/. Reproduce: "
              "`bench/run` (or `bench/run --quick`).", ""]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    text = "\n".join(lines)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(text)
    plot(summary)
    return text


def plot(summary):
    """latest.png: req/s relative to direct, and p99 latency, per scenario and system."""
    # Relative to direct: scenarios without a direct row (l7-h2: hello speaks no HTTP/2) are left out.
    keys = [sc for sc in SCENARIOS if sc["key"] in summary and not sc.get("idle") and "direct" in summary[sc["key"]]]
    systems = ["direct", "portmux-handoff", "portmux-lend", "portmux-forward", "portmux-forward-user", "portmux-terminate",
               "portmux-l7"] + list(ALL_PEERS)
    data = os.path.join(RESULTS, "latest.dat")
    with open(data, "w") as f:
        f.write("scenario " + " ".join(systems) + " " + " ".join(systems) + "\n")
        for sc in keys:
            s = summary[sc["key"]]
            direct = s.get("direct", {}).get("rps") or 1
            rel = [f"{s[x]['rps'] / direct:.3f}" if x in s else "NaN" for x in systems]
            p99 = [f"{s[x]['p99']:.3f}" if x in s and s[x]["p99"] else "NaN" for x in systems]
            f.write(f"\"{sc.get('short', sc['key'])}\" " + " ".join(rel) + " " + " ".join(p99) + "\n")
    n = len(systems)
    script = f"""
set terminal pngcairo size 1400,900 font ',10' noenhanced
set output '{os.path.join(RESULTS, "latest.png")}'
set multiplot layout 2,1 title 'portmux benchmark (bench/results/latest.md)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.9 border -1
set key outside right
set grid ytics
set ylabel 'req/s, relative to direct'
set yrange [0:*]
plot for [i=2:{n + 1}] '{data}' using i:xtic(1) title columnheader(i)
set ylabel 'p99 latency (ms, log)'
set yrange [*:*]
set logscale y
plot for [i={n + 2}:{2 * n + 1}] '{data}' using i:xtic(1) title columnheader(i)
unset multiplot
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=False, capture_output=True)
    os.remove(data)


if __name__ == "__main__":
    main()
