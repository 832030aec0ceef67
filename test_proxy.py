"""Tests for gitlab_duo_proxy: stdlib unittest against a fake GitLab and a fake AI gateway.

Run: python3 -m unittest -v        (the suite also passes under python3 -S -m unittest)
"""

import base64
import contextlib
import hashlib
import http.client
import http.server
import importlib.util
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import ssl
import tempfile
import threading
import time
import unittest

import gitlab_duo_proxy as gdp

# The proxy's warnings (a fallback, say) go to tests that ask for them (assertLogs), not to
# the terminal through logging's last resort.
logging.getLogger("gitlab_duo_proxy").addHandler(logging.NullHandler())

GITLAB_TOKEN = "glpat-TESTSECRET0123456789abcd"
PROXY_KEY = "proxy-key-SECRET-4242"
HERE = os.path.dirname(os.path.abspath(__file__))


# --- a self-signed certificate, made here (the stdlib cannot make one) -------------------

def _der(tag, content):
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _der_int(n):
    return _der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def _der_seq(*items):
    return _der(0x30, b"".join(items))


def _der_oid(dotted):
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        while part > 0x7F:
            part >>= 7
            chunk.append(0x80 | (part & 0x7F))
        body += bytes(reversed(chunk))
    return _der(0x06, body)


def _probable_prime(bits, rng):
    small = [p for p in range(3, 2000, 2) if all(p % q for q in range(3, int(p ** 0.5) + 1, 2))]
    while True:
        n = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if any(n % p == 0 for p in small):
            continue
        d, r = n - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        for _ in range(24):
            x = pow(rng.randrange(2, n - 2), d, n)
            if x in (1, n - 1):
                continue
            for _ in range(r - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                break
        else:
            return n


def make_self_signed_cert(directory, name="127.0.0.1"):
    """(cert path, key path): an RSA-2048 certificate for 127.0.0.1 and localhost."""
    import base64
    import hashlib
    rng, e = random.SystemRandom(), 65537
    while True:
        p, q = _probable_prime(1024, rng), _probable_prime(1024, rng)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e:
            break
    n, d = p * q, pow(e, -1, phi)
    alg = _der_seq(_der_oid("1.2.840.113549.1.1.11"), b"\x05\x00")
    public = _der_seq(_der_int(n), _der_int(e))
    key_id = hashlib.sha1(public).digest()
    subject = _der_seq(_der(0x31, _der_seq(_der_oid("2.5.4.3"), _der(0x0C, name.encode()))))
    ext = lambda oid, value, critical=False: _der_seq(_der_oid(oid), *([b"\x01\x01\xff"] if critical else []),  # noqa: E731
                                                      _der(0x04, value))
    extensions = _der_seq(
        ext("2.5.29.19", _der_seq(b"\x01\x01\xff"), critical=True),
        ext("2.5.29.15", _der(0x03, b"\x02\xa4"), critical=True),
        ext("2.5.29.17", _der_seq(_der(0x87, bytes([127, 0, 0, 1])), _der(0x82, b"localhost"))),
        ext("2.5.29.14", _der(0x04, key_id)),
        ext("2.5.29.35", _der_seq(_der(0x80, key_id))))
    tbs = _der_seq(_der(0xA0, _der_int(2)), _der_int(rng.getrandbits(63)), alg, subject,
                   _der_seq(_der(0x17, b"250101000000Z"), _der(0x18, b"20991231235959Z")), subject,
                   _der_seq(_der_seq(_der_oid("1.2.840.113549.1.1.1"), b"\x05\x00"), _der(0x03, b"\x00" + public)),
                   _der(0xA3, extensions))
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(tbs).digest()
    k = (n.bit_length() + 7) // 8
    em = b"\x00\x01" + b"\xff" * (k - 3 - len(digest_info)) + b"\x00" + digest_info
    signature = pow(int.from_bytes(em, "big"), d, n).to_bytes(k, "big")
    cert = _der_seq(tbs, alg, _der(0x03, b"\x00" + signature))
    key = _der_seq(_der_int(0), _der_int(n), _der_int(e), _der_int(d), _der_int(p), _der_int(q),
                   _der_int(d % (p - 1)), _der_int(d % (q - 1)), _der_int(pow(q, -1, p)))

    def pem(label, der):
        text = base64.b64encode(der).decode()
        lines = [text[i:i + 64] for i in range(0, len(text), 64)]
        return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)
    paths = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    for path, text in zip(paths, (pem("CERTIFICATE", cert), pem("RSA PRIVATE KEY", key))):
        with open(path, "w") as fh:
            fh.write(text)
    return paths


# --- test plumbing ----------------------------------------------------------------------

def start_server(testcase, server):
    """Serve on a daemon thread; stopped, joined and closed when the test ends."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    testcase.addCleanup(server.server_close)
    testcase.addCleanup(thread.join, 5)
    testcase.addCleanup(server.shutdown)
    return server


class FakeClock:
    """An injected clock the tests move by hand."""

    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class Recorded:
    def __init__(self, handler, body):
        self.method = handler.command
        self.path = handler.path
        self.headers = handler.headers
        self.body = body
        self.connection = id(handler.connection)

    def json(self):
        return json.loads(self.body)


class DuoState:
    """What the fake GitLab issued and the fake gateway accepts, shared by both."""

    HEADER_NAMES = ("x-gitlab-host-name", "x-gitlab-instance-id", "x-gitlab-realm",
                    "x-gitlab-global-user-id", "x-gitlab-namespace-id", "x-gitlab-root-namespace-id",
                    "x-gitlab-enabled-feature-flags", "x-gitlab-version", "x-gitlab-feature-enabled-by-namespace-ids",
                    "x-gitlab-enabled-instance-verbose-ai-logs", "x-gitlab-duo-seat-count",
                    "x-gitlab-saas-duo-pro-namespace-ids", "x-gitlab-language-server-version")

    def __init__(self, clock):
        self.clock = clock
        self.lock = threading.Lock()
        self.issued = {}
        self.revoked = set()
        self.gitlab_tokens = {GITLAB_TOKEN}
        self.lifetime = 3600
        self.scopes = {}  # token -> its scopes (else what the README asks for)
        self.usernames = {}  # token -> its owner's username (else "ada")
        self.scope_challenge = False  # add a WWW-Authenticate header to 403 insufficient_scope

    def scopes_of(self, token):
        return self.scopes.get(token, ["ai_features", "read_user"])

    def global_user_id(self, gitlab_token):
        """GitLab's x-gitlab-global-user-id: base64 of a SHA-256 of instance and user id."""
        user_id = sum(map(ord, self.usernames.get(gitlab_token, "ada")))
        return base64.b64encode(hashlib.sha256(b"uuid-fake-%d" % user_id).digest()).decode()

    def issue(self, gitlab_token):
        with self.lock:
            token = "eyJhbGciOiJSUzI1NiJ9.gwtoken%d.%s" % (len(self.issued) + 1, os.urandom(6).hex())
            headers = {name: "value-%s-%d" % (name[9:], len(self.issued)) for name in self.HEADER_NAMES}
            headers["x-gitlab-global-user-id"] = self.global_user_id(gitlab_token)
            headers["x-gitlab-unit-primitive"] = "ai_gateway_model_provider_proxy"
            headers["x-gitlab-authentication-type"] = "oidc"
            headers["X-Gitlab-Is-Team-Member"] = "false"
            self.issued[token] = headers
            return token, headers

    def revoke_all(self):
        with self.lock:
            self.revoked.update(self.issued)


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # it writes head and body separately; Nagle would stall the body

    def log_message(self, *args):
        pass

    def setup(self):
        self.server.threads.append(threading.current_thread())  # for tests that join them
        super().setup()

    def read_body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send_json(self, status, obj, headers=()):
        self.send_bytes(status, json.dumps(obj).encode(), headers)

    def send_bytes(self, status, body, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_stream(self, frames, gates=None, end=True, request_id="gw-req-1"):
        """frames as chunks; gates {index: Event} wait before that frame is sent."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", request_id)
        self.end_headers()
        for index, frame in enumerate(frames):
            if gates and index in gates:
                gates[index].wait(10)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        if end:
            self.wfile.write(b"0\r\n\r\n")

    def reset(self):
        """Abort the connection with a TCP reset."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.connection.close()
        self.close_connection = True


class ScriptedServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler, state):
        self.state = state
        self.requests = []
        self.script = []
        self.lock = threading.Lock()
        self.gate = None
        self.active = 0
        self.max_active = 0
        self.connections = 0
        self.threads = []
        self.tls = None
        super().__init__(("127.0.0.1", 0), handler)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            super().handle_error(request, client_address)  # the proxy hanging up is expected

    def get_request(self):
        sock, addr = super().get_request()
        with self.lock:
            self.connections += 1
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True)
        return sock, addr

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.server_address[1])

    def next_script(self):
        with self.lock:
            return self.script.pop(0) if self.script else None

    def record(self, handler, body):
        with self.lock:
            self.requests.append(Recorded(handler, body))
            return self.requests[-1]

    @contextlib.contextmanager
    def active_request(self):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1


# What each GitLab endpoint takes (Rails' allow_access_with_scope): a token without one of
# these scopes gets 403 insufficient_scope; personal_access_tokens/self answers any token.
SCOPES_NEEDED = {gdp.DIRECT_ACCESS_PATH: ("ai_features", "api"),
                 "/api/v4/user": ("read_user", "read_api", "api"),
                 "/api/v4/version": ("read_user", "ai_features", "read_api", "api"),
                 "/api/v4/personal_access_tokens/self": ()}


class FakeGitLabHandler(FakeHandler):
    """GitLab's direct_access endpoint (PROTOCOL.md §1), GET /api/v4/user, /version and
    /personal_access_tokens/self, with GitLab's scope rules."""

    def refusal(self):
        """GitLab's answer when the token cannot call this path; None when it can."""
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token not in self.server.state.gitlab_tokens:
            return 401, {"message": "401 Unauthorized"}, []
        needed = SCOPES_NEEDED[self.path]
        if needed and not set(needed) & set(self.server.state.scopes_of(token)):
            # rack-oauth2's Forbidden, as GitLab sends it: no WWW-Authenticate header.
            challenge = [("WWW-Authenticate", 'Bearer realm="Protected by OAuth 2.0", error='
                          '"insufficient_scope", scope="%s"' % " ".join(needed))]
            return 403, {"error": "insufficient_scope", "error_description": "The request requires "
                         "higher privileges than provided by the access token.",
                         "scope": " ".join(needed)}, challenge if self.server.state.scope_challenge else []
        if self.path.endswith("/self") and not token.startswith("glpat-"):
            return 400, {"message": "400 Bad request - This endpoint requires token type to be a "
                         "personal access token"}, []
        return None

    def do_POST(self):
        srv, body = self.server, self.read_body()
        srv.record(self, body)
        if self.path != gdp.DIRECT_ACCESS_PATH:
            return self.send_json(404, {"message": "404 Not Found"})
        with srv.active_request():
            if srv.gate is not None:
                srv.gate.wait(10)
            scripted = srv.next_script()
            if scripted is not None:
                return scripted(self)
            refusal = self.refusal()
            if refusal is not None:
                return self.send_json(*refusal)
            token, headers = srv.state.issue(self.headers["Authorization"][7:])
            payload = {"headers": headers, "token": token}
            if srv.state.lifetime is not None:
                payload["expires_at"] = int(srv.state.clock() + srv.state.lifetime)
            self.send_json(201, payload)

    def do_GET(self):
        srv = self.server
        srv.record(self, b"")
        if self.path not in SCOPES_NEEDED or self.path == gdp.DIRECT_ACCESS_PATH:
            return self.send_json(404, {"message": "404 Not Found"})
        refusal = self.refusal()
        if refusal is not None:
            return self.send_json(*refusal)
        token = self.headers["Authorization"][7:]
        if self.path == "/api/v4/version":
            return self.send_json(200, {"version": "18.6.0-ee"})
        if self.path.endswith("/self"):
            return self.send_json(200, {"id": 3, "name": "duo", "revoked": False, "active": True,
                                        "scopes": srv.state.scopes_of(token), "user_id": 7,
                                        "expires_at": "2027-01-31"})
        self.send_json(200, {"id": 7, "username": srv.state.usernames.get(token, "ada")})


GATEWAY_PATHS = {  # compared with the query string, exactly
    "/v1/proxy/anthropic/v1/messages": "messages",
    "/v1/proxy/anthropic/v1/messages?beta=true": "messages",
    "/v1/proxy/anthropic/v1/messages/count_tokens?beta=true": "count_tokens",
    "/v1/proxy/openai/v1/chat/completions": "chat",
    "/v1/proxy/openai/v1/responses": "responses",
}
# GitLab's lists of 2026-08-22 (PROTOCOL.md §2), written out here rather than taken from the
# catalog under test: the proxy must cope with what GitLab serves, not with itself.
GATEWAY_MODELS = {
    "claude-opus-4-5-20251101", "claude-opus-4-6", "claude-opus-4-7", "claude-opus-4-8",
    "claude-opus-5", "claude-sonnet-5", "claude-fable-5", "claude-sonnet-4-6",
    "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001",
    "gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna", "gpt-5.5-2026-04-23", "gpt-5.4-2026-03-05",
    "gpt-5.2-2025-12-11", "gpt-5.1-2025-11-13", "gpt-5-mini-2025-08-07", "gpt-5.4-mini",
    "gpt-5.4-nano", "gpt-5.3-codex", "gpt-5", "gpt-5.1"}


def thinking_problem(model, thinking):
    """Anthropic's answer to a thinking setting the model does not take (PROTOCOL.md §3):
    Opus 4.7 and later, the 5-series and Fable take only adaptive; 4.5 and older never."""
    if not isinstance(thinking, dict):
        return None
    kind = thinking.get("type")
    version = tuple(int(n) for n in re.findall(r"-(\d+)(?=-|$)", model)[:2]) + (0,)
    adaptive_only = version[0] >= 5 or version[:2] >= (4, 7)
    if kind in ("enabled", "disabled") and adaptive_only or kind == "adaptive" and version[:2] < (4, 6):
        return {"type": "error", "error": {"type": "invalid_request_error", "message":
                "thinking.type: %r is not supported for %s" % (kind, model)}}
    return None


class FakeGatewayHandler(FakeHandler):
    """The AI gateway's proxy endpoints, as strict as PROTOCOL.md §2 (checks in its order)."""

    def do_GET(self):
        self.server.record(self, b"")
        self.send_json(405, {"detail": "Method Not Allowed"})

    def do_POST(self):
        srv, body = self.server, self.read_body()
        req = srv.record(self, body)
        problem = self.check(req)
        if problem is not None:
            return self.send_json(*problem)
        scripted = srv.next_script()
        if scripted is not None:
            return scripted(self, req)
        self.default_answer(req)

    def check(self, req):
        state, headers = self.server.state, req.headers
        auth = headers.get("Authorization")
        if not auth:
            return 401, {"error": "No authorization header presented"}
        token = auth[len("Bearer "):]
        issued = state.issued.get(token)
        if issued is None or token in state.revoked:
            return 401, {"error": "Forbidden by auth provider"}
        for name, value in issued.items():
            if headers.get(name) != value:
                if name == "x-gitlab-unit-primitive":
                    return 400, {"detail": "Missing x-gitlab-unit-primitive header"}
                return 401, {"error": "Header mismatch '%s'" % name}
        prefix = self.server.prefix
        kind = GATEWAY_PATHS.get(req.path[len(prefix):]) if req.path.startswith(prefix) else None
        if kind is None:
            return 404, {"detail": "Not found"}
        req.kind = kind
        try:
            payload = json.loads(req.body)
        except ValueError:
            return 400, {"detail": "Invalid JSON"}
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            return 400, {"detail": "Failed to extract model name"}
        if model not in self.server.models:
            return 400, {"detail": "Unsupported model"}
        if kind in ("messages", "count_tokens") and not headers.get("anthropic-version"):
            return 400, {"type": "error", "error": {"type": "invalid_request_error",
                                                    "message": "anthropic-version: header is required"}}
        problem = thinking_problem(model, payload.get("thinking")) if kind == "messages" else None
        return (400, problem) if problem else None

    def default_answer(self, req):
        payload = req.json()
        if req.kind == "count_tokens":
            return self.send_json(200, {"input_tokens": 42})
        wrong = self.server.wrong_types
        if req.kind == "messages" and payload.get("stream"):
            return self.send_stream([mistyped(frame, wrong) for frame in text_stream(payload["model"])])
        if req.kind == "messages":
            return self.send_json(200, dict(message_json(payload["model"]), **wrong.get("message", {})),
                                  [("x-request-id", "gw-req-9")])
        if req.kind == "chat" and payload.get("stream"):
            return self.send_stream(openai_chat_stream(payload["model"]))
        if req.kind == "chat":
            return self.send_json(200, openai_chat_json(payload["model"]))
        if payload.get("stream"):
            return self.send_stream(responses_stream(payload["model"]))
        return self.send_json(200, {"id": "resp_1", "object": "response", "status": "completed",
                                    "model": payload["model"], "output": [], "usage": {
                                        "input_tokens": 4, "output_tokens": 2, "total_tokens": 6}})


class FakeGateway(ScriptedServer):
    def __init__(self, state, prefix="/ai"):
        self.prefix = prefix
        self.models = set(GATEWAY_MODELS)  # what GitLab serves today
        # A gateway bug: {"message" or an event's type: {field: a value of the wrong type}}
        # in its Messages answers, whole and streamed, with status 200.
        self.wrong_types = {}
        super().__init__(FakeGatewayHandler, state)


def mistyped(frame, wrong):
    event = json.loads(frame.split(b"data: ", 1)[1])
    return sse(event["type"], dict(event, **wrong[event["type"]])) if event["type"] in wrong else frame


def sse(event, data):
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data, separators=(",", ":")))).encode()


def message_json(model, text="Hello!"):
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 5}}


def text_stream(model, text=("Hel", "lo!")):
    frames = [sse("message_start", {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 7}}}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        sse("ping", {"type": "ping"})]
    frames += [sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": t}}) for t in text]
    frames += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
               sse("message_delta", {"type": "message_delta", "delta": {
                   "stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 5}}),
               sse("message_stop", {"type": "message_stop"})]
    return frames


def rich_stream(model):
    """Thinking with a signature, then a tool call whose JSON arrives in pieces."""
    delta = lambda i, d: sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})  # noqa: E731
    return [
        sse("message_start", {"type": "message_start", "message": {
            "id": "msg_02", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 30, "output_tokens": 1, "cache_creation_input_tokens": 100,
                      "cache_read_input_tokens": 2000}}}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        delta(0, {"type": "thinking_delta", "thinking": "Let me check the weather."}),
        delta(0, {"type": "signature_delta", "signature": "EqQBCkYIBRgCIkD" + "A" * 40}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}}),
        delta(1, {"type": "input_json_delta", "partial_json": ""}),
        delta(1, {"type": "input_json_delta", "partial_json": "{\"city\": \"Par"}),
        delta(1, {"type": "input_json_delta", "partial_json": "is\"}"}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                                 "stop_sequence": None},
                              "usage": {"output_tokens": 40}}),
        sse("message_stop", {"type": "message_stop"}),
    ]


