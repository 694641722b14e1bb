"""Runs slowhttptest against portmux and writes bench/results/slowhttp.md.

Each attack runs SLOW_SECONDS (30) with 1000 connections opened at 200/s
from 127.0.0.1; meanwhile a probe makes an ordinary request every 100 ms
from 127.0.0.2 and records how many were answered and how fast."""
import csv, os, re, socket, subprocess, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORTMUX = os.path.join(ROOT, "target/release/portmux")
HELLO = os.path.join(ROOT, "target/release/examples/hello")
SECONDS = int(os.environ.get("SLOW_SECONDS", "30"))
CONNS = 1000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(proc, text, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return line
        if not line and proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited: {proc.stderr.read()}")
    raise SystemExit(f"no '{text}' from {proc.args}")


def probe(port, stop, results):
    """An ordinary client (from another address) every 100 ms: (ok, seconds)."""
    while not stop.is_set():
        start = time.time()
        ok = False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                ok = data.startswith(b"HTTP/1.1 200")
        except OSError:
            pass
        results.append((ok, time.time() - start))
        stop.wait(0.1)


def attack(name, port, args, out_dir):
    """One slowhttptest run with the probe beside it; a row for the table."""
    prefix = os.path.join(out_dir, name.replace(", ", "-").replace(" ", "-"))
    cmd = ["slowhttptest", *args, "-c", str(CONNS), "-r", "200", "-l", str(SECONDS), "-p", "3", "-g",
           "-o", prefix, "-u", f"http://127.0.0.1:{port}/"]
    stop, results = threading.Event(), []
    t = threading.Thread(target=probe, args=(port, stop, results))
    t.start()
    run = subprocess.run(cmd, capture_output=True, text=True)
    stop.set()
    t.join()
    rows = list(csv.DictReader(open(prefix + ".csv")))
    connected = max(int(r["Connected"]) for r in rows)
    # slowhttptest's own probe: non-zero while its probe request is answered.
    available = sum(1 for r in rows if r["Service Available"].strip() not in ("0", "")) / max(len(rows), 1)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout)
    exit_line = next((l.split("Exit status:")[-1].strip() for l in plain.splitlines() if "Exit status" in l), "")
    ok = [d for good, d in results if good]
    answered = len(ok) / max(len(results), 1)
    slowest = max(ok) if ok else float("nan")
    median = sorted(ok)[len(ok) // 2] if ok else float("nan")
    return (f"| {name} | {connected} | {available:.0%} | {len(results)} | {answered:.0%} | "
            f"{median * 1000:.1f} ms | {slowest * 1000:.0f} ms | {exit_line} |")


def main():
    d = tempfile.mkdtemp(prefix="portmux-slow-")
    control = os.path.join(d, "control.sock")
    procs = []
    try:
        pm = subprocess.Popen([PORTMUX, "run", "--bind", "127.0.0.1", "--control", control, "--log", "warn"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(pm)
        wait_line(pm, " ready: ")
        handoff, forward = free_port(), free_port()
        env = dict(os.environ, PORTMUX_CONTROL=control)
        # 64 KiB answers, so that a slow reader has something to be slow with.
        svc = subprocess.Popen([HELLO, f"http://:{handoff}", "x", "--size", "65536"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(svc)
        wait_line(svc, "registered")
        backend = subprocess.Popen([HELLO, "--listen", "127.0.0.1:0", "x", "--size", "65536"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(backend)
        addr = wait_line(backend, "listening on").split()[-1]
        subprocess.run([PORTMUX, "route", "add", f"http://:{forward}", "--backend", addr,
                        "--admin", os.path.join(d, "admin.sock")], check=True, capture_output=True)
        slowloris = ["-H", "-i", "10", "-x", "24"]
        slowread = ["-X", "-k", "3", "-n", "5", "-z", "32", "-w", "512", "-y", "1024"]
        rows = [
            attack("slowloris, handoff", handoff, slowloris, d),
            attack("slowloris, forward", forward, slowloris, d),
            attack("slow read, handoff", handoff, slowread, d),
            attack("slow read, forward", forward, slowread, d),
        ]
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    version = subprocess.run(["slowhttptest", "-h"], capture_output=True, text=True).stdout.split("version ")[-1].split()[0]
    head = ("| attack, route | most attack connections open | slowhttptest: service available | probe requests | "
            "answered | median | slowest | slowhttptest ended |\n|---|---|---|---|---|---|---|---|")
    text = (f"# slowhttptest against portmux\n\n`bench/slowhttp` on {time.strftime('%Y-%m-%d')}: slowhttptest {version}, "
            f"{CONNS} connections at 200/s for {SECONDS} s per attack from 127.0.0.1; a probe request every 100 ms "
            f"from 127.0.0.2. portmux on its defaults (peek deadline 10 s, 1024 connections per address).\n\n"
            f"{head}\n" + "\n".join(rows) + "\n\n"
            "Slowloris ends with no connection left: portmux closes each at the peek deadline, whatever it "
            "trickles. Slow readers of a handed-off connection hold the service's socket, not portmux; on a "
            "forwarding route the relay waits on the slow reader, holding no more than its fixed buffer per connection.\n")
    os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
    open(os.path.join(ROOT, "bench/results/slowhttp.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
