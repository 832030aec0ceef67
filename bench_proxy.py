#!/usr/bin/env python3
"""Benchmark and load test for gitlab_duo_proxy (stdlib only).

Starts a fast fake GitLab + AI gateway in its own process (raw sockets, canned answers,
so it measures the proxy, not itself), starts the proxy as a user would, and reports
each figure direct-to-fake and through-proxy in the same run, in alternating rounds so
the machine's noise falls on both sides alike.

  python3 bench_proxy.py            # the benchmark table (about a minute)
  python3 bench_proxy.py --load     # the load test: 200 streams, 2,000 short calls
  python3 bench_proxy.py --capacity # events per proxy CPU-second, memory per open stream
  python3 bench_proxy.py --markdown # the table as Markdown, for the README

Linux figures for CPU and memory come from /proc; elsewhere they show as n/a.

For whoever optimises next (2-core VM, Python 3.11): a small call costs the proxy about
0.3-0.5 ms of CPU; its request parsing (http.server's email-based header parser), the
http.client request and response and the one log line are most of it. Throughput at
many clients is bounded by the GIL and by every socket operation waking a thread on
the other core; earlier versions pinned busy threads to one core, kept socket timeouts
in the kernel and wrote their own HTTP reader, each worth 10-30% under load and none
worth its complexity for a user whose call takes seconds. A 1.9 MB request body costs
one json.loads when the model name is left alone (about 8 ms here) and a json.dumps
on top when an alias or fallback changes it (about 10 ms more). A relayed stream event
costs the proxy 120-150 us of CPU when events come one per read (--capacity): a poll()
before each recv and each send (sockets with a timeout) and http.client's chunk parsing
on top of the recv and send; a bare Python byte pump here manages about 50-60 us.
"""

import argparse
import json
import os
import platform
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GITLAB_TOKEN = "glpat-BENCHMARK000000000000"
DIRECT_ACCESS = "/api/v4/ai/third_party_agents/direct_access"
MESSAGES = "/ai/v1/proxy/anthropic/v1/messages"  # on the fake
PROXIED = "/v1/messages"  # on the proxy


# --- the fake upstream (runs in its own process) ----------------------------------------

def _fake_answers():
    token = json.dumps({"token": "eyJbench.token.sig", "expires_at": int(time.time()) + 3600,
                        "headers": {"x-gitlab-realm": "saas", "x-gitlab-unit-primitive":
                                    "ai_gateway_model_provider_proxy", "X-Gitlab-Is-Team-Member": "false"}})
    message = json.dumps({"id": "msg_b", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
                          "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                          "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}})
    return {"token": _http(201, token.encode()), "message": _http(200, message.encode()),
            "unsupported": _http(400, b'{"detail": "Unsupported model"}')}


def _http(status, body, ctype="application/json"):
    return (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\nx-request-id: bench\r\n\r\n"
            % (status, ctype.encode(), len(body)) + body)


def _frame(event, data):
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data, separators=(",", ":")))).encode()