def openai_chat_json(model):
    return {"id": "chatcmpl-gpt", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi from GPT"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}


def openai_chat_stream(model):
    chunk = lambda delta, finish=None: ("data: %s\n\n" % json.dumps({  # noqa: E731
        "id": "chatcmpl-gpt", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})).encode()
    return [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi "}), chunk({"content": "GPT"}),
            chunk({}, "stop"), ("data: %s\n\n" % json.dumps({"id": "chatcmpl-gpt", "object": "chat.completion.chunk",
                                                               "choices": [], "usage": {"prompt_tokens": 9,
                                                                                        "completion_tokens": 3}})).encode(),
            b"data: [DONE]\n\n"]


def responses_stream(model, text="Hi"):
    """What OpenAI's Responses API streams for a one-message answer, every event Codex CLI and
    the SDK's responses.stream() need (a shorter stream makes both give up)."""
    rid, iid, n = "resp_1", "msg_1", iter(range(100))
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": iid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    base = {"id": rid, "object": "response", "created_at": 1, "model": model}
    usage = {"input_tokens": 4, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 6}
    where = {"item_id": iid, "output_index": 0, "content_index": 0}
    events = [
        ("response.created", {"response": dict(base, status="in_progress", output=[])}),
        ("response.in_progress", {"response": dict(base, status="in_progress", output=[])}),
        ("response.output_item.added", {"output_index": 0, "item": dict(item, status="in_progress", content=[])}),
        ("response.content_part.added", dict(where, part=dict(part, text=""))),
        ("response.output_text.delta", dict(where, delta=text)),
        ("response.output_text.done", dict(where, text=text)),
        ("response.content_part.done", dict(where, part=part)),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": dict(base, status="completed", output=[item], usage=usage)})]
    return [sse(name, dict({"type": name, "sequence_number": next(n)}, **data)) for name, data in events]


def parse_sse(body):
    """[(event, data)] as an SDK sees them."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        events.append((fields.get("event"), json.loads(fields["data"])))
    return events


class Response:
    def __init__(self, resp, body):
        self.status = resp.status
        self.headers = resp.headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    @property
    def error(self):
        data = self.json()
        assert data["type"] == "error", data
        return data["error"]


def base_config(**overrides):
    values = dict(gitlab_token=GITLAB_TOKEN, port=0, retry_base_delay=0.01, retry_max_seconds=5.0,
                  connect_timeout=2.0, token_timeout=2.0, read_timeout=10.0, client_timeout=10.0,
                  stream_idle_timeout=10.0, token_source="GITLAB_TOKEN in the environment")
    values.update(overrides)
    return gdp.Config(**values)


class ProxyTestCase(unittest.TestCase):
    """A proxy wired to a fresh fake GitLab and fake gateway for every test."""

    config_overrides = {}

    def setUp(self):
        self.clock = FakeClock()
        self.duo = DuoState(self.clock)
        self.gitlab = start_server(self, ScriptedServer(FakeGitLabHandler, self.duo))
        self.gateway = start_server(self, FakeGateway(self.duo))
        self.proxy = self.make_proxy(**self.config_overrides)

    def make_proxy(self, handler_class=gdp.ProxyHandler, **overrides):
        overrides.setdefault("instance_url", self.gitlab.url)
        overrides.setdefault("gateway_url", self.gateway.url)
        return start_server(self, gdp.ProxyServer(base_config(**overrides), clock=self.clock,
                                                  handler_class=handler_class))

    def tracked_proxy(self, **overrides):
        """A proxy whose connection threads are listed in proxy.threads, to be joined."""
        threads = []

        class Tracked(gdp.ProxyHandler):
            def setup(self):
                threads.append(threading.current_thread())
                super().setup()
        proxy = self.make_proxy(Tracked, **overrides)
        proxy.threads = threads
        return proxy

    def request(self, method, path, body=None, headers=None, proxy=None, timeout=10):
        proxy = proxy or self.proxy
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            conn.request(method, path, body, dict(headers or {}))
            resp = conn.getresponse()
            return Response(resp, resp.read())
        finally:
            conn.close()

    def post(self, path, payload, headers=None, **kw):
        merged = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
        merged.update(headers or {})
        return self.request("POST", path, payload, merged, **kw)

    def gateway_calls(self, kind=None):
        return [r for r in self.gateway.requests if kind is None or getattr(r, "kind", None) == kind]

    def exchanges(self):
        return [r for r in self.gitlab.requests if r.path == gdp.DIRECT_ACCESS_PATH]


CATALOG = gdp.Catalog(gdp.build_catalog(""), gdp.DEFAULT_MODEL)
EMPTY_ENV = os.path.join(tempfile.mkdtemp(), "empty.env")  # for runs that must not read a real .env
open(EMPTY_ENV, "w").close()


def load_config(argv, environ, cwd=None):
    """gdp.load_config with no .env beside the script (a developer's own) in the way."""
    cwd = cwd or tempfile.mkdtemp()
    return gdp.load_config(argv, environ, cwd=cwd, script_dir=cwd)
PNG = "data:image/png;base64,iVBORw0KGgo="
SIMPLE = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}


# --- configuration ----------------------------------------------------------------------

class ConfigTests(unittest.TestCase):
    def load(self, argv=(), environ=None, cwd=None):
        return load_config(list(argv), environ or {}, cwd=cwd or self.tmp)[0]

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(lambda: [os.remove(os.path.join(self.tmp, f)) for f in os.listdir(self.tmp)])

    def write_env(self, text, name=".env", mode=0o600):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as fh:
            fh.write(text)
        os.chmod(path, mode)
        return path

    def test_defaults(self):
        config = self.load(environ={"GITLAB_TOKEN": "t"})
        self.assertEqual(config.instance_url, "https://gitlab.com")
        self.assertEqual(config.gateway_url, "https://cloud.gitlab.com")
        self.assertEqual(config.gateway_base, "https://cloud.gitlab.com/ai")
        self.assertEqual((config.host, config.port), ("127.0.0.1", 4141))
        self.assertEqual(config.default_model, "claude-sonnet-4-6")
        self.assertNotEqual(config.default_model, "claude-sonnet-4-5-20250929")
        self.assertFalse(config.debug)

    def test_flags_beat_environment_beat_dotenv(self):
        self.write_env("GITLAB_TOKEN=from-file\nPORT=5000\nHOST=127.0.0.2\nDEFAULT_MODEL=opus\n")
        config = self.load(["--port", "6000"], {"PORT": "5500", "HOST": "::1"})
        self.assertEqual(config.port, 6000)
        self.assertEqual(config.host, "::1")
        self.assertEqual(config.default_model, "opus")
        self.assertEqual(config.gitlab_token, "from-file")

    def test_dotenv_syntax(self):
        values = gdp.parse_dotenv('# c\nexport A=1\nB="two words"\nC=\'x # y\'\nD=plain # note\n\nE\n')
        self.assertEqual(values, {"A": "1", "B": "two words", "C": "x # y", "D": "plain"})

    def test_env_file_flag_chooses_the_file(self):
        self.write_env("GITLAB_TOKEN=ignored\n")
        other = self.write_env("GITLAB_TOKEN=chosen\nGITLAB_AI_GATEWAY_URL=http://localhost:5052\n"
                               "GITLAB_AI_GATEWAY_PREFIX=\n", name="other.env")
        config = self.load(["--env-file", other])
        self.assertEqual(config.gitlab_token, "chosen")
        self.assertEqual(config.gateway_base, "http://localhost:5052")

    def test_gdk_setup_by_configuration_alone(self):
        config = self.load(environ={"GITLAB_TOKEN": "t", "GITLAB_INSTANCE_URL": "http://localhost:3000",
                                    "GITLAB_AI_GATEWAY_URL": "http://localhost:5052",
                                    "GITLAB_AI_GATEWAY_PREFIX": ""})
        self.assertEqual(config.gateway_base + gdp.PROXY_PATHS["anthropic"], "http://localhost:5052/v1/proxy/anthropic")
        self.assertEqual(gdp.Endpoint.parse(config.instance_url).origin, "http://localhost:3000")

    def test_gateway_url_with_ai_suffix_is_not_doubled(self):
        config = self.load(environ={"GITLAB_TOKEN": "t", "GITLAB_AI_GATEWAY_URL": "https://cloud.gitlab.com/ai/"})
        self.assertEqual(config.gateway_base, "https://cloud.gitlab.com/ai")

    def assert_start_fails(self, environ, fragment, argv=()):
        code, _, err = run_script(list(argv), environ, cwd=self.tmp)
        self.assertEqual(code, 2, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn(fragment, err)
        self.assertNotIn("Traceback", err)

    def test_missing_token_stops_with_one_line(self):
        self.assert_start_fails({}, "no GitLab token")

    def test_malformed_port_and_urls_stop_with_one_line(self):
        self.assert_start_fails({"GITLAB_TOKEN": "t", "PORT": "41a"}, "PORT='41a' is not valid")
        self.assert_start_fails({"GITLAB_TOKEN": "t", "PORT": "70000"}, "between 0 and 65535")
        self.assert_start_fails({"GITLAB_TOKEN": "t", "GITLAB_INSTANCE_URL": "gitlab.com"},
                                "GITLAB_INSTANCE_URL='gitlab.com' is not valid")
        self.assert_start_fails({"GITLAB_TOKEN": "t"}, "GITLAB_AI_GATEWAY_URL",
                                ["--gateway-url", "ftp://x"])

    def test_help_lists_every_option_with_default_and_variable(self):
        code, out, _ = run_script(["--help"], {}, cwd=self.tmp)
        self.assertEqual(code, 0)
        flat = " ".join(out.split())
        for opt in gdp.OPTIONS:
            self.assertIn(opt.env, flat)
            if opt.flag:
                self.assertIn(opt.flag, flat)
        self.assertIn("default: 4141", flat)
        self.assertIn("default: 'https://gitlab.com'", flat)

    def test_invalid_numbers_are_rejected(self):
        with self.assertRaises(gdp.ConfigError):
            self.load(environ={"GITLAB_TOKEN": "t", "READ_TIMEOUT": "-1"})
        with self.assertRaises(gdp.ConfigError):
            self.load(environ={"GITLAB_TOKEN": "t", "DEBUG": "maybe"})

    def test_secrets_not_in_repr(self):
        config = self.load(environ={"GITLAB_TOKEN": GITLAB_TOKEN, "PROXY_API_KEY": PROXY_KEY})
        self.assertNotIn(GITLAB_TOKEN, repr(config))
        self.assertNotIn(PROXY_KEY, repr(config))


def run_script(argv, environ, cwd=None, timeout=20):
    """Run the program as a user would; (exit status, stdout, stderr). A .env a developer
    keeps next to the script is not read (the suite passes after the quick start)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "SYSTEMROOT", "HOME", "TMPDIR")}
    env.update(environ)
    argv = argv if "--env-file" in argv else argv + ["--env-file", EMPTY_ENV]
    done = subprocess.run([sys.executable, os.path.join(HERE, "gitlab_duo_proxy.py")] + argv,
                          env=env, cwd=cwd or HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


class LeastPrivilegeTests(unittest.TestCase):
    def test_nothing_asks_for_a_token_with_scope_api(self):
        code, help_text, _ = run_script(["--help"], {})
        self.assertEqual(code, 0)
        texts = {"--help": help_text, "hints": " ".join(list(gdp.TOKEN_ERROR_HINTS.values()) +
                                                        list(gdp.GATEWAY_STATUS_HINTS.values()))}
        for name in ("README.md", ".env.example"):
            with open(os.path.join(HERE, name), encoding="utf-8") as fh:
                texts[name] = fh.read()
        for name, text in texts.items():
            self.assertEqual(re.findall(r"scope[:\s]+[`*]*api\b", text), [], name)
        for name in ("--help", "README.md", ".env.example"):
            self.assertIn("ai_features", texts[name], name)


# --- models and aliases -----------------------------------------------------------------

class CatalogTests(unittest.TestCase):
    def setUp(self):
        self.catalog = gdp.Catalog(gdp.build_catalog(""), gdp.DEFAULT_MODEL)

    def test_dated_ids_and_undated_aliases(self):
        resolve = self.catalog.resolve
        self.assertEqual(resolve("claude-sonnet-4-5"), "claude-sonnet-4-5-20250929")
        self.assertEqual(resolve("claude-opus-4-5"), "claude-opus-4-5-20251101")
        self.assertEqual(resolve("claude-haiku-4-5"), "claude-haiku-4-5-20251001")
        self.assertEqual(resolve("claude-haiku-4-5-20251001"), "claude-haiku-4-5-20251001")
        self.assertEqual(resolve("claude-opus-4-6-20260205"), "claude-opus-4-6")
        self.assertEqual(resolve("claude-sonnet-4-5-latest"), "claude-sonnet-4-5-20250929")

    def test_short_names_are_the_newest_of_their_family(self):
        resolve = self.catalog.resolve
        self.assertEqual(resolve("sonnet"), "claude-sonnet-5")
        self.assertEqual(resolve("opus"), "claude-opus-5")
        self.assertEqual(resolve("haiku"), "claude-haiku-4-5-20251001")
        self.assertEqual(resolve("claude-opus"), "claude-opus-5")

    def test_duo_chat_names(self):
        resolve = self.catalog.resolve
        self.assertEqual(resolve("duo-chat"), gdp.DEFAULT_MODEL)
        self.assertEqual(resolve("duo-chat-opus-4-6"), "claude-opus-4-6")
        self.assertEqual(resolve("duo-chat-sonnet-4-5"), "claude-sonnet-4-5-20250929")
        self.assertEqual(resolve("duo-chat-haiku-4-5"), "claude-haiku-4-5-20251001")
        self.assertEqual(resolve("duo-chat-gpt-5-1"), "gpt-5.1-2025-11-13")
        self.assertEqual(resolve("duo-chat-gpt-5-mini"), "gpt-5-mini-2025-08-07")
        self.assertEqual(resolve("duo-chat-gpt-5-2-codex"), "gpt-5.2-codex")  # GitLab's fallback
        for short in ("2", "4", "5"):  # GitLab's client maps these to the dated ids
            dated = {"2": "gpt-5.2-2025-12-11", "4": "gpt-5.4-2026-03-05", "5": "gpt-5.5-2026-04-23"}[short]
            self.assertEqual(resolve("duo-chat-gpt-5-" + short), dated)
            self.assertEqual(resolve("gpt-5." + short), dated)

    def test_unknown_names_go_upstream_unchanged(self):
        self.assertEqual(self.catalog.resolve("claude-next-9"), "claude-next-9")
        self.assertEqual(self.catalog.resolve(""), gdp.DEFAULT_MODEL)

    def test_models_setting_replaces_or_edits_the_list(self):
        replaced = gdp.build_catalog("claude-opus-4-8, claude-sonnet-9-1-20270101")
        self.assertEqual([m.id for m in replaced], ["claude-sonnet-9-1-20270101", "claude-opus-4-8"])
        self.assertEqual(replaced[0].display_name, "Claude Sonnet 9.1")
        self.assertEqual(replaced[0].created_at, "2027-01-01T00:00:00Z")
        edited = [m.id for m in gdp.build_catalog("+claude-mythos-5,-claude-sonnet-4-5-20250929")]
        self.assertIn("claude-mythos-5", edited)
        self.assertNotIn("claude-sonnet-4-5-20250929", edited)
        self.assertEqual(len(edited), len(gdp.MODEL_CATALOG))

    def test_pages(self):
        ids = self.catalog.ids("anthropic")
        page, more = self.catalog.page(3, api="anthropic")
        self.assertEqual([m.id for m in page], ids[:3])
        self.assertTrue(more)
        page, more = self.catalog.page(3, after_id=ids[2], api="anthropic")
        self.assertEqual([m.id for m in page], ids[3:6])
        page, more = self.catalog.page(2, before_id=ids[3], api="anthropic")
        self.assertEqual([m.id for m in page], ids[1:3])
        self.assertTrue(more)
        with self.assertRaises(gdp.BadRequest):
            self.catalog.page(3, after_id="nope")


class HelperTests(unittest.TestCase):
    def test_changed_bodies_are_the_same_json_with_the_change(self):
        members = gdp.parse_body('{ "max_tokens" : 5,\n "model":"sonnet" , "x": [1.0, 1e5, "\\u00e9"] }'.encode())
        self.assertEqual(members["model"], "sonnet")
        changed = json.loads(gdp.body_with(members, {"model": "claude-sonnet-5"}))
        self.assertEqual(changed, dict(members, model="claude-sonnet-5"))
        self.assertEqual(json.loads(gdp.body_with({"a": 1}, {"model": "m"})), {"a": 1, "model": "m"})
        renamed = gdp.body_with({"model": "gpt-5.1", "max_tokens": 5, "x": 1}, {"model": "gpt-5.1-2025-11-13"},
                                {"max_tokens": "max_completion_tokens"})
        self.assertEqual(json.loads(renamed), {"model": "gpt-5.1-2025-11-13", "max_completion_tokens": 5, "x": 1})

    def test_bodies_that_are_not_json_objects_are_refused_precisely(self):
        for raw, fragment in ((b"[1]", "not an array"), (b'{"a":1', "not valid JSON"),
                              (b'{"a":1}x', "extra data"), (b"", "empty"), (b"  ", "empty"),
                              (b"\xff{}", "UTF-8"), (b'{"a" 1}', "expecting ':'"), (b'{"a":1, 2}', "property name"),
                              (b"[" * 20000 + b"]" * 20000, "nested too deeply"),
                              (b'{"a":' * 20000 + b"1" + b"}" * 20000, "nested too deeply")):
            with self.assertRaises(gdp.BadRequest) as caught:
                gdp.parse_body(raw)
            self.assertIn(fragment, caught.exception.message, raw[:40])
        self.assertIn("line 2 column 3", self.message_of(b'{"a":\n  x}'))

    @staticmethod
    def message_of(raw):
        try:
            gdp.parse_body(raw)
        except gdp.BadRequest as exc:
            return exc.message
        return ""

    def test_split_target(self):
        self.assertEqual(gdp.split_target("/v1/v1/messages?beta=true"), ("/v1/messages", {"beta": "true"}))
        self.assertEqual(gdp.split_target("/v1/models/"), ("/v1/models", {}))
        with self.assertRaises(gdp.NotFound):
            gdp.split_target("http://evil.example/v1/messages")

    def test_join_beta(self):
        self.assertEqual(gdp.join_beta(["a,b", " c ", "a"]), "a,b,c")

    def test_error_translation(self):
        anthropic = json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                           "message": "prompt is too long: 210000 tokens > 200000 maximum"}}).encode()
        passed = gdp.translate_gateway_error(400, anthropic, "m", [])
        self.assertEqual((passed.status, passed.body()), (400, anthropic))
        for_openai = gdp.translate_gateway_error(400, anthropic, "m", [], dialect="openai")
        self.assertEqual(json.loads(for_openai.body("openai")), {"error": {
            "message": "prompt is too long: 210000 tokens > 200000 maximum", "type": "invalid_request_error",
            "param": None, "code": "context_length_exceeded"}})
        err = gdp.translate_gateway_error(400, b'{"detail":"Unsupported model"}', "claude-x", ["a", "b"])
        self.assertEqual((err.status, err.error_type), (400, "invalid_request_error"))
        self.assertIn("'claude-x'", err.message)
        self.assertIn("a, b", err.message)
        err = gdp.translate_gateway_error(402, json.dumps({"error": "insufficient_credits", "error_code":
                                                           "USAGE_QUOTA_EXCEEDED", "message": "Quota exceeded"}).encode(), "m", [])
        self.assertEqual((err.status, err.error_type), (402, "billing_error"))
        self.assertIn("Quota exceeded", err.message)
        self.assertIn("credits", err.message)
        err = gdp.translate_gateway_error(401, b'{"error":"Forbidden by auth provider"}', "m", [])
        self.assertEqual(err.error_type, "authentication_error")
        self.assertIn("scope ai_features", err.message)
        err = gdp.translate_gateway_error(502, b"<html>bad</html>", "m", [])
        self.assertIn("Bad Gateway", err.message)

    def test_token_error_translation(self):
        err = gdp.translate_token_error(401, b'{"message":"401 Unauthorized"}')
        self.assertEqual(err.error_type, "authentication_error")
        self.assertIn("scope ai_features", err.message)
        err = gdp.translate_token_error(403, b'{"message":"403 Forbidden"}')
        self.assertIn("third-party agents", err.message)
        err = gdp.translate_token_error(403, b'{"error":"insufficient_scope","error_description":"d","scope":"api"}')
        self.assertIn("scope", err.message)
        for text in ("Token creation failed", "Token is missing in response",
                     "An HTTP error occurred when creating a Direct Access Token."):
            err = gdp.translate_token_error(503, json.dumps({"message": text}).encode())
            self.assertEqual((err.status, err.upstream_status), (503, 503))
            self.assertIn("(503: %s)" % text, err.message)
            self.assertIn("often temporary", err.message)
            self.assertIn("seat", err.message)
        err = gdp.translate_token_error(503, b'{"message":"Missing default GitLab Duo namespace user preference"}')
        self.assertIn("default GitLab Duo namespace", err.message)
        self.assertIn("/-/profile/preferences", err.message)
        err = gdp.translate_token_error(403, b'{"message":"403 Forbidden"}')
        for fragment in ("Duo seat", "Duo Agent Platform credits", "agent_platform_claude_code"):
            self.assertIn(fragment, err.message)
        err = gdp.translate_token_error(429, b'{"message":{"error":"This endpoint has been requested too many times."}}', 30)
        self.assertEqual((err.status, err.headers["retry-after"]), (429, "30"))
        self.assertIn("too many times", err.message)

    def test_headers_never_carry_client_credentials(self):
        client = http.client.HTTPMessage()
        for key, value in (("x-api-key", "k"), ("Authorization", "Bearer c"), ("anthropic-beta", "a"),
                           ("anthropic-beta", "b"), ("Cookie", "c=1"), ("Connection", "keep-alive"),
                           ("x-stainless-os", "Linux")):
            client[key] = value
        headers = gdp.token_headers("gw", {"x-gitlab-realm": "saas"})
        headers.update(gdp.request_headers(client))
        lowered = {k.lower(): v for k, v in headers.items()}
        self.assertEqual(lowered["authorization"], "Bearer gw")
        self.assertEqual(lowered["anthropic-beta"], "a,b")
        self.assertEqual(lowered["anthropic-version"], "2023-06-01")
        self.assertEqual(lowered["accept-encoding"], "identity")
        for name in ("x-api-key", "cookie", "connection", "x-stainless-os"):
            self.assertNotIn(name, lowered)

    def test_exchange_headers_drop_x_api_key_and_refuse_injection(self):
        self.assertEqual(gdp.clean_exchange_headers({"x-api-key": "k", "X-Gitlab-Is-Team-Member": "false"}),
                         {"X-Gitlab-Is-Team-Member": "false"})
        with self.assertRaises(ValueError):
            gdp.clean_exchange_headers({"x-gitlab-realm": "saas\r\nX-Evil: 1"})

    def test_no_proxy_matching(self):
        self.assertTrue(gdp.proxy_bypassed("gitlab.example.com", 443, ".example.com"))
        self.assertTrue(gdp.proxy_bypassed("example.com", 443, "example.com:443"))
        self.assertFalse(gdp.proxy_bypassed("example.com", 80, "example.com:443"))
        self.assertTrue(gdp.proxy_bypassed("x", 1, "*"))
        self.assertFalse(gdp.proxy_bypassed("notexample.com", 443, "example.com"))

    def test_read_usage_reads_only_usage_objects(self):
        def usage_of(answer):
            usage = {}
            gdp.read_usage(usage, answer)
            return usage
        answer = {"content": [{"type": "text", "text": 'he said "usage": 5'}],
                  "usage": {"input_tokens": 3, "output_tokens": 4}}
        self.assertEqual(usage_of(answer), {"input": 3, "output": 4})
        self.assertEqual(usage_of({"type": "message_start", "message": {"usage": {"input_tokens": 7}}}), {"input": 7})
        self.assertEqual(usage_of({"response": {"usage": {"input_tokens": 2, "input_tokens_details": {
            "cached_tokens": 1}}}}), {"input": 2, "cache_read": 1})
        for odd in ({"a": 1}, {"x": "usage"}, {"usage": [1]}, [1], None, {"usage": {"input_tokens": True}}):
            self.assertEqual(usage_of(odd), {}, odd)

    def test_request_bodies_are_read_without_a_socket(self):
        def headers(**fields):
            message = http.client.HTTPMessage()
            for name, value in fields.items():
                message[name.replace("_", "-")] = value
            return message
        read = lambda h, data, limit=100: gdp.read_body(h, io.BytesIO(data), limit)  # noqa: E731
        self.assertEqual(read(headers(Content_Length="3"), b"abcdef"), b"abc")
        self.assertEqual(read(headers(Transfer_Encoding="chunked"), b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\nT: 1\r\n\r\n"),
                         b"abcde")
        for fields, data, error, fragment in (
                ({}, b"", gdp.LengthRequired, "needs a Content-Length"),
                ({"Content_Length": "-1"}, b"", gdp.BadRequest, "invalid Content-Length"),
                ({"Content_Length": "\u0663"}, b"", gdp.BadRequest, "invalid Content-Length"),  # a digit, not ASCII
                ({"Content_Length": "101"}, b"x" * 101, gdp.PayloadTooLarge, "MAX_REQUEST_BYTES"),
                ({"Content_Length": "5"}, b"ab", gdp.BadRequest, "ended after 2 of the 5 bytes"),
                ({"Transfer_Encoding": "gzip"}, b"", gdp.BadRequest, "not supported"),
                ({"Transfer_Encoding": "chunked"}, b"zz\r\n", gdp.BadRequest, "malformed chunked"),
                ({"Transfer_Encoding": "chunked"}, b"65\r\n" + b"x" * 101, gdp.PayloadTooLarge, "limit")):
            with self.assertRaises(error) as caught:
                read(headers(**fields), data)
            self.assertIn(fragment, caught.exception.message, fields)
        both = headers(Content_Length="3")
        both["Content-Length"] = "4"
        self.assertRaises(gdp.BadRequest, read, both, b"abcd")

    def test_the_presented_key_is_found_without_a_socket(self):
        def key(name, value):
            message = http.client.HTTPMessage()
            message[name] = value
            return gdp.presented_key(message)
        self.assertEqual(key("x-api-key", " k1 "), "k1")
        self.assertEqual(key("Authorization", "Bearer  k2"), "k2")
        self.assertEqual(key("Authorization", "bearer k3"), "k3")
        self.assertEqual(key("Authorization", "Basic " + base64.b64encode(b"anyone:k4").decode()), "k4")
        self.assertEqual(key("Authorization", "Basic not-base64!"), "")
        self.assertEqual(key("Authorization", "Digest x"), "")
        self.assertEqual(gdp.presented_key(http.client.HTTPMessage()), "")

    def test_the_404_names_the_api_routes_from_the_route_table(self):
        for path, methods in gdp.ROUTES.items():
            if path.startswith("/v1/") and "{" not in path:
                self.assertIn(path, gdp.ROUTE_SUMMARY)
                self.assertIn(sorted(methods)[0], gdp.ROUTE_SUMMARY)

    def test_client_address_believes_only_trusted_proxies(self):
        trusted = gdp.parse_networks("10.0.0.1, 192.168.0.0/16, ::1")
        cases = [("10.0.0.1", ["203.0.113.7"], "203.0.113.7"),  # from the balancer: its client
                 ("10.0.0.1", ["1.1.1.1, 203.0.113.7"], "203.0.113.7"),  # left of it: anyone's word
                 ("10.0.0.1", ["1.1.1.1", "203.0.113.7, 192.168.3.4"], "203.0.113.7"),  # two proxies
                 ("10.0.0.2", ["203.0.113.7"], "10.0.0.2"),  # not a trusted proxy: its own address
                 ("10.0.0.1", [], "10.0.0.1"), ("10.0.0.1", ["garbage"], "10.0.0.1"),
                 ("10.0.0.1", ["192.168.1.1, 192.168.1.2"], "192.168.1.1"),  # all trusted: the first
                 ("::ffff:10.0.0.1", ["203.0.113.7"], "203.0.113.7"),  # IPv4 mapped into IPv6
                 ("::1", ["2001:db8::1"], "2001:db8::1"), ("10.0.0.1", ["[2001:db8::2]"], "2001:db8::2")]
        for peer, forwarded, expected in cases:
            self.assertEqual(gdp.client_address(peer, forwarded, trusted), expected, (peer, forwarded))
        self.assertEqual(gdp.client_address("10.0.0.1", ["203.0.113.7"], ()), "10.0.0.1")
        with self.assertRaises(ValueError):
            gdp.parse_networks("10.0.0.0/8, not-an-address")

    def test_retry_after_parsing(self):
        self.assertEqual(gdp.parse_retry_after("2"), 2.0)
        self.assertEqual(gdp.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470), 10.0)
        self.assertIsNone(gdp.parse_retry_after("soon"))


# --- token exchange ---------------------------------------------------------------------

class TokenCacheTests(unittest.TestCase):
    def test_fifty_cold_requests_cause_one_exchange(self):
        gate, calls = threading.Event(), []

        def exchange():
            calls.append(1)
            gate.wait(5)
            return {"token": "tok", "headers": {}, "expires_at": 2_000_000_000}
        cache = gdp.TokenCache(exchange, clock=FakeClock())
        results, barrier = [], threading.Barrier(50)

        def worker():
            barrier.wait()
            results.append(cache.get().token)
        threads = [threading.Thread(target=worker) for _ in range(50)]
        for t in threads:
            t.start()
        gate.set()
        for t in threads:
            t.join(10)
        self.assertEqual(len(calls), 1)
        self.assertEqual(results, ["tok"] * 50)

    def test_expiry_margin_with_injected_clock(self):
        clock, n = FakeClock(), []

        def exchange():
            n.append(1)
            return {"token": "t%d" % len(n), "headers": {}, "expires_at": clock() + 3600}
        cache = gdp.TokenCache(exchange, clock=clock)
        self.assertEqual(cache.get().token, "t1")
        clock.advance(3600 - gdp.TOKEN_MARGIN - 1)
        self.assertEqual(cache.get().token, "t1")
        clock.advance(2)
        self.assertEqual(cache.get().token, "t2")

    def test_twenty_five_minutes_without_expires_at(self):
        clock, n = FakeClock(), []
        cache = gdp.TokenCache(lambda: n.append(1) or {"token": "t%d" % len(n)}, clock=clock)
        cache.get()
        clock.advance(25 * 60 - 1)
        self.assertEqual(cache.get().token, "t1")
        clock.advance(2)
        self.assertEqual(cache.get().token, "t2")

    def test_failures_are_not_cached(self):
        answers = [gdp.ProxyError("down", 503), {"token": "ok"}]

        def exchange():
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        cache = gdp.TokenCache(exchange, clock=FakeClock())
        with self.assertRaises(gdp.ProxyError):
            cache.get()
        self.assertEqual(cache.get().token, "ok")

    def test_invalidate_only_drops_the_failed_token(self):
        n = []
        cache = gdp.TokenCache(lambda: n.append(1) or {"token": "t%d" % len(n)}, clock=FakeClock())
        old = cache.get()
        cache.invalidate(old)
        new = cache.get()
        cache.invalidate(old)  # a late 401 for the old token changes nothing
        self.assertIs(cache.get(), new)
        self.assertEqual(len(n), 2)


class ExchangeTests(ProxyTestCase):
    def test_exchange_request_and_header_replay(self):
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 200, resp.body)
        (exchange,) = self.exchanges()
        self.assertEqual(exchange.method, "POST")
        self.assertEqual(exchange.headers["Authorization"], "Bearer " + GITLAB_TOKEN)
        self.assertEqual(json.loads(exchange.body), {"feature_flags": {"DuoAgentPlatformNext": True}})
        (call,) = self.gateway_calls()
        token, issued = next(iter(self.duo.issued.items()))
        self.assertEqual(call.headers["Authorization"], "Bearer " + token)
        for name, value in issued.items():
            self.assertEqual(call.headers[name], value)
        self.assertIn("X-Gitlab-Is-Team-Member", call.headers.keys())

    def test_token_is_reused_until_near_expiry(self):
        for _ in range(3):
            self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.assertEqual(len(self.exchanges()), 1)
        self.clock.advance(3600 - gdp.TOKEN_MARGIN + 1)
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.assertEqual(len(self.exchanges()), 2)

    def test_fifty_concurrent_requests_on_a_cold_cache(self):
        self.gitlab.gate = threading.Event()
        results = []
        threads = [threading.Thread(target=lambda: results.append(self.post("/v1/messages", SIMPLE).status))
                   for _ in range(50)]
        for t in threads:
            t.start()
        self.gitlab.gate.set()
        for t in threads:
            t.join(20)
        self.assertEqual(results, [200] * 50)
        self.assertEqual(len(self.exchanges()), 1)

    def test_gateway_401_refreshes_and_replays_once(self):
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.duo.revoke_all()
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(len(self.exchanges()), 2)
        self.assertEqual(len(self.gateway_calls()), 3)
        self.assertEqual(self.gateway_calls()[1].body, self.gateway_calls()[2].body)

    def test_second_401_reaches_the_client_with_a_hint(self):
        self.gateway.script = [lambda h, r: h.send_json(401, {"error": "Forbidden by auth provider"})] * 2
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 401)
        self.assertEqual(resp.error["type"], "authentication_error")
        self.assertIn("Forbidden by auth provider", resp.error["message"])
        self.assertIn("scope ai_features", resp.error["message"])
        self.assertEqual(len(self.exchanges()), 2)
        self.assertEqual(len(self.gateway_calls()), 2)

    def check_token_failure(self, status, body, expected_status, expected_type, fragment):
        self.gitlab.script = [lambda h: h.send_json(status, body)]
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, expected_status, resp.body)
        self.assertEqual(resp.error["type"], expected_type)
        self.assertIn(fragment, resp.error["message"])
        self.assertEqual(self.gateway_calls(), [])
        self.assertNotIn(GITLAB_TOKEN, resp.body.decode())

    def test_token_endpoint_401(self):
        self.check_token_failure(401, {"error": "invalid_token", "error_description": "Token is expired."},
                                 401, "authentication_error", "scope ai_features")

    def test_token_endpoint_403(self):
        self.check_token_failure(403, {"message": "403 Forbidden"}, 403, "permission_error",
                                 "Duo is not enabled")

    def test_token_endpoint_403_scope(self):
        self.check_token_failure(403, {"error": "insufficient_scope", "error_description": "needs api",
                                       "scope": "api"}, 403, "permission_error", "scope ai_features")

    def test_a_token_without_the_scope_gets_an_answer_naming_ai_features(self):
        self.duo.scopes[GITLAB_TOKEN] = ["read_user"]
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual((resp.status, resp.error["type"]), (403, "permission_error"))
        self.assertIn("needs scope ai_features", resp.error["message"])
        self.duo.scopes[GITLAB_TOKEN] = ["ai_features"]  # the least that works
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)

    def test_token_endpoint_503(self):
        self.check_token_failure(503, {"message": "Token creation failed"}, 503, "api_error",
                                 "could not mint")

    def test_real_gitlab_token_rejected(self):
        self.duo.gitlab_tokens.clear()
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 401)
        self.assertIn("invalid, expired or revoked", resp.error["message"])


# --- /v1/messages -----------------------------------------------------------------------

class MessagesTests(ProxyTestCase):
    def test_body_goes_upstream_byte_for_byte(self):
        raw = ('{"model": "claude-sonnet-4-6",  "max_tokens": 64, "temperature": 1.0, "messages": '
               '[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", '
               '"media_type": "image/png", "data": "iVBORw0KGgo="}}, {"type": "text", "text": "caf\\u00e9 ☕"}]}],'
               ' "thinking": {"type": "enabled", "budget_tokens": 1024}, "tools": [{"name": "t", '
               '"input_schema": {"type": "object"}}]}').encode()
        resp = self.post("/v1/messages", raw)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(self.gateway_calls()[0].body, raw)

    def test_alias_changes_only_the_model(self):
        raw = b'{"max_tokens":64,"model" : "claude-sonnet-4-5","messages":[{"role":"user","content":"x \xc3\xa9"}]}'
        self.assertEqual(self.post("/v1/messages", raw).status, 200)
        self.assertEqual(self.gateway_calls()[0].json(), dict(json.loads(raw), model="claude-sonnet-4-5-20250929"))

    def test_default_model_when_absent(self):
        resp = self.post("/v1/messages", {"max_tokens": 5, "messages": []})
        self.assertEqual(resp.status, 200)
        self.assertEqual(self.gateway_calls()[0].json()["model"], gdp.DEFAULT_MODEL)

    def test_non_streaming_answer_and_request_id(self):
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.json()["content"][0]["text"], "Hello!")
        self.assertEqual(resp.headers["request-id"], "gw-req-9")
        self.assertEqual(resp.headers["Content-Type"], "application/json")

    def test_upstream_headers(self):
        headers = {"x-api-key": "client-key", "Authorization": "Bearer client", "anthropic-version": "2023-01-01",
                   "Connection": "keep-alive, x-hop", "Keep-Alive": "timeout=5", "TE": "trailers",
                   "Proxy-Authorization": "Basic eA==", "Cookie": "a=b", "x-stainless-lang": "python",
                   "Accept": "application/json", "User-Agent": "Anthropic/Python 2.12.0"}
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=10)
        self.addCleanup(conn.close)
        conn.putrequest("POST", "/v1/messages?beta=true", skip_accept_encoding=True)
        body = json.dumps(SIMPLE).encode()
        for key, value in list(headers.items()) + [("anthropic-beta", "a-2025"), ("anthropic-beta", "b-2026,c"),
                                                   ("Content-Length", str(len(body))),
                                                   ("Accept-Encoding", "gzip, br")]:
            conn.putheader(key, value)
        conn.endheaders(body)
        self.assertEqual(conn.getresponse().status, 200)
        call = self.gateway_calls()[0]
        self.assertEqual(call.path, "/ai/v1/proxy/anthropic/v1/messages?beta=true")
        got = {k.lower(): v for k, v in call.headers.items()}
        self.assertEqual(got["anthropic-version"], "2023-01-01")
        self.assertEqual(call.headers.get_all("anthropic-beta"), ["a-2025,b-2026,c"])
        self.assertEqual(got["accept-encoding"], "identity")
        self.assertTrue(got["user-agent"].startswith("gitlab-duo-proxy/" + gdp.__version__))
        self.assertTrue(got["authorization"].startswith("Bearer eyJ"))
        for name in ("x-api-key", "keep-alive", "te", "proxy-authorization", "cookie", "x-stainless-lang",
                     "x-hop", "connection"):
            self.assertNotIn(name, got)

    def test_query_and_double_v1_paths(self):
        self.assertEqual(self.post("/v1/v1/messages", SIMPLE).status, 200)
        self.assertEqual(self.post("/v1/messages?beta=true&foo=bar", SIMPLE).status, 200)
        self.assertEqual(self.post("/v1/messages?foo=bar", SIMPLE).status, 200)
        self.assertEqual([c.path for c in self.gateway_calls()],
                         ["/ai/v1/proxy/anthropic/v1/messages", "/ai/v1/proxy/anthropic/v1/messages?beta=true",
                          "/ai/v1/proxy/anthropic/v1/messages"])

    def test_count_tokens_gets_beta_query(self):
        for path in ("/v1/messages/count_tokens", "/v1/messages/count_tokens?beta=true"):
            resp = self.post(path, {"model": "claude-sonnet-4-6", "messages": []})
            self.assertEqual(resp.json(), {"input_tokens": 42})
        self.assertEqual({c.path for c in self.gateway_calls()},
                         {"/ai/v1/proxy/anthropic/v1/messages/count_tokens?beta=true"})

    def test_openai_model_on_messages_is_refused_clearly(self):
        resp = self.post("/v1/messages", dict(SIMPLE, model="gpt-5-codex"))
        self.assertEqual(resp.status, 400)
        self.assertIn("/v1/chat/completions", resp.error["message"])

    def test_prompt_too_long_reaches_the_client_verbatim(self):
        body = json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": "prompt is too long: 210000 tokens > 200000 maximum"}})
        self.gateway.script = [lambda h, r: h.send_json(400, json.loads(body), [("x-request-id", "gw-77")])]
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 400)
        self.assertEqual(resp.body, body.encode())
        self.assertEqual(resp.headers["request-id"], "gw-77")

    def test_gitlab_shaped_errors_become_anthropic_errors(self):
        cases = [(402, {"detail": "Proxy endpoints are not enabled for this namespace"}, "billing_error",
                  "GitLab support or your GitLab account team"),
                 (403, {"detail": "Gitlab namespace id mismatch"}, "permission_error", "mismatch"),
                 (402, {"error": "insufficient_credits", "error_code": "USAGE_QUOTA_EXCEEDED",
                        "message": "Usage quota exceeded"}, "billing_error", "Usage quota exceeded"),
                 (403, {"error": "not_entitled", "error_code": "USAGE_QUOTA_NOT_ENTITLED",
                        "message": "Not entitled"}, "permission_error", "subscription"),
                 (400, {"message": "something odd"}, "invalid_request_error", "something odd")]
        for status, body, error_type, fragment in cases:
            # Twice: a not_entitled answer is tried once more (it can be transient).
            self.gateway.script = [lambda h, r, s=status, b=body: h.send_json(s, b)] * 2
            resp = self.post("/v1/messages", SIMPLE)
            self.assertEqual(resp.status, status, body)
            self.assertEqual(resp.error["type"], error_type, body)
            self.assertIn(fragment, resp.error["message"])

    def test_unsupported_model_lists_known_models(self):
        resp = self.post("/v1/messages", dict(SIMPLE, model="claude-unknown-1"))
        self.assertEqual(resp.status, 400)
        self.assertIn("'claude-unknown-1'", resp.error["message"])
        self.assertIn("claude-sonnet-4-6", resp.error["message"])
        self.assertEqual(self.gateway_calls()[0].json()["model"], "claude-unknown-1")

    def test_unreachable_gateway_is_502_with_host_and_reason(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proxy = self.make_proxy(gateway_url="http://127.0.0.1:%d" % port, retries=0)
        resp = self.post("/v1/messages", SIMPLE, proxy=proxy)
        self.assertEqual(resp.status, 502)
        self.assertEqual(resp.error["type"], "api_error")
        self.assertIn("127.0.0.1:%d" % port, resp.error["message"])
        self.assertIn("refused", resp.error["message"])
        self.assertTrue(resp.headers["request-id"])

    def test_gdk_gateway_without_ai_prefix(self):
        gateway = start_server(self, FakeGateway(self.duo, prefix=""))
        proxy = self.make_proxy(gateway_url=gateway.url, gateway_prefix="")
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 200)
        self.assertEqual(gateway.requests[0].path, "/v1/proxy/anthropic/v1/messages")


class StreamingTests(ProxyTestCase):
    def stream(self, frames, payload=None, **kw):
        self.gateway.script = [lambda h, r: h.send_stream(frames, **kw)]
        return self.post("/v1/messages?beta=true", payload or dict(SIMPLE, stream=True))

    def test_stream_relayed_byte_for_byte(self):
        frames = rich_stream("claude-sonnet-4-6")
        resp = self.stream(frames)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.body, b"".join(frames))
        self.assertEqual(resp.headers["Content-Type"], "text/event-stream; charset=utf-8")
        self.assertEqual(resp.headers["Cache-Control"], "no-cache")
        self.assertEqual(resp.headers["X-Accel-Buffering"], "no")
        self.assertEqual(resp.headers["Transfer-Encoding"], "chunked")
        self.assertEqual(resp.headers["request-id"], "gw-req-1")
        events = parse_sse(resp.body)
        self.assertEqual(events[3][1]["delta"]["type"], "signature_delta")
        partial = "".join(d["delta"].get("partial_json", "") for e, d in events if e == "content_block_delta")
        self.assertEqual(json.loads(partial), {"city": "Paris"})

    def test_frames_split_across_chunks_are_rejoined_exactly(self):
        whole = b"".join(text_stream("claude-sonnet-4-6"))
        pieces = [whole[i:i + 7] for i in range(0, len(whole), 7)]
        self.assertEqual(self.stream(pieces).body, whole)

    def test_claude_code_style_accept_json_still_streams(self):
        self.assertEqual(self.post("/v1/messages?beta=true", dict(SIMPLE, stream=True),
                                   {"Accept": "application/json"}).headers["Content-Type"],
                         "text/event-stream; charset=utf-8")

    def test_bytes_reach_the_client_before_the_upstream_ends(self):
        release = threading.Event()
        frames = text_stream("claude-sonnet-4-6")
        self.gateway.script = [lambda h, r: h.send_stream(frames, gates={3: release})]
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/messages", json.dumps(dict(SIMPLE, stream=True)),
                     {"anthropic-version": "2023-06-01", "Content-Type": "application/json"})
        resp = conn.getresponse()
        first = b""
        while first.count(b"\n\n") < 3:
            first += resp.read1(65536)
        self.assertEqual(first, b"".join(frames[:3]))
        self.assertFalse(release.is_set())
        release.set()
        self.assertEqual(first + resp.read(), b"".join(frames))

    def test_usage_is_logged_from_the_stream(self):
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            self.stream(rich_stream("claude-sonnet-4-6"))
            self.assertTrue(self.proxy.inflight.wait_idle(5))
        line = next(entry for entry in logs.output if "/v1/messages" in entry)
        for part in ("POST /v1/messages", "model=claude-sonnet-4-6", "status=200", "stream", "in=30 out=40"):
            self.assertIn(part, line)

    def test_keep_alive_connection_serves_many_requests(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=10)
        self.addCleanup(conn.close)
        sockets = set()
        for payload in (SIMPLE, dict(SIMPLE, stream=True), SIMPLE):
            conn.request("POST", "/v1/messages", json.dumps(payload), {"anthropic-version": "2023-06-01"})
            resp = conn.getresponse()
            resp.read()
            self.assertEqual(resp.status, 200)
            sockets.add(id(conn.sock))
        self.assertEqual(len(sockets), 1)

    def test_idle_client_connections_are_closed_cleanly(self):
        proxy = self.make_proxy(client_timeout=0.3)
        sock = socket.create_connection(("127.0.0.1", proxy.server_address[1]), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            data += sock.recv(65536)
        self.assertIn(b"200 OK", data)
        self.assertEqual(sock.recv(65536), b"")  # closed by the proxy after the idle timeout


class ModelsRouteTests(ProxyTestCase):
    def test_list_in_anthropic_schema(self):
        resp = self.request("GET", "/v1/models?limit=1000", headers={"anthropic-version": "2023-06-01"})
        data = resp.json()
        ids = [m["id"] for m in data["data"]]
        self.assertEqual(ids, [m.id for m in gdp.build_catalog("") if m.api == "anthropic"])
        self.assertTrue(all(i.startswith("claude") for i in ids))
        self.assertFalse(data["has_more"])
        self.assertEqual((data["first_id"], data["last_id"]), (ids[0], ids[-1]))
        for entry in data["data"]:
            self.assertEqual(entry["type"], "model")
            self.assertRegex(entry["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
            self.assertTrue(entry["display_name"])

    def test_pagination_parameters(self):
        first = self.request("GET", "/v1/models?limit=2", headers={"anthropic-version": "2023-06-01"}).json()
        self.assertTrue(first["has_more"])
        nxt = self.request("GET", "/v1/models?limit=2&after_id=" + first["last_id"],
                           headers={"anthropic-version": "2023-06-01"}).json()
        self.assertNotIn(nxt["first_id"], [m["id"] for m in first["data"]])
        back = self.request("GET", "/v1/models?limit=2&before_id=" + nxt["first_id"],
                            headers={"anthropic-version": "2023-06-01"}).json()
        self.assertEqual(back["data"], first["data"])
        self.assertEqual(self.request("GET", "/v1/models?limit=0").status, 400)
        self.assertEqual(self.request("GET", "/v1/models?limit=x").status, 400)

    def test_get_one_model(self):
        data = self.request("GET", "/v1/models/claude-sonnet-4-5").json()
        self.assertEqual(data["id"], "claude-sonnet-4-5-20250929")
        resp = self.request("GET", "/v1/models/claude-nope")
        self.assertEqual((resp.status, resp.error["type"]), (404, "not_found_error"))

    def test_models_override(self):
        proxy = self.make_proxy(models="claude-opus-4-8,claude-haiku-4-5-20251001")
        data = self.request("GET", "/v1/models", proxy=proxy).json()
        self.assertEqual([m["id"] for m in data["data"]], ["claude-opus-4-8", "claude-haiku-4-5-20251001"])


class HelloProbeTests(ProxyTestCase):
    config_overrides = {"api_key": PROXY_KEY, "drain_seconds": 60}  # signalled, it keeps serving

    def test_claude_codes_probe_needs_no_key_and_shows_no_usage(self):
        self.post("/v1/messages", SIMPLE, {"x-api-key": PROXY_KEY})
        resp = self.request("GET", "/api/hello")
        self.assertEqual((resp.status, resp.json()), (200, {"status": "ok"}))
        resp = self.request("HEAD", "/api/hello")
        self.assertEqual((resp.status, resp.body), (200, b""))

    def test_liveness_and_readiness_need_no_key_and_are_not_usage(self):
        with self.assertLogs("gitlab_duo_proxy", "DEBUG") as logs:
            for path in ("/livez", "/readyz"):
                self.assertEqual(self.request("GET", path).json(), {"status": "ok"})
                self.assertEqual(self.request("HEAD", path).status, 200)
            self.assertTrue(self.proxy.inflight.wait_idle(5))
        lines = [r for r in logs.records if r.getMessage().split()[1] in ("/livez", "/readyz")]
        self.assertEqual([r.levelname for r in lines], ["DEBUG"] * 4)  # no INFO line every few seconds
        stats = self.request("GET", "/stats", headers={"x-api-key": PROXY_KEY}).json()
        self.assertFalse({"/livez", "/readyz"} & set(stats["routes"]))
        self.proxy.draining.set()  # the shutdown signal
        resp = self.request("GET", "/readyz")
        self.assertEqual((resp.status, resp.json(), resp.headers["Connection"]), (503, {"status": "draining"}, "close"))
        self.assertEqual(self.request("GET", "/livez").status, 200)

    def test_a_request_that_arrives_as_idle_connections_close_is_still_answered(self):
        arrived, go, release = threading.Event(), threading.Event(), threading.Event()
        self.addCleanup(release.set)

        class JustArrived(gdp.ProxyHandler):
            def parse_request(self):  # read, but not yet counted as in flight
                arrived.set()
                go.wait(10)
                return super().parse_request()
        proxy = self.make_proxy(JustArrived, api_key=PROXY_KEY)
        frames = text_stream("claude-sonnet-4-6")
        self.gateway.script = [lambda h, r: h.send_stream(frames, gates={4: release})]
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/messages", json.dumps(dict(SIMPLE, stream=True)),
                     {"x-api-key": PROXY_KEY, "anthropic-version": "2023-06-01"})
        self.assertTrue(arrived.wait(5))
        self.assertEqual(proxy.close_idle(), 1)  # it looked idle: its reading side is shut
        go.set()
        resp = conn.getresponse()
        head = resp.read1(65536)
        watched = [k.data for k in proxy.watcher._selector.get_map().values() if k.data is not None]
        self.assertEqual(watched, [])  # the end of its input is not the client leaving
        release.set()
        self.assertEqual(head + resp.read(), b"".join(frames))

    def test_from_the_shutdown_signal_on_every_answer_closes_its_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=10)
        self.addCleanup(conn.close)
        headers = {"x-api-key": PROXY_KEY, "anthropic-version": "2023-06-01"}
        conn.request("POST", "/v1/messages", json.dumps(SIMPLE), headers)
        resp = conn.getresponse()
        resp.read()
        self.assertIsNone(resp.getheader("Connection"))  # kept alive
        self.proxy.draining.set()
        conn.request("POST", "/v1/messages", json.dumps(dict(SIMPLE, stream=True)), headers)
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.getheader("Connection")), (200, "close"))
        self.assertTrue(resp.read().endswith(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"))
        self.assertEqual(conn.sock.recv(1) if conn.sock else b"", b"")  # and closed after it


class StatusTests(ProxyTestCase):
    def test_status_before_and_after_first_token(self):
        data = self.request("GET", "/").json()
        self.assertEqual((data["name"], data["version"]), ("gitlab-duo-proxy", gdp.__version__))
        self.assertEqual(data["gateway_token"]["state"], "not yet fetched")
        self.assertEqual(data["ai_gateway"], self.gateway.url + "/ai")
        self.post("/v1/messages", SIMPLE)
        resp = self.request("GET", "/")
        data = resp.json()
        self.assertEqual(data["gateway_token"]["state"], "valid")
        self.assertEqual(data["gateway_token"]["expires_in"], 3600)
        for secret in list(self.duo.issued) + [GITLAB_TOKEN]:
            self.assertNotIn(secret, resp.body.decode())

    def test_head(self):
        resp = self.request("HEAD", "/")
        self.assertEqual((resp.status, resp.body), (200, b""))
        self.assertGreater(int(resp.headers["Content-Length"]), 0)

    def test_unknown_path_is_anthropic_404(self):
        resp = self.request("GET", "/v2/whatever")
        self.assertEqual((resp.status, resp.error["type"]), (404, "not_found_error"))
        self.assertTrue(resp.headers["request-id"].startswith("req_"))


class ModelFallbackTests(ProxyTestCase):
    """GitLab's list moves: a model it does not serve is served by its family's newest."""

    def models_sent(self):
        return [c.json()["model"] for c in self.gateway_calls()]

    def test_a_newer_name_is_served_by_the_newest_of_its_family_then_remembered(self):
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            resp = self.post("/v1/messages", dict(SIMPLE, model="claude-opus-5-5"))
            self.assertTrue(self.proxy.inflight.wait_idle(5))  # its log line is written
        self.assertEqual((resp.status, resp.json()["model"]), (200, "claude-opus-5"))
        self.assertEqual(self.models_sent(), ["claude-opus-5-5", "claude-opus-5"])
        (warning,) = [r.getMessage() for r in logs.records if r.levelname == "WARNING"]
        for fragment in ("claude-opus-5-5", "serving it with claude-opus-5", "MODEL_FALLBACK=off"):
            self.assertIn(fragment, warning)
        self.assertIn("model=claude-opus-5 fallback-from=claude-opus-5-5 status=200", logs.output[-1])
        self.gateway.requests.clear()
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:  # straight to the fallback
            resp = self.post("/v1/messages", dict(SIMPLE, model="claude-opus-5-5", stream=True))
            self.assertTrue(self.proxy.inflight.wait_idle(5))
        self.assertEqual(parse_sse(resp.body)[0][1]["message"]["model"], "claude-opus-5")
        self.assertEqual(self.models_sent(), ["claude-opus-5"])
        self.assertEqual([r.levelname for r in logs.records], ["INFO"])  # warned once per model
        self.assertEqual(self.request("GET", "/stats").json()["model_fallbacks"], [
            {"requested": "claude-opus-5-5", "served": "claude-opus-5", "requests": 2}])
        # An hour later GitLab is asked again: it may serve the model by then.
        self.clock.advance(3601)
        self.gateway.models.add("claude-opus-5-5")
        self.gateway.requests.clear()
        self.assertEqual(self.post("/v1/messages", dict(SIMPLE, model="claude-opus-5-5")).json()["model"],
                         "claude-opus-5-5")
        self.assertEqual(self.models_sent(), ["claude-opus-5-5"])

    def test_fallback_before_a_stream_and_in_every_front_door(self):
        resp = self.post("/v1/messages?beta=true", dict(SIMPLE, model="claude-sonnet-5-9", stream=True))
        self.assertEqual(parse_sse(resp.body)[0][1]["message"]["model"], "claude-sonnet-5")
        self.assertEqual(self.models_sent()[-2:], ["claude-sonnet-5-9", "claude-sonnet-5"])
        resp = self.request("POST", "/v1/responses", {"model": "gpt-5-codex", "input": "hi", "stream": True})
        self.assertEqual(resp.body, b"".join(responses_stream("gpt-5.3-codex")))
        resp = self.request("POST", "/v1/chat/completions", {"model": "gpt-5.2-codex", "max_tokens": 9,
                                                             "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(resp.json()["model"], "gpt-5.3-codex")
        self.assertEqual(self.gateway_calls()[-1].json()["max_completion_tokens"], 9)

    def test_a_translated_request_is_translated_again_for_the_model_that_serves_it(self):
        # haiku 9 would think adaptively; haiku 4.5, which serves it, needs a budget instead.
        resp = self.request("POST", "/v1/chat/completions", {
            "model": "claude-haiku-9", "reasoning_effort": "high", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(resp.json()["model"], "claude-haiku-4-5-20251001")
        first, second = [c.json() for c in self.gateway_calls()]
        self.assertEqual(first["thinking"], {"type": "adaptive"})
        self.assertEqual(second["thinking"], {"type": "enabled", "budget_tokens": 24576})

    def test_no_fallback_when_off_for_unknown_families_or_when_the_fallback_is_refused(self):
        proxy = self.make_proxy(model_fallback=False)
        resp = self.post("/v1/messages", dict(SIMPLE, model="claude-opus-5-5"), proxy=proxy)
        self.assertEqual(resp.status, 400)
        self.assertIn("GitLab does not serve model 'claude-opus-5-5'", resp.error["message"])
        resp = self.post("/v1/messages", dict(SIMPLE, model="claude-nonsense-9"))
        self.assertIn("GitLab does not serve model 'claude-nonsense-9'", resp.error["message"])
        self.gateway.models.discard("claude-opus-5")
        self.gateway.requests.clear()
        resp = self.post("/v1/messages", dict(SIMPLE, model="claude-opus-5-5"))
        self.assertEqual(resp.status, 400)
        self.assertEqual(self.models_sent(), ["claude-opus-5-5", "claude-opus-5"])  # one fallback, no more
        self.assertNotIn("claude-opus-5-5", self.proxy.upstream.fallbacks)  # the refused fallback is forgotten

    def test_the_switch_through_the_command_line(self):
        environ = dict(os.environ, GITLAB_TOKEN=GITLAB_TOKEN, GITLAB_INSTANCE_URL=self.gitlab.url,
                       GITLAB_AI_GATEWAY_URL=self.gateway.url, PORT="0")
        for argv, status in ((["--model-fallback", "off"], 400), ([], 200)):
            proc, port = spawn_proxy(self, argv, environ)
            proxy = type("Address", (), {"server_address": ("127.0.0.1", port)})
            self.assertEqual(self.post("/v1/messages", dict(SIMPLE, model="claude-opus-5-5"), proxy=proxy).status,
                             status, argv)
            proc.terminate()
            self.assertEqual(proc.wait(10), 0)
        self.assertFalse(load_config([], {"GITLAB_TOKEN": "t", "MODEL_FALLBACK": "off"},
                                         cwd=tempfile.gettempdir())[0].model_fallback)


class QuotaAnswerTests(ProxyTestCase):
    NOT_ENTITLED = {"error": "not_entitled", "error_code": "USAGE_QUOTA_NOT_ENTITLED",
                    "message": "User is not entitled"}

    def test_not_entitled_is_tried_once_more_then_explained(self):
        self.gateway.script = [lambda h, r: h.send_json(403, self.NOT_ENTITLED), ok_message]
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)  # the billing check timed out
        self.assertEqual(len(self.gateway_calls()), 2)
        self.gateway.script = [lambda h, r: h.send_json(403, self.NOT_ENTITLED)] * 2
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual((resp.status, resp.error["type"]), (403, "permission_error"))
        for fragment in ("may be temporary", "Duo seat or Duo Agent Platform credits"):
            self.assertIn(fragment, resp.error["message"])

    def test_both_402s_name_who_can_help(self):
        self.gateway.script = [lambda h, r: h.send_json(402, {
            "error": "insufficient_credits", "error_code": "USAGE_QUOTA_EXCEEDED", "message": "Out of credits"})]
        message = self.post("/v1/messages", SIMPLE).error["message"]
        self.assertIn("credits are used up", message)
        self.assertIn("up to an hour", message)
        for wording in ("namespace", "instance"):
            self.gateway.script = [lambda h, r, w=wording: h.send_json(402, {
                "detail": "Proxy endpoints are not enabled for this " + w})]
            message = self.post("/v1/messages", SIMPLE).error["message"]
            self.assertIn("allowlist GitLab operates", message)
            self.assertIn("GitLab support or your GitLab account team", message)
            self.assertNotIn("administrator", message)

    def test_exchange_failures_say_what_to_do(self):
        cases = [(503, "Missing default GitLab Duo namespace user preference", "/-/profile/preferences"),
                 (503, "Token creation failed", "503: Token creation failed"),
                 (403, "403 Forbidden", "agent_platform_claude_code")]
        for status, text, fragment in cases:
            self.gitlab.script = [lambda h, s=status, t=text: h.send_json(s, {"message": t})]
            resp = self.post("/v1/messages", SIMPLE)
            self.assertEqual(resp.status, status)
            self.assertIn(fragment, resp.error["message"])


class RefreshAheadTests(ProxyTestCase):
    def test_after_the_first_call_no_request_waits_for_an_exchange(self):
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.proxy.refresher.tick()
        self.assertEqual(len(self.exchanges()), 1)  # not due yet
        self.clock.advance(3600 - gdp.TOKEN_MARGIN - gdp.REFRESH_AHEAD + 1)
        self.proxy.refresher.tick()
        self.assertEqual(len(self.exchanges()), 2)  # refreshed ahead, in the background
        self.clock.advance(gdp.REFRESH_AHEAD)  # the old token would be due now
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.assertEqual(len(self.exchanges()), 2)
        fresh = self.gateway_calls()[-1].headers["Authorization"]
        self.assertEqual(fresh, "Bearer " + list(self.duo.issued)[-1])

    def test_a_failed_refresh_keeps_serving_then_the_exchange_error_reaches_requests(self):
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.gitlab.script = [lambda h: h.send_json(503, {"message": "Token creation failed"})] * 10
        self.clock.advance(3600 - gdp.TOKEN_MARGIN - gdp.REFRESH_AHEAD + 1)
        with self.assertLogs("gitlab_duo_proxy", "WARNING") as logs:
            self.proxy.refresher.tick()
        self.assertIn("refreshing the gateway token failed", logs.output[0])
        self.assertIn("current token serves until it expires", logs.output[0])
        for secret in list(self.duo.issued) + [GITLAB_TOKEN]:
            self.assertNotIn(secret, logs.output[0])
        self.clock.advance(gdp.REFRESH_AHEAD + 60)  # past due, before expiry: still served, nobody waits
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.assertEqual(len(self.exchanges()), 2)
        self.clock.advance(gdp.TOKEN_MARGIN)  # past its own expiry
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 503)
        self.assertIn("could not mint a Duo token", resp.error["message"])

    def test_the_refresher_thread_refreshes_by_itself(self):
        refreshed = threading.Event()

        class Due:
            def refresh_if_due(self):
                refreshed.set()
        stopping = threading.Event()
        refresher = gdp.TokenRefresher(lambda: [Due()], stopping, interval=0.01)
        refresher.start()
        self.addCleanup(refresher.join, 5)
        self.addCleanup(stopping.set)
        self.assertTrue(refreshed.wait(5))

    def test_team_mode_refreshes_ahead_only_for_users_seen_in_the_last_hour(self):
        recent, idle = "glpat-RECENT00000000000000", "glpat-IDLE0000000000000000"
        self.duo.gitlab_tokens.update({recent, idle})
        users = gdp.UserTokens(self.proxy.upstream, clock=self.clock)
        users.for_client(idle, "10.0.0.1").get()  # and never again
        users.for_client(recent, "10.0.0.1").get()
        self.clock.advance(1800)
        users.for_client(recent, "10.0.0.1").get()
        self.clock.advance(1801)
        self.assertEqual(users.caches(), [users.for_client(recent, "10.0.0.1")])
        self.clock.advance(24 * 3600)  # a day unseen: forgotten
        users.caches()
        self.assertEqual(len(users), 0)


class GooseWireTests(ProxyTestCase):
    """Goose's anthropic engine, as PROTOCOL.md §3 describes it (Goose itself cannot be run here)."""

    def test_goose_session(self):
        host = "/v1"  # a user who put /v1 at the end of ANTHROPIC_HOST
        models = self.request("GET", host + "/v1/models", headers={"x-api-key": "unused"}).json()
        self.assertIn("claude-sonnet-4-6", [m["id"] for m in models["data"]])
        frames = rich_stream("claude-sonnet-4-6")
        self.gateway.script = [lambda h, r: h.send_stream(frames)]
        resp = self.request("POST", host + "/v1/messages", json.dumps({
            "model": "claude-sonnet-4-6", "max_tokens": 4096, "stream": True, "system": "You are Goose",
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}),
            {"x-api-key": "unused", "anthropic-version": "2023-06-01", "content-type": "application/json"})
        self.assertEqual(resp.status, 200)
        # Goose reads only data: lines and stops at message_stop.
        types = []
        for line in resp.body.decode().splitlines():
            if line.startswith("data: "):
                types.append(json.loads(line[6:])["type"])
                if types[-1] == "message_stop":
                    break
        self.assertEqual(types[0], "message_start")
        self.assertEqual(types[-1], "message_stop")
        self.assertEqual(self.gateway_calls()[-1].path, "/ai/v1/proxy/anthropic/v1/messages")
        self.assertNotIn("x-api-key", {k.lower() for k in self.gateway_calls()[-1].headers.keys()})


# --- faults -----------------------------------------------------------------------------

def overloaded(h, r):
    h.send_json(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


def ok_message(h, r):
    h.send_json(200, message_json(r.json()["model"]))


class RetryTests(ProxyTestCase):
    def test_retryable_statuses_are_retried_then_succeed(self):
        for status_script in (overloaded, lambda h, r: h.send_json(503, {"detail": "unavailable"}),
                              lambda h, r: h.send_json(429, {"type": "error", "error": {
                                  "type": "rate_limit_error", "message": "slow down"}}),
                              lambda h, r: h.send_json(408, {"detail": "timeout"})):
            self.gateway.requests.clear()
            self.gateway.script = [status_script, status_script, ok_message]
            resp = self.post("/v1/messages", SIMPLE)
            self.assertEqual(resp.status, 200, resp.body)
            self.assertEqual(len(self.gateway_calls()), 3)

    def test_last_error_goes_to_the_client_with_retry_headers(self):
        self.gateway.script = [overloaded] * 3
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 529)
        self.assertEqual(resp.error, {"type": "overloaded_error", "message": "Overloaded"})
        self.assertEqual(resp.headers["x-should-retry"], "true")
        self.assertGreaterEqual(int(resp.headers["retry-after"]), 1)
        self.assertEqual(len(self.gateway_calls()), 3)

    def test_other_4xx_are_never_retried(self):
        for status in (400, 401, 403, 404, 413):
            self.gateway.requests.clear()
            self.gateway.script = [lambda h, r, s=status: h.send_json(s, {"detail": "no"})] * 2
            self.post("/v1/messages", SIMPLE)
            self.assertEqual(len(self.gateway_calls()), 2 if status == 401 else 1, status)

    def test_retry_after_is_honoured(self):
        self.gateway.script = [lambda h, r: h.send_json(503, {"detail": "busy"}, [("retry-after", "0.25")]), ok_message]
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.assertTrue(any("retry 1 in 0.25s" in line for line in logs.output), logs.output)

    def test_connection_errors_are_retried_with_bounded_attempts(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proxy = self.make_proxy(gateway_url="http://127.0.0.1:%d" % port, retries=3)
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            resp = self.post("/v1/messages", SIMPLE, proxy=proxy)
        self.assertEqual(resp.status, 502)
        self.assertEqual(resp.headers["x-should-retry"], "true")
        self.assertEqual(sum("retry" in line and "refused" in line for line in logs.output), 3)

    def test_total_retry_time_is_bounded(self):
        proxy = self.make_proxy(retries=10, retry_base_delay=0.2, retry_max_seconds=0.5)
        self.gateway.script = [overloaded] * 10
        resp = self.post("/v1/messages", SIMPLE, proxy=proxy)
        self.assertEqual(resp.status, 529)
        self.assertLess(len(self.gateway_calls()), 5)

    def test_backoff_grows_with_jitter(self):
        delays = [gdp.backoff_delay(n, 0.5, rng=lambda: 1.0) for n in range(6)]
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 8.0])
        self.assertEqual(gdp.backoff_delay(1, 0.5, rng=lambda: 0.0), 0.5)


def stream_then(frames, failure):
    """A script: send frames, then fail in one of the ways a network fails."""
    def script(h, r):
        h.send_stream(frames, end=False)
        failure(h)
    return script


def truncated_chunk(h):
    h.wfile.write(b"64\r\nevent: content_block_delta\ndata: {\"ty")
    h.wfile.flush()
    h.close_connection = True
    h.connection.shutdown(socket.SHUT_RDWR)


class MidStreamFailureTests(ProxyTestCase):
    def assert_error_frame(self, resp, fragment):
        self.assertEqual(resp.status, 200)
        events = parse_sse(resp.body)
        self.assertEqual(events[-1][0], "error")
        self.assertEqual(events[-1][1]["type"], "error")
        self.assertIn(events[-1][1]["error"]["type"], ("api_error", "overloaded_error"))
        self.assertIn(fragment, events[-1][1]["error"]["message"])
        self.assertEqual([e for e, _ in events[:3]], ["message_start", "content_block_start", "ping"])
        self.assertEqual(len(self.gateway_calls()), 1)  # never retried once bytes went out

    def cut_stream(self, script, proxy=None):
        self.gateway.script = [script]
        with self.assertLogs("gitlab_duo_proxy", "WARNING") as logs:
            resp = self.post("/v1/messages", dict(SIMPLE, stream=True), proxy=proxy)
        self.assertIn("cut:", logs.output[0])
        return resp

    def test_reset(self):
        resp = self.cut_stream(stream_then(text_stream("claude-sonnet-4-6")[:3], FakeHandler.reset))
        self.assert_error_frame(resp, "broke mid-stream")

    def test_truncated_chunk(self):
        resp = self.cut_stream(stream_then(text_stream("claude-sonnet-4-6")[:3], truncated_chunk))
        self.assert_error_frame(resp, "broke mid-stream")
        self.assertNotIn(b'{"ty\n', resp.body)  # the torn frame never reached the client

    def test_read_timeout(self):
        proxy = self.make_proxy(stream_idle_timeout=0.3)
        never = threading.Event()
        self.addCleanup(never.set)
        resp = self.cut_stream(lambda h, r: h.send_stream(text_stream("m"), gates={3: never}), proxy)
        self.assert_error_frame(resp, "sent nothing for 0.3 s")

    def test_clean_close_without_message_stop(self):
        resp = self.cut_stream(lambda h, r: h.send_stream(text_stream("m")[:4]))
        self.assert_error_frame(resp, "before it was complete")

    def test_upstream_error_frame_passes_through(self):
        frames = text_stream("m")[:3] + [sse("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}})]
        self.gateway.script = [lambda h, r: h.send_stream(frames)]
        resp = self.post("/v1/messages", dict(SIMPLE, stream=True))
        self.assertEqual(resp.body, b"".join(frames))


def fd_count():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def join_all(testcase, threads, timeout=10):
    """Wait until each thread has ended (a gate: no polling)."""
    for thread in list(threads):
        thread.join(timeout)
        testcase.assertFalse(thread.is_alive(), thread.name)


class ClientDisconnectTests(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.proxy = self.tracked_proxy()

    def start_stream(self):
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]), timeout=10)
        body = json.dumps(dict(SIMPLE, stream=True)).encode()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while b"message_start" not in data:
            data += sock.recv(65536)
        return sock

    def stalling_script(self, upstream_closed):
        """Send the start of a stream, then stay silent until the proxy hangs up."""
        def script(h, r):
            try:
                h.send_stream(text_stream("m")[:3], end=False)
                h.wfile.flush()
                closed = h.connection.recv(1) == b""
            except ConnectionError:
                # Closed too. The client may leave after the first event and the proxy cut
                # this connection before the last events were written here (a broken pipe),
                # and a proxy that closes with unread bytes in its buffer sends a reset.
                closed = True
            if closed:
                upstream_closed.set()
            h.close_connection = True
        return script

    def test_upstream_closed_promptly_even_when_silent(self):
        upstream_closed = threading.Event()
        self.gateway.script = [self.stalling_script(upstream_closed)]
        sock = self.start_stream()
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            sock.close()
            self.assertTrue(upstream_closed.wait(5))
            self.assertTrue(self.proxy.inflight.wait_idle(5))
        self.assertEqual([r.levelname for r in logs.records], ["INFO"])
        self.assertIn("status=200", logs.output[0])
        self.assertIn("client closed the connection", logs.output[0])

    def test_hundred_abandoned_streams_leave_nothing_behind(self):
        self.post("/v1/messages", SIMPLE)  # warm up: token fetched, watcher thread started
        self.gateway.script = [self.stalling_script(threading.Event()) for _ in range(101)]
        self.start_stream().close()
        self.assertTrue(self.proxy.inflight.wait_idle(5))
        join_all(self, self.proxy.threads + self.gateway.threads[1:])  # all but the pooled one
        threads, fds = threading.active_count(), fd_count()
        proxy_started, gateway_started = len(self.proxy.threads), len(self.gateway.threads)
        for _ in range(100):
            self.start_stream().close()
        self.assertTrue(self.proxy.inflight.wait_idle(10))
        join_all(self, self.proxy.threads[proxy_started:] + self.gateway.threads[gateway_started:])
        self.assertLessEqual(threading.active_count(), threads)
        self.assertLessEqual(fd_count(), fds)


DEEP = b"[" * 20000 + b"]" * 20000


class DeepJsonAnswerTests(ProxyTestCase):
    """JSON nested past Python's recursion limit, from GitLab or the gateway."""

    def test_token_exchange(self):
        self.gitlab.script = [lambda h: h.send_bytes(201, b'{"token": ' + DEEP + b"}")]
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 502)
        self.assertIn("did not answer JSON", resp.error["message"])

    def test_gateway_answers_and_errors(self):
        deep_answer = b'{"type": "message", "content": ' + DEEP + b', "usage": {"input_tokens": 1}}'
        self.gateway.script = [lambda h, r: h.send_bytes(200, deep_answer)] * 2 + [
            lambda h, r: h.send_bytes(400, b'{"detail": ' + DEEP + b"}")]
        resp = self.post("/v1/messages", SIMPLE)  # relayed as it is
        self.assertEqual((resp.status, resp.body), (200, deep_answer))
        resp = self.request("POST", "/v1/chat/completions", {"model": "claude-sonnet-4-6", "messages": [
            {"role": "user", "content": "x"}]})  # translated: the proxy must read it
        self.assertEqual(resp.status, 502)
        self.assertIn("could not translate", resp.json()["error"]["message"])
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 400)
        self.assertIn("GitLab AI gateway answered 400", resp.error["message"])

    def test_stream_frames(self):
        frames = text_stream("claude-sonnet-4-6")
        frames.insert(1, b"event: message_delta\ndata: " + DEEP + b"\n\n")
        self.gateway.script = [lambda h, r: h.send_stream(frames)]
        resp = self.post("/v1/messages", dict(SIMPLE, stream=True))
        self.assertEqual(resp.body, b"".join(frames))