def _chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def _read_message(sock, buf):
    """One HTTP message framed by Content-Length: (head, body, what follows); head is
    None once the peer has closed."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None, None, b""
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    parts, have = [rest], len(rest)
    while have < length:
        data = sock.recv(262144)
        if not data:
            return None, None, b""
        parts.append(data)
        have += len(data)
    rest = b"".join(parts)
    return head, rest[:length], rest[length:]


def _read_request(sock, buf):
    head, body, buf = _read_message(sock, buf)
    if head is None:
        return None, b""
    return (head.split(b"\r\n", 1)[0].split(b" ")[1].decode(), body), buf


def claude_frames(count):
    """A whole Anthropic stream of count (>= 6) events, as the gateway would frame it."""
    frames = [_frame("message_start", {"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "content": [], "model": "m",
        "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        _frame("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    frames += [_frame("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "text_delta", "text": " word%d of the answer" % i}}) for i in range(count - 5)]
    return frames + [
        _frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _frame("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": count}}),
        _frame("message_stop", {"type": "message_stop"})]


def _stream(sock, body):
    """Streams carry their own plan in metadata.user_id: 'events:N:gap_us', or
    'hold:seconds[:N]' (the stream starts, stays silent that long, then sends N events),
    or 'claude:N:gap_us' (claude_frames(N), one every gap_us, on a fixed schedule)."""
    plan = json.loads(body).get("metadata", {}).get("user_id", "events:3:0").split(":")
    if plan[0] == "claude":
        frames, gap = claude_frames(int(plan[1])), int(plan[2]) / 1e6
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(frames[0]))
        started = time.monotonic()
        for i, frame in enumerate(frames[1:], 1):
            time.sleep(max(0.0, started + i * gap - time.monotonic()))
            sock.sendall(_chunk(frame))
        sock.sendall(b"0\r\n\r\n")
        return
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + _chunk(_frame("message_start", {"type": "message_start", "message": {
                     "id": "m", "type": "message", "role": "assistant", "content": [], "model": "m",
                     "usage": {"input_tokens": 3, "output_tokens": 1}}})))
    if plan[0] == "hold":
        time.sleep(float(plan[1]))
        count, gap = (int(plan[2]) if len(plan) > 2 else 3), 0.0
    else:
        count, gap = int(plan[1]), int(plan[2]) / 1e6
    template = _frame("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "text_delta", "text": "SEQ:NS"}}).replace(b"SEQ:NS", b"%d:%d")
    for seq in range(count):
        if gap:
            time.sleep(gap)
        sock.sendall(_chunk(template % (seq, time.monotonic_ns())))  # cheap: the fake must not be the bottleneck
    sock.sendall(_chunk(_frame("message_stop", {"type": "message_stop"})) + b"0\r\n\r\n")


def _serve_connection(sock, answers, counters, lock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    try:
        while True:
            request, buf = _read_request(sock, buf)
            if request is None:
                return
            path, body = request
            if path == DIRECT_ACCESS:
                with lock:
                    counters["exchanges"] += 1
                sock.sendall(answers["token"])
            elif path == "/__stats":
                with lock:
                    sock.sendall(_http(200, json.dumps(counters).encode()))
            elif b'"model": "random-' in body or b'"model": "claude-opus-7' in body:
                sock.sendall(answers["unsupported"])  # as GitLab answers names not on its list
            elif b'"stream": true' in body or b'"stream":true' in body:
                _stream(sock, body)
            else:
                sock.sendall(answers["message"])
    except OSError:
        return
    finally:
        sock.close()


def _listen():
    """A listener on a free loopback port, its number printed for the parent process."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    print(listener.getsockname()[1], flush=True)
    return listener


def serve_fake(cert=None, key=None):
    """The fake upstream's main loop: prints its port, serves until killed."""
    answers, counters, lock = _fake_answers(), {"connections": 0, "exchanges": 0}, threading.Lock()
    context = None
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    listener = _listen()
    while True:
        sock, _ = listener.accept()
        with lock:
            counters["connections"] += 1
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError):
                sock.close()
                continue
        threading.Thread(target=_serve_connection, args=(sock, answers, counters, lock), daemon=True).start()


# --- a lean client ----------------------------------------------------------------------

class Client:
    """One keep-alive connection; small and fast, so it does not hide the proxy's cost."""

    def __init__(self, port, context=None):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(sock, server_hostname="127.0.0.1") if context else sock
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, path, body, method="POST"):
        self.sock.sendall(b"%s %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          b"anthropic-version: 2023-06-01\r\nContent-Length: %d\r\n\r\n%s"
                          % (method.encode(), path.encode(), len(body), body))

    def head(self):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        return int(lines[0].split(b" ")[1]), fields

    def call(self, path, body):
        """A non-streaming call: (status, body)."""
        self.send(path, body)
        status, fields = self.head()
        length = int(fields.get(b"content-length", b"0"))
        while len(self.buf) < length:
            self._fill()
        data, self.buf = self.buf[:length], self.buf[length:]
        return status, data

    def _fill(self):
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def stream(self, path, body, on_data=None):
        """A streamed call, de-chunked; on_data(bytes, arrival ns) per read. Returns the body."""
        self.send(path, body)
        status, fields = self.head()
        out = []
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line, 16)
            while len(self.buf) < size + 2:
                self._fill()
            data, self.buf = self.buf[:size], self.buf[size + 2:]
            if size == 0:
                return status, b"".join(out)
            if on_data:
                on_data(data, time.monotonic_ns())
            out.append(data)


def small_body(model="claude-sonnet-4-6"):
    return json.dumps({"model": model, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


def conversation_body(size=1_900_000):
    """A request like a long Claude Code session: code read by tools, shell output with
    tabs, prose with quotes; full of the characters JSON must escape."""
    with open(os.path.join(HERE, "gitlab_duo_proxy.py"), encoding="utf-8") as fh:
        code = fh.read()
    shell = "".join("-rw-r--r--\t1 ada\tstaff\t%d\tNov 29 12:%02d\tfile_%d.py\n" % (i * 37, i % 60, i)
                    for i in range(200))
    prose = 'I looked at "the handler" and the relay; the test says "expected 200", got 500.\n' * 20
    messages, size_so_far, turn = [], 0, 0
    while size_so_far < size:
        piece = code[(turn * 7919) % len(code):][:6000]
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": prose},
            {"type": "tool_use", "id": "toolu_%d" % turn, "name": "Bash", "input": {"command": "ls -la"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_%d" % turn, "content": piece + shell}]})
        size_so_far += len(piece) + len(shell) + len(prose)
        turn += 1
    return json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 32000, "messages": messages}).encode()


def stream_body(plan):
    return json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 16, "stream": True, "metadata": {
        "user_id": plan}, "messages": [{"role": "user", "content": "hi"}]}).encode()


# --- processes --------------------------------------------------------------------------