class IdleThreadTests(ProxyTestCase):
    def test_an_idle_proxy_runs_at_most_three_threads(self):
        proxy = self.tracked_proxy()
        before = set(threading.enumerate())  # the serving thread among them: the main one in use
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 200)
        self.assertEqual(self.post("/v1/messages", dict(SIMPLE, stream=True), proxy=proxy).status, 200)
        join_all(self, proxy.threads)
        fakes = set(self.gateway.threads + self.gitlab.threads)
        started = [t.name for t in set(threading.enumerate()) - before - fakes]
        self.assertLessEqual(1 + len(started), 3, started)


class TokenFaultTests(ProxyTestCase):
    config_overrides = {"token_timeout": 0.3}

    def test_gitlab_unreachable_fails_fast_with_502(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proxy = self.make_proxy(instance_url="http://127.0.0.1:%d" % port)
        resp = self.post("/v1/messages", SIMPLE, proxy=proxy)
        self.assertEqual(resp.status, 502)
        self.assertIn("cannot reach GitLab", resp.error["message"])
        self.assertIn("127.0.0.1:%d" % port, resp.error["message"])

    def test_slow_gitlab_gives_503_and_nothing_is_cached(self):
        self.gitlab.gate = threading.Event()
        self.addCleanup(self.gitlab.gate.set)
        results = []
        threads = [threading.Thread(target=lambda: results.append(self.post("/v1/messages", SIMPLE)))
                   for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual({r.status for r in results}, {503})
        self.assertIn("did not answer the token exchange within 0.3 s", results[0].error["message"])
        self.assertEqual(self.gitlab.max_active, 1)
        self.gitlab.gate.set()
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)


# --- shutdown ---------------------------------------------------------------------------

@unittest.skipIf(os.name != "posix", "signals are POSIX; Ctrl-C on Windows takes the same path")
class ShutdownTests(ProxyTestCase):
    def start_process(self, grace="5", **settings):
        environ = dict(os.environ, GITLAB_TOKEN=GITLAB_TOKEN, GITLAB_INSTANCE_URL=self.gitlab.url,
                       GITLAB_AI_GATEWAY_URL=self.gateway.url, PORT="0", SHUTDOWN_GRACE=grace, **settings)
        proc, port = spawn_proxy(self, [], environ)
        return proc, port

    def line_with(self, proc, text):
        line = b""
        while text not in line:
            line = proc.stderr.readline()
            self.assertTrue(line, "the proxy ended before logging %r" % text)
        return line

    def kept_alive(self, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/livez")
        resp = conn.getresponse()
        self.assertEqual((resp.read(), resp.getheader("Connection")), (b'{"status": "ok"}', None))
        return conn

    def test_a_drain_serves_with_connection_close_then_closes_the_idle_connections(self):
        import signal
        proc, port = self.start_process(DRAIN_SECONDS="1")
        used, idle = self.kept_alive(port), self.kept_alive(port)
        proc.send_signal(signal.SIGTERM)
        self.line_with(proc, b"draining for 1s: /readyz answers 503")
        ready = self.request("GET", "/readyz", proxy=type("P", (), {"server_address": ("127.0.0.1", port)}))
        self.assertEqual((ready.status, ready.headers["Connection"]), (503, "close"))  # new ones still taken
        used.request("POST", "/v1/messages", json.dumps(SIMPLE), {"anthropic-version": "2023-06-01"})
        resp = used.getresponse()  # a kept-alive connection is served, and told to go elsewhere next
        self.assertEqual((resp.status, resp.getheader("Connection")), (200, "close"))
        resp.read()
        line = self.line_with(proc, b"shutting down")  # the drain is over
        self.assertIn(b"1 idle connection(s) closed", line)
        idle.sock.settimeout(5)
        self.assertEqual(idle.sock.recv(1), b"")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        self.assertEqual(proc.wait(10), 0)

    def test_without_a_drain_idle_connections_close_at_the_signal(self):
        import signal
        proc, port = self.start_process()
        idle = self.kept_alive(port)
        proc.send_signal(signal.SIGTERM)
        idle.sock.settimeout(5)
        self.assertEqual(idle.sock.recv(1), b"")
        # Closed as idle, or (if its thread had yet to leave the request it just answered) by
        # that thread at once: either way, closed at the signal.
        self.assertRegex(self.line_with(proc, b"shutting down"), rb"[01] idle connection\(s\) closed")
        self.assertEqual(proc.wait(10), 0)

    def test_sigterm_lets_streams_finish_then_exits_zero(self):
        import signal
        release = threading.Event()
        self.addCleanup(release.set)
        frames = text_stream("claude-sonnet-4-6")
        self.gateway.script = [lambda h, r: h.send_stream(frames, gates={4: release})]
        proc, port = self.start_process()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/messages", json.dumps(dict(SIMPLE, stream=True)),
                     {"anthropic-version": "2023-06-01"})
        resp = conn.getresponse()
        head = resp.read1(65536)
        proc.send_signal(signal.SIGTERM)
        line = b""
        while b"shutting down" not in line:  # logged once the listening socket is closed
            line = proc.stderr.readline()
            self.assertTrue(line, "the proxy ended without shutting down")
        self.assertIn(b"for 1 request(s)", line)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        release.set()
        self.assertEqual(head + resp.read(), b"".join(frames))
        self.assertEqual(proc.wait(10), 0)

    def test_grace_period_is_bounded(self):
        import signal
        never = threading.Event()
        self.addCleanup(never.set)
        self.gateway.script = [lambda h, r: h.send_stream(text_stream("m"), gates={4: never})]
        proc, port = self.start_process(grace="0.5")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/messages", json.dumps(dict(SIMPLE, stream=True)),
                     {"anthropic-version": "2023-06-01"})
        conn.getresponse().read1(65536)
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(10), 0)
        self.assertIn(b"still running after 0.5s", proc.stderr.read())