class Processes:
    def __init__(self):
        self.procs = []
        self.tmp = tempfile.mkdtemp(prefix="bench-duo-")

    def fake(self, tls=False):
        args = [sys.executable, os.path.abspath(__file__), "--serve-fake"]
        if tls:
            args += list(self.cert())
        return self._spawn(args)[1]

    def _spawn(self, args):
        """A helper process that prints the port it listens on: (process, port)."""
        proc = subprocess.Popen(args, stdout=subprocess.PIPE)
        self.procs.append(proc)
        return proc, int(proc.stdout.readline())

    def cert(self):
        if not hasattr(self, "_cert"):
            sys.path.insert(0, HERE)
            from test_proxy import make_self_signed_cert
            self._cert = make_self_signed_cert(self.tmp)
        return self._cert

    def proxy(self, upstream_port, tls=False, extra=None, python_flags=()):
        """Start the proxy as a user would; (process, port, seconds until it first answered)."""
        scheme = "https" if tls else "http"
        env = dict(os.environ, GITLAB_TOKEN=GITLAB_TOKEN, PORT="0",
                   GITLAB_INSTANCE_URL="%s://127.0.0.1:%d" % (scheme, upstream_port),
                   GITLAB_AI_GATEWAY_URL="%s://127.0.0.1:%d" % (scheme, upstream_port))
        if tls:
            env["GITLAB_CA_BUNDLE"] = self.cert()[0]
        env.update(extra or {})
        env_file = os.path.join(self.tmp, "empty.env")
        open(env_file, "w").close()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable] + list(python_flags) + [os.path.join(HERE, "gitlab_duo_proxy.py"),
                                 "--env-file", env_file],
                                env=env, stderr=subprocess.PIPE, cwd=self.tmp)
        self.procs.append(proc)
        line = proc.stderr.readline().decode()
        port = int(line.split("listening on http://127.0.0.1:")[1].split()[0])
        threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()  # keep logging flowing
        client = Client(port)
        client.call("/", b"")
        ready = time.perf_counter() - started
        client.close()
        return proc, port, ready

    def close(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def fake_stats(port, tls_context=None):
    client = Client(port, tls_context)
    client.send("/__stats", b"", "GET")
    status, fields = client.head()
    length = int(fields[b"content-length"])
    while len(client.buf) < length:
        client._fill()
    client.close()
    return json.loads(client.buf[:length])


def proc_cpu_seconds(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def proc_threads(pid):
    try:
        return len(os.listdir("/proc/%d/task" % pid))
    except OSError:
        return None


def proc_memory_mb(pid, field="VmRSS"):
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --- measurements -----------------------------------------------------------------------

def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latencies(port, n=600, context=None, path=MESSAGES):
    client = Client(port, context)
    body, out = small_body(), []
    for i in range(n + 50):
        started = time.perf_counter()
        status, _ = client.call(path, body)
        if status != 200:
            raise RuntimeError("status %d" % status)
        if i >= 50:  # warm-up excluded
            out.append((time.perf_counter() - started) * 1000)
    client.close()
    return out


def first_byte_times(port, n=40, path=MESSAGES):
    client, body, out = Client(port), stream_body("events:3:0"), []
    for _ in range(n):
        marks = []
        started = time.perf_counter()
        client.stream(path, body, lambda data, ns, marks=marks: marks.append(time.perf_counter()))
        out.append((marks[0] - started) * 1000)
    client.close()
    return out


STAMP = re.compile(rb'"text":"\d+:(\d+)"')
SEQ = re.compile(rb'"text":"(\d+):\d+"')


def event_delays(port, events=1000, gap_us=1000, path=MESSAGES):
    """Arrival minus send time of each event, in ms (one clock: CLOCK_MONOTONIC)."""
    delays = []

    def on_data(data, arrived):
        # Parsing kept minimal: the client shares the CPU with the proxy it measures.
        for stamp in STAMP.findall(data):
            delays.append((arrived - int(stamp)) / 1e6)
    client = Client(port)
    client.stream(path, stream_body("events:%d:%d" % (events, gap_us)), on_data)
    client.close()
    return delays


def throughput(port, concurrency, seconds, path=MESSAGES):
    """(requests per second after a 0.3 s warm-up, errors, requests answered in all)."""
    counts, errors, stop = [0] * concurrency, [0], threading.Event()

    def worker(i):
        client, body = Client(port), small_body()
        while not stop.is_set():
            status, _ = client.call(path, body)
            if status == 200:
                counts[i] += 1
            else:
                errors[0] += 1
        client.close()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # warm-up
    before = sum(counts)
    started = time.perf_counter()
    stop.wait(seconds)
    done = sum(counts) - before
    elapsed = time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join()
    return done / elapsed, errors[0], sum(counts) + errors[0]


def throughput_rows(proxy_pid, fake, port, seconds, rounds=3, concurrencies=(1, 8)):
    """Requests per second at 1 and 8 clients, direct and through the proxy in
    alternating rounds (medians), and the proxy's CPU per request at 8 clients."""
    rows = []
    for concurrency in concurrencies:
        direct, proxied, cpu = [], [], []
        for _ in range(rounds):
            direct.append(throughput(fake, concurrency, seconds)[0])
            cpu0 = proc_cpu_seconds(proxy_pid)
            rate, _, answered = throughput(port, concurrency, seconds, PROXIED)
            cpu1 = proc_cpu_seconds(proxy_pid)
            proxied.append(rate)
            if cpu0 is not None:
                cpu.append((cpu1 - cpu0) / answered * 1000)
        rows.append(row("requests/s, %d concurrent" % concurrency, pct(direct, 0.5),
                        pct(proxied, 0.5), "req/s", False))
        if concurrency == 8 and cpu:
            rows.append(row("proxy CPU per request, 8 concurrent", None, pct(cpu, 0.5), "ms", False))
    return rows


def big_body_latencies(port, n=15, path=MESSAGES):
    """Latency of calls carrying a 1.9 MB conversation (warm-up excluded)."""
    client, body, out = Client(port), conversation_body(), []
    for i in range(n + 2):
        started = time.perf_counter()
        status, _ = client.call(path, body)
        if status != 200:
            raise RuntimeError("status %d" % status)
        if i >= 2:
            out.append((time.perf_counter() - started) * 1000)
    client.close()
    return out


def open_streams(port, n, hold, pid=None, path=PROXIED, events=3):
    """n streams held open by the fake; returns (peak RSS MB of pid, events seen per stream)."""
    results, errors = [], []

    def worker():
        try:
            client = Client(port)
            seen = []
            client.stream(path, stream_body("hold:%g:%d" % (hold, events)), lambda d, ns: seen.append(d))
            results.append(b"".join(seen))
            client.close()
        except OSError as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    peak = 0.0
    deadline = time.monotonic() + hold * 0.8
    while time.monotonic() < deadline:
        if pid:
            peak = max(peak, proc_memory_mb(pid) or 0.0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    return peak, results, errors


def paired(measure, fake_port, proxy_port, rounds=5, **kw):
    """Samples of measure(direct) and measure(through the proxy), taken in alternating
    rounds so the machine's noise falls on both sides alike."""
    direct, proxied = [], []
    for _ in range(rounds):
        direct += measure(fake_port, **kw)
        proxied += measure(proxy_port, path=PROXIED, **kw)
    return direct, proxied


def row(name, direct, proxied, unit, added=True):
    diff = "%+.3f" % (proxied - direct) if added and direct is not None else ""
    fmt = lambda v: "n/a" if v is None else ("%.3f" % v if v < 100 else "%.0f" % v)  # noqa: E731
    return name, fmt(direct), fmt(proxied), diff, unit


def benchmark(quick=False):
    procs = Processes()
    rows = []
    try:
        fake = procs.fake()
        proxy, port, ready = procs.proxy(fake)
        rows.append(row("start-up to first answered request", None, ready * 1000, "ms", False))
        n = 100 if quick else 600
        direct, through = paired(latencies, fake, port, n=n)
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            rows.append(row("small call latency %s" % label, pct(direct, q), pct(through, q), "ms"))
        direct, through = paired(first_byte_times, fake, port, n=40)
        rows.append(row("stream time to first byte p50", pct(direct, 0.5), pct(through, 0.5), "ms"))
        direct, through = paired(event_delays, fake, port, rounds=3)
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            rows.append(row("per-event delay %s (3 x 1,000 events)" % label, pct(direct, q),
                            pct(through, q), "ms"))
        direct, through = paired(big_body_latencies, fake, port, rounds=3, n=5 if quick else 15)
        rows.append(row("1.9 MB conversation: latency p50", pct(direct, 0.5), pct(through, 0.5), "ms"))
        rows.extend(throughput_rows(proxy.pid, fake, port, 1.0 if quick else 2.0))
        rows.extend(memory_rows(procs, fake))
        rows.extend(tls_rows(procs, n))
    finally:
        procs.close()
    return rows


def memory_rows(procs, fake):
    """RSS of a fresh proxy, idle and holding 200 streams."""
    proxy, port, _ = procs.proxy(fake)
    idle = proc_memory_mb(proxy.pid)
    peak, results, errors = open_streams(port, 200, 3.0, proxy.pid)
    rows = [row("proxy RSS idle / with 200 open streams", idle, peak, "MB", False)]
    if errors or len(results) != 200:
        rows.append(("  stream errors", "", str(len(errors)), "", ""))
    time.sleep(1.0)  # connection threads end a moment after their client leaves
    rows.append(row("proxy threads idle, after the streams", None, proc_threads(proxy.pid), "", False))
    proxy.kill()
    proxy.wait()
    return rows


def tls_rows(procs, n):
    fake = procs.fake(tls=True)
    proxy, port, _ = procs.proxy(fake, tls=True)
    context = ssl.create_default_context(cafile=procs.cert()[0])
    before = fake_stats(fake, context)["connections"]
    client = Client(port)
    for _ in range(100):
        client.call(PROXIED, small_body())
    client.close()
    handshakes = fake_stats(fake, context)["connections"] - before - 1
    direct, through = [], []
    for _ in range(5):  # alternating, as in paired(); only the direct side speaks TLS
        direct += latencies(fake, n // 2, context)
        through += latencies(port, n // 2, path=PROXIED)
    return [row("TLS upstream: small call latency p50", pct(direct, 0.5), pct(through, 0.5), "ms"),
            row("TLS upstream: small call latency p99", pct(direct, 0.99), pct(through, 0.99), "ms"),
            row("TLS handshakes per 100 requests (incl. token)", None, handshakes, "", False)]


def random_names(port, count, clients=8):
    """count calls naming random models (some of a known family, some junk); then the
    sizes of /stats and /metrics."""
    def worker(n, seed):
        client = Client(port)
        for i in range(n):
            # Half fall back (claude-opus-70-0 ... 77-99: the newest opus serves them), half are junk.
            name = "claude-opus-%d-%d" % (70 + seed, i % 100) if i % 2 else "random-<%d>\\r\\n%d" % (seed, i)
            client.call(PROXIED, json.dumps({"model": name, "max_tokens": 5, "messages": []}).encode())
        client.close()
    threads = [threading.Thread(target=worker, args=(count // clients, s)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sizes = []
    for path in ("/stats", "/metrics"):
        client = Client(port)
        client.send(path, b"", "GET")
        _, fields = client.head()
        sizes.append(int(fields[b"content-length"]))
        client.close()
    return sizes


def load_test():
    """200 concurrent streams and 2,000 sequential calls: nothing lost, one exchange.
    Then 100,000 calls naming random models: memory and statistics stay flat."""
    procs = Processes()
    try:
        fake = procs.fake()
        proxy, port, _ = procs.proxy(fake, python_flags=("-S",) if "-S" in sys.argv else ())
        rss0 = proc_memory_mb(proxy.pid)
        peak, results, errors = open_streams(port, 200, 2.0, proxy.pid, events=50)
        stop = _frame("message_stop", {"type": "message_stop"})
        # Complete: every event exactly once, in order, and the stream properly ended.
        complete = sum(1 for r in results if [int(m) for m in SEQ.findall(r)] == list(range(50))
                       and r.endswith(stop) and r.count(b"event: message_start") == 1)
        client, failures = Client(port), 0
        for _ in range(2000):
            status, _ = client.call(PROXIED, small_body())
            failures += status != 200
        client.close()
        stats = fake_stats(fake)
        rss1 = proc_memory_mb(proxy.pid)
        sizes0 = random_names(port, 10000)
        rss2 = proc_memory_mb(proxy.pid)
        sizes1 = random_names(port, 100000)
        rss3 = proc_memory_mb(proxy.pid)
    finally:
        procs.close()
    return [("200 concurrent streams: complete / errors", "%d / %d" % (complete, len(errors))),
            ("2,000 sequential calls: failures", str(failures)),
            ("token exchanges", str(stats["exchanges"])),
            ("proxy RSS before / peak / after (MB)", "%.1f / %.1f / %.1f" % (rss0 or 0, peak, rss1 or 0)),
            ("random model names, after 10,000 / 110,000 calls: RSS (MB)", "%.1f / %.1f" % (rss2, rss3)),
            ("... /stats and /metrics size (bytes)", "%d, %d / %d, %d" % tuple(sizes0 + sizes1))]


def relay_run(port, pid, streams=40, events=400, rate=100):
    """streams concurrent streams of claude_frames(events), rate events/s each: (events
    that arrived, streams not byte-for-byte intact, proxy CPU seconds or None, wall s)."""
    expected, body = b"".join(claude_frames(events)), stream_body("claude:%d:%d" % (
        events, 1e6 / rate))
    counts, broken = [], []

    def worker():
        try:
            client = Client(port)
            status, data = client.stream(PROXIED, body)
            client.close()
            counts.append(data.count(b"\n\n"))
            if status != 200 or data != expected:
                broken.append(status)
        except OSError as exc:
            broken.append(repr(exc))
    threads = [threading.Thread(target=worker) for _ in range(streams)]
    cpu0, started = proc_cpu_seconds(pid), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1, wall = proc_cpu_seconds(pid), time.perf_counter() - started
    return sum(counts), len(broken), None if cpu0 is None else cpu1 - cpu0, wall


def capacity(runs=3, target=10000, events_per_second=60):
    """Events relayed per proxy CPU-second (runs x 40 paced streams), memory per stream held
    open (stalled upstream) at 100 and 200 streams, and what that means for a team."""
    procs = Processes()
    out = []
    try:
        fake = procs.fake()
        proxy, port, _ = procs.proxy(fake)
        relay_run(port, proxy.pid, streams=4, events=20, rate=1000)  # warm-up
        time.sleep(0.5)
        rss = [proc_memory_mb(proxy.pid)]
        for n in (100, 200):
            peak, results, errors = open_streams(port, n, 3.0, proxy.pid)
            rss.append(peak or None)
            if errors or len(results) != n:
                out.append(("  %d held streams: complete / errors" % n,
                            "%d / %d" % (len(results), len(errors))))
            time.sleep(1.0)  # connection threads end a moment after their client leaves
        rss.append(proc_memory_mb(proxy.pid))
        rates = []
        for i in range(runs):
            got, broken, cpu, wall = relay_run(port, proxy.pid)
            rates.append(got / cpu if cpu else None)
            out.append(("run %d: events arrived / broken streams / proxy CPU s / wall s" % (i + 1),
                        "%d / %d / %s / %.1f" % (got, broken, "n/a" if cpu is None else
                                                 "%.2f" % cpu, wall)))
    finally:
        procs.close()
    fmt = lambda v, f="%.0f": "n/a" if v is None else f % v  # noqa: E731
    per = [None if None in (rss[0], rss[i]) else (rss[i] - rss[0]) * 1024 / n
           for i, n in ((1, 100), (2, 200))]
    median = None if None in rates else pct(rates, 0.5)
    return [("events relayed per proxy CPU-second, median of %d (40 streams x 400 events, "
             "100/s each)" % runs, fmt(median)),
            ("... range", "n/a" if median is None else "%.0f - %.0f" % (min(rates), max(rates)))
            ] + out + [
            ("proxy RSS idle / 100 open / 200 open / idle after (MB)",
             " / ".join(fmt(v, "%.1f") for v in rss)),
            ("memory per open stream, at 100 / 200 open (KiB)",
             " / ".join(fmt(v) for v in per)),
            ("developers streaming at once per core (a Claude stream: ~%d events/s)"
             % events_per_second, fmt(median and median / events_per_second)),
            ("guard: >= %d events per proxy CPU-second" % target,
             "n/a" if median is None else "PASS" if median >= target else "FAIL")]


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))  # noqa: E741
    except (OSError, StopIteration):
        pass
    return "%s, %d cores, %s, Python %s" % (model, os.cpu_count() or 0, platform.system(), platform.python_version())


def print_table(headers, rows, markdown):
    if markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "---|" * len(headers))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for r in [headers] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", action="store_true", help="run the load test instead")
    parser.add_argument("--capacity", action="store_true", help="measure capacity instead")
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--serve-fake", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake is not None:
        return serve_fake(*args.serve_fake)
    print("machine: %s" % machine())
    if args.load:
        print_table(("load test", "result"), load_test(), args.markdown)
    elif args.capacity:
        print_table(("capacity", "result"), capacity(), args.markdown)
    else:
        print_table(("measure", "direct", "via proxy", "added", "unit"), benchmark(args.quick), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