# --- bad input --------------------------------------------------------------------------

def raw_exchange(port, data, shut=True, timeout=5):
    """Send raw bytes, half-close, read everything the proxy answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        if shut:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the proxy answered and closed first (a refusal): its answer is still here
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


def parse_raw(data):
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    return status, head.decode("latin-1"), body


class BadInputTests(ProxyTestCase):
    config_overrides = {"max_body": 4096}

    def check(self, resp, status, fragment, error_type=None):
        self.assertEqual(resp.status, status, resp.body)
        self.assertIn(fragment, resp.error["message"])
        if error_type:
            self.assertEqual(resp.error["type"], error_type)
        self.assertEqual(self.request("GET", "/").status, 200)

    def test_malformed_json(self):
        self.check(self.post("/v1/messages", b'{"model": '), 400, "not valid JSON", "invalid_request_error")

    def test_json_that_is_not_an_object(self):
        self.check(self.post("/v1/messages", b'["model"]'), 400, "must be a JSON object")
        self.check(self.post("/v1/messages", b'"hi"'), 400, "not a string")

    def test_ill_typed_model_and_messages_reach_upstream_and_come_back_clearly(self):
        self.check(self.post("/v1/messages", {"model": 5, "messages": "x"}), 400, "needs a \"model\" string")
        resp = self.post("/v1/messages", {"model": ["a"], "max_tokens": 5})
        self.assertEqual(resp.status, 400)

    def test_body_over_the_limit_is_refused_unread(self):
        data = raw_exchange(self.proxy.server_address[1],
                            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n", shut=False)
        status, head, body = parse_raw(data)
        self.assertEqual(status, 413)
        self.assertIn("Connection: close", head)
        self.assertEqual(json.loads(body)["error"]["type"], "request_too_large")
        self.assertEqual(self.gateway_calls(), [])

    def test_chunked_body_over_the_limit(self):
        payload = b"2000\r\n" + b"x" * 0x2000 + b"\r\n0\r\n\r\n"
        data = raw_exchange(self.proxy.server_address[1], b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n" + payload)
        self.assertEqual(parse_raw(data)[0], 413)

    def test_chunked_request_bodies_are_accepted(self):
        body = json.dumps(SIMPLE).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 10]), body[i:i + 10]) for i in range(0, len(body), 10))
        data = raw_exchange(self.proxy.server_address[1], b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
                            b"anthropic-version: 2023-06-01\r\nTransfer-Encoding: chunked\r\n\r\n"
                            + chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
        status, _, _ = parse_raw(data)
        self.assertEqual(status, 200)
        self.assertEqual(self.gateway_calls()[0].body, body)

    def test_missing_and_wrong_content_length(self):
        status, _, body = parse_raw(raw_exchange(self.proxy.server_address[1],
                                                 b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertEqual(status, 411)
        self.assertIn("Content-Length", json.loads(body)["error"]["message"])
        for value in (b"abc", b"-1", b"1, 2"):
            status, _, _ = parse_raw(raw_exchange(self.proxy.server_address[1], b"POST /v1/messages HTTP/1.1\r\n"
                                                  b"Host: x\r\nContent-Length: " + value + b"\r\n\r\n{}"))
            self.assertEqual(status, 400, value)

    def test_body_shorter_than_its_content_length_gets_a_400_then_close(self):
        # The client sends part of the body and shuts down its sending side: it still reads.
        data = raw_exchange(self.proxy.server_address[1], b"POST /v1/messages HTTP/1.1\r\n"
                            b"Host: x\r\nContent-Length: 100\r\n\r\n{\"model\": 1}")
        status, head, body = parse_raw(data)
        self.assertEqual(status, 400)
        self.assertIn("Connection: close", head)
        self.assertIn("ended after 12 of the 100 bytes", json.loads(body)["error"]["message"])
        self.assertTrue(self.proxy.inflight.wait_idle(5))
        self.assertEqual(self.gateway_calls(), [])

    def test_deeply_nested_json_is_a_400_on_every_route(self):
        proxy = self.make_proxy(max_body=gdp.MIB)
        for deep in (b"[" * 20000 + b"]" * 20000, b'{"a":' * 20000 + b"1" + b"}" * 20000):
            body = b'{"model": "claude-sonnet-4-6", "messages": ' + deep + b"}"
            for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions", "/v1/responses"):
                resp = self.post(path, body, proxy=proxy)
                self.assertEqual(resp.status, 400, (path, resp.body[:200]))
                error = resp.json()["error"]
                self.assertEqual(error["type"], "invalid_request_error")
                self.assertIn("nested too deeply", error["message"])
        self.assertEqual(self.gateway_calls(), [])

    def test_unsupported_methods(self):
        for method in ("PUT", "DELETE", "PATCH"):
            resp = self.request(method, "/v1/messages", b"{}")
            self.assertEqual(resp.status, 405, method)
            self.assertEqual(resp.headers["Allow"], "POST")
        status, _, body = parse_raw(raw_exchange(self.proxy.server_address[1], b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertEqual(status, 405)
        self.assertEqual(json.loads(body)["type"], "error")
        status, _, _ = parse_raw(raw_exchange(self.proxy.server_address[1],
                                              b"CONNECT gitlab.com:443 HTTP/1.1\r\nHost: gitlab.com\r\n\r\n"))
        self.assertEqual(status, 405)

    def test_very_long_urls_and_headers(self):
        status, _, body = parse_raw(raw_exchange(self.proxy.server_address[1],
                                                 b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"))
        self.assertEqual(status, 414)
        self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")
        status, _, _ = parse_raw(raw_exchange(self.proxy.server_address[1],
                                              b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n"))
        self.assertEqual(status, 431)
        status, _, _ = parse_raw(raw_exchange(self.proxy.server_address[1], b"GET / HTTP/1.1\r\n"
                                              + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"))
        self.assertEqual(status, 431)

    def test_non_utf8_bytes(self):
        self.check(self.post("/v1/messages", b'{"model": "\xff\xfe"}'), 400, "not valid UTF-8")
        status, _, body = parse_raw(raw_exchange(self.proxy.server_address[1],
                                                 b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertEqual(status, 404)
        json.loads(body)

    def test_header_injection_in_echoed_values(self):
        self.gateway.script = [lambda h, r: h.send_json(200, message_json("m"), [
            ("x-request-id", "abc\x0b<script>\"x\"def"), ("Set-Cookie", "session=1"),
            ("Server", "gateway/1.0"), ("anthropic-ratelimit-requests-remaining", "9")])]
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.headers["request-id"], "abcscriptxdef")
        self.assertIsNone(resp.headers.get("Set-Cookie"))
        self.assertNotIn("gateway", resp.headers.get("Server"))
        self.assertEqual(resp.headers["anthropic-ratelimit-requests-remaining"], "9")
        data = raw_exchange(self.proxy.server_address[1], b"GET /x%0d%0aSet-Cookie:%20a=b HTTP/1.1\r\nHost: x\r\n\r\n")
        status, head, _ = parse_raw(data)
        self.assertEqual(status, 404)
        self.assertNotIn("Set-Cookie", head)

    def test_slow_loris_client_is_dropped(self):
        proxy = self.tracked_proxy(client_timeout=0.3)
        sock = socket.create_connection(("127.0.0.1", proxy.server_address[1]), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-")
        self.assertEqual(sock.recv(65536), b"")  # the proxy gave up on us
        join_all(self, proxy.threads)  # and its thread ended


class FuzzTests(ProxyTestCase):
    """A few thousand generated malformed requests; the proxy must answer each sanely."""

    config_overrides = {"max_body": 2048, "client_timeout": 2.0}
    PIECES = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"\x00", b" ", b"/", b"/v1/messages", b"/v1/models/",
              b"?beta=true", b"%00", b"%0d%0a", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"\r\n", b"\n",
              b"Content-Length: ", b"Transfer-Encoding: chunked", b"Content-Length: 5", b"x-api-key: \r\n",
              b"anthropic-beta: \xff", b"{", b"}", b'"model"', b":", b"\xc3\x28", b"0\r\n\r\n", b"ffffffff\r\n",
              b"Expect: 100-continue", b"Host: \x7f", b":", b"a" * 300, b"\t"]

    def generate(self, rng):
        if rng.random() < 0.5:
            return b"".join(rng.choice(self.PIECES) for _ in range(rng.randint(1, 25)))
        body = rng.choice([b"{}", b'{"model":"sonnet","messages":[]}', b"[", b"\xff" * 5, b"x" * 3000,
                           json.dumps({"model": rng.random()}).encode()])
        length = rng.choice([len(body), 0, len(body) + 1, max(0, len(body) - 1)])
        path = rng.choice([b"/v1/messages", b"/v1/v1/messages?beta=true", b"/v1/messages/count_tokens",
                           b"/v1/models?limit=" + str(rng.randint(-5, 2000)).encode(), b"/", b"/x"])
        return (rng.choice([b"POST ", b"GET ", b"PUT "]) + path + b" HTTP/1.1\r\nHost: x\r\n"
                b"anthropic-version: 2023-06-01\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n" + body)

    def test_fuzz(self):
        rng = random.Random(20261122)
        port = self.proxy.server_address[1]
        for _ in range(2500):
            data = raw_exchange(port, self.generate(rng), timeout=10)
            if not data:
                continue  # the request never completed: closing is the right answer
            self.assertTrue(data.startswith(b"HTTP/1.1 "), data[:100])
            status, head, body = parse_raw(data)
            self.assertLess(status, 500, data[:300])
            if status >= 400 and b"Content-Length: 0" not in head.encode():
                self.assertEqual(json.loads(body.split(b"HTTP/1.1 ")[0])["type"], "error")
        self.assertEqual(self.request("GET", "/").status, 200)
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)


# --- structured fuzzing: every translation, fed what clients and the gateway might send -----
# Each target takes `choose(n)` (a number below n) from a seeded random generator here, or
# from atheris' coverage-guided data in .ci/fuzz.py, builds its input by changing valid
# requests and answers at random places with values of OpenAI's and Anthropic's vocabulary,
# and lets through only the proxy's own errors.

FUZZ_KEYS = ("model", "messages", "role", "content", "type", "text", "image_url", "url", "tool_calls",
             "id", "function", "name", "arguments", "tool_call_id", "tools", "parameters", "description",
             "tool_choice", "parallel_tool_calls", "response_format", "json_schema", "schema", "max_tokens",
             "max_completion_tokens", "temperature", "top_p", "stop", "user", "reasoning_effort", "stream",
             "stream_options", "include_usage", "n", "logprobs", "refusal", "index", "delta", "message",
             "content_block", "partial_json", "thinking", "stop_reason", "usage", "input_tokens",
             "output_tokens", "error", "input", "signature", "input_tokens_details", "cached_tokens")
FUZZ_STRINGS = ("system", "developer", "user", "assistant", "tool", "text", "image_url", "input_text",
                "function", "auto", "none", "required", "json_object", "json_schema", "object", "minimal",
                "low", "high", "xhigh", "max", "tool_use", "tool_result", "text_delta", "thinking_delta",
                "input_json_delta", "message_start", "content_block_start", "content_block_delta",
                "message_delta", "message_stop", "ping", "error", "end_turn", "max_tokens", gdp.JSON_TOOL,
                "claude-sonnet-4-6", "claude-opus-4-5-20251101", "gpt-5.3-codex", PNG, "https://x.example/a.png",
                "data:image/tiff;base64,AA==", "{}", '{"a": 1}', "[1]", "", "\u00e9\x00")


def fuzz_value(choose, depth=0):
    kind = choose(8 if depth < 3 else 5)
    if kind < 3:
        return (None, True, False, 0, -1, 1, 7, 2 ** 40, 1.5, -0.5, float("nan"))[choose(11)]
    if kind < 5:
        return (FUZZ_STRINGS + FUZZ_KEYS)[choose(len(FUZZ_STRINGS) + len(FUZZ_KEYS))]
    if kind < 7:
        return [fuzz_value(choose, depth + 1) for _ in range(choose(4))]
    return {FUZZ_KEYS[choose(len(FUZZ_KEYS))]: fuzz_value(choose, depth + 1) for _ in range(choose(4))}


def fuzz_change(choose, value):
    """value with one thing somewhere in it replaced, added or dropped."""
    if isinstance(value, dict) and value and choose(4):
        key = list(value)[choose(len(value))]
        if choose(8) == 0:
            del value[key]
        else:
            value[key if choose(6) else FUZZ_KEYS[choose(len(FUZZ_KEYS))]] = fuzz_change(choose, value[key])
        return value
    if isinstance(value, list) and value and choose(4):
        index = choose(len(value))
        value[index] = fuzz_change(choose, value[index])
        return value
    return fuzz_value(choose)


def fuzzed(choose, seeds):
    value = json.loads(json.dumps(seeds[choose(len(seeds))]))
    for _ in range(1 + choose(3)):
        value = fuzz_change(choose, value)
    return value


TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"x": {"type": "string"}}}}}
CHAT_SEEDS = (
    {"model": "claude-sonnet-4-6", "max_tokens": 50, "temperature": 0.5, "top_p": 0.9, "stop": ["X"], "user": "u",
     "messages": [{"role": "system", "content": "s"}, {"role": "developer", "content": [{"type": "text", "text": "d"}]},
                  {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {
                      "url": PNG}}]}]},
    {"model": "claude-opus-4-5-20251101", "reasoning_effort": "minimal", "stream": True, "tools": [TOOL],
     "stream_options": {"include_usage": True}, "tool_choice": "required", "parallel_tool_calls": False,
     "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "text", "text": "a"}],
                  "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "r"}]}]},
    {"model": "claude-fable-5", "reasoning_effort": "xhigh", "max_completion_tokens": 9, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "tool_choice": {
        "type": "function", "function": {"name": "f"}}, "messages": [{"role": "user", "content": "x"}]})
MESSAGE_SEEDS = (message_json("claude-sonnet-4-6"), {
    "id": "msg_1", "type": "message", "model": "m", "stop_reason": "tool_use", "content": [
        {"type": "thinking", "thinking": "t", "signature": "s"}, {"type": "text", "text": "x"},
        {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
        {"type": "tool_use", "id": "j", "name": gdp.JSON_TOOL, "input": {"b": 2}}],
    "usage": {"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": 3}})
EVENT_SEEDS = tuple(json.loads(frame.split(b"data: ", 1)[1]) for frame in
                    rich_stream("claude-sonnet-4-6") + text_stream("claude-sonnet-4-6")) + (
    {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "j",
                                                                  "name": gdp.JSON_TOOL, "input": {}}})


def fuzz_chat_request(choose):
    """A client's chat completions request, as far as the translation for the model that
    serves it (and again for a fallback)."""
    try:
        members = gdp.parse_body(json.dumps(fuzzed(choose, CHAT_SEEDS)).encode())
        model = CATALOG.resolve(members.get("model") or "")
        adapter = gdp.ChatAdapter(members, model, CATALOG, 1) if CATALOG.spec(model).api == "anthropic" \
            else gdp.OpenAIAdapter("/v1/chat/completions", members, b"", model, CATALOG)
        json.loads(adapter.body(("claude-opus-4-5-20251101", "claude-sonnet-5", "gpt-5.4-mini")[choose(3)]))
    except gdp.ProxyError:
        pass


def fuzz_chat_answer(choose):
    """The gateway's answer to a translated request, whole or streamed, translated back."""
    adapter = gdp.ChatAdapter(json.loads(json.dumps(CHAT_SEEDS[choose(len(CHAT_SEEDS))])), "claude-sonnet-4-6",
                              CATALOG, 1)
    try:
        if choose(3) == 0:
            json.loads(adapter.answer(json.dumps(fuzzed(choose, MESSAGE_SEEDS)).encode()))
        for _ in range(1 + choose(12)):
            event = fuzzed(choose, EVENT_SEEDS) if choose(3) else EVENT_SEEDS[choose(len(EVENT_SEEDS))]
            adapter.feed(b"event: x\ndata: " + json.dumps(event).encode() + b"\n\n")
    except gdp.ProxyError:
        pass


def fuzz_pass_through(choose):
    """The Messages and Responses routes and the GPT chat relay: bodies, events, answers."""
    try:
        members = gdp.parse_body(json.dumps(fuzzed(choose, CHAT_SEEDS + (SIMPLE,))).encode())
        kind = (gdp.Adapter, gdp.OpenAIAdapter)[choose(2)]
        adapter = kind(("/v1/messages", "/v1/responses", "/v1/chat/completions")[choose(3)], members, b"{}",
                       CATALOG.resolve(members.get("model") or ""), CATALOG)
        adapter.body(("gpt-5.4-mini", "claude-sonnet-5")[choose(2)])
        adapter.feed(b"data: " + json.dumps(fuzzed(choose, EVENT_SEEDS + MESSAGE_SEEDS)).encode() + b"\n\n")
        adapter.answer(json.dumps(fuzzed(choose, MESSAGE_SEEDS)).encode())
    except gdp.ProxyError:
        pass


def fuzz_helpers(choose):
    """The pure helpers that read what clients send: targets, query strings, keys, bodies."""
    words = FUZZ_STRINGS + ("/v1/v1/messages", "?", "&", "=", "%00", "limit", "after_id", "before_id", "Bearer ",
                            "Basic ", "x-api-key", "chunked", "10.0.0.1", "::1", ",", "1", "-3", "\r\n", "ff")
    text = "".join(words[choose(len(words))] for _ in range(choose(6)))
    headers = http.client.HTTPMessage()
    for _ in range(choose(4)):
        headers[("Authorization", "x-api-key", "Content-Length", "Transfer-Encoding", "anthropic-beta",
                 "X-Forwarded-For", "accept")[choose(7)]] = text
    try:
        path, query = gdp.split_target(text)
        gdp.parse_page_args(query)
    except gdp.ProxyError:
        pass
    gdp.presented_key(headers)
    gdp.request_headers(headers)
    gdp.client_address(text, headers.get_all("X-Forwarded-For") or [], gdp.parse_networks("10.0.0.0/8,::1"))
    gdp.parse_retry_after(text)
    try:
        gdp.read_body(headers, io.BytesIO(text.encode("utf-8", "replace")), 64)
    except gdp.ProxyError:
        pass


FUZZ_TARGETS = {"chat_request": fuzz_chat_request, "chat_answer": fuzz_chat_answer,
                "pass_through": fuzz_pass_through, "helpers": fuzz_helpers}


class TypedInputTests(ProxyTestCase):
    """What clients and the gateway send is checked against the types their APIs document:
    a client's mistake is a 400 naming the field, the gateway's a 502 or an error frame."""

    USER = [{"role": "user", "content": "hi"}]

    def chat(self, payload):
        return self.request("POST", "/v1/chat/completions", dict({"model": "claude-sonnet-4-6"}, **payload),
                            {"Content-Type": "application/json"})

    def test_client_fields_of_the_wrong_type_get_a_400_naming_them(self):
        text = lambda value: [{"type": "text", "text": value}]  # noqa: E731
        cases = [({"tools": 5}, "tools must be an array, not a number"),
                 ({"tools": True}, "tools must be an array, not true"),
                 ({"reasoning_effort": {"a": 1}}, "reasoning_effort must be a string, not an object"),
                 ({"reasoning_effort": ["high"]}, "reasoning_effort must be a string, not an array"),
                 ({"stream": "yes"}, "stream must be a boolean, not a string"),
                 ({"messages": [{"role": "system", "content": text(5)}] + self.USER},
                  "messages[0].content[0].text must be a string, not a number"),
                 ({"messages": [{"role": "developer", "content": text(None)}, {"role": "user", "content": text([1])}]},
                  "messages[1].content[0].text must be a string, not an array"),
                 ({"messages": self.USER + [{"role": "assistant", "content": text({"a": 1})}]},
                  "messages[1].content[0].text must be a string, not an object"),
                 ({"messages": self.USER + [{"role": "assistant", "tool_calls": [{"id": "c", "function": {
                     "name": "f", "arguments": {"a": 1}}}]}]},
                  "messages[1].tool_calls[0].function.arguments must be a string, not an object"),
                 ({"messages": [{"role": "system", "content": "only"}], "reasoning_effort": "minimal"},
                  "messages need a user message")]
        for extra, fragment in cases:
            resp = self.chat(dict({"messages": self.USER}, **extra))
            self.assertEqual(resp.status, 400, (extra, resp.body))
            self.assertEqual(resp.json()["error"]["type"], "invalid_request_error")
            self.assertIn(fragment, resp.json()["error"]["message"])
        self.assertEqual(self.gateway_calls(), [])

    def test_a_model_that_is_not_a_string_is_a_400_on_every_route(self):
        for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions", "/v1/responses"):
            for model in (5, ["claude-sonnet-4-6"], {"id": "claude-sonnet-4-6"}, True):
                resp = self.post(path, {"model": model, "messages": self.USER, "max_tokens": 5, "input": "hi"})
                self.assertEqual(resp.status, 400, (path, model))
                self.assertIn('the request needs a "model" string', resp.json()["error"]["message"])
        self.assertEqual(self.gateway_calls(), [])

    def test_a_translated_answer_with_a_field_of_the_wrong_type_is_a_502(self):
        self.gateway.wrong_types = {"message": {"content": "not a list"}}
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            resp = self.chat({"messages": self.USER})
            self.assertTrue(self.proxy.inflight.wait_idle(5))
        self.assertEqual((resp.status, resp.json()["error"]["type"]), (502, "server_error"))
        self.assertIn("could not translate (message.content must be an array, not a string)",
                      resp.json()["error"]["message"])
        lines = [line for line in logs.output if "could not translate" in line]
        self.assertEqual(len(lines), 1)
        self.assertIn("request-id=" + resp.headers["request-id"], lines[0])

    def test_a_translated_stream_with_a_field_of_the_wrong_type_ends_with_an_error_frame(self):
        self.gateway.wrong_types = {"content_block_delta": {"delta": 5}}
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            resp = self.chat({"messages": self.USER, "stream": True})  # read to its end: not torn
            self.assertTrue(self.proxy.inflight.wait_idle(5))
        self.assertEqual(resp.status, 200)
        frames = [json.loads(f[6:]) for f in resp.body.decode().split("\n\n") if f.startswith("data: {")]
        self.assertEqual(frames[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertIn("content_block_delta.delta must be an object, not a number", frames[-1]["error"]["message"])
        self.assertNotIn(b"[DONE]", resp.body)
        cut = [r.getMessage() for r in logs.records if r.levelname == "WARNING"]
        self.assertEqual(len(cut), 1)
        self.assertIn("stream %s cut: GitLab's AI gateway sent an answer" % resp.headers["request-id"], cut[0])

    def test_the_pass_through_routes_relay_such_answers_byte_for_byte(self):
        self.gateway.wrong_types = wrong = {"content_block_delta": {"delta": 5}, "message": {"content": "x"}}
        resp = self.post("/v1/messages", dict(SIMPLE, stream=True))
        self.assertEqual(resp.body, b"".join(mistyped(f, wrong) for f in text_stream("claude-sonnet-4-6")))
        self.assertEqual(self.post("/v1/messages", SIMPLE).json()["content"], "x")

    def test_every_crash_structured_fuzzing_found_is_now_the_proxys_own_error(self):
        crashed = [{"tools": 5}, {"reasoning_effort": {}}, {"messages": [{"role": "system", "content": "s"}],
                                                             "reasoning_effort": "minimal"},
                   {"messages": [{"role": "system", "content": [{"type": "text", "text": True}]}]},
                   {"messages": [{"role": "assistant", "content": [{"type": "text", "text": {}}]}]},
                   {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {
                       "name": "f", "arguments": 1}}]}]}]
        for req in crashed:
            with self.assertRaises(gdp.BadRequest):
                gdp.ChatAdapter(dict({"messages": self.USER}, **req), "claude-sonnet-4-6", CATALOG, 1)
        events = [{"type": "message_start", "message": True}, {"type": "content_block_start", "content_block": "x"},
                  {"type": "content_block_start", "index": {}, "content_block": {"type": "tool_use", "name": "f"}},
                  {"type": "content_block_delta", "delta": "x"}, {"type": "content_block_delta", "index": {},
                                                                 "delta": {"type": "input_json_delta", "partial_json": "{"}},
                  {"type": "message_delta", "delta": "x"}, {"type": "message_delta", "delta": {"stop_reason": []}},
                  {"type": "error", "error": []}, {"type": "error", "error": {"type": []}}]
        for event in events:
            adapter = gdp.ChatAdapter({"messages": self.USER}, "claude-sonnet-4-6", CATALOG, 1)
            with self.assertRaises(gdp.UpstreamUnreachable):
                adapter.feed(b"data: " + json.dumps(event).encode() + b"\n\n")
        for message in ({"content": 5}, {"content": [1]}, {"content": [{"type": "text", "text": 2}]}, {"stop_reason": []}):
            with self.assertRaises(gdp.UpstreamUnreachable):
                gdp.ChatAdapter({"messages": self.USER}, "claude-sonnet-4-6", CATALOG, 1).answer(json.dumps(message).encode())


class TranslationPropertyTests(unittest.TestCase):
    """Thousands of generated requests and gateway answers through each translation (seeded:
    a failure is repeatable). Only the proxy's own errors may come out."""

    def test_only_the_proxys_own_errors_come_out(self):
        for name, target in FUZZ_TARGETS.items():
            rng = random.Random(name)
            for n in range(2500):
                state = rng.getstate()
                try:
                    target(rng.randrange)
                except Exception as exc:
                    rng.setstate(state)
                    self.fail("%s, case %d: %r (repeat with rng state %s)" % (name, n, exc, hash(state)))


# --- security ---------------------------------------------------------------------------

class ApiKeyTests(ProxyTestCase):
    config_overrides = {"api_key": PROXY_KEY}

    def test_every_route_but_status_needs_the_key(self):
        for method, path in (("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
                             ("GET", "/v1/models"), ("GET", "/v1/models/sonnet"), ("GET", "/stats")):
            resp = self.request(method, path, b"{}" if method == "POST" else None)
            self.assertEqual((resp.status, resp.error["type"]), (401, "authentication_error"), path)
            self.assertIn("PROXY_API_KEY", resp.error["message"])
            resp = self.request(method, path, None, {"x-api-key": "wrong"})
            self.assertEqual(resp.status, 401)
        self.assertEqual(self.request("GET", "/").status, 200)
        self.assertEqual(self.request("HEAD", "/").status, 200)
        self.assertEqual(self.gateway_calls(), [])

    def test_key_as_x_api_key_or_bearer(self):
        self.assertEqual(self.post("/v1/messages", SIMPLE, {"x-api-key": PROXY_KEY}).status, 200)
        self.assertEqual(self.post("/v1/messages", SIMPLE, {"Authorization": "Bearer " + PROXY_KEY}).status, 200)
        self.assertNotIn(PROXY_KEY, json.dumps({k: v for k, v in self.gateway_calls()[0].headers.items()}))

    def test_comparison_is_constant_time(self):
        import inspect
        self.assertIn("hmac.compare_digest", inspect.getsource(gdp.ProxyHandler.authorize))


class BindTests(unittest.TestCase):
    def test_non_loopback_without_key_refuses_to_start(self):
        with self.assertRaises(gdp.ConfigError) as caught:
            load_config(["--host", "0.0.0.0"], {"GITLAB_TOKEN": "t"}, cwd=tempfile.gettempdir())
        self.assertIn("spend your Duo seat", str(caught.exception))
        for argv, env in ((["--host", "0.0.0.0", "--allow-unauthenticated"], {}),
                          (["--host", "0.0.0.0"], {"PROXY_API_KEY": "k"}),
                          (["--host", "::1"], {}), (["--host", "localhost"], {})):
            env["GITLAB_TOKEN"] = "t"
            load_config(argv, env, cwd=tempfile.gettempdir())

    def test_allow_unauthenticated_warns_about_the_risk(self):
        proc, _ = spawn_proxy(self, ["--host", "0.0.0.0", "--allow-unauthenticated"],
                              dict(os.environ, GITLAB_TOKEN="t", PORT="0"))
        warning = proc.stderr.readline().decode()
        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        self.assertIn("WITHOUT a proxy API key", warning)
        self.assertIn("Duo seat", warning)


def spawn_proxy(testcase, argv, environ):
    """Start the program as a process; (process, port) once it listens."""
    env_file = tempfile.NamedTemporaryFile("w", suffix=".env", delete=False)
    env_file.close()
    testcase.addCleanup(os.remove, env_file.name)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gitlab_duo_proxy.py"), "--env-file",
                             env_file.name] + argv, env=environ, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    testcase.addCleanup(proc.stderr.close)
    testcase.addCleanup(lambda: proc.poll() is None and proc.kill())
    line = proc.stderr.readline().decode()
    match = re.search(r"listening on https?://[^ ]+:(\d+) ", line)
    testcase.assertIsNotNone(match, line)
    return proc, int(match.group(1))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """The proxy as a process on a fixed port, its log read as it comes (a full pipe would
    stall it)."""

    def __init__(self, testcase, port, environ, env_file):
        self.lines, self.listening = [], threading.Event()
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gitlab_duo_proxy.py"), "--env-file",
                                      env_file], stderr=subprocess.PIPE, env=dict(environ, PORT=str(port)),
                                     cwd=tempfile.gettempdir())
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()
        testcase.addCleanup(self.close)
        testcase.assertTrue(self.listening.wait(10), self.lines)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.reader.join(10)

    def read(self):
        for line in self.proc.stderr:
            self.lines.append(line.decode())
            if b"listening on" in line:
                self.listening.set()
        self.proc.stderr.close()

    def stop(self):
        self.proc.terminate()  # SIGTERM
        return self.proc.wait(20)


@unittest.skipUnless(shutil.which("haproxy"), "haproxy is not installed here (.ci/run installs it: apt-get install "
                     "haproxy); the README's HAProxy configuration cannot be tried")
class HAProxyTests(ProxyTestCase):
    """The README's HAProxy configuration, run for real in front of two replicas."""

    def start(self, **settings):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        self.env_file = os.path.join(folder, "empty.env")
        open(self.env_file, "w").close()
        self.ports = [free_port(), free_port()]
        self.environ = {k: v for k, v in os.environ.items() if k in ("PATH", "SYSTEMROOT", "HOME", "TMPDIR")}
        self.environ.update(GITLAB_INSTANCE_URL=self.gitlab.url, GITLAB_AI_GATEWAY_URL=self.gateway.url,
                            DRAIN_SECONDS="2", TRUSTED_PROXIES="127.0.0.1", SHUTDOWN_GRACE="10", **settings)
        self.replicas = [Replica(self, port, self.environ, self.env_file) for port in self.ports]
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
            config = re.search(r"```haproxy\n(.*?)```", fh.read(), re.S).group(1)
        self.port = free_port()
        self.stats = os.path.join(folder, "stats.sock")
        for old, new in (("bind :4141", "bind 127.0.0.1:%d" % self.port), ("127.0.0.1:4151", "127.0.0.1:%d" % self.ports[0]),
                         ("127.0.0.1:4152", "127.0.0.1:%d" % self.ports[1]), ("defaults\n", "defaults\n    retries 0\n"),
                         ("global\n", "global\n    stats socket %s level admin\n" % self.stats)):
            self.assertIn(old, config)
            config = config.replace(old, new)
        path = os.path.join(folder, "haproxy.cfg")
        with open(path, "w") as fh:
            fh.write(config)
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(haproxy.stderr.close)
        self.addCleanup(lambda: haproxy.poll() is None and (haproxy.kill(), haproxy.wait(10)))
        self.wait_until_up({"duo1", "duo2"})

    def servers_up(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.stats)
                s.sendall(b"show stat\n")
                data = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        except OSError:
            return set()  # not listening yet
        rows = [line.split(",") for line in data.splitlines() if line.startswith("duo,")]
        return {row[1] for row in rows if row[17] == "UP"}

    def wait_until_up(self, names, timeout=20):
        deadline = time.monotonic() + timeout
        while not names <= self.servers_up():  # another process's state: nothing to wait on but polling
            self.assertLess(time.monotonic(), deadline, "HAProxy never saw %s up" % names)
            time.sleep(0.05)

    def through(self, path, payload, headers=None, source="127.0.0.1", port=None):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30, source_address=(source, 0))
        try:
            conn.request("POST", path, json.dumps(payload), dict({"anthropic-version": "2023-06-01"}, **(headers or {})))
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def test_a_rolling_restart_under_load_fails_no_request(self):
        frames = text_stream("claude-sonnet-4-6", text=("a", "b", "c", "d", "e", "f"))

        def answer(h, r):  # streams last a while, so some are in flight at every restart
            if not r.json().get("stream"):
                return h.send_json(200, message_json("claude-sonnet-4-6"))
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for frame in frames:
                time.sleep(0.02)  # the model writing
                h.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            h.wfile.write(b"0\r\n\r\n")
        self.gateway.script = [answer] * 100000
        self.start(GITLAB_TOKEN=GITLAB_TOKEN)
        stop, done, failures, lock = threading.Event(), [], [], threading.Lock()

        def client(n):
            while not stop.is_set():
                stream = len(done) % 2 == 0
                try:
                    status, body = self.through("/v1/messages", dict(SIMPLE, stream=stream))
                    ok = status == 200 and (body.endswith(frames[-1]) if stream else b'"content"' in body)
                    outcome = None if ok else "%d %s" % (status, body[:200])
                except (OSError, http.client.HTTPException) as exc:
                    outcome = repr(exc)
                with lock:
                    (failures.append(outcome) if outcome else done.append(n))
        clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in clients:
            thread.start()
        self.addCleanup(lambda: [stop.set()] + [t.join(30) for t in clients])
        for index in (0, 1):
            before = len(done)
            self.assertEqual(self.replicas[index].stop(), 0)  # SIGTERM: drained, then stopped
            self.assertTrue(any("draining for 2s" in line for line in self.replicas[index].lines))
            self.replicas[index] = Replica(self, self.ports[index], self.environ, self.env_file)
            self.wait_until_up({"duo1", "duo2"})
            self.assertGreater(len(done), before)  # served throughout
        stop.set()
        for thread in clients:
            thread.join(30)
        self.assertEqual(failures, [])
        self.assertGreater(len(done), 100)

    def test_behind_it_a_flood_of_bad_tokens_is_throttled_and_others_are_served(self):
        ada = "glpat-ADA000000000000000000"
        self.duo.gitlab_tokens.add(ada)
        self.start(PER_USER="1")
        flood, good = [], []
        for n in range(40):  # from 127.0.0.2, through HAProxy, to either replica
            flood.append(self.through("/v1/messages", SIMPLE, {"x-api-key": "glpat-FLOOD%015d" % n},
                                      source="127.0.0.2")[0])
            good.append(self.through("/v1/messages", SIMPLE, {"x-api-key": ada}, source="127.0.0.3")[0])
        self.assertEqual(set(flood), {401, 429})
        self.assertEqual(flood[:10], [401] * 10)  # 429 once a replica has seen ten
        self.assertEqual(good, [200] * 40)
        direct = [self.through("/v1/messages", SIMPLE, {"x-api-key": "glpat-DIRECT%014d" % n,
                                                        "X-Forwarded-For": "198.51.100.%d" % n},
                               source="127.0.0.4", port=self.ports[0])[0] for n in range(12)]
        self.assertEqual(direct, [401] * 10 + [429] * 2)  # its own header is not believed


class OpenProxyTests(ProxyTestCase):
    def test_clients_cannot_choose_upstream_host_path_or_method(self):
        status, _, _ = parse_raw(raw_exchange(self.proxy.server_address[1],
                                              b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"))
        self.assertEqual(status, 404)
        for path in ("/v1/proxy/anthropic/v1/messages", "/ai/v1/proxy/anthropic/v1/messages",
                     "/v1/messages/../../admin", "/api/v4/user"):
            self.assertEqual(self.post(path, SIMPLE).status, 404, path)
        self.assertEqual(self.request("GET", "/v1/messages").status, 405)
        self.assertEqual(self.gateway_calls(), [])

    def test_no_cors_headers_unless_configured(self):
        resp = self.request("GET", "/", headers={"Origin": "https://evil.example"})
        self.assertIsNone(resp.headers.get("Access-Control-Allow-Origin"))
        proxy = self.make_proxy(cors_origins="https://app.example")
        resp = self.request("OPTIONS", "/v1/messages", headers={"Origin": "https://app.example"}, proxy=proxy)
        self.assertEqual(resp.status, 204)
        self.assertEqual(resp.headers["Access-Control-Allow-Origin"], "https://app.example")
        resp = self.request("GET", "/", headers={"Origin": "https://evil.example"}, proxy=proxy)
        self.assertIsNone(resp.headers.get("Access-Control-Allow-Origin"))


class SecretTests(ProxyTestCase):
    config_overrides = {"debug": True, "api_key": PROXY_KEY}

    def secrets(self):
        return [GITLAB_TOKEN, PROXY_KEY] + list(self.duo.issued)

    def test_no_secret_in_a_debug_session_covering_every_path(self):
        auth = {"x-api-key": PROXY_KEY}
        with self.assertLogs("gitlab_duo_proxy", "DEBUG") as logs:
            self.post("/v1/messages", SIMPLE, auth)                      # exchange
            self.post("/v1/messages", dict(SIMPLE, stream=True), auth)   # stream
            self.duo.revoke_all()
            self.post("/v1/messages", SIMPLE, auth)                      # 401, refresh, replay
            self.gateway.script = [lambda h, r: h.send_json(401, {"error": "Forbidden by auth provider"})] * 2
            self.post("/v1/messages", SIMPLE, auth)                      # second 401
            self.gateway.script = [overloaded] * 3
            self.post("/v1/messages", SIMPLE, auth)                      # retries, upstream error
            self.post("/v1/messages", SIMPLE, {"Authorization": "Bearer " + PROXY_KEY + "x"})  # bad key
            self.gitlab.script = [lambda h: h.send_json(401, {"message": "401 Unauthorized"})]
            self.clock.advance(7200)
            self.post("/v1/messages", SIMPLE, auth)                      # token endpoint error
            self.assertTrue(self.proxy.inflight.wait_idle(5))
        text = "\n".join(logs.output)
        self.assertIn("[redacted]", text)
        self.assertIn("token-refreshed", text)
        for secret in self.secrets():
            self.assertNotIn(secret, text)
            self.assertNotIn(secret[-12:], text)

    def test_internal_errors_are_logged_redacted_and_answered_generically(self):
        class Broken(gdp.ProxyHandler):
            def route_list_models(self, query):
                raise RuntimeError("boom with " + GITLAB_TOKEN + " and " + PROXY_KEY)
        proxy = self.make_proxy(Broken, api_key=PROXY_KEY)
        with self.assertLogs("gitlab_duo_proxy", "DEBUG") as logs:
            resp = self.request("GET", "/v1/models", headers={"x-api-key": PROXY_KEY}, proxy=proxy)
        self.assertEqual((resp.status, resp.error["type"]), (500, "api_error"))
        self.assertIn("internal proxy error", resp.error["message"])
        text = "\n".join(logs.output) + resp.body.decode()
        self.assertIn("RuntimeError", text)
        for secret in (GITLAB_TOKEN, PROXY_KEY):
            self.assertNotIn(secret, text)

    def test_env_file_readable_by_others_warns_once(self):
        if os.name != "posix":
            self.skipTest("POSIX permissions")
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, ".env")
        with open(path, "w") as fh:
            fh.write("GITLAB_TOKEN=%s\n" % GITLAB_TOKEN)
        self.addCleanup(os.remove, path)
        os.chmod(path, 0o644)
        _, _, warnings = load_config([], {}, cwd=tmp)
        self.assertEqual(len(warnings), 1)
        self.assertIn("chmod 600", warnings[0])
        self.assertNotIn(GITLAB_TOKEN, warnings[0])
        os.chmod(path, 0o600)
        self.assertEqual(load_config([], {}, cwd=tmp)[2], [])


# --- upstream connections ---------------------------------------------------------------

class CombinedHandler(FakeGatewayHandler):
    """GitLab and its gateway on one host, as with a self-managed instance."""

    refusal = FakeGitLabHandler.refusal

    def do_POST(self):
        if self.path.startswith("/api/"):
            return FakeGitLabHandler.do_POST(self)
        return FakeGatewayHandler.do_POST(self)


class FakeTLSCombined(FakeGateway):
    def __init__(self, state, cert, key):
        super().__init__(state)
        self.RequestHandlerClass = CombinedHandler
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)


class Cert:
    """One certificate for the whole run: RSA key generation takes a moment."""

    paths = None

    @classmethod
    def get(cls):
        if cls.paths is None:
            cls.paths = make_self_signed_cert(tempfile.mkdtemp())
        return cls.paths


class PoolTests(ProxyTestCase):
    def test_hundred_sequential_requests_reuse_one_connection(self):
        for _ in range(100):
            self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.assertLessEqual(self.gateway.connections, 2)
        self.assertEqual(sum(self.proxy.pool.opened.values()), 2)  # gateway + GitLab

    def test_tls_handshakes_are_few_and_shared_with_the_token_endpoint(self):
        cert, key = Cert.get()
        server = start_server(self, FakeTLSCombined(self.duo, cert, key))
        proxy = self.make_proxy(instance_url=server.url, gateway_url=server.url, ca_bundle=cert)
        for _ in range(100):
            self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 200)
        self.assertLessEqual(server.connections, 2)
        self.assertEqual(len([r for r in server.requests if r.path == gdp.DIRECT_ACCESS_PATH]), 1)

    def test_clients_hanging_up_after_a_stream_leave_the_pooled_connection_alone(self):
        for _ in range(30):
            self.assertEqual(self.post("/v1/messages", dict(SIMPLE, stream=True)).status, 200)
        self.assertTrue(self.proxy.inflight.wait_idle(5))
        self.assertLessEqual(self.gateway.connections, 2)
        self.assertEqual(len(self.gateway_calls()), 30)

    def test_untrusted_certificate_is_explained(self):
        cert, key = Cert.get()
        server = start_server(self, FakeTLSCombined(self.duo, cert, key))
        proxy = self.make_proxy(instance_url=server.url, gateway_url=server.url)
        resp = self.post("/v1/messages", SIMPLE, proxy=proxy)
        self.assertEqual(resp.status, 502)
        self.assertIn("not trusted", resp.error["message"])
        self.assertIn("GITLAB_CA_BUNDLE", resp.error["message"])

    def test_dead_pooled_connection_is_replaced_once(self):
        def close_without_answer(h, r):
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        self.assertEqual(self.post("/v1/messages", SIMPLE).status, 200)
        self.gateway.script = [close_without_answer]
        resp = self.post("/v1/messages", SIMPLE)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(len(self.gateway_calls()), 3)
        # A fresh connection that dies is an upstream failure, not retried as stale.
        self.gateway.script = [close_without_answer] * 3
        proxy = self.make_proxy(retries=0)
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 502)

class TimeoutTests(ProxyTestCase):
    def test_gateway_that_never_answers_is_a_504(self):
        never = threading.Event()
        self.addCleanup(never.set)
        self.gateway.script = [lambda h, r: never.wait(10)]
        resp = self.post("/v1/messages", SIMPLE, proxy=self.make_proxy(read_timeout=0.2, retries=0))
        self.assertEqual(resp.status, 504)
        self.assertIn("did not answer within 0.2 s (READ_TIMEOUT)", resp.error["message"])

    def test_client_that_stops_mid_body_is_dropped(self):
        proxy = self.make_proxy(client_timeout=0.2)
        sock = socket.create_connection(("127.0.0.1", proxy.server_address[1]), timeout=5)
        self.addCleanup(sock.close)
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo")
            self.assertEqual(sock.recv(65536), b"")
            self.assertTrue(proxy.inflight.wait_idle(5))
        self.assertIn("status=499", logs.output[-1])
        self.assertIn("client dropped (it sent or read nothing for 0.2 s, CLIENT_TIMEOUT)", logs.output[-1])
        self.assertEqual(self.gateway_calls(), [])


class ConnectProxy(http.server.ThreadingHTTPServer):
    """A corporate HTTP proxy: CONNECT only, with Basic authentication."""

    daemon_threads = True

    def __init__(self):
        self.tunnels = []
        super().__init__(("127.0.0.1", 0), ConnectHandler)


class ConnectHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_CONNECT(self):
        self.server.tunnels.append((self.path, self.headers.get("Proxy-Authorization")))
        if self.headers.get("Proxy-Authorization") != "Basic dXNlcjpwQHNz":  # user:p@ss
            self.send_response(407)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        host, port = self.path.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        self.send_response(200)
        self.end_headers()
        self.close_connection = True
        pump = threading.Thread(target=self.pipe, args=(upstream, self.connection), daemon=True)
        pump.start()
        self.pipe(self.connection, upstream)
        pump.join(5)
        upstream.close()

    @staticmethod
    def pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class CorporateProxyTests(ProxyTestCase):
    def setUp(self):
        super().setUp()
        self.corporate = start_server(self, ConnectProxy())
        self.proxy_url = "http://user:p%%40ss@127.0.0.1:%d" % self.corporate.server_address[1]

    def test_https_through_connect_tunnel(self):
        cert, key = Cert.get()
        server = start_server(self, FakeTLSCombined(self.duo, cert, key))
        proxy = self.make_proxy(instance_url=server.url, gateway_url=server.url, ca_bundle=cert,
                                https_proxy=self.proxy_url)
        for _ in range(3):
            self.assertEqual(self.post("/v1/messages", dict(SIMPLE, stream=True), proxy=proxy).status, 200)
        target = "127.0.0.1:%d" % server.server_address[1]
        self.assertEqual([t[0] for t in self.corporate.tunnels], [target])  # one tunnel, kept alive
        self.assertEqual(self.corporate.tunnels[0][1], "Basic dXNlcjpwQHNz")

    def test_plain_http_also_tunnels_and_no_proxy_bypasses(self):
        proxy = self.make_proxy(http_proxy=self.proxy_url, no_proxy="localhost,gitlab.internal")
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 200)
        self.assertEqual(len(self.corporate.tunnels), 2)  # GitLab and the gateway
        bypass = self.make_proxy(http_proxy=self.proxy_url, no_proxy="127.0.0.1")
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=bypass).status, 200)
        self.assertEqual(len(self.corporate.tunnels), 2)

    def test_proxy_refusal_is_reported_without_credentials(self):
        proxy = self.make_proxy(http_proxy="http://user:wrong@127.0.0.1:%d" % self.corporate.server_address[1],
                                retries=0)
        resp = self.post("/v1/messages", SIMPLE, proxy=proxy)
        self.assertEqual(resp.status, 502)
        self.assertIn("407", resp.error["message"])
        self.assertNotIn("wrong", resp.error["message"])

    def test_proxy_settings_come_from_the_usual_variables(self):
        config, _, _ = load_config([], {"GITLAB_TOKEN": "t", "HTTPS_PROXY": "http://proxy.corp:3128",
                                            "no_proxy": ".corp"}, cwd=tempfile.gettempdir())
        self.assertEqual((config.https_proxy, config.no_proxy), ("http://proxy.corp:3128", ".corp"))
        self.assertNotIn("proxy.corp:3128", repr(config))
        with self.assertRaises(gdp.ConfigError):
            load_config([], {"GITLAB_TOKEN": "t", "HTTPS_PROXY": "https://proxy:3128"},
                            cwd=tempfile.gettempdir())


# --- OpenAI front door ------------------------------------------------------------------



class ChatTranslationTests(unittest.TestCase):
    def plan(self, model="claude-sonnet-4-6", **req):
        req.setdefault("messages", [{"role": "user", "content": "hi"}])
        return gdp.chat_to_anthropic(req, CATALOG.spec(model))

    def test_conversation_with_images_tools_and_results(self):
        body = self.plan(messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is here?"},
                                         {"type": "image_url", "image_url": {"url": PNG}},
                                         {"type": "image_url", "image_url": {"url": "https://x.example/a.jpg"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"a\": 1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": "and?"}]).body
        self.assertEqual(body["system"], "Be brief.\n\nUse tools.")
        self.assertEqual(body["max_tokens"], gdp.DEFAULT_MAX_TOKENS)
        user, assistant, results = body["messages"]
        self.assertEqual(user["content"][1], {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}})
        self.assertEqual(user["content"][2]["source"], {"type": "url", "url": "https://x.example/a.jpg"})
        self.assertEqual(assistant["content"], [
            {"type": "tool_use", "id": "call_1", "name": "look", "input": {"a": 1}},
            {"type": "tool_use", "id": "call_2", "name": "look", "input": {}}])
        self.assertEqual(results["role"], "user")
        self.assertEqual([b["type"] for b in results["content"]], ["tool_result", "tool_result", "text"])
        self.assertEqual(results["content"][1], {"type": "tool_result", "tool_use_id": "call_2",
                                                 "content": [{"type": "text", "text": "two"}]})

    def test_tools_and_tool_choice(self):
        tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
            "type": "object", "properties": {"x": {"type": "string"}}}}}]
        body = self.plan(tools=tools, tool_choice="required", parallel_tool_calls=False).body
        self.assertEqual(body["tools"], [{"name": "f", "description": "d", "input_schema": {
            "type": "object", "properties": {"x": {"type": "string"}}}}])
        self.assertEqual(body["tool_choice"], {"type": "any", "disable_parallel_tool_use": True})
        for choice, expected in (("auto", {"type": "auto"}), ("none", {"type": "none"}),
                                 ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"})):
            self.assertEqual(self.plan(tools=tools, tool_choice=choice).body["tool_choice"], expected)
        with self.assertRaises(gdp.BadRequest):
            self.plan(tools=[{"type": "retrieval"}])

    def test_sampling_stop_user_and_limits(self):
        body = self.plan(temperature=1.7, top_p=0.9, stop="END", max_tokens=100, user="u-1",
                         stream=True, stream_options={"include_usage": True})
        self.assertEqual((body.body["temperature"], body.body["top_p"]), (1.0, 0.9))
        self.assertEqual(body.body["stop_sequences"], ["END"])
        self.assertEqual(body.body["max_tokens"], 100)
        self.assertEqual(body.body["metadata"], {"user_id": "u-1"})
        self.assertTrue(body.stream and body.include_usage and body.body["stream"])
        self.assertEqual(self.plan(max_completion_tokens=7, max_tokens=100).body["max_tokens"], 7)

    def test_response_format_is_a_forced_tool(self):
        plan = self.plan(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}}}})
        self.assertTrue(plan.json_mode)
        self.assertEqual(plan.body["tool_choice"], {"type": "tool", "name": gdp.JSON_TOOL})
        self.assertEqual(plan.body["tools"][0]["input_schema"]["properties"], {"a": {"type": "integer"}})
        self.assertEqual(self.plan(response_format={"type": "json_object"}).body["tools"][0]["input_schema"],
                         {"type": "object"})
        self.assertFalse(self.plan(response_format={"type": "text"}).json_mode)
        for bad in ({"type": "json_schema", "json_schema": {"schema": {"type": "array"}}}, {"type": "yaml"}):
            with self.assertRaises(gdp.BadRequest):
                self.plan(response_format=bad)

    def test_reasoning_effort_becomes_thinking(self):
        # Claude 4.5 and older: a budget of thinking tokens
        body = self.plan(reasoning_effort="medium", max_tokens=1000, temperature=0.2,
                         model="claude-sonnet-4-5-20250929").body
        self.assertEqual(body["thinking"], {"type": "enabled", "budget_tokens": 8192})
        self.assertEqual(body["max_tokens"], 9192)
        self.assertNotIn("temperature", body)
        self.assertNotIn("output_config", body)
        # 4.6 and later: adaptive, with the effort (OpenAI's minimal is Anthropic's low)
        for model, effort, level in (("claude-sonnet-4-6", "medium", "medium"), ("claude-opus-4-7", "high", "high"),
                                     ("claude-opus-5", "minimal", "low"), ("claude-fable-5", "xhigh", "xhigh"),
                                     ("claude-opus-4-6", "xhigh", "high"), ("claude-sonnet-5", "low", "low")):
            body = self.plan(reasoning_effort=effort, max_tokens=1000, model=model).body
            self.assertEqual((body["thinking"], body["output_config"]), ({"type": "adaptive"}, {"effort": level}))
            self.assertGreater(body["max_tokens"], 1000)
        self.assertNotIn("thinking", self.plan(reasoning_effort="none").body)
        with self.assertRaises(gdp.BadRequest):
            self.plan(reasoning_effort="extreme")
        after_tool = self.plan(reasoning_effort="high", messages=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "r"}]).body
        self.assertNotIn("thinking", after_tool)

    def test_unsupported_requests_are_refused_clearly(self):
        cases = [({"n": 2}, "n must be 1"), ({"logprobs": True}, "logprobs"),
                 ({"functions": []}, "use tools"), ({"messages": []}, "non-empty"),
                 ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input_audio"),
                 ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                     "url": "data:image/tiff;base64,AA=="}}]}]}, "base64 images"),
                 ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                     "name": "f", "arguments": "not json"}}]}]}, "JSON object"),
                 ({"messages": [{"role": "function", "content": "x"}]}, "role 'function'"),
                 ({"temperature": "hot"}, "temperature"), ({"max_tokens": 0}, "positive"),
                 ({"tools": [{"type": "function", "function": {"name": "f"}}],
                   "response_format": {"type": "json_object"}}, "cannot be combined")]
        for extra, fragment in cases:
            with self.assertRaises(gdp.BadRequest) as caught:
                self.plan(**extra)
            self.assertIn(fragment, caught.exception.message, extra)

    def test_answer_translation(self):
        plan = self.plan()
        message = {"id": "msg_1", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": "é"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100,
                      "cache_creation_input_tokens": 20}}
        out = gdp.anthropic_to_chat(message, plan, 123)
        choice = out["choices"][0]
        self.assertEqual((out["object"], out["id"], out["created"], out["model"]),
                         ("chat.completion", "chatcmpl-msg_1", 123, "claude-sonnet-4-6"))
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertEqual(choice["message"]["content"], "Let me look.")
        self.assertEqual(choice["message"]["reasoning_content"], "hmm")
        self.assertEqual(choice["message"]["tool_calls"], [{"id": "toolu_1", "type": "function", "function": {
            "name": "look", "arguments": '{"q": "é"}'}}])
        self.assertEqual(out["usage"], {"prompt_tokens": 130, "completion_tokens": 5, "total_tokens": 135,
                                        "prompt_tokens_details": {"cached_tokens": 100},
                                        "completion_tokens_details": {"reasoning_tokens": 0}})
        for stop, finish in (("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"),
                             ("refusal", "content_filter")):
            out = gdp.anthropic_to_chat({"content": [{"type": "text", "text": "x"}], "stop_reason": stop}, plan, 1)
            self.assertEqual(out["choices"][0]["finish_reason"], finish)
        json_plan = self.plan(response_format={"type": "json_object"})
        out = gdp.anthropic_to_chat({"content": [{"type": "tool_use", "name": gdp.JSON_TOOL, "input": {"a": 1}}],
                                     "stop_reason": "tool_use"}, json_plan, 1)
        self.assertEqual((out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]), ('{"a": 1}', "stop"))
        self.assertNotIn("tool_calls", out["choices"][0]["message"])

    def chunks(self, req, frames):
        req.setdefault("messages", [{"role": "user", "content": "hi"}])
        stream = gdp.ChatAdapter(req, "claude-sonnet-4-6", CATALOG, 7)
        out = b"".join(stream.feed(f) for f in frames)
        self.assertTrue(stream.complete)
        self.assertTrue(out.endswith(b"data: [DONE]\n\n"))
        return [json.loads(line[6:]) for line in out.decode().split("\n\n")
                if line.startswith("data: {")]

    def test_stream_translation_with_thinking_and_split_tool_arguments(self):
        chunks = self.chunks(dict(stream=True, stream_options={"include_usage": True}),
                             rich_stream("claude-sonnet-4-6"))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        self.assertEqual(deltas[0], {"role": "assistant", "content": ""})
        self.assertEqual(deltas[1], {"reasoning_content": "Let me check the weather."})
        self.assertEqual(deltas[2], {"tool_calls": [{"index": 0, "id": "toolu_01", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": ""}}]})
        arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[3:] if "tool_calls" in d)
        self.assertEqual(json.loads(arguments), {"city": "Paris"})
        self.assertTrue(all(d["tool_calls"][0]["index"] == 0 for d in deltas[2:] if "tool_calls" in d))
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        self.assertEqual([c["choices"][0]["finish_reason"] for c in finals], ["tool_calls"])
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["prompt_tokens"], 2130)
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 40)
        self.assertTrue(all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-msg_02" for c in chunks))
        self.assertTrue(all("usage" in c for c in chunks))

    def test_stream_translation_of_text_and_json_mode(self):
        chunks = self.chunks(dict(stream=True), text_stream("m"))
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "") for c in chunks), "Hello!")
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertFalse(any("usage" in c for c in chunks))
        json_frames = rich_stream("m")[:1] + [
            sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "t", "name": gdp.JSON_TOOL, "input": {}}}),
            sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": '{"a":'}}),
            sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": ' 1}'}}),
            sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}}),
            sse("message_stop", {"type": "message_stop"})]
        chunks = self.chunks(dict(stream=True, response_format={"type": "json_object"}), json_frames)
        self.assertEqual(json.loads("".join(c["choices"][0]["delta"].get("content", "") for c in chunks)), {"a": 1})
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")


class OpenAIRouteTests(ProxyTestCase):
    def chat(self, payload, **kw):
        return self.request("POST", "/v1/chat/completions", payload,
                            dict({"Authorization": "Bearer sk-dummy", "Content-Type": "application/json"},
                                 **kw.pop("headers", {})), **kw)

    def test_claude_through_chat_completions(self):
        resp = self.chat({"model": "claude-sonnet-4-6", "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "max_tokens": 50})
        self.assertEqual(resp.status, 200, resp.body)
        data = resp.json()
        self.assertEqual(data["choices"][0]["message"], {"role": "assistant", "content": "Hello!"})
        self.assertEqual(data["usage"]["prompt_tokens"], 12)
        self.assertEqual(resp.headers["Content-Type"], "application/json")
        call = self.gateway_calls()[0]
        self.assertEqual(call.path, "/ai/v1/proxy/anthropic/v1/messages")
        self.assertEqual(call.json()["system"], "s")
        self.assertEqual(call.headers["anthropic-version"], "2023-06-01")
        self.assertNotIn("sk-dummy", str(call.headers.items()))

    def test_claude_stream_through_chat_completions(self):
        self.gateway.script = [lambda h, r: h.send_stream(rich_stream("claude-sonnet-4-6"))]
        resp = self.chat({"model": "sonnet", "stream": True, "stream_options": {"include_usage": True},
                          "messages": [{"role": "user", "content": "weather?"}]})
        self.assertEqual(resp.headers["Content-Type"], "text/event-stream")
        lines = [line for line in resp.body.decode().split("\n\n") if line]
        self.assertEqual(lines[-1], "data: [DONE]")
        first = json.loads(lines[0][6:])
        self.assertEqual(first["model"], "claude-sonnet-5")
        self.assertEqual(self.gateway_calls()[0].json()["stream"], True)

    def test_gpt_models_are_relayed_to_the_openai_proxy(self):
        resp = self.chat({"model": "duo-chat-gpt-5-1", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(resp.json()["choices"][0]["message"]["content"], "Hi from GPT")
        call = self.gateway_calls()[0]
        self.assertEqual(call.path, "/ai/v1/proxy/openai/v1/chat/completions")
        self.assertEqual(json.loads(call.body), {"model": "gpt-5.1-2025-11-13", "max_completion_tokens": 20,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        self.assertIsNone(call.headers.get("anthropic-version"))
        resp = self.chat({"model": "gpt-5-mini-2025-08-07", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(resp.body, b"".join(openai_chat_stream("gpt-5-mini-2025-08-07")))

    def test_responses_api(self):
        resp = self.request("POST", "/v1/responses", {"model": "gpt-5.3-codex", "input": "hi", "stream": True},
                            {"Authorization": "Bearer x"})
        self.assertEqual(resp.body, b"".join(responses_stream("gpt-5.3-codex")))
        self.assertEqual(self.gateway_calls()[0].path, "/ai/v1/proxy/openai/v1/responses")
        resp = self.request("POST", "/v1/responses", {"model": "claude-opus-4-6", "input": "hi"})
        self.assertEqual(resp.status, 400)
        self.assertIn("/v1/chat/completions", resp.json()["error"]["message"])

    def test_errors_come_in_openai_shape(self):
        resp = self.chat(b"{nope")
        self.assertEqual(resp.status, 400)
        self.assertEqual(set(resp.json()["error"]), {"message", "type", "param", "code"})
        self.gateway.script = [lambda h, r: h.send_json(400, {"type": "error", "error": {
            "type": "invalid_request_error", "message": "prompt is too long: 300000 tokens > 200000 maximum"}})]
        resp = self.chat({"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(resp.json()["error"]["code"], "context_length_exceeded")
        self.gateway.script = [lambda h, r: h.send_json(402, {"error": "insufficient_credits", "error_code":
                                                              "USAGE_QUOTA_EXCEEDED", "message": "quota"})]
        resp = self.chat({"model": "gpt-5.3-codex", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual((resp.status, resp.json()["error"]["type"]), (402, "insufficient_quota"))
        gpt_error = {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "c"}}
        self.gateway.script = [lambda h, r: h.send_json(400, gpt_error)]
        resp = self.chat({"model": "gpt-5.3-codex", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(resp.json(), gpt_error)

    def test_mid_stream_failure_is_an_openai_error_chunk(self):
        self.gateway.script = [stream_then(text_stream("claude-sonnet-4-6")[:4], FakeHandler.reset)]
        with self.assertLogs("gitlab_duo_proxy", "WARNING"):
            resp = self.chat({"model": "claude-sonnet-4-6", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        last = resp.body.decode().strip().split("\n\n")[-1]
        self.assertIn("broke mid-stream", json.loads(last[6:])["error"]["message"])

    def test_proxy_key_rules_apply(self):
        proxy = self.make_proxy(api_key=PROXY_KEY)
        payload = {"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "x"}]}
        resp = self.chat(payload, proxy=proxy)
        self.assertEqual((resp.status, resp.json()["error"]["type"]), (401, "authentication_error"))
        self.assertEqual(self.chat(payload, proxy=proxy, headers={"Authorization": "Bearer " + PROXY_KEY}).status, 200)

    def test_models_list_serves_both_schemas(self):
        data = self.request("GET", "/v1/models", headers={"Authorization": "Bearer x"}).json()
        ids = [m["id"] for m in data["data"]]
        self.assertIn("gpt-5.3-codex", ids)
        self.assertNotIn("gpt-5-codex", ids)  # removed by GitLab on 2026-07-13
        self.assertEqual(data["object"], "list")
        entry = next(m for m in data["data"] if m["id"] == "gpt-5.3-codex")
        self.assertEqual((entry["object"], entry["owned_by"], entry["type"]), ("model", "openai", "model"))
        self.assertIsInstance(entry["created"], int)


# --- doctor, client set-up, token sources, team mode, statistics ------------------------

class DoctorTests(ProxyTestCase):
    def doctor(self, encoding="utf-8", **overrides):
        overrides.setdefault("instance_url", self.gitlab.url)
        overrides.setdefault("gateway_url", self.gateway.url)
        out = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
        return gdp.Doctor(base_config(**overrides), out, clock=self.clock), out

    def run_doctor(self, inference=True, every_model=False, **overrides):
        doctor, out = self.doctor(**overrides)
        ok = doctor.run(inference=inference, models=every_model)
        return ok, out.buffer.getvalue().decode("utf-8")

    def test_all_checks_pass(self):
        ok, text = self.run_doctor(every_model=True)
        self.assertTrue(ok, text)
        lines = text.splitlines()
        self.assertTrue(all(line.startswith("\u2713") for line in lines), text)
        self.assertIn("signed in as ada; token scopes: ai_features, read_user (expires 2027-01-31)", text)
        self.assertIn("Duo token exchange works (expires in 60 min", text)
        self.assertIn("answers with claude-sonnet-4-6", text)
        self.assertEqual(sum(line.startswith("\u2713 model ") for line in lines), len(gdp.MODEL_CATALOG))
        self.assertNotIn(GITLAB_TOKEN, text)

    def test_unreachable_instance(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ok, text = self.run_doctor(instance_url="http://127.0.0.1:%d" % port)
        self.assertFalse(ok)
        self.assertIn("\u2717 GitLab instance http://127.0.0.1:%d is not reachable" % port, text)
        self.assertIn("fix: check GITLAB_INSTANCE_URL", text)
        self.assertEqual(len(text.splitlines()), 3)  # config ok, instance failed, its fix; nothing after

    def test_instance_url_that_is_not_gitlab(self):
        ok, text = self.run_doctor(instance_url=self.gateway.url)  # reachable, but no GitLab API there
        self.assertFalse(ok)
        self.assertIn("answered HTTP 405 for /api/v4/version", text)
        self.assertIn("fix: GITLAB_INSTANCE_URL must be the address of a GitLab instance", text)

    def test_invalid_token(self):
        self.duo.gitlab_tokens.clear()
        ok, text = self.run_doctor()
        self.assertFalse(ok)
        self.assertIn("\u2717 GitLab rejected the token (HTTP 401)", text)
        self.assertIn("scope ai_features", text)

    def test_exchange_refused(self):
        self.gitlab.script = [lambda h: h.send_json(403, {"message": "403 Forbidden"})]
        ok, text = self.run_doctor()
        self.assertFalse(ok)
        self.assertIn("\u2717 Duo token exchange failed (HTTP 403)", text)
        self.assertIn("third-party agents", text)

    def test_model_checks_cost_nothing(self):
        ok, text = self.run_doctor(inference=False, every_model=True)
        self.assertTrue(ok, text)
        kinds = {(call.json()["model"].startswith("claude"), call.kind) for call in self.gateway_calls()}
        self.assertEqual(kinds, {(True, "count_tokens"), (False, "chat")})  # count_tokens has no usage
        gpt = next(c.json() for c in self.gateway_calls() if c.kind == "chat")
        self.assertEqual(gpt["max_completion_tokens"], 16)

    def test_gateway_refuses_the_default_model(self):
        ok, text = self.run_doctor(default_model="claude-nonexistent-1")
        self.assertFalse(ok)
        self.assertIn("refused claude-nonexistent-1: HTTP 400", text)
        ok, text = self.run_doctor(inference=False, default_model="claude-nonexistent-1")
        self.assertTrue(ok, text)

    def test_models_lists_the_ones_the_gateway_rejects(self):
        ok, text = self.run_doctor(every_model=True, models="+claude-retired-1")
        self.assertFalse(ok)
        self.assertIn("\u2717 model claude-retired-1: HTTP 400", text)
        self.assertIn("MODELS=-claude-retired-1", text)

    def test_ascii_console_gets_plain_marks(self):
        doctor, out = self.doctor(encoding="ascii")
        self.assertTrue(doctor.run(inference=False))
        self.assertTrue(out.buffer.getvalue().startswith(b"OK   configuration"))

    def test_check_command_exit_status(self):
        env = {"GITLAB_TOKEN": GITLAB_TOKEN, "GITLAB_INSTANCE_URL": self.gitlab.url,
               "GITLAB_AI_GATEWAY_URL": self.gateway.url, "PYTHONIOENCODING": "utf-8"}
        code, out, _ = run_script(["--check"], env, cwd=tempfile.mkdtemp())
        self.assertEqual(code, 0, out)
        self.duo.gitlab_tokens.clear()
        code, out, _ = run_script(["--check"], env, cwd=tempfile.mkdtemp())
        self.assertEqual(code, 1, out)

    def check_cli(self, *argv, token=GITLAB_TOKEN):
        env = {"GITLAB_TOKEN": token, "GITLAB_INSTANCE_URL": self.gitlab.url,
               "GITLAB_AI_GATEWAY_URL": self.gateway.url, "PYTHONIOENCODING": "utf-8"}
        code, out, err = run_script(["--check"] + list(argv), env, cwd=tempfile.mkdtemp())
        return code, out + err

    def test_a_token_with_only_ai_features_passes_every_step(self):
        self.duo.scopes[GITLAB_TOKEN] = ["ai_features"]
        for challenge in (False, True):  # GitLab sends no WWW-Authenticate with the 403; fine either way
            self.duo.scope_challenge = challenge
            code, out = self.check_cli()
            self.assertEqual(code, 0, out)
            self.assertTrue(all(line.startswith("\u2713") for line in out.splitlines()), out)
            self.assertIn("\u2713 token valid: GitLab names its user only to a token with scope read_user "
                          "(optional); token scopes: ai_features (expires 2027-01-31)", out)
        user_calls = [r for r in self.gitlab.requests if r.path == "/api/v4/user"]
        self.assertTrue(user_calls)  # asked, and answered 403 insufficient_scope

    def test_a_broader_token_passes_with_one_line_of_advice(self):
        for scopes, named in ((["api"], "api"), (["ai_features", "write_repository"], "write_repository")):
            self.duo.scopes[GITLAB_TOKEN] = scopes
            code, out = self.check_cli()
            self.assertEqual(code, 0, out)
            notes = [line for line in out.splitlines() if line.startswith("    note:")]
            self.assertEqual(len(notes), 1, out)
            self.assertIn("scope %s gives this token far more than the proxy needs" % named, notes[0])
            self.assertIn("a token with only ai_features is enough", notes[0])
        self.duo.scopes[GITLAB_TOKEN] = ["ai_features", "read_user"]
        self.assertNotIn("note:", self.check_cli()[1])

    def test_a_token_without_ai_features_or_api_fails_at_the_exchange_naming_the_scope(self):
        self.duo.scopes[GITLAB_TOKEN] = ["read_user", "read_api"]
        code, out = self.check_cli()
        self.assertEqual(code, 1, out)
        self.assertIn("\u2713 token valid: signed in as ada; token scopes: read_user, read_api", out)
        failed = out.split("\u2717 Duo token exchange failed (HTTP 403)")[1]
        self.assertIn("needs scope ai_features", failed)
        self.duo.gitlab_tokens.clear()  # and a token GitLab does not know at all
        code, out = self.check_cli()
        self.assertEqual(code, 1, out)
        self.assertIn("fix: create a personal access token with scope ai_features", out)

    def test_an_oauth_token_passes_without_scopes_shown(self):
        self.duo.gitlab_tokens.add("oauth-access-token-0123456789abcdef")
        ok, text = self.run_doctor(gitlab_token="oauth-access-token-0123456789abcdef")
        self.assertTrue(ok, text)
        self.assertIn("token valid: signed in as ada\n", text)  # /personal_access_tokens/self: 400

    def test_check_models_shows_the_table_even_after_the_inference_step_failed(self):
        self.gateway.models.discard("claude-sonnet-4-6")  # GitLab's list moved under the default
        code, out = self.check_cli("--models")
        self.assertEqual(code, 1, out)
        self.assertIn("refused claude-sonnet-4-6: HTTP 400: GitLab AI gateway answered 400: Unsupported "
                      "model", out)
        self.assertIn("The proxy's model fallback serves requests for it with claude-sonnet-5.", out)
        self.assertIn("fix: set DEFAULT_MODEL=claude-sonnet-5", out)
        table = [line for line in out.splitlines() if line[2:8] == "model "]
        self.assertEqual(len(table), len(gdp.MODEL_CATALOG), out)
        self.assertIn("\u2717 model claude-sonnet-4-6: HTTP 400", out)
        code, out = self.check_cli("--models", "--model-fallback", "off")
        self.assertEqual(code, 1, out)
        self.assertNotIn("model fallback serves", out)

    def test_a_reader_that_leaves_early_gets_no_false_error(self):  # --check --models | head -1
        env = dict(os.environ, GITLAB_TOKEN=GITLAB_TOKEN, GITLAB_INSTANCE_URL=self.gitlab.url,
                   GITLAB_AI_GATEWAY_URL=self.gateway.url, PYTHONIOENCODING="utf-8")
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gitlab_duo_proxy.py"), "--check", "--models",
                                 "--env-file", EMPTY_ENV], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertTrue(proc.stdout.readline().startswith("\u2713 configuration".encode()))
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        self.assertEqual(proc.wait(20), 1)
        self.assertEqual(err, b"")  # no "cannot listen on ...: Broken pipe", no traceback

    def test_check_models_through_the_command_line(self):
        env = {"GITLAB_TOKEN": GITLAB_TOKEN, "GITLAB_INSTANCE_URL": self.gitlab.url,
               "GITLAB_AI_GATEWAY_URL": self.gateway.url, "PYTHONIOENCODING": "utf-8"}
        code, out, err = run_script(["--check", "--models"], env, cwd=tempfile.mkdtemp())
        self.assertEqual(code, 0, out + err)
        models = [line.split()[2] for line in out.splitlines() if line.startswith("\u2713 model ")]
        self.assertEqual(models, [m.id for m in gdp.build_catalog("")])
        self.gateway.models.discard("claude-haiku-4-5-20251001")
        code, out, _ = run_script(["--check", "--models", "--no-inference"], env, cwd=tempfile.mkdtemp())
        self.assertEqual(code, 1, out)
        self.assertIn("\u2717 model claude-haiku-4-5-20251001: HTTP 400", out)
        self.assertEqual(sum(line.startswith("\u2713 model ") for line in out.splitlines()),
                         len(gdp.MODEL_CATALOG) - 1)


@unittest.skipUnless(os.environ.get("GITLAB_DUO_PROXY_COMMAND"), "CI sets it after pip install .")
class InstalledCommandTests(ProxyTestCase):
    """The command `pip install .` installs (its path in GITLAB_DUO_PROXY_COMMAND)."""

    def test_installed_command_checks_a_setup(self):
        command = os.environ["GITLAB_DUO_PROXY_COMMAND"]
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "SYSTEMROOT")}
        env.update(GITLAB_TOKEN=GITLAB_TOKEN, GITLAB_INSTANCE_URL=self.gitlab.url,
                   GITLAB_AI_GATEWAY_URL=self.gateway.url, PYTHONIOENCODING="utf-8")
        done = subprocess.run([command, "--check", "--models"], env=env, cwd=tempfile.mkdtemp(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        out = done.stdout.decode()
        self.assertEqual(done.returncode, 0, out + done.stderr.decode())
        self.assertIn("\u2713 Duo token exchange works", out)
        self.assertEqual(sum(line.startswith("\u2713 model ") for line in out.splitlines()),
                         len(gdp.MODEL_CATALOG))
        version = subprocess.run([command, "--version"], stdout=subprocess.PIPE, timeout=30)
        self.assertEqual(version.stdout.decode().split(), ["gitlab-duo-proxy", gdp.__version__])


class ClientSetupTests(unittest.TestCase):
    def config(self, **kw):
        return base_config(**kw)

    def test_goose_config_is_written_from_the_catalog(self):
        path = os.path.join(tempfile.mkdtemp(), "custom_providers", "gitlab_duo.json")
        status, message = gdp.write_goose_config(self.config(port=4242, api_key=PROXY_KEY), path)
        self.assertEqual(status, 0, message)
        with open(path) as fh:
            data = json.load(fh)
        self.assertEqual((data["name"], data["engine"], data["base_url"]), ("gitlab_duo", "anthropic", "http://127.0.0.1:4242"))
        self.assertEqual([m["name"] for m in data["models"]],
                         [m.id for m in gdp.build_catalog("") if m.api == "anthropic"])
        self.assertEqual(data["models"][0]["context_limit"], 1000000)
        self.assertTrue(data["requires_auth"])
        self.assertEqual(data["api_key_env"], "GITLAB_DUO_PROXY_KEY")
        self.assertNotIn(PROXY_KEY, json.dumps(data))
        self.assertIn("export GITLAB_DUO_PROXY_KEY", message)

    def test_goose_config_never_overwrites_a_different_file_without_force(self):
        path = os.path.join(tempfile.mkdtemp(), "gitlab_duo.json")
        with open(path, "w") as fh:
            fh.write("{}")
        status, message = gdp.write_goose_config(self.config(), path)
        self.assertEqual(status, 1)
        self.assertIn("--force", message)
        with open(path) as fh:
            self.assertEqual(fh.read(), "{}")
        self.assertEqual(gdp.write_goose_config(self.config(), path, force=True)[0], 0)
        status, message = gdp.write_goose_config(self.config(), path)
        self.assertEqual((status, message.endswith("already up to date")), (0, True))
        with open(path) as fh:
            self.assertFalse(json.load(fh)["requires_auth"])

    def test_print_env_for_every_tool_and_shell(self):
        config = self.config(api_key="k'ey", port=5000)
        for tool in ("claude-code", "goose", "anthropic-sdk", "openai-sdk", "codex"):
            posix = gdp.client_env_lines(config, tool)
            values = dict(shlex_pair(line) for line in posix)
            self.assertTrue(any(v.startswith("http://127.0.0.1:5000") for v in values.values()), tool)
            self.assertIn("k'ey", values.values())
            powershell = gdp.client_env_lines(config, tool, "powershell")
            self.assertTrue(all(line.startswith("$env:") for line in powershell))
            self.assertIn("'k''ey'", "\n".join(powershell))
        values = dict(shlex_pair(line) for line in gdp.client_env_lines(config, "claude-code"))
        self.assertEqual(values["ANTHROPIC_DEFAULT_HAIKU_MODEL"], "claude-haiku-4-5-20251001")
        self.assertEqual(values["ANTHROPIC_MODEL"], gdp.DEFAULT_MODEL)
        self.assertEqual(dict(shlex_pair(line) for line in gdp.client_env_lines(config, "openai-sdk"))[
            "OPENAI_BASE_URL"], "http://127.0.0.1:5000/v1")

    def test_print_env_needs_no_token(self):
        code, out, err = run_script(["--print-env", "goose"], {}, cwd=tempfile.mkdtemp())
        self.assertEqual(code, 0, err)
        self.assertIn("export ANTHROPIC_HOST=http://127.0.0.1:4141", out)


def shlex_pair(line):
    import shlex
    name, _, value = line[len("export "):].partition("=")
    return name, shlex.split(value)[0]


class TokenSourceTests(ProxyTestCase):
    def test_token_command_is_run_again_when_gitlab_rejects_the_token(self):
        outputs = [(0, b"glpat-old-and-revoked\n"), (0, GITLAB_TOKEN.encode() + b"\n")]
        runs = []

        def runner(command):
            runs.append(command)
            return outputs.pop(0)
        proxy = start_server(self, gdp.ProxyServer(base_config(
            gitlab_token="", gitlab_token_command="pass show gitlab", token_source="GITLAB_TOKEN_COMMAND",
            instance_url=self.gitlab.url, gateway_url=self.gateway.url), clock=self.clock, runner=runner))
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 200)
        self.assertEqual(runs, ["pass show gitlab"] * 2)
        self.assertEqual([r.headers["Authorization"] for r in self.exchanges()],
                         ["Bearer glpat-old-and-revoked", "Bearer " + GITLAB_TOKEN])

    def test_failing_command_is_reported_without_its_output(self):
        command = "%s -c \"print('SECRET-OUTPUT'); raise SystemExit(3)\"" % sys.executable
        proxy = self.make_proxy(gitlab_token="", gitlab_token_command=command, token_source="GITLAB_TOKEN_COMMAND")
        resp = self.post("/v1/messages", SIMPLE, proxy=proxy)
        self.assertEqual(resp.status, 401)
        self.assertIn("GITLAB_TOKEN_COMMAND failed (exit status 3)", resp.error["message"])
        self.assertNotIn("SECRET-OUTPUT", resp.body.decode())

    def test_real_command_and_token_file(self):
        command = "%s -c \"print('%s')\"" % (sys.executable, GITLAB_TOKEN)
        proxy = self.make_proxy(gitlab_token="", gitlab_token_command=command, token_source="GITLAB_TOKEN_COMMAND")
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 200)
        path = os.path.join(tempfile.mkdtemp(), "token")
        with open(path, "w") as fh:
            fh.write(GITLAB_TOKEN + "\n")
        proxy = self.make_proxy(gitlab_token="", gitlab_token_file=path, token_source="GITLAB_TOKEN_FILE")
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 200)
        os.remove(path)
        proxy = self.make_proxy(gitlab_token="", gitlab_token_file=path, token_source="GITLAB_TOKEN_FILE")
        resp = self.post("/v1/messages", SIMPLE, proxy=proxy)
        self.assertIn("cannot read GITLAB_TOKEN_FILE", resp.error["message"])

    def test_oauth_tokens_work_like_personal_access_tokens(self):
        self.duo.gitlab_tokens.add("oauth-access-token-0123456789abcdef")
        proxy = self.make_proxy(gitlab_token="oauth-access-token-0123456789abcdef")
        self.assertEqual(self.post("/v1/messages", SIMPLE, proxy=proxy).status, 200)
        self.assertEqual(self.exchanges()[0].headers["Authorization"], "Bearer oauth-access-token-0123456789abcdef")


class TeamModeTests(ProxyTestCase):
    ADA, BOB = "glpat-ADA000000000000000000", "glpat-BOB000000000000000000"

    def setUp(self):
        super().setUp()
        self.duo.gitlab_tokens.update({self.ADA, self.BOB})
        self.team = self.make_proxy(gitlab_token="", token_source="", per_user=True)

    def as_user(self, token, payload=SIMPLE, source="127.0.0.1", forwarded=None, proxy=None):
        conn = http.client.HTTPConnection("127.0.0.1", (proxy or self.team).server_address[1], timeout=10,
                                          source_address=(source, 0))
        try:
            headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
            if forwarded:
                headers["X-Forwarded-For"] = forwarded
            if token:
                headers["x-api-key"] = token
            conn.request("POST", "/v1/messages", json.dumps(payload), headers)
            resp = conn.getresponse()
            return Response(resp, resp.read())
        finally:
            conn.close()

    def team_get(self, path, token=None, **headers):
        if token:
            headers["x-api-key"] = token
        return self.request("GET", path, headers=headers, proxy=self.team)

    def test_usage_is_counted_per_gitlab_username_and_no_token_shows(self):
        self.duo.usernames.update({self.ADA: "ada", self.BOB: "bob"})
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            for token in (self.ADA, self.BOB, self.ADA):
                self.assertEqual(self.as_user(token).status, 200)
            self.gateway.script = [lambda h, r: h.send_stream(rich_stream("claude-sonnet-4-6"))]
            self.assertEqual(self.as_user(self.BOB, dict(SIMPLE, stream=True)).status, 200)
            self.assertTrue(self.team.inflight.wait_idle(5))
        lookups = [r for r in self.gitlab.requests if r.path == "/api/v4/user"]
        self.assertEqual(len(lookups), 2)  # once per new token
        stats = self.team_get("/stats", self.ADA)
        users = stats.json()["users"]
        self.assertEqual(users["ada"], {"requests": 2, "errors": 0, "input": 24, "output": 10})
        self.assertEqual((users["bob"]["requests"], users["bob"]["input"], users["bob"]["output"]), (2, 42, 45))
        metrics = self.team_get("/metrics", self.BOB).body.decode()
        self.assertIn('gitlab_duo_proxy_user_requests_total{user="ada"} 2', metrics)
        self.assertIn('gitlab_duo_proxy_user_tokens_total{user="bob",kind="cache_read"} 2000', metrics)
        page = self.team_get("/", self.ADA, Accept="text/html")
        table = PageText()
        table.feed(page.body.decode())
        self.assertEqual([row[:3] for row in table.rows["users"][1:]], [["ada", "2", "0"], ["bob", "2", "0"]])
        self.assertIn("user=bob", logs.output[-1])
        everything = stats.body.decode() + metrics + page.body.decode() + "\n".join(logs.output)
        for secret in [self.ADA, self.BOB] + list(self.duo.issued):
            self.assertNotIn(secret, everything)

    def test_a_persons_tokens_count_as_one_user_without_read_user(self):
        ada2, ada3 = "glpat-ADA2222222222222222222", "glpat-ADA3333333333333333333"
        self.duo.gitlab_tokens.update({ada2, ada3})
        self.duo.usernames.update({self.ADA: "ada", ada2: "ada", ada3: "ada", self.BOB: "bob"})
        for token in (self.ADA, ada2, self.BOB):
            self.duo.scopes[token] = ["ai_features"]  # GitLab will not say whose they are
        for token in (self.ADA, ada2, self.BOB, ada2):
            self.assertEqual(self.as_user(token).status, 200)
        self.assertTrue(self.team.inflight.wait_idle(5))
        users = self.team_get("/stats", self.ADA).json()["users"]
        self.assertEqual(sorted(c["requests"] for c in users.values()), [1, 3])
        (ada,) = [name for name, counts in users.items() if counts["requests"] == 3]
        self.assertRegex(ada, r"^user-[0-9a-f]{10}$")
        for token in (self.ADA, ada2):  # made from GitLab's user id, not from token material
            self.assertNotIn(ada[5:], hashlib.sha256(token.encode()).hexdigest())
        metrics = self.team_get("/metrics", self.ADA).body.decode()
        self.assertIn('gitlab_duo_proxy_user_requests_total{user="%s"} 3' % ada, metrics)
        self.assertEqual(metrics.count("gitlab_duo_proxy_user_requests_total{"), 2)
        # A token of hers that may read her name: the same person, now by name, in one row.
        self.assertEqual(self.as_user(ada3).status, 200)
        self.assertEqual(self.as_user(self.ADA).status, 200)
        self.assertTrue(self.team.inflight.wait_idle(5))
        users = self.team_get("/stats", self.BOB).json()["users"]
        self.assertEqual(users["ada"]["requests"], 5)
        self.assertEqual(len(users), 2)
        self.assertNotIn(ada, self.team_get("/metrics", self.BOB).body.decode())

    def test_a_rejected_token_costs_gitlab_one_exchange(self):
        bad = "glpat-BAD000000000000000000"
        results = []
        threads = [threading.Thread(target=lambda: results.append(self.as_user(bad).status)) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        results += [self.as_user(bad).status for _ in range(40)]
        self.assertEqual(results, [401] * 50)
        self.assertEqual(len(self.exchanges()), 1)
        self.clock.advance(61)  # remembered for a minute: then GitLab is asked again
        self.assertEqual(self.as_user(bad).status, 401)
        self.assertEqual(len(self.exchanges()), 2)

    def test_a_flood_of_bad_tokens_is_throttled_per_address_and_others_keep_working(self):
        self.assertEqual(self.as_user(self.ADA, source="127.0.0.2").status, 200)
        statuses = [self.as_user("glpat-RANDOM%015d" % n, source="127.0.0.2").status for n in range(15)]
        self.assertEqual(statuses, [401] * 10 + [429] * 5)
        self.assertEqual(len(self.exchanges()), 11)  # Ada's and ten bad ones
        throttled = self.as_user("glpat-RANDOM%015d" % 99, source="127.0.0.2")
        self.assertEqual(throttled.error["type"], "rate_limit_error")
        self.assertLessEqual(int(throttled.headers["retry-after"]), 61)
        self.assertEqual(self.as_user(self.ADA, source="127.0.0.2").status, 200)  # known users: unaffected
        self.assertEqual(self.as_user(self.BOB).status, 200)  # another address: unaffected
        self.clock.advance(61)
        self.assertEqual(self.as_user("glpat-RANDOM%015d" % 100, source="127.0.0.2").status, 401)

    def test_behind_a_trusted_proxy_the_forwarded_client_is_throttled_and_others_are_served(self):
        team = self.make_proxy(gitlab_token="", token_source="", per_user=True,
                               trusted_proxies=gdp.parse_networks("127.0.0.1, 10.9.0.0/16"))
        with self.assertLogs("gitlab_duo_proxy", "INFO") as logs:
            flood = [self.as_user("glpat-FLOOD%015d" % n, forwarded="203.0.113.7, 10.9.1.1", proxy=team).status
                     for n in range(12)]
            self.assertTrue(team.inflight.wait_idle(5))
        self.assertEqual(flood, [401] * 10 + [429] * 2)
        self.assertIn("client=203.0.113.7 ", logs.output[-1])
        self.assertEqual(self.as_user(self.ADA, forwarded="203.0.113.8", proxy=team).status, 200)
        # A client that is not a trusted proxy: its X-Forwarded-For is not believed.
        rotating = [self.as_user("glpat-ROTATE%014d" % n, source="127.0.0.2", forwarded="198.51.100.%d" % n,
                                 proxy=team).status for n in range(12)]
        self.assertEqual(rotating, [401] * 10 + [429] * 2)
        self.assertEqual(self.as_user(self.BOB, forwarded="203.0.113.9", proxy=team).status, 200)

    def test_transient_failures_are_never_remembered(self):
        self.gitlab.script = [lambda h: h.send_json(503, {"message": "Token creation failed"})]
        self.assertEqual(self.as_user(self.ADA).status, 503)
        self.assertEqual(self.as_user(self.ADA).status, 200)
        self.assertEqual(len(self.exchanges()), 2)

    def test_each_user_exchanges_their_own_token(self):
        for token in (self.ADA, self.BOB, self.ADA):
            self.assertEqual(self.as_user(token).status, 200)
        self.assertEqual(sorted(r.headers["Authorization"] for r in self.exchanges()),
                         ["Bearer " + self.ADA, "Bearer " + self.BOB])
        tokens_used = [c.headers["Authorization"] for c in self.gateway_calls()]
        self.assertEqual(tokens_used[0], tokens_used[2])
        self.assertNotEqual(tokens_used[0], tokens_used[1])
        self.assertEqual(self.request("GET", "/", proxy=self.team).json()["gateway_token"],
                         {"state": "per-user", "cached_users": 2})

    def test_one_users_failure_never_affects_another(self):
        resp = self.as_user("glpat-MALLORY00000000000000")
        self.assertEqual((resp.status, resp.error["type"]), (401, "authentication_error"))
        self.assertEqual(self.as_user(self.ADA).status, 200)
        self.assertEqual(self.as_user(None).status, 401)

    def test_a_request_that_took_a_token_before_gitlab_rejected_it_gets_the_rejection(self):
        bad = "glpat-LATE0000000000000000"
        users = gdp.UserTokens(self.team.upstream, clock=self.clock)
        key = hashlib.sha256(bad.encode()).hexdigest()
        late = users._new_cache(key, bad, "10.0.0.1")  # the cache a request took, about to ask
        with self.assertRaises(gdp.ProxyError) as first:
            users.for_client(bad, "10.0.0.1")  # another request's exchange: rejected
        with self.assertRaises(gdp.ProxyError) as second:
            late.get()
        self.assertEqual((first.exception.status, second.exception.status), (401, 401))
        self.assertEqual(len(self.exchanges()), 1)

    def test_cache_is_a_bounded_lru_keyed_by_hash(self):
        carol = "glpat-CAROL0000000000000000"
        self.duo.gitlab_tokens.add(carol)
        users = gdp.UserTokens(self.team.upstream, clock=self.clock, max_users=2)

        def member(token):
            return users.for_client(token, "10.0.0.1")  # kept once GitLab accepted the token
        first = member(self.ADA)
        member(self.BOB)
        self.assertIs(member(self.ADA), first)  # used again: now the most recent
        member(carol)
        self.assertEqual(len(users), 2)
        self.assertIs(member(self.ADA), first)
        self.assertNotIn(self.ADA, repr(list(users._members)))

    def test_stats_need_a_working_token(self):
        self.assertEqual(self.request("GET", "/stats", headers={"x-api-key": "nonsense"}, proxy=self.team).status, 401)
        self.assertEqual(self.request("GET", "/stats", headers={"x-api-key": self.ADA}, proxy=self.team).status, 200)

    def test_config_refuses_team_mode_with_a_shared_token_or_key(self):
        with self.assertRaises(gdp.ConfigError):
            load_config(["--per-user"], {"GITLAB_TOKEN": "t"}, cwd=tempfile.gettempdir())
        with self.assertRaises(gdp.ConfigError):
            load_config(["--per-user"], {"PROXY_API_KEY": "k"}, cwd=tempfile.gettempdir())


class LogEvent(logging.Handler):
    """Set when the proxy logs a line containing text (for lines logged off the request path)."""

    def __init__(self, testcase, text):
        super().__init__(logging.DEBUG)
        self.text, self.event = text, threading.Event()
        logger = logging.getLogger("gitlab_duo_proxy")
        previous = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        testcase.addCleanup(logger.setLevel, previous)
        testcase.addCleanup(logger.removeHandler, self)

    def emit(self, record):
        if self.text in record.getMessage():
            self.event.set()

    def wait(self, timeout):
        return self.event.wait(timeout)


class TLSServingTests(ProxyTestCase):
    def test_https_serving_with_a_self_signed_certificate(self):
        cert, key = Cert.get()
        proxy = self.make_proxy(tls_cert=cert, tls_key=key)
        self.assertTrue(proxy.url.startswith("https://"))
        context = ssl.create_default_context(cafile=cert)
        for payload in (SIMPLE, dict(SIMPLE, stream=True)):
            conn = http.client.HTTPSConnection("127.0.0.1", proxy.server_address[1], context=context, timeout=10)
            conn.request("POST", "/v1/messages", json.dumps(payload), {"anthropic-version": "2023-06-01"})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            self.assertEqual(resp.status, 200, body)
        self.assertIn(b"message_stop", body)
        self.assertTrue(proxy.inflight.wait_idle(5))
        failed = LogEvent(self, "TLS handshake with 127.0.0.1 failed")
        with socket.create_connection(("127.0.0.1", proxy.server_address[1]), timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS: the handshake fails, the server lives on
            try:
                plain.recv(100)
            except ConnectionResetError:
                pass
        self.assertTrue(failed.wait(5))
        self.assertEqual(self.request_tls(proxy, context), 200)

    def request_tls(self, proxy, context):
        conn = http.client.HTTPSConnection("127.0.0.1", proxy.server_address[1], context=context, timeout=10)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status
        finally:
            conn.close()

    def test_bad_certificate_files_stop_start_up(self):
        with self.assertRaises(gdp.ConfigError):
            gdp.ProxyServer(base_config(tls_cert="/nonexistent.pem", tls_key="/nonexistent.key"))


class StatsTests(ProxyTestCase):
    def test_counts_and_tokens(self):
        self.post("/v1/messages", SIMPLE)
        self.gateway.script = [lambda h, r: h.send_stream(rich_stream("claude-sonnet-4-6"))]
        self.post("/v1/messages", dict(SIMPLE, stream=True))
        self.post("/v1/messages", b"{bad")
        self.assertTrue(self.proxy.inflight.wait_idle(5))
        data = self.request("GET", "/stats").json()
        self.assertEqual(data["routes"], {"/v1/messages": {"requests": 3, "errors": 1}})
        model = data["models"]["claude-sonnet-4-6"]
        self.assertEqual((model["requests"], model["input"], model["output"]), (2, 42, 45))
        self.assertEqual((model["cache_read"], model["cache_creation"]), (2000, 100))
        self.assertEqual(data["gateway_token"]["state"], "valid")
        self.assertEqual(data["upstream_latency_ms"]["count"], 2)
        self.assertIn("p99", data["upstream_latency_ms"])
        health = self.request("GET", "/").json()
        self.assertNotIn("models", json.dumps(health).replace('"models":', ""))
        self.assertNotIn("routes", health)

    def test_html_page_for_browsers(self):
        self.post("/v1/messages", SIMPLE)
        self.assertTrue(self.proxy.inflight.wait_idle(5))
        resp = self.request("GET", "/", headers={"Accept": "text/html,application/xhtml+xml"})
        self.assertEqual(resp.headers["Content-Type"], "text/html; charset=utf-8")
        page = PageText()
        page.feed(resp.body.decode())
        self.assertEqual(page.tags_seen & {"script", "link", "img"}, set())
        self.assertIn("claude-sonnet-4-6", page.text)
        self.assertIn("valid (expires in 60 min)", page.text)
        self.assertIn('http-equiv="refresh"', resp.body.decode())
        row = page.rows["models"][1]
        self.assertEqual(row[:5], ["claude-sonnet-4-6", "1", "0", "12", "5"])
        self.assertEqual(page.rows["routes"][1][:3], ["/v1/messages", "1", "0"])

    def test_key_protects_usage_but_not_health(self):
        proxy = self.make_proxy(api_key=PROXY_KEY)
        self.assertEqual(self.request("GET", "/", proxy=proxy).status, 200)
        resp = self.request("GET", "/", headers={"Accept": "text/html"}, proxy=proxy)
        self.assertEqual(resp.status, 401)
        self.assertTrue(resp.headers["WWW-Authenticate"].startswith("Basic "))
        import base64
        basic = "Basic " + base64.b64encode(("anyone:" + PROXY_KEY).encode()).decode()
        self.assertEqual(self.request("GET", "/", headers={"Accept": "text/html", "Authorization": basic},
                                      proxy=proxy).status, 200)
        self.assertEqual(self.request("GET", "/stats", proxy=proxy).status, 401)
        self.assertEqual(self.request("GET", "/stats", headers={"x-api-key": PROXY_KEY}, proxy=proxy).status, 200)
        self.assertEqual(self.request("GET", "/stats", headers={"Authorization": basic}, proxy=proxy).status, 200)


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})?'
                         r' (-?[0-9.e+-]+|\+Inf|NaN)$')


def parse_metrics(text):
    """{(sample name, labels text): value}, checking the exposition format as it goes:
    HELP then TYPE before any sample of a metric, well-formed escaped labels, no
    duplicate series, a newline at the end."""
    assert text.endswith("\n")
    samples, typed, last = {}, {}, None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            last = line.split()[2]
            continue
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert name == last and kind in ("counter", "gauge", "histogram"), line
            typed[name] = kind
            continue
        match = METRIC_LINE.match(line)
        assert match, line
        family = re.sub(r"_(bucket|sum|count)$", "", match.group(1)) if match.group(1) not in typed \
            else match.group(1)
        assert family in typed, line
        key = (match.group(1), match.group(2) or "")
        assert key not in samples, "duplicate series " + line
        samples[key] = float(match.group(3))
    return samples


class MetricsTests(ProxyTestCase):
    def metrics(self, proxy=None, **headers):
        resp = self.request("GET", "/metrics", headers=headers, proxy=proxy)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(resp.headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        return resp.body.decode()

    def test_metrics_after_known_traffic_equal_the_traffic(self):
        self.post("/v1/messages", SIMPLE)
        self.gateway.script = [lambda h, r: h.send_stream(rich_stream("claude-sonnet-4-6"))]
        self.post("/v1/messages", dict(SIMPLE, stream=True))
        self.post("/v1/messages", dict(SIMPLE, model="claude-opus-5-5"))
        self.post("/v1/messages", b"{bad")
        self.request("GET", "/v1/models")
        # a connection counts until its thread reads the client's close, just after the answer
        self.assertTrue(self.proxy.connections.wait_idle(5))
        samples = parse_metrics(self.metrics())
        requests = lambda route, model, status: samples[("gitlab_duo_proxy_requests_total",  # noqa: E731
                                                         '{route="%s",model="%s",status="%s"}' % (route, model, status))]
        self.assertEqual(requests("/v1/messages", "claude-sonnet-4-6", 200), 2)
        self.assertEqual(requests("/v1/messages", "claude-opus-5", 200), 1)
        self.assertEqual(requests("/v1/messages", "", 400), 1)
        self.assertEqual(requests("/v1/models", "", 200), 1)
        tokens = lambda model, kind: samples[("gitlab_duo_proxy_tokens_total",  # noqa: E731
                                              '{model="%s",kind="%s"}' % (model, kind))]
        self.assertEqual([tokens("claude-sonnet-4-6", k) for k in ("input", "output", "cache_read", "cache_creation")],
                         [42, 45, 2000, 100])
        self.assertEqual(tokens("claude-opus-5", "input"), 12)
        # one per answered request: to the head of the answer that served it
        self.assertEqual(samples[("gitlab_duo_proxy_upstream_latency_seconds_count", '{route="/v1/messages"}')], 3)
        self.assertEqual(samples[("gitlab_duo_proxy_upstream_latency_seconds_bucket",
                                  '{route="/v1/messages",le="+Inf"}')], 3)
        self.assertEqual(samples[("gitlab_duo_proxy_token_exchanges_total", '{result="ok"}')], 1)
        self.assertEqual(samples[("gitlab_duo_proxy_model_fallbacks_total",
                                  '{requested="claude-opus-5-5",served="claude-opus-5"}')], 1)
        self.assertEqual(samples[("gitlab_duo_proxy_in_flight_requests", "")], 1)  # this scrape
        self.assertEqual(samples[("gitlab_duo_proxy_open_connections", "")], 1)
        self.assertAlmostEqual(samples[("gitlab_duo_proxy_token_expires_in_seconds", "")], 3600, delta=1)
        self.assertEqual(samples[("gitlab_duo_proxy_connections_rejected_total", "")], 0)

    def test_label_values_are_escaped(self):
        snap = gdp.Stats().snapshot()
        snap["fallbacks"] = {('a"b\\c\nd', "claude-opus-5"): 3}
        text = gdp.render_metrics(snap, {"in_flight_requests": 0, "open_connections": 0,
                                         "token_expires_in_seconds": None}, team_mode=True)
        samples = parse_metrics(text)
        self.assertEqual(samples[("gitlab_duo_proxy_model_fallbacks_total",
                                  '{requested="a\\"b\\\\c\\nd",served="claude-opus-5"}')], 3)
        self.assertIn("# TYPE gitlab_duo_proxy_user_requests_total counter", text)

    def test_same_access_rule_as_stats(self):
        proxy = self.make_proxy(api_key=PROXY_KEY)
        self.assertEqual(self.request("GET", "/metrics", proxy=proxy).status, 401)
        self.metrics(proxy, Authorization="Bearer " + PROXY_KEY)  # as Prometheus' authorization sends it
        self.metrics(proxy, **{"x-api-key": PROXY_KEY})

    @unittest.skipUnless(importlib.util.find_spec("prometheus_client"), "a dev tool: CI installs it in a venv")
    def test_prometheus_own_parser_reads_it(self):
        from prometheus_client.parser import text_string_to_metric_families
        self.post("/v1/messages", SIMPLE)
        self.post("/v1/messages", dict(SIMPLE, model="claude-opus-5-5"))
        self.assertTrue(self.proxy.connections.wait_idle(5))
        families = {f.name: f for f in text_string_to_metric_families(self.metrics())}
        self.assertEqual(families["gitlab_duo_proxy_upstream_latency_seconds"].type, "histogram")
        requests = families["gitlab_duo_proxy_requests"]
        self.assertEqual(requests.type, "counter")
        served = {(s.labels["model"], s.labels["status"]): s.value for s in requests.samples}
        self.assertEqual(served[("claude-sonnet-4-6", "200")], 1)
        self.assertEqual(families["gitlab_duo_proxy_open_connections"].samples[0].value, 1)


class BoundedBookkeepingTests(ProxyTestCase):
    def test_a_hundred_thousand_random_model_names_leave_the_statistics_flat(self):
        stats, rng = gdp.Stats(), random.Random(13)
        gauges = {"in_flight_requests": 0, "open_connections": 0, "token_expires_in_seconds": None}
        sizes = []
        for n in range(100000):
            ctx = gdp.RequestContext("POST", "id")
            ctx.route, ctx.status = "/v1/messages", rng.choice((400, 400, 200))
            ctx.model = "claude-opus-%d-%d" % (rng.randrange(10 ** 6), n) if n % 3 else "<script>\r\n%d" % n
            ctx.user = "user-%d" % n
            ctx.fallback = (ctx.model, "claude-opus-5") if ctx.status == 200 else None
            ctx.upstream_seconds = 0.1 if ctx.status == 200 else None
            if ctx.status == 200:
                ctx.model = "claude-opus-5"  # what served it
            stats.record(ctx)
            if n in (1999, 99999):
                snap = stats.snapshot()
                sizes.append((len(json.dumps(gdp.stats_json(snap))), len(gdp.render_metrics(snap, gauges, True))))
        # The same series: only the counts grow (a digit or two each).
        self.assertLess(sizes[1][0] - sizes[0][0], sizes[0][0] / 50)
        self.assertLess(sizes[1][1] - sizes[0][1], sizes[0][1] / 50)
        snap = stats.snapshot()
        self.assertEqual(set(snap["models"]), {"claude-opus-5", "other"})
        self.assertLessEqual(len({r for r, _ in snap["fallbacks"]}), gdp.MAX_FALLBACK_NAMES + 1)
        self.assertLessEqual(len(snap["users"]), gdp.MAX_USER_SERIES + 1)

    def test_random_names_through_the_proxy_leave_stats_and_metrics_flat(self):
        names = ["claude-opus-9-%d" % n for n in range(60)] + ["claude-nonsense-%d" % n for n in range(20)] + \
                ["<script>alert(%d)</script>" % n for n in range(40)] + \
                ["claude-x\r\nSet-Cookie: a=%d" % n for n in range(40)] + ["claude-opus-8-%d" % n for n in range(60)]

        def scrape(path):  # once the requests before it are counted (just after their answers)
            self.assertTrue(self.proxy.connections.wait_idle(5))
            return len(self.request("GET", path).body)

        def sizes():
            return scrape("/stats"), scrape("/metrics"), len(self.proxy.upstream.fallbacks)
        for name in names[:80]:  # fallback names past the 50 kept apart, and junk
            self.post("/v1/messages", dict(SIMPLE, model=name))
        before = sizes()
        for name in names[80:]:
            self.post("/v1/messages", dict(SIMPLE, model=name))
        after = sizes()
        self.assertLess(after[0] - before[0], 100)  # only counts grow
        self.assertLess(after[1] - before[1], 100)
        self.assertLessEqual(after[2], 256)  # remembered fallbacks: bounded too
        stats = self.request("GET", "/stats").json()
        self.assertEqual(set(stats["models"]), {"claude-opus-5", "other"})
        self.assertLessEqual(len({f["requested"] for f in stats["model_fallbacks"]}), gdp.MAX_FALLBACK_NAMES + 1)
        self.assertNotIn("<script>", self.request("GET", "/metrics").body.decode())


class ConnectionCapTests(ProxyTestCase):
    def test_idle_connections_past_the_cap_are_refused_at_once_without_threads(self):
        proxy = self.tracked_proxy(max_connections=50)
        port = proxy.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(80)]
        for sock in idle:
            self.addCleanup(sock.close)
        refused = []
        for sock in idle[50:]:  # accepted in order: these found the cap reached
            status, head, body = parse_raw(sock.recv(65536))
            refused.append((status, json.loads(body)["error"]["type"], "retry-after: 1" in head))
        self.assertEqual(set(refused), {(503, "overloaded_error", True)})
        self.assertEqual(len(proxy.threads), 50)  # no thread for a refused connection
        status, _, _ = parse_raw(raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertEqual(status, 503)  # new requests get an answer at once
        stats = proxy.stats_snapshot()["connections"]
        self.assertEqual((stats["open"], stats["max"], stats["rejected"]), (50, 50, 31))
        for sock in idle[:10]:
            sock.close()
        self.assertTrue(proxy.connections.wait_until(40, 10))
        self.assertEqual(self.request("GET", "/", proxy=proxy).status, 200)
        metrics = parse_metrics(self.request("GET", "/metrics", proxy=proxy).body.decode())
        self.assertEqual(metrics[("gitlab_duo_proxy_connections_rejected_total", "")], 31)


class PageText(__import__("html.parser").parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.tags_seen, self.rows, self.table, self.row = "", set(), {}, None, None

    def handle_starttag(self, tag, attrs):
        self.tags_seen.add(tag)
        if tag == "table":
            self.table = dict(attrs).get("id")
            self.rows[self.table] = []
        elif tag == "tr":
            self.row = []
            self.rows[self.table].append(self.row)

    def handle_data(self, data):
        self.text += data
        if self.row is not None and data.strip():
            self.row.append(data.strip())


class JsonLogTests(unittest.TestCase):
    def test_json_log_lines(self):
        record = logging.LogRecord("gitlab_duo_proxy", logging.INFO, __file__, 1, "POST %s status=%d", ("/v1/messages", 200), None)
        line = json.loads(gdp.JsonFormatter().format(record))
        self.assertEqual((line["level"], line["message"]), ("INFO", "POST /v1/messages status=200"))
        self.assertIn("time", line)
        code, _, err = run_script(["--log-format", "json", "--port", "0", "--help"], {})
        self.assertEqual(code, 0)

    def test_text_lines_are_loggings_own_format(self):
        standard = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        ours = gdp.log_handler(base_config(), stream=io.StringIO()).formatter
        record = logging.LogRecord("gitlab_duo_proxy", logging.INFO, __file__, 1, "POST %s", ("/v1/messages",), None)
        self.assertEqual(ours.format(record), standard.format(record))

    def test_each_line_is_written_when_it_is_logged(self):
        stream = io.StringIO()
        setup = base_config()
        logger = logging.getLogger("gitlab_duo_proxy")
        handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
        self.addCleanup(lambda: (setattr(logger, "handlers", handlers), logger.setLevel(level),
                                 setattr(logger, "propagate", propagate)))
        gdp.setup_logging(setup, stream)
        gdp.log.info("one")
        self.assertTrue(stream.getvalue().endswith(" INFO one\n"))

    def test_log_file(self):
        path = os.path.join(tempfile.mkdtemp(), "proxy.log")
        code, out, err = run_script(["--log-file", path, "--port", "0", "--env-file", os.devnull + "x"], {})
        self.assertEqual(code, 2)  # the env file is missing: said on stderr, not in the log
        self.assertIn("no such file", err)
        handler = gdp.log_handler(base_config(log_file=path, log_format="json"))
        handler.handle(logging.LogRecord("gitlab_duo_proxy", logging.INFO, __file__, 1, "hello %s", ("file",), None))
        handler.close()
        with open(path) as fh:
            self.assertEqual(json.loads(fh.read())["message"], "hello file")
        with self.assertRaises(gdp.ConfigError):
            gdp.log_handler(base_config(log_file=os.path.join(path, "not-a-dir", "x.log")))


class DisconnectWatcherTests(unittest.TestCase):
    def watcher(self, selector_class=None):
        watcher = gdp.DisconnectWatcher(selector_class) if selector_class else gdp.DisconnectWatcher()
        self.addCleanup(watcher.close)
        return watcher

    def pair(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a, b

    def wait_gone(self, watch):
        return watch.gone.wait(5)

    SELECTORS = (None, "select")  # the platform's (epoll here: live registration) and select()

    def each_watcher(self):
        for kind in self.SELECTORS:
            with self.subTest(selector=kind or "default"):
                yield self.watcher(selectors_select() if kind else None)

    def test_hang_up_fires_and_cuts_the_bound_connection(self):
        for watcher in self.each_watcher():
            server_side, client_side = self.pair()
            upstream, far = self.pair()
            watch = watcher.watch(gdp.Relay(server_side, upstream))
            client_side.close()
            self.assertTrue(self.wait_gone(watch))
            far.settimeout(5)
            self.assertEqual(far.recv(1), b"")  # the upstream socket was shut down
            watcher.unwatch(watch)

    def test_a_next_request_is_not_a_hang_up(self):
        for watcher in self.each_watcher():
            server_side, client_side = self.pair()
            watch = watcher.watch(gdp.Relay(server_side, None))
            client_side.sendall(b"GET / HTTP/1.1\r\n\r\n")
            watcher.unwatch(watch)
            self.assertFalse(watch.gone.is_set())
            self.assertEqual(server_side.recv(100)[:3], b"GET")  # peeked, never consumed

    def test_survives_a_socket_closed_while_registered(self):
        for watcher in self.each_watcher():
            for reuse_number in (False, True):
                first, first_peer = socket.socketpair()
                self.addCleanup(first_peer.close)
                watcher.watch(gdp.Relay(first, None))
                if not reuse_number:
                    server_side, client_side = self.pair()  # made first: first's number stays free
                first.close()  # select() now fails on it, or its number comes back for a new socket
                if reuse_number:
                    server_side, client_side = self.pair()
                watch = watcher.watch(gdp.Relay(server_side, None))
                client_side.close()
                self.assertTrue(self.wait_gone(watch), reuse_number)
                watcher.unwatch(watch)

    def test_readiness_that_is_stale_changes_nothing(self):
        # Streams register and leave while the watcher's thread waits, so it can be told of
        # a socket with nothing to read, or of a stream that has ended since.
        for watcher in self.each_watcher():
            server_side, client_side = self.pair()
            watch = watcher.watch(gdp.Relay(server_side, None))
            watcher._check(watch)  # nothing to read: still watched
            client_side.close()
            self.assertTrue(self.wait_gone(watch))
            watcher.unwatch(watch)
            server_side, client_side = self.pair()
            ended = watcher.watch(gdp.Relay(server_side, None))
            watcher.unwatch(ended)
            client_side.close()
            watcher._check(ended)
            self.assertFalse(ended.gone.is_set())

    def test_a_stream_that_ended_and_closed_after_its_readiness_changes_nothing(self):
        # select() reported the client's hang-up, then the stream noticed it too, ended and
        # its connection closed before the watcher's thread looked.
        for watcher in self.each_watcher():
            server_side, client_side = socket.socketpair()
            self.addCleanup(client_side.close)
            ended = watcher.watch(gdp.Relay(server_side, None))
            client_side.close()
            watcher.unwatch(ended)
            server_side.close()
            watcher._check(ended)
            server_side, client_side = self.pair()  # the watcher still works for the next one
            watch = watcher.watch(gdp.Relay(server_side, None))
            client_side.close()
            self.assertTrue(self.wait_gone(watch))
            watcher.unwatch(watch)


def selectors_select():
    import selectors
    return selectors.SelectSelector
