#!/usr/bin/env python3
"""gitlab-duo-proxy: use a GitLab Duo subscription from any Anthropic or OpenAI API client.

Serves the Anthropic Messages API (and an OpenAI-compatible front door) on
http://127.0.0.1:4141 and relays every call to GitLab's AI gateway, exchanging your
GitLab token for short-lived gateway tokens as needed. One file, Python 3.8+, standard
library only.

Quick start:
  cp .env.example .env          # put GITLAB_TOKEN=glpat-... in it (scope: ai_features)
  python3 gitlab_duo_proxy.py   # then point a client at http://127.0.0.1:4141

  ANTHROPIC_BASE_URL=http://127.0.0.1:4141 ANTHROPIC_AUTH_TOKEN=unused claude

Routes: POST /v1/messages, POST /v1/messages/count_tokens, GET /v1/models[/{id}],
POST /v1/chat/completions, POST /v1/responses, GET /stats, GET /metrics,
GET|HEAD /api/hello, /livez, /readyz, GET|HEAD /.

Settings come from command-line flags, then the environment, then a .env file (next
to this script and in the working directory, or the one --env-file names).
"""

import argparse
import base64
import calendar
import collections
import copy
import email.utils
import functools
import hashlib
import hmac
import html
import http.client
import http.server
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import select
import selectors
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import traceback
import types
import urllib.parse
import urllib.request

__version__ = "1.1.0"

# === Catalog ===

NAME = "gitlab-duo-proxy"
USER_AGENT = "%s/%s (python/%d.%d)" % ((NAME, __version__) + tuple(sys.version_info[:2]))
log = logging.getLogger("gitlab_duo_proxy")
MIB = 1024 * 1024

ANTHROPIC, OPENAI = "anthropic", "openai"  # the two APIs, and the two error dialects
# How a Claude model takes OpenAI's reasoning_effort (Anthropic's extended-thinking and effort
# docs): a thinking budget (4.5 and older), adaptive thinking with an effort (4.6, which has
# no "xhigh"), or adaptive thinking with every effort (4.7, the 5-series and later).
BUDGET, ADAPTIVE, ADAPTIVE_XHIGH = "budget", "adaptive", "adaptive+xhigh"

# A model and what the proxy must know to talk to it: which API serves it, how it thinks,
# and the name of its max-tokens parameter. A new family is a new row here.
Model = collections.namedtuple("Model", "id display_name created_at api context_window "
                                        "thinking max_tokens_field")


def claude(model_id, name, date, context, thinking):
    return Model(model_id, name, date + "T00:00:00Z", ANTHROPIC, context, thinking, "max_tokens")


def gpt(model_id, name, date, context):
    # GPT-5 and later refuse max_tokens: they want max_completion_tokens.
    return Model(model_id, name, date + "T00:00:00Z", OPENAI, context, None,
                 "max_completion_tokens")


# GitLab's lists as its gateway source had them on 2026-08-22. They change monthly: MODELS=
# edits this list without touching code, and model fallback keeps clients working when a
# name disappears. Dates order /v1/models (approximate for the newest models). A family
# name ("opus") means the newest of that family.
MODEL_CATALOG = (
    claude("claude-fable-5", "Claude Fable 5", "2026-08-01", 1000000, ADAPTIVE_XHIGH),
    claude("claude-opus-5", "Claude Opus 5", "2026-07-15", 1000000, ADAPTIVE_XHIGH),
    claude("claude-sonnet-5", "Claude Sonnet 5", "2026-07-15", 1000000, ADAPTIVE_XHIGH),
    claude("claude-opus-4-8", "Claude Opus 4.8", "2026-06-01", 1000000, ADAPTIVE_XHIGH),
    claude("claude-opus-4-7", "Claude Opus 4.7", "2026-04-01", 1000000, ADAPTIVE_XHIGH),
    claude("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17", 1000000, ADAPTIVE),
    claude("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05", 1000000, ADAPTIVE),
    claude("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24", 200000, BUDGET),
    claude("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15", 200000, BUDGET),
    claude("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29", 200000, BUDGET),
    gpt("gpt-5.6-sol", "GPT-5.6 Sol", "2026-07-22", 1050000),
    gpt("gpt-5.6-terra", "GPT-5.6 Terra", "2026-07-21", 1050000),
    gpt("gpt-5.6-luna", "GPT-5.6 Luna", "2026-07-20", 1050000),
    gpt("gpt-5.5-2026-04-23", "GPT-5.5", "2026-04-23", 1050000),
    gpt("gpt-5.4-2026-03-05", "GPT-5.4", "2026-03-05", 1050000),
    gpt("gpt-5.4-mini", "GPT-5.4 mini", "2026-03-05", 400000),
    gpt("gpt-5.4-nano", "GPT-5.4 nano", "2026-03-05", 400000),
    gpt("gpt-5.3-codex", "GPT-5.3 Codex", "2026-02-05", 400000),
    gpt("gpt-5.2-2025-12-11", "GPT-5.2", "2025-12-11", 400000),
    gpt("gpt-5.1-2025-11-13", "GPT-5.1", "2025-11-13", 400000),
    gpt("gpt-5-mini-2025-08-07", "GPT-5 mini", "2025-08-07", 400000),
)
# On every 2026 list GitLab published; claude-sonnet-4-5-20250929 retires 2026-11-30.
DEFAULT_MODEL = "claude-sonnet-4-6"
# Announced deprecations and retirements, shown in /v1/models.
LIFECYCLE = {"claude-sonnet-4-5-20250929": {"retires_at": "2026-11-30T00:00:00Z"},
             "gpt-5-mini-2025-08-07": {"deprecated_at": "2026-06-16T00:00:00Z"}}
FALLBACK_MEMORY = 3600  # seconds a fallback is remembered: a model GitLab adds later is found

_CLAUDE = re.compile(r"^claude-([a-z]+)-(\d+)(?:-(\d{1,2}))?(?:-(\d{8}))?$")
_CLAUDE_OLD = re.compile(r"^claude-(\d+)(?:-(\d{1,2}))?-([a-z]+)(?:-(\d{8}))?$")  # 3-5-sonnet
_GPT = re.compile(r"^gpt-(\d+)(?:\.(\d+))?((?:-[a-z]+)*)(?:-(\d{4}-\d{2}-\d{2}))?$")
_DATE_SUFFIX = re.compile(r"-(?:\d{8}|\d{4}-\d{2}-\d{2})$")
_SHORT_FAMILY = re.compile(r"^(?:claude-)?([a-z]+)$")
GPT_FAMILIES = ("codex", "mini", "nano")  # any other GPT is of the plain "gpt" family


def model_kind(model_id):
    """(family, (major, minor, date)) of a model id, e.g. ("opus", (4, 6, "")) or
    ("codex", (5, 3, "")); None for a name that follows no known pattern."""
    match = _CLAUDE.match(model_id) or _CLAUDE_OLD.match(model_id)
    if match and match.re is _CLAUDE:
        family, major, minor, date = match.groups()
    elif match:
        major, minor, family, date = match.groups()
    else:
        match = _GPT.match(model_id)
        if not match:
            return None
        major, minor, words, date = match.groups()
        family = next((w for w in GPT_FAMILIES if w in words.split("-")), "gpt")
    return family, (int(major), int(minor or 0), date or "")


def guess_model(model_id):
    """What a model id not in the catalog most likely is, by the rules of its family."""
    name, date = display_name_for(model_id), created_for(model_id)
    openai = re.match(r"^(?:gpt-(\d+)|o\d|codex)", model_id)
    if openai:
        new = openai.group(1) is None or int(openai.group(1)) >= 5
        return Model(model_id, name, date, OPENAI, 200000, None,
                     "max_completion_tokens" if new else "max_tokens")
    kind = model_kind(model_id) if model_id.startswith("claude-") else None
    version = kind[1][:2] if kind else (0, 0)
    thinking = ADAPTIVE_XHIGH if version >= (4, 7) else ADAPTIVE if version >= (4, 6) else BUDGET
    return Model(model_id, name, date, ANTHROPIC, 200000, thinking, "max_tokens")


def display_name_for(model_id):
    words = _DATE_SUFFIX.sub("", model_id).split("-")
    if words[0] == "claude":
        family = [w.capitalize() for w in words[1:] if not w.isdigit()]
        version = ".".join(w for w in words[1:] if w.isdigit())
        return " ".join(["Claude"] + family + ([version] if version else []))
    return "-".join(w.upper() if w == "gpt" else w for w in words)


def created_for(model_id):
    match = re.search(r"(\d{4})-?(\d{2})-?(\d{2})$", model_id)
    return "%s-%s-%sT00:00:00Z" % match.groups() if match else "2026-01-01T00:00:00Z"


def build_catalog(spec, builtin=MODEL_CATALOG):
    """The model list after MODELS= (plain ids replace the list; +id adds, -id removes)."""
    entries = [item.strip() for item in spec.split(",") if item.strip()]
    known = {m.id: m for m in builtin}
    models = [] if any(e[0] not in "+-" for e in entries) else list(builtin)
    for entry in entries:
        model_id = entry.lstrip("+-").strip()
        if entry.startswith("-"):
            models = [m for m in models if m.id != model_id]
        elif all(m.id != model_id for m in models):
            models.append(known.get(model_id) or guess_model(model_id))
    models.sort(key=lambda m: (m.created_at, m.id), reverse=True)
    return tuple(models)


class Catalog:
    """The models this proxy knows, and what a client's model name means."""

    def __init__(self, models, default_model):
        self.models = tuple(models)
        self.by_id = {m.id: m for m in self.models}
        self.default_model = self.resolve(default_model) if default_model else ""

    @classmethod
    def from_config(cls, config):
        return cls(build_catalog(config.models), config.default_model)

    def ids(self, api=None):
        return [m.id for m in self.models if api in (None, m.api)]

    def spec(self, model_id):
        """The catalog's entry for a model, or what the rules of its family make of it."""
        return self.by_id.get(model_id) or guess_model(model_id)

    def resolve(self, name):
        """The id GitLab wants for a client's model name (unknown names unchanged)."""
        name = name.strip()
        if not name or name == "duo-chat":
            return self.default_model or name
        if name in self.by_id:
            return name
        if name.startswith("duo-chat-"):  # GitLab's own: duo-chat-opus-4-6, duo-chat-gpt-5-4
            rest = re.sub(r"^gpt-(\d+)-(\d+)", r"gpt-\1.\2", name[len("duo-chat-"):])
            return self.resolve(rest if rest.startswith("gpt-") else "claude-" + rest)
        if name.endswith("-latest"):
            return self.resolve(name[:-len("-latest")])
        short = _SHORT_FAMILY.match(name)
        family = short and self.newest(short.group(1))
        return family or self._dated(name) or self._undated(name) or name

    def _dated(self, name):
        """claude-sonnet-4-5 -> claude-sonnet-4-5-20250929; gpt-5.4 -> gpt-5.4-2026-03-05."""
        dated = [m.id for m in self.models
                 if m.id.startswith(name + "-") and _DATE_SUFFIX.match(m.id[len(name):])]
        return max(dated) if dated else None

    def _undated(self, name):
        """A dated name for a model GitLab lists without a date (claude-opus-4-6-20260205)."""
        base = _DATE_SUFFIX.sub("", name)
        return base if base != name and base in self.by_id else None

    def newest(self, family, exclude=()):
        """The newest catalog model of a family ("opus", "codex"); None if it has none."""
        members = [m for m in self.models if m.id not in exclude
                   and (model_kind(m.id) or ("",))[0] == family]
        if not members:
            return None
        return max(members, key=lambda m: (model_kind(m.id)[1], m.created_at)).id

    def fallback_for(self, model_id):
        """What serves a model GitLab does not: the newest other catalog model of its
        family (claude-opus-5-5 -> claude-opus-5); None for a name of no known family."""
        kind = model_kind(model_id)
        return self.newest(kind[0], exclude=(model_id,)) if kind else None

    def page(self, limit=20, after_id=None, before_id=None, api=None):
        """One page of /v1/models, newest first, as (models, has_more)."""
        models = [m for m in self.models if api in (None, m.api)]
        ids = [m.id for m in models]
        for cursor in (after_id, before_id):
            if cursor is not None and cursor not in ids:
                raise BadRequest("unknown model id %r in after_id/before_id; list /v1/models "
                                 "without it first" % cursor)
        if after_id is not None:
            models = models[ids.index(after_id) + 1:]
        elif before_id is not None:
            models = models[:ids.index(before_id)]
            return models[-limit:], len(models) > limit
        return models[:limit], len(models) > limit


def model_entry(model):
    """A model in Anthropic's schema with OpenAI's fields beside it."""
    created = calendar.timegm(time.strptime(model.created_at, "%Y-%m-%dT%H:%M:%SZ"))
    dates = LIFECYCLE.get(model.id, {})
    return {"type": "model", "id": model.id, "display_name": model.display_name,
            "created_at": model.created_at, "max_input_tokens": model.context_window,
            "lifecycle": "deprecated" if dates else "active",
            "deprecated_at": dates.get("deprecated_at"), "retires_at": dates.get("retires_at"),
            "object": "model", "created": created, "owned_by": model.api}


def parse_page_args(query):
    """limit/after_id/before_id from a /v1/models query string."""
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise BadRequest("limit must be a whole number between 1 and 1000") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000")
    after_id, before_id = query.get("after_id"), query.get("before_id")
    if after_id is not None and before_id is not None:
        raise BadRequest("give after_id or before_id, not both")
    return limit, after_id, before_id


# === Errors ===

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error",
}


class ProxyError(Exception):
    """An error the client receives with this status, as Anthropic's error JSON (or
    OpenAI's, on the OpenAI routes)."""

    status = 500
    kind = None  # an error type to keep, instead of the one the status implies
    upstream_status = None  # the HTTP status GitLab answered, when it came from there
    definitive = False  # GitLab rejected the token itself (team mode remembers that)

    def __init__(self, message, status=None, headers=None, retry=None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})
        self.retry = retry  # None: let the client decide; True/False: x-should-retry

    @property
    def error_type(self):
        """Anthropic's error type: the one kept from upstream, else the status's."""
        return self.kind or ERROR_TYPES.get(self.status) or (
            "invalid_request_error" if self.status < 500 else "api_error")

    def body(self, dialect=ANTHROPIC):
        if dialect == OPENAI:
            return openai_error_body(self.status, self.error_type, self.message)
        return anthropic_error_body(self.error_type, self.message)


# ProxyErrors that differ only in their status.
BadRequest = type("BadRequest", (ProxyError,), {"status": 400})
Unauthorized = type("Unauthorized", (ProxyError,), {"status": 401})
NotFound = type("NotFound", (ProxyError,), {"status": 404})
MethodNotAllowed = type("MethodNotAllowed", (ProxyError,), {"status": 405})
LengthRequired = type("LengthRequired", (ProxyError,), {"status": 411})
PayloadTooLarge = type("PayloadTooLarge", (ProxyError,), {"status": 413})
UpstreamUnreachable = type("UpstreamUnreachable", (ProxyError,), {"status": 502})
RateLimited = type("RateLimited", (ProxyError,), {"status": 429})
UpstreamTimeout = type("UpstreamTimeout", (ProxyError,), {"status": 504})


class PassThrough(ProxyError):
    """An upstream error already in the client's dialect: relayed byte for byte."""

    def __init__(self, status, raw, headers=None, retry=None):
        super().__init__("upstream error %d" % status, status, headers, retry)
        self.raw = raw

    def body(self, dialect=ANTHROPIC):
        return self.raw


class ClientGone(Exception):
    """The client closed its connection; there is nobody left to answer."""


class ConfigError(Exception):
    """A setting is missing or malformed; start-up stops with this one line."""


def anthropic_error_body(error_type, message):
    return json.dumps({"type": "error", "error": {"type": error_type,
                                                  "message": message}}).encode()


OPENAI_ERROR_TYPES = {
    "authentication_error": "authentication_error", "permission_error": "permission_error",
    "rate_limit_error": "rate_limit_error", "billing_error": "insufficient_quota",
    "not_found_error": "invalid_request_error", "request_too_large": "invalid_request_error",
    "overloaded_error": "server_error", "api_error": "server_error",
    "timeout_error": "server_error", "invalid_request_error": "invalid_request_error"}


def openai_error_body(status, error_type, message):
    """OpenAI's error shape, with the code its SDKs and tools look for where one fits."""
    code = None
    if "prompt is too long" in message or "context length" in message.lower():
        code = "context_length_exceeded"
    elif status == 401:
        code = "invalid_api_key"
    elif status == 404 and error_type == "not_found_error":
        code = "model_not_found" if "model" in message else None
    elif status == 429:
        code = "rate_limit_exceeded"
    return json.dumps({"error": {"message": message, "param": None, "code": code,
                                 "type": OPENAI_ERROR_TYPES.get(error_type, error_type)}}).encode()


def error_message_of(obj):
    """The human message in one of GitLab's or the gateway's error shapes."""
    if not isinstance(obj, dict):
        return None
    for key in ("message", "detail", "error_description", "error"):
        value = obj.get(key)
        if isinstance(value, dict):
            value = error_message_of(value)
        if isinstance(value, list):
            value = "; ".join(str(v.get("msg", v) if isinstance(v, dict) else v) for v in value)
        if isinstance(value, str) and value:
            if key == "error" and isinstance(obj.get("message"), str):
                continue
            return value
    return None


def is_anthropic_error(obj):
    return (isinstance(obj, dict) and obj.get("type") == "error"
            and isinstance(obj.get("error"), dict) and isinstance(obj["error"].get("type"), str))


def is_openai_error(obj):
    return (isinstance(obj, dict) and isinstance(obj.get("error"), dict)
            and isinstance(obj["error"].get("message"), str))


def gateway_problem(raw):
    """"unsupported_model", "not_entitled" or None: gateway answers worth a second try."""
    obj = parse_json_or_none(raw)
    if not isinstance(obj, dict):
        return None
    if obj.get("error") == "not_entitled" or obj.get("error_code") == "USAGE_QUOTA_NOT_ENTITLED":
        return "not_entitled"
    if str(obj.get("detail", "")).lower() == "unsupported model":
        return "unsupported_model"
    return None


def gateway_error_hint(status, message, obj, model, known_models):
    """What a user can do about a gateway error that is not Anthropic's own."""
    lower = (message or "").lower()
    code = str(obj.get("error_code", "") if isinstance(obj, dict) else "")
    if "unsupported model" in lower:
        return ("GitLab does not serve model %r. Other models this proxy knows: %s. If GitLab's "
                "list changed, set MODELS or pick another model." % (model, ", ".join(
                    m for m in known_models if m != model)))
    if "failed to extract model" in lower:
        return "The request needs a \"model\" string."
    if code == "USAGE_QUOTA_EXCEEDED" or "insufficient_credits" in lower:
        return ("Your GitLab Duo credits are used up. Ask whoever manages your GitLab "
                "subscription for more; GitLab may keep giving this answer for up to an hour "
                "after credits are added.")
    if code == "USAGE_QUOTA_NOT_ENTITLED" or "not_entitled" in lower:
        return ("This may be temporary: GitLab gives this answer when its billing check fails "
                "or times out, and the proxy already retried once. If it persists, check that "
                "your subscription gives you a GitLab Duo seat or Duo Agent Platform credits.")
    if "proxy endpoints are not enabled" in lower:
        return ("This is an allowlist GitLab operates, not a setting of your group or instance: "
                "ask GitLab support or your GitLab account team to enable the Duo proxy "
                "endpoints for it.")
    if "missing x-gitlab" in lower or "mismatch" in lower:
        return "GitLab's headers were not accepted; this is a proxy bug, please report it."
    return GATEWAY_STATUS_HINTS.get(status, "")


GATEWAY_STATUS_HINTS = {
    401: "The AI gateway rejected the token even after a fresh exchange. Check that your GitLab "
         "token is valid with scope ai_features and that your Duo seat is active.",
    402: "GitLab refused to bill this request; check your Duo subscription and credits.",
    403: "GitLab does not allow this for your account; check your Duo seat and namespace "
         "settings.",
    404: "The gateway has no such route: check GITLAB_AI_GATEWAY_URL and GITLAB_AI_GATEWAY_PREFIX "
         "(a self-hosted gateway usually needs an empty prefix).",
    429: "Too many requests; wait a moment and retry.",
    502: "The gateway could not reach the model provider; retry shortly.",
    503: "The gateway is unavailable; retry shortly.",
    504: "The gateway timed out; retry, or use streaming for long answers.",
}


def translate_gateway_error(status, raw, model, known_models, upstream=ANTHROPIC,
                            dialect=ANTHROPIC):
    """The error a client gets for a failed gateway answer. An error already in the
    client's dialect passes through as it is (PassThrough); an Anthropic error reaching an
    OpenAI client keeps its message and type; GitLab's own shapes get a hint."""
    obj = parse_json_or_none(raw)
    native = is_anthropic_error(obj) if upstream == ANTHROPIC else is_openai_error(obj)
    if native and dialect == upstream:
        return PassThrough(status, raw)
    if native and upstream == ANTHROPIC:
        error = ProxyError(obj["error"].get("message") or "error", status)
        error.kind = obj["error"]["type"]
        return error
    if native:
        return ProxyError(obj["error"]["message"], status)
    message = (error_message_of(obj) or short_text(raw)
               or http.client.responses.get(status, "error"))
    hint = gateway_error_hint(status, message, obj, model, known_models)
    text = "GitLab AI gateway answered %d: %s" % (status, message.rstrip("."))
    return ProxyError(text + (". " + hint if hint else ""), status)


def short_text(raw, limit=300):
    text = raw.decode("utf-8", "replace").strip()
    return "" if "<html" in text[:200].lower() else " ".join(text.split())[:limit]


TOKEN_ERROR_HINTS = {
    401: "GitLab rejected the GitLab token (%s): it is invalid, expired or revoked. Create a "
         "personal access token with scope ai_features (or refresh your OAuth token) and use it "
         "instead.",
    403: "GitLab refused a Duo token (%s): Duo is not enabled for this user. Using third-party "
         "agents needs a GitLab Duo seat (Pro or Enterprise) or Duo Agent Platform credits; on a "
         "self-managed instance an administrator must also turn on the feature flag "
         "agent_platform_claude_code (off by default) and must not have turned off direct "
         "connections to the AI gateway.",
    429: "GitLab rate-limited the token exchange (%s); retry shortly.",
}
NO_DUO_NAMESPACE = ("GitLab could not mint a Duo token (503: %s): you have no default GitLab "
                    "Duo namespace. In GitLab, open your user Preferences (/-/profile/"
                    "preferences), choose a default GitLab Duo namespace (a group where you have "
                    "Duo), save, and retry.")
MINT_FAILED = ("GitLab could not mint a Duo token (503: %s). This is often temporary (GitLab "
               "gives its gateway only a few seconds); retry. If it persists, check your Duo "
               "seat, credits and default Duo namespace.")


def translate_token_error(status, raw, retry_after=None):
    """A failed direct_access exchange as an actionable Anthropic error."""
    obj = parse_json_or_none(raw)
    message = error_message_of(obj) or short_text(raw) or http.client.responses.get(status, "")
    headers = {"retry-after": str(int(retry_after + 0.999))} if retry_after is not None else None
    scope = isinstance(obj, dict) and obj.get("error") == "insufficient_scope"
    if scope:
        error = ProxyError("The GitLab token lacks the needed scope (%s). The Duo token "
                           "exchange needs scope ai_features: create a personal access token "
                           "with it." % message, 403, retry=False)
    elif status == 503:
        no_namespace = "default gitlab duo namespace" in message.lower()
        error = ProxyError((NO_DUO_NAMESPACE if no_namespace else MINT_FAILED) % message, 503,
                           headers, retry=True)
    elif status in TOKEN_ERROR_HINTS:
        error = ProxyError(TOKEN_ERROR_HINTS[status] % message, status, headers,
                           retry=status == 429)
    else:
        error = ProxyError("GitLab's token exchange failed with %d (%s); check "
                           "GITLAB_INSTANCE_URL." % (status, message), 502)
    error.upstream_status = status
    # GitLab said no to the token itself: asking again with it cannot help.
    error.definitive = status == 401 or scope
    return error


# === Config ===

Option = collections.namedtuple("Option", "dest env flag default kind help")

OPTIONS = (
    Option("gitlab_token", "GITLAB_TOKEN", None, "", "secret",
           "GitLab personal access token (scope ai_features; read_user optional, for usernames) "
           "or OAuth access token; environment or .env only, never a flag, so it stays out of "
           "process lists"),
    Option("gitlab_token_file", "GITLAB_TOKEN_FILE", "--token-file", "", "str",
           "read the GitLab token from this file"),
    Option("gitlab_token_command", "GITLAB_TOKEN_COMMAND", "--token-command", "", "str",
           "run this command and use its output as the GitLab token (re-run when GitLab "
           "rejects the token), e.g. 'pass show gitlab'"),
    Option("instance_url", "GITLAB_INSTANCE_URL", "--instance-url", "https://gitlab.com", "url",
           "GitLab instance that exchanges the token"),
    Option("gateway_url", "GITLAB_AI_GATEWAY_URL", "--gateway-url", "https://cloud.gitlab.com",
           "url", "GitLab AI gateway"),
    Option("gateway_prefix", "GITLAB_AI_GATEWAY_PREFIX", "--gateway-prefix", "/ai", "prefix",
           "path under which the gateway serves /v1/proxy/...; empty for a self-hosted "
           "gateway such as a local GDK's (http://localhost:5052)"),
    Option("host", "HOST", "--host", "127.0.0.1", "str", "address to listen on"),
    Option("port", "PORT", "--port", 4141, "port", "port to listen on (0: any free port)"),
    Option("default_model", "DEFAULT_MODEL", "--default-model", DEFAULT_MODEL, "str",
           "model used when a request names none; aliases allowed"),
    Option("models", "MODELS", "--catalog", "", "str",
           "model catalog: comma-separated ids replacing the built-in list, or +id / -id "
           "entries that add to or remove from it"),
    Option("model_fallback", "MODEL_FALLBACK", "--model-fallback", True, "switch",
           "when GitLab does not serve a model, serve the request with the newest catalog "
           "model of the same family (remembered for an hour, logged); off returns GitLab's "
           "error"),
    Option("api_key", "PROXY_API_KEY", "--api-key", "", "secret",
           "key clients must send (x-api-key or Authorization: Bearer); required to listen "
           "beyond loopback"),
    Option("allow_unauthenticated", "ALLOW_UNAUTHENTICATED", "--allow-unauthenticated", False,
           "bool", "listen on a non-loopback address without PROXY_API_KEY (anyone who reaches "
           "the port spends your Duo seat)"),
    Option("per_user", "PER_USER", "--per-user", False, "bool",
           "team mode: each client sends its own GitLab token as its API key"),
    Option("tls_cert", "TLS_CERT", "--tls-cert", "", "str",
           "serve HTTPS with this certificate (PEM)"),
    Option("tls_key", "TLS_KEY", "--tls-key", "", "str", "private key for --tls-cert (PEM)"),
    Option("ca_bundle", "GITLAB_CA_BUNDLE", "--ca-bundle", "", "str",
           "CA certificates (PEM) to trust for GitLab and the gateway, for internal CAs "
           "(SSL_CERT_FILE works too)"),
    Option("max_body", "MAX_REQUEST_BYTES", "--max-request-bytes", 32 * MIB, "int",
           "largest request body accepted (bytes)"),
    Option("max_connections", "MAX_CONNECTIONS", "--max-connections", 1024, "int",
           "client connections served at once; beyond it a new connection gets an immediate "
           "503 and is closed"),
    Option("connect_timeout", "CONNECT_TIMEOUT", "--connect-timeout", 10.0, "float",
           "seconds to connect to GitLab or the gateway"),
    Option("token_timeout", "TOKEN_TIMEOUT", "--token-timeout", 15.0, "float",
           "seconds to wait for GitLab's token exchange"),
    Option("read_timeout", "READ_TIMEOUT", "--read-timeout", 600.0, "float",
           "seconds to wait for the gateway's answer to start (non-streaming generations "
           "are silent until done)"),
    Option("stream_idle_timeout", "STREAM_IDLE_TIMEOUT", "--stream-idle-timeout", 300.0, "float",
           "seconds a stream may stay silent before it is cut"),
    Option("stream_max_seconds", "STREAM_MAX_SECONDS", "--stream-max-seconds", 3600.0, "float",
           "longest a single stream may last"),
    Option("client_timeout", "CLIENT_TIMEOUT", "--client-timeout", 120.0, "float",
           "seconds an idle or stalled client connection is kept"),
    Option("retries", "UPSTREAM_RETRIES", "--retries", 2, "int",
           "retries on connection errors, 408, 429, 502, 503, 504 and 529 before any byte "
           "reached the client"),
    Option("retry_base_delay", "RETRY_BASE_DELAY", "--retry-base-delay", 0.5, "float",
           "first retry delay in seconds (doubles each time, with jitter)"),
    Option("retry_max_seconds", "RETRY_MAX_SECONDS", "--retry-max-seconds", 20.0, "float",
           "total time retries may add to one request"),
    Option("shutdown_grace", "SHUTDOWN_GRACE", "--shutdown-grace", 30.0, "float",
           "seconds in-flight requests get to finish on SIGINT/SIGTERM"),
    Option("drain_seconds", "DRAIN_SECONDS", "--drain-seconds", 0.0, "float",
           "after SIGINT/SIGTERM, keep serving this long, every answer closing its connection, "
           "while /readyz answers 503: a load balancer takes the replica out before it stops"),
    Option("trusted_proxies", "TRUSTED_PROXIES", "--trusted-proxies", (), "networks",
           "comma-separated addresses or CIDRs of reverse proxies whose X-Forwarded-For is "
           "believed for the client's address (per-address throttle, log)"),
    Option("cors_origins", "CORS_ORIGINS", "--cors-origins", "", "str",
           "comma-separated origins allowed to call from a browser (none by default)"),
    Option("log_format", "LOG_FORMAT", "--log-format", "text", "logformat",
           "log lines as text or json"),
    Option("log_file", "LOG_FILE", "--log-file", "", "str",
           "append log lines to this file instead of stderr (for pythonw and services)"),
    Option("debug", "DEBUG", "--debug", False, "bool", "log headers too (secrets redacted)"),
)

# Settings that come from elsewhere than OPTIONS: the usual proxy variables, and notes
# on where things came from.
EXTRA_FIELDS = (("https_proxy", ""), ("http_proxy", ""), ("no_proxy", ""), ("token_source", ""),
                ("env_files", ()))
SECRET_FIELDS = frozenset(("gitlab_token", "api_key", "https_proxy", "http_proxy"))


class Config(collections.namedtuple(
        "Config", [o.dest for o in OPTIONS] + [f for f, _ in EXTRA_FIELDS],
        defaults=[o.default for o in OPTIONS] + [d for _, d in EXTRA_FIELDS])):
    """Every setting, read once at start-up (immutable); nothing else reads the environment."""

    __slots__ = ()

    def __repr__(self):
        shown = ("%s=%r" % (k, "[hidden]" if k in SECRET_FIELDS and v else v)
                 for k, v in zip(self._fields, self))
        return "Config(%s)" % ", ".join(shown)

    @property
    def gateway_base(self):
        base = self.gateway_url.rstrip("/")
        if self.gateway_prefix and not base.endswith(self.gateway_prefix):
            base += self.gateway_prefix
        return base


def parse_dotenv(text):
    """KEY=VALUE lines as a dict: `export ` prefixes, quotes and # comments allowed."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[7:].strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def read_env_files(paths):
    """Merged .env values (later files win) and the file each value came from."""
    values, origin = {}, {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("cannot read %s: %s" % (path, exc)) from None
        for key, value in parse_dotenv(text).items():
            values[key] = value
            origin[key] = path
    return values, origin


def default_env_files(cwd=None, script_dir=None):
    here = os.path.join(script_dir or os.path.dirname(os.path.abspath(__file__)), ".env")
    there = os.path.join(cwd or os.getcwd(), ".env")
    return [here] if os.path.abspath(here) == os.path.abspath(there) else [here, there]


def parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false, 1/0, yes/no or on/off")


def parse_url(text):
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    parts.port  # noqa: B018 -- raises ValueError for a malformed port
    return text.strip().rstrip("/")


def parse_port(text):
    port = int(str(text).strip())
    if not 0 <= port <= 65535:
        raise ValueError("expected a number between 0 and 65535")
    return port


def parse_prefix(text):
    value = str(text).strip().strip("/")
    return "/" + value if value else ""


def parse_positive(kind):
    def parse(text):
        value = int(str(text).strip()) if kind == "int" else float(str(text).strip())
        if value < 0:
            raise ValueError("must not be negative")
        return value
    return parse


def parse_networks(text):
    try:
        return tuple(ipaddress.ip_network(item.strip(), strict=False)
                     for item in str(text).split(",") if item.strip())
    except ValueError as exc:
        raise ValueError("expected comma-separated addresses or CIDRs (%s)" % exc) from None


def parse_log_format(text):
    value = str(text).strip().lower()
    if value not in ("text", "json"):
        raise ValueError("expected text or json")
    return value


PARSERS = {
    "str": lambda v: str(v).strip(), "secret": lambda v: str(v).strip(), "url": parse_url,
    "port": parse_port, "bool": parse_bool, "switch": parse_bool, "int": parse_positive("int"),
    "float": parse_positive("float"), "prefix": parse_prefix, "logformat": parse_log_format,
    "networks": parse_networks,
}


def build_arg_parser():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment only: GITLAB_TOKEN (%s). Corporate proxies: HTTPS_PROXY, "
               "HTTP_PROXY, NO_PROXY." % OPTIONS[0].help)
    parser.add_argument("--version", action="version", version="%s %s" % (NAME, __version__))
    parser.add_argument("--env-file", metavar="PATH",
                        help="read settings from this .env file instead of ./.env and the "
                             "one next to the script")
    for opt in OPTIONS:
        if opt.flag is None:
            continue
        if opt.kind in ("bool", "switch"):
            shown = "on" if opt.default else "off"
        else:
            shown = repr(opt.default) if opt.default not in ("", ()) else "unset"
        text = ("%s (default: %s; env %s)" % (opt.help, shown, opt.env)).replace("%", "%%")
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.dest, action="store_const", const="1",
                                default=None, help=text)
        else:  # a switch takes on or off, like its variable
            metavar = "on|off" if opt.kind == "switch" else opt.env
            parser.add_argument(opt.flag, dest=opt.dest, default=None, metavar=metavar, help=text)
    add_action_arguments(parser)
    return parser


def resolve_settings(args, environ, dotenv):
    """Flags win over the environment, which wins over .env files."""
    values, sources = {}, {}
    for opt in OPTIONS:
        flag_value = getattr(args, opt.dest, None)
        if flag_value is not None:
            raw, source = flag_value, opt.flag
        elif opt.env in environ:
            raw, source = environ[opt.env], "environment"
        elif opt.env in dotenv:
            raw, source = dotenv[opt.env], ".env"
        else:
            values[opt.dest] = opt.default
            continue
        try:
            values[opt.dest] = PARSERS[opt.kind](raw)
        except ValueError as exc:
            shown = "(hidden)" if opt.kind == "secret" else repr(str(raw))
            raise ConfigError("%s=%s is not valid: %s" % (opt.env, shown, exc)) from None
        sources[opt.dest] = source
    return values, sources


def proxy_settings(environ, dotenv):
    def pick(name):
        for key in (name.upper(), name.lower()):
            if key in environ:
                return environ[key]
        return dotenv.get(name.upper(), dotenv.get(name.lower(), ""))
    values = {key: pick(key) for key in ("https_proxy", "http_proxy", "no_proxy")}
    for key in ("https_proxy", "http_proxy"):
        if values[key] and not urllib.parse.urlsplit(values[key]).hostname:
            raise ConfigError("%s is not a proxy URL (expected http://host:port)" % key.upper())
        if values[key].startswith("https://"):
            raise ConfigError("%s: only http:// proxies are supported (CONNECT tunnels "
                              "still carry TLS end to end)" % key.upper())
    return values


def load_config(argv=None, environ=None, cwd=None, script_dir=None):
    """Parse flags, environment and .env files into (Config, parsed args, warnings)."""
    environ = os.environ if environ is None else environ
    args = build_arg_parser().parse_args(argv)
    files = [args.env_file] if args.env_file else default_env_files(cwd, script_dir)
    if args.env_file and not os.path.isfile(args.env_file):
        raise ConfigError("--env-file %s: no such file" % args.env_file)
    dotenv, origin = read_env_files(files)
    values, sources = resolve_settings(args, environ, dotenv)
    values.update(proxy_settings(environ, dotenv))
    values["env_files"] = tuple(p for p in files if os.path.isfile(p))
    warnings = []
    if sources.get("gitlab_token") == ".env":
        warnings.extend(check_file_private(origin["GITLAB_TOKEN"]))
    values["token_source"] = describe_token_source(values, sources, origin)
    config = Config(**values)
    validate_config(config, args)
    return config, args, warnings


def describe_token_source(values, sources, origin):
    if values["gitlab_token"]:
        source = sources.get("gitlab_token")
        return "GITLAB_TOKEN in %s" % (origin["GITLAB_TOKEN"] if source == ".env"
                                       else "the environment")
    if values["gitlab_token_file"]:
        return "GITLAB_TOKEN_FILE %s" % values["gitlab_token_file"]
    return "GITLAB_TOKEN_COMMAND" if values["gitlab_token_command"] else ""


def check_file_private(path):
    """A warning when a file holding the token is readable by group or others."""
    if os.name != "posix":
        return []
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return ["%s holds GITLAB_TOKEN and is readable by other users (mode %s); run: chmod 600 %s"
                % (path, oct(mode & 0o777), shlex.quote(path))]
    return []


def is_loopback(host):
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate_config(config, args):
    needs_token = not (config.per_user or args.print_env or args.goose_config)
    if needs_token and not config.token_source:
        raise ConfigError("no GitLab token: set GITLAB_TOKEN (in the environment or .env), "
                          "GITLAB_TOKEN_FILE or GITLAB_TOKEN_COMMAND, or use --per-user")
    if config.per_user and config.token_source and not args.check:
        raise ConfigError("--per-user takes each client's own GitLab token; remove %s (or "
                          "use --env-file with another file)" % config.token_source)
    if config.per_user and config.api_key:
        raise ConfigError("--per-user uses each client's GitLab token as its key; PROXY_API_KEY "
                          "cannot be combined with it")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if config.max_connections < 1:
        raise ConfigError("MAX_CONNECTIONS must be at least 1")
    if not is_loopback(config.host) and not (config.api_key or config.per_user
                                             or config.allow_unauthenticated):
        raise ConfigError("refusing to listen on %s without PROXY_API_KEY: anyone who reaches "
                          "the port could spend your Duo seat. Set PROXY_API_KEY, or pass "
                          "--allow-unauthenticated if the network is trusted" % config.host)


# === HTTP helpers ===

DIRECT_ACCESS_PATH = "/api/v4/ai/third_party_agents/direct_access"
# GitLab ignores the body; its own client sends this, so we do too.
DIRECT_ACCESS_BODY = b'{"feature_flags": {"DuoAgentPlatformNext": true}}'
PROXY_PATHS = {ANTHROPIC: "/v1/proxy/anthropic", OPENAI: "/v1/proxy/openai"}
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
SECRET_HEADERS = frozenset((
    "authorization", "x-api-key", "proxy-authorization", "cookie", "set-cookie",
    "private-token", "x-gitlab-oidc-token", "job-token",
))
# Upstream response headers a client may see; everything else (cookies, server
# software, hop-by-hop framing) stays behind the proxy.
RESPONSE_HEADER_ALLOW = ("content-type", "content-encoding", "anthropic-", "openai-",
                         "retry-after", "x-should-retry", "x-ratelimit-")
# Worth another try before anything reached the client (other 4xx never are).
RETRY_STATUSES = frozenset((408, 429, 502, 503, 504, 529))
TOO_DEEP = ("request body is nested too deeply (over about 900 levels of arrays and objects); "
            "flatten it")


def parse_json_or_none(data):
    """JSON, or None for what json.loads cannot read (or nests too deeply for Python)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        return None


def parse_body(raw):
    """A request body as a dict, or BadRequest saying precisely what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("request body is not valid UTF-8 (byte %d); send JSON encoded as "
                         "UTF-8" % exc.start) from None
    if not text.strip():
        raise BadRequest("request body is empty; send a JSON object ({...})")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest("request body is not valid JSON: %s%s at line %d column %d (char %d)" % (
            exc.msg[:1].lower(), exc.msg[1:], exc.lineno, exc.colno, exc.pos)) from None
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object ({...}), not %s" % json_kind(body))
    if not isinstance(body.get("model", ""), (str, type(None))):  # on every route
        raise BadRequest("model must be a string: the request needs a \"model\" string (such as "
                         "%s), not %s" % (DEFAULT_MODEL, json_kind(body["model"])))
    return body


def json_kind(value):
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {list: "an array", str: "a string", dict: "an object"}.get(type(value), "a number")


JSON_TYPES = {"string": str, "array": list, "object": dict, "boolean": bool, "integer": int,
              "number": (int, float)}


def field(obj, key, kinds, where="", error=BadRequest):
    """obj[key] when it is absent, null, or of one of the JSON types kinds names ("string",
    "string|array"); else error naming the field's path (messages[2].content[0].text)."""
    value = obj.get(key)
    if value is None or any(isinstance(value, JSON_TYPES[k]) and (k == "boolean") ==
                            isinstance(value, bool) for k in kinds.split("|")):
        return value
    raise error("%s%s must be %s, not %s" % (where, key, " or ".join(
        ("an " if k[0] in "aeiou" else "a ") + k for k in kinds.split("|")), json_kind(value)))


def bad_answer(problem):
    return UpstreamUnreachable("GitLab's AI gateway sent an answer the proxy could not translate "
                               "(%s); retry, and report it if it persists" % problem)


answer_field = functools.partial(field, error=bad_answer)  # for what the gateway sends


def dump_json(obj):
    """obj as compact JSON bytes; nesting Python cannot write out is the client's 400."""
    try:
        return json.dumps(obj, separators=(",", ":")).encode()
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None


def body_with(members, changes, renames=None):
    """A request body re-serialised with some values changed and keys renamed (the same
    JSON, other spacing). Bodies that need no change go upstream as they came."""
    renames = renames or {}
    body = {renames.get(key, key): value for key, value in members.items()}
    body.update(changes)
    return dump_json(body)


def split_target(target):
    """(path, query dict) of a request target; /v1/v1/... is accepted as /v1/..."""
    path, _, query = target.partition("?")
    if "://" in path:
        raise NotFound("absolute URLs are not served: this is not an open proxy")
    while path.startswith("/v1/v1/") or path == "/v1/v1":
        path = path[3:]
    if len(path) > 1:
        path = path.rstrip("/")
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True)) if query else {}
    return path, params


def read_body(headers, rfile, limit):
    """A request's body from rfile, framed by Content-Length or chunked; LengthRequired
    when it has neither; any other error leaves the rest of the body on the socket."""
    encoding = headers.get("Transfer-Encoding")
    if encoding:
        if encoding.strip().lower() != "chunked":
            raise BadRequest("Transfer-Encoding %r is not supported; send Content-Length or "
                             "chunked" % safe_for_log(encoding))
        return read_chunked(rfile, limit)
    lengths = [v.strip() for v in headers.get_all("Content-Length") or []]
    if not lengths:
        raise LengthRequired("a request body needs a Content-Length header (or chunked "
                             "transfer encoding)")
    if len(set(lengths)) > 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
        raise BadRequest("invalid Content-Length header")
    length = int(lengths[0])
    if length > limit:
        raise too_large(length, limit)
    data = rfile.read(length)
    if len(data) < length:
        raise BadRequest("the request body ended after %d of the %d bytes its Content-Length "
                         "announced; send the whole body" % (len(data), length))
    return data


def too_large(length, limit):
    return PayloadTooLarge("request body of %d bytes is over the proxy's limit of %d bytes "
                           "(MAX_REQUEST_BYTES); shorten the conversation or raise the limit"
                           % (length, limit))


def read_chunked(rfile, limit):
    parts, total = [], 0
    while True:
        line = rfile.readline(1026)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("malformed chunked request body") from None
        if size == 0:
            break
        total += size
        if total > limit:
            raise too_large(total, limit)
        chunk = rfile.read(size)
        if len(chunk) < size or rfile.read(2) != b"\r\n":
            raise BadRequest("malformed or truncated chunked request body")
        parts.append(chunk)
    while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
        pass  # trailer fields carry nothing we use
    return b"".join(parts)


def presented_key(headers):
    """The key a client sent: x-api-key, a Bearer token, or a browser's Basic password."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("latin-1").partition(
                ":")[2]
        except ValueError:
            return ""
    return ""


def response_head(status, fields):
    """An HTTP/1.1 response head: the status line, then (name, value) fields, cleaned."""
    lines = ["HTTP/1.1 %d %s" % (status, http.client.responses.get(status, "Unknown"))]
    lines.extend("%s: %s" % (k, clean_header_value(v)) for k, v in fields)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def ip_of(text):
    """An address as ipaddress knows it (IPv4 mapped into IPv6 as IPv4); None if it is none."""
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if ip.version == 6 else ip


def client_address(peer, forwarded, trusted):
    """The client's address: the peer's, unless the peer is a trusted reverse proxy; then
    the rightmost X-Forwarded-For address that is not itself trusted (each proxy adds the
    address it saw on the right; what is further left anyone could have written)."""
    ip = ip_of(peer) if trusted else None
    if ip is None or not any(ip in net for net in trusted):
        return peer
    for hop in reversed([hop for value in forwarded for hop in value.split(",")]):
        ip = ip_of(hop)
        if ip is None:
            return peer  # a hop we cannot read: nothing left of it can be believed
        if not any(ip in net for net in trusted):
            break
    return str(ip)  # the rightmost untrusted hop, or the leftmost if all are trusted


def join_beta(values):
    """Several anthropic-beta lines as one: the gateway keeps only the first line."""
    parts = []
    for value in values:
        parts.extend(p.strip() for p in value.split(",") if p.strip())
    return ",".join(dict.fromkeys(parts))


def token_headers(token, exchange_headers):
    """The headers every gateway call with this token carries."""
    headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json",
               "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    headers.update(exchange_headers)
    return headers


def request_headers(client_headers, api=ANTHROPIC):
    """The headers that change from call to call; never the client's credentials."""
    headers = {}
    accept = client_headers.get("accept")
    if accept:
        headers["Accept"] = clean_header_value(accept)
    if api == ANTHROPIC:
        headers["anthropic-version"] = clean_header_value(
            client_headers.get("anthropic-version") or DEFAULT_ANTHROPIC_VERSION)
        beta = join_beta(client_headers.get_all("anthropic-beta") or [])
        if beta:
            headers["anthropic-beta"] = clean_header_value(beta)
    return headers


def clean_header_value(value):
    """A header value that cannot split a header block (CR/LF/NUL removed, latin-1 only)."""
    value = re.sub(r"[\r\n\x00]+\s*", " ", str(value)).strip()
    return value.encode("latin-1", "replace").decode("latin-1")


def clean_exchange_headers(headers):
    """The exchange's headers, replayed as they came, minus anything unsendable."""
    if not isinstance(headers, dict):
        raise ValueError("headers is not an object")
    clean = {}
    for key, value in headers.items():
        key, value = str(key), str(value)
        if key.lower() in ("x-api-key", "authorization"):
            continue
        if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", key) or re.search(r"[\r\n\x00]", value):
            raise ValueError("header %r cannot be sent" % key)
        value.encode("latin-1")  # UnicodeEncodeError is a ValueError too
        clean[key] = value
    return clean


def redact_headers(pairs):
    """Header pairs safe to log: credential values replaced."""
    return [(k, "[redacted]" if k.lower() in SECRET_HEADERS else v) for k, v in pairs]


def response_headers_for_client(headers):
    return [(k, clean_header_value(v)) for k, v in headers.items()
            if k.lower().startswith(RESPONSE_HEADER_ALLOW) and k.lower() != "content-length"]


def parse_retry_after(value, now=None):
    """Seconds from a Retry-After value (seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_seconds(headers):
    """Retry-After (or retry-after-ms) of an upstream answer, in seconds."""
    try:
        return max(0.0, float(headers.get("retry-after-ms")) / 1000.0)
    except (TypeError, ValueError):
        return parse_retry_after(headers.get("retry-after"))


def backoff_delay(attempt, base, cap=8.0, rng=random.random):
    """Exponential backoff with jitter: between half and all of base * 2^attempt."""
    delay = min(cap, base * (2 ** attempt))
    return delay * (0.5 + rng() / 2)


def proxy_bypassed(host, port, no_proxy):
    """Whether NO_PROXY exempts host (suffix match, *, and optional :port)."""
    return urllib.request.proxy_bypass_environment("%s:%d" % (host, port), {"no": no_proxy})


def safe_for_log(value, limit=120):
    """A client-supplied string that cannot forge log lines."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


_TOKEN_PATTERNS = re.compile(r"(gl(?:pat|oas|dt|rt|ft|cbt|ptt|soat|agent)-[A-Za-z0-9_.-]{8,}"
                             r"|(?i:bearer)\s+[A-Za-z0-9_.~+/=-]{8,}"
                             r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_.-]+)")


def redact_patterns(text):
    return _TOKEN_PATTERNS.sub("[redacted]", text)


_EVENT_END = re.compile(rb"\r?\n\r?\n")


def sse_split(buf):
    """(the whole SSE events at the start of buf, the partial event after them)."""
    lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\r\n\r\n")
    cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
    return buf[:cut], buf[cut:]


def sse_events(data, containing=b""):
    """The JSON objects the data: lines of the whole events in data carry (only of the
    events holding `containing`); events without a JSON object are skipped."""
    for frame in _EVENT_END.split(data):
        if containing not in frame:
            continue
        lines = [line[5:].lstrip() for line in frame.splitlines() if line.startswith(b"data:")]
        try:
            event = json.loads(b"\n".join(lines)) if lines else None
        except (ValueError, RecursionError):
            continue  # not JSON: nothing to read in it
        if isinstance(event, dict):
            yield event


USAGE_KEYS = {"input_tokens": "input", "output_tokens": "output",
              "cache_read_input_tokens": "cache_read",
              "cache_creation_input_tokens": "cache_creation", "prompt_tokens": "input",
              "completion_tokens": "output"}
TOKEN_KINDS = ("input", "output", "cache_read", "cache_creation")


def read_usage(usage, answer):
    """Fold the token counts an answer or event reports into usage (one dict per request):
    its own "usage", or that of the message (Anthropic's message_start) or response
    (OpenAI's Responses events) it carries. Anything malformed counts nothing."""
    if not isinstance(answer, dict):
        return
    inner = answer.get("message") or answer.get("response")
    reported = (inner if isinstance(inner, dict) else answer).get("usage")
    if not isinstance(reported, dict):
        return
    for key, name in USAGE_KEYS.items():
        value = reported.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            usage[name] = value
    details = reported.get("prompt_tokens_details") or reported.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(cached, int) and not isinstance(cached, bool):
        usage["cache_read"] = cached


# === OpenAI translation ===

DEFAULT_MAX_TOKENS = 8192
# OpenAI's reasoning_effort as Anthropic's effort; budgets for models before adaptive thinking.
EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
           "xhigh": "xhigh", "max": "max"}
REASONING_BUDGETS = {"low": 2048, "medium": 8192, "high": 24576, "xhigh": 32768, "max": 32768}
JSON_TOOL = "json_response"  # the forced tool that carries response_format answers
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop",
                  "model_context_window_exceeded": "length"}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

ChatPlan = collections.namedtuple("ChatPlan", "body model stream include_usage json_mode")


def chat_to_anthropic(req, model):
    """An OpenAI chat completions request as an Anthropic Messages request for a model (its
    catalog entry), as a ChatPlan."""
    refuse_unsupported(req)
    system, messages = chat_messages(req.get("messages"))
    body = {"model": model.id, "messages": messages, "max_tokens": max_tokens_of(req)}
    if system:
        body["system"] = system
    json_mode = add_tools(body, req)
    add_sampling(body, req)
    if not json_mode:
        add_thinking(body, req.get("reasoning_effort"), model)
    stream = req.get("stream") is True
    if stream:
        body["stream"] = True
    usage = field(req.get("stream_options") or {}, "include_usage", "boolean", "stream_options.")
    return ChatPlan(body, model.id, stream, stream and usage is True, json_mode)


# The types OpenAI documents for the request fields the translation reads.
CHAT_FIELDS = {"messages": "array", "tools": "array", "tool_choice": "string|object",
               "parallel_tool_calls": "boolean", "response_format": "object",
               "stop": "string|array", "max_tokens": "integer", "max_completion_tokens": "integer",
               "temperature": "number", "top_p": "number", "user": "string", "n": "integer",
               "reasoning_effort": "string", "stream": "boolean", "stream_options": "object",
               "logprobs": "boolean"}


def refuse_unsupported(req):
    for key, kinds in CHAT_FIELDS.items():
        field(req, key, kinds)
    if req.get("n") not in (None, 1):
        raise BadRequest("n must be 1 for Claude models (one choice per request)")
    if req.get("logprobs"):
        raise BadRequest("logprobs are not available for Claude models")
    for name in ("audio", "prediction", "functions", "function_call"):
        if req.get(name) is not None:
            raise BadRequest("%s is not supported for Claude models%s" % (
                name, "; use tools and tool_choice" if name.startswith("function") else ""))


def max_tokens_of(req):
    value = req.get("max_completion_tokens", req.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest("max_tokens / max_completion_tokens must be a positive whole number")
    return value


def chat_messages(messages):
    """(system text, Anthropic turns): system and developer messages become the system
    prompt; tool results join the user turn after them, ahead of anything else in it."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty array")
    system, turns = [], []
    for i, msg in enumerate(messages):
        where = "messages[%d]" % i
        if not isinstance(msg, dict):
            raise BadRequest("%s must be an object" % where)
        role = field(msg, "role", "string", where + ".")
        if role in ("system", "developer"):
            system.append(text_of(msg.get("content"), where + ".content"))
        elif role == "user":
            add_turn(turns, "user", user_blocks(msg.get("content"), where))
        elif role == "assistant":
            add_turn(turns, "assistant", assistant_blocks(msg, where))
        elif role == "tool":
            add_turn(turns, "user", [tool_result_block(msg, where)])
        else:
            raise BadRequest("%s.role %r is not supported; use system, developer, user, "
                             "assistant or tool" % (where, role))
    if not turns:
        raise BadRequest("messages need a user message with some content: Claude answers "
                         "turns, not only system or developer messages")
    for turn in turns:
        # Anthropic wants tool results first in a user turn.
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return "\n\n".join(t for t in system if t), turns


def add_turn(turns, role, blocks):
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": list(blocks)})


def text_of(content, where):
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(field(part, "text", "string", "%s[%d]." % (where, j)) or ""
                       for j, part in enumerate(content)
                       if isinstance(part, dict) and part.get("type") in ("text", "input_text"))
    raise BadRequest("%s must be a string or an array of text parts" % where)


def user_blocks(content, where):
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest("%s.content must be a string or an array of parts" % where)
    blocks = []
    for j, part in enumerate(content):
        part_where = "%s.content[%d]" % (where, j)
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if field(part, "text", "string", part_where + "."):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            blocks.append(image_block(image.get("url") if isinstance(image, dict) else image,
                                      part_where))
        else:
            raise BadRequest("%s: part type %r is not supported for Claude models (text and "
                             "image_url are)" % (part_where, kind))
    return blocks


def image_block(url, where):
    """An image part (data: URL or http(s) URL) as an Anthropic image block."""
    if not isinstance(url, str):
        raise BadRequest("%s.image_url.url must be a string" % where)
    if url.startswith("data:"):
        header, _, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding != "base64" or media_type not in IMAGE_TYPES or not data:
            raise BadRequest("%s: data URLs must be base64 images of type %s"
                             % (where, ", ".join(IMAGE_TYPES)))
        return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                            "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest("%s: image URLs must be data: or http(s) URLs" % where)


def assistant_blocks(msg, where):
    blocks = []
    content = msg.get("content")
    if isinstance(content, list):
        text = "".join(field(p, "text", "string", "%s.content[%d]." % (where, j)) or
                       field(p, "refusal", "string", "%s.content[%d]." % (where, j)) or ""
                       for j, p in enumerate(content) if isinstance(p, dict))
    else:
        text = text_of(content, where + ".content")
    if text:
        blocks.append({"type": "text", "text": text})
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadRequest("%s.tool_calls must be an array" % where)
    for j, call in enumerate(calls):
        blocks.append(tool_use_block(call, "%s.tool_calls[%d]" % (where, j)))
    return blocks


def tool_use_block(call, where):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(call.get("id"), str) \
            or not isinstance(function.get("name"), str):
        raise BadRequest("%s needs an id and a function with a name" % where)
    arguments = parse_json_or_none(field(function, "arguments", "string", where + ".function.")
                                   or "{}")
    if not isinstance(arguments, dict):
        raise BadRequest("%s.function.arguments must be a JSON object (as a string)" % where)
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}


def tool_result_block(msg, where):
    if not isinstance(msg.get("tool_call_id"), str):
        raise BadRequest("%s: a tool message needs tool_call_id" % where)
    block = {"type": "tool_result", "tool_use_id": msg["tool_call_id"]}
    content = msg.get("content")
    if isinstance(content, list):
        parts = user_blocks(content, where)
        if parts:
            block["content"] = parts
    elif content:
        block["content"] = text_of(content, where + ".content")
    return block


def add_tools(body, req):
    """tools, tool_choice and response_format; True when the answer is forced JSON."""
    tools, choice = req.get("tools"), req.get("tool_choice")
    json_schema = response_format_schema(req.get("response_format"))
    if json_schema is not None:
        if tools:
            raise BadRequest("response_format json_object/json_schema cannot be combined with "
                             "tools for Claude models; ask for JSON in the prompt instead")
        body["tools"] = [{"name": JSON_TOOL, "description": "Give the answer as this JSON object.",
                          "input_schema": json_schema}]
        body["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
        return True
    if tools:
        body["tools"] = [chat_tool(tool, "tools[%d]" % j) for j, tool in enumerate(tools)]
    if choice is not None and tools:
        body["tool_choice"] = chat_tool_choice(choice)
        if req.get("parallel_tool_calls") is False and body["tool_choice"]["type"] != "none":
            body["tool_choice"]["disable_parallel_tool_use"] = True
    return False


def response_format_schema(response_format):
    """The JSON schema a response_format asks for (None: plain text). Claude answers it
    through a forced tool call, so the JSON really is the schema's, not hoped for."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise BadRequest("response_format.json_schema.schema must be an object schema "
                             "(\"type\": \"object\") for Claude models")
        return schema
    raise BadRequest("response_format.type must be text, json_object or json_schema")


def chat_tool(tool, where):
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" \
            or not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest("%s: only function tools with a name are supported" % where)
    schema = field(function, "parameters", "object", where + ".function.")
    entry = {"name": function["name"], "input_schema": schema or {"type": "object",
                                                                  "properties": {}}}
    if field(function, "description", "string", where + ".function."):
        entry["description"] = function["description"]
    return entry


def chat_tool_choice(choice):
    simple = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
    if isinstance(choice, str) and choice in simple:
        return dict(simple[choice])
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"type": "tool", "name": function["name"]}
    raise BadRequest("tool_choice must be auto, none, required or {\"type\": \"function\", "
                     "\"function\": {\"name\": ...}}")


def add_sampling(body, req):
    for field, limit in (("temperature", 1.0), ("top_p", 1.0)):
        value = req.get(field)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise BadRequest("%s must be a non-negative number" % field)
        body[field] = min(float(value), limit)  # OpenAI's temperature goes to 2, Claude's to 1
    stop = req.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise BadRequest("stop must be a string or an array of strings")
        if [x for x in stops if x.strip()]:
            body["stop_sequences"] = [x for x in stops if x.strip()]
    if isinstance(req.get("user"), str) and req["user"]:
        body["metadata"] = {"user_id": req["user"][:256]}


def add_thinking(body, effort, model):
    """reasoning_effort as thinking: adaptive with an effort for Claude 4.6 and later (4.7
    and the 5-series take nothing else), a token budget for 4.5 and older. Not after a
    tool call: Claude then needs its earlier signed thinking back, which OpenAI clients
    cannot keep."""
    if effort is None or effort == "none":
        return
    level = EFFORTS.get(effort)
    if level is None:
        raise BadRequest("reasoning_effort must be none, minimal, low, medium, high or xhigh")
    last = body["messages"][-1]
    if last["role"] == "user" and any(b["type"] == "tool_result" for b in last["content"]):
        return
    if model.thinking in (ADAPTIVE, ADAPTIVE_XHIGH):
        if level == "xhigh" and model.thinking == ADAPTIVE:
            level = "high"
        body["thinking"] = {"type": "adaptive"}
        body["output_config"] = {"effort": level}
    else:
        body["thinking"] = {"type": "enabled", "budget_tokens": REASONING_BUDGETS[level]}
    body["max_tokens"] += REASONING_BUDGETS[level]  # room for the thinking
    body.pop("temperature", None)  # thinking runs at Claude's own temperature
    if body.get("top_p", 1.0) < 0.95:
        body["top_p"] = 0.95


def finish_reason(stop_reason, json_mode):
    if json_mode and stop_reason == "tool_use":
        return "stop"
    return FINISH_REASONS.get(stop_reason, "stop")


def chat_usage(usage):
    """Token counts (as read_usage collects them) in OpenAI's usage shape."""
    cached = usage.get("cache_read", 0)
    prompt = usage.get("input", 0) + cached + usage.get("cache_creation", 0)
    completion = usage.get("output", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def anthropic_to_chat(message, plan, created):
    """An Anthropic message as an OpenAI chat.completion object."""
    texts, reasoning, calls = [], [], []
    for i, block in enumerate(answer_field(message, "content", "array", "message.") or []):
        where = "message.content[%d]." % i
        if not isinstance(block, dict):
            raise bad_answer("%s must be an object, not %s" % (where[:-1], json_kind(block)))
        kind = block.get("type")
        if kind in ("text", "thinking"):
            (texts if kind == "text" else reasoning).append(answer_field(block, kind, "string",
                                                                         where) or "")
        elif kind == "tool_use" and plan.json_mode and block.get("name") == JSON_TOOL:
            texts.append(json.dumps(block.get("input"), ensure_ascii=False))
        elif kind == "tool_use":
            calls.append({"id": answer_field(block, "id", "string", where), "type": "function",
                          "function": {"name": answer_field(block, "name", "string", where),
                                       "arguments": json.dumps(block.get("input") or {},
                                                               ensure_ascii=False)}})
    reply = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        reply["tool_calls"] = calls
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    usage = {}
    read_usage(usage, message)
    stop_reason = answer_field(message, "stop_reason", "string", "message.")
    return {"id": "chatcmpl-" + (answer_field(message, "id", "string", "message.") or "proxy"),
            "object": "chat.completion", "created": created, "model": plan.model,
            "system_fingerprint": None, "choices": [{"index": 0, "message": reply, "logprobs":
                                                     None, "finish_reason": finish_reason(
                                                         stop_reason, plan.json_mode)}],
            "usage": chat_usage(usage)}


def openai_error_frame(message, error_type="api_error"):
    data = json.dumps({"error": {"message": message, "type": error_type, "param": None,
                                 "code": None}})
    return ("data: %s\n\n" % data).encode()


# === Dialects ===

class Adapter:
    """How one request goes upstream and its answer comes back, for its dialect: the body
    for a model, the client's bytes for a stream's whole events (feed) and for a plain
    answer (answer), and the usage they report. This one is the Anthropic pass-through:
    the body goes as it came (re-serialised only when the model's name changes) and the
    answer comes back byte for byte; only usage and a stream's end are read on the way."""

    api = dialect = ANTHROPIC  # the gateway's API; the client's dialect
    END_MARKERS = (b"event: message_stop", b"event: error")
    relays_headers = True  # the gateway's response headers reach the client

    def __init__(self, path, members, raw, model, catalog):
        self.path, self.members, self.raw, self.model = path, members, raw, model
        self.catalog = catalog
        self.usage = {}
        self.complete = False  # a stream's end was seen

    def body(self, model):
        if model == self.members.get("model"):
            return self.raw
        return body_with(self.members, {"model": model})

    def feed(self, data):
        if any(marker in data for marker in self.END_MARKERS):
            self.complete = True
        for event in sse_events(data, b'"usage"') if b'"usage"' in data else ():
            read_usage(self.usage, event)
        return data

    def answer(self, data):
        read_usage(self.usage, parse_json_or_none(data))
        return data

    def error_frame(self, message):
        if self.dialect == OPENAI:
            return openai_error_frame(message)
        return b"event: error\ndata: %s\n\n" % anthropic_error_body("api_error", message)


class OpenAIAdapter(Adapter):
    """GPT and Codex models, chat completions or Responses, relayed as they are; only
    max_tokens is renamed for the models that take max_completion_tokens."""

    api = dialect = OPENAI
    END_MARKERS = (b"data: [DONE]", b'"type":"response.completed"', b'"type":"response.failed"',
                   b'"type": "response.completed"', b'"type":"response.incomplete"')

    def body(self, model):
        members = self.members
        if self.path != "/v1/chat/completions" or "max_tokens" not in members \
                or "max_completion_tokens" in members \
                or self.catalog.spec(model).max_tokens_field != "max_completion_tokens":
            return super().body(model)
        return body_with(members, {"model": model}, {"max_tokens": "max_completion_tokens"})


class ChatAdapter(Adapter):
    """OpenAI chat completions for a Claude model: translated to the Messages API for the
    model that serves it (again, should a fallback change it), and the answer back, events
    as they arrive: the role first, then content, reasoning and tool-call deltas (each call
    with a stable index, its id and name on its first delta), the finish reason, usage if
    asked, [DONE]."""

    api, dialect = ANTHROPIC, OPENAI
    relays_headers = False

    def __init__(self, members, model, catalog, created):
        super().__init__("/v1/messages", members, None, model, catalog)
        self.plan = chat_to_anthropic(members, catalog.spec(model))  # a bad request: 400 now
        self.created = created
        self.id = "chatcmpl-proxy"
        self.blocks = {}  # Anthropic block index -> tool call index, or JSON_TOOL
        self.finish_reason = "stop"

    def body(self, model):
        """The translation for model; the last one asked for is the model that served."""
        if model != self.plan.model:
            self.plan = chat_to_anthropic(self.members, self.catalog.spec(model))
        return dump_json(self.plan.body)

    def answer(self, data):
        message = parse_json_or_none(data)
        if not isinstance(message, dict):
            raise bad_answer("not a JSON object")
        read_usage(self.usage, message)
        try:
            return json.dumps(anthropic_to_chat(message, self.plan, self.created)).encode()
        except RecursionError:
            raise bad_answer("nested too deeply") from None

    def feed(self, data):
        out = []
        for event in sse_events(data):
            handler = getattr(self, "on_" + str(event.get("type")), None)
            if handler is not None:
                out.extend(handler(event))
        return b"".join(out)

    def chunk(self, delta, finish=None, usage=None):
        """A chat.completion.chunk event; with delta None, the usage chunk (no choices)."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.plan.model, "system_fingerprint": None,
               "choices": [] if delta is None else [choice]}
        if self.plan.include_usage:
            obj["usage"] = usage
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    def on_message_start(self, event):
        message = answer_field(event, "message", "object", "message_start.") or {}
        self.id = "chatcmpl-" + (answer_field(message, "id", "string", "message.") or "proxy")
        read_usage(self.usage, event)
        return [self.chunk({"role": "assistant", "content": ""})]

    def on_content_block_start(self, event):
        block = answer_field(event, "content_block", "object", "content_block_start.") or {}
        index = answer_field(event, "index", "integer", "content_block_start.")
        if block.get("type") != "tool_use":
            return []
        name = answer_field(block, "name", "string", "content_block.")
        if self.plan.json_mode and name == JSON_TOOL:
            self.blocks[index] = JSON_TOOL
            return []
        call = sum(1 for v in self.blocks.values() if v != JSON_TOOL)
        self.blocks[index] = call
        function = {"name": name, "arguments": ""}
        return [self.chunk({"tool_calls": [{"index": call, "id": answer_field(
            block, "id", "string", "content_block."), "type": "function", "function": function}]})]

    DELTAS = {"text_delta": ("text", "content"), "input_json_delta": ("partial_json", None),
              "thinking_delta": ("thinking", "reasoning_content")}  # Anthropic's -> OpenAI's

    def on_content_block_delta(self, event):
        delta = answer_field(event, "delta", "object", "content_block_delta.") or {}
        key, out = self.DELTAS.get(answer_field(delta, "type", "string", "delta."), (None, None))
        text = key and answer_field(delta, key, "string", "delta.")
        if not text:
            return []
        if out:
            return [self.chunk({out: text})]
        target = self.blocks.get(answer_field(event, "index", "integer", "content_block_delta."))
        if target == JSON_TOOL:
            return [self.chunk({"content": text})]
        if target is not None:
            return [self.chunk({"tool_calls": [{"index": target,
                                                "function": {"arguments": text}}]})]
        return []

    def on_message_delta(self, event):
        read_usage(self.usage, event)
        delta = answer_field(event, "delta", "object", "message_delta.") or {}
        self.finish_reason = finish_reason(answer_field(delta, "stop_reason", "string", "delta."),
                                           self.plan.json_mode)
        return []

    def on_message_stop(self, event):
        self.complete = True
        out = [self.chunk({}, self.finish_reason)]
        if self.plan.include_usage:
            out.append(self.chunk(None, usage=chat_usage(self.usage)))
        return out + [b"data: [DONE]\n\n"]

    def on_ping(self, event):
        return [b": ping\n\n"]  # a comment: OpenAI clients skip it, idle timers see traffic

    def on_error(self, event):
        self.complete = True
        error = answer_field(event, "error", "object", "error event.") or {}
        kind = answer_field(error, "type", "string", "error.")
        return [openai_error_frame(answer_field(error, "message", "string", "error.") or
                                   "upstream error", OPENAI_ERROR_TYPES.get(kind, "server_error"))]


# === Credentials and tokens ===

TOKEN_MARGIN = 300          # a gateway token is due this many seconds before it expires
TOKEN_FALLBACK_TTL = 1500   # GitLab's tokens live ~1 h; without expires_at trust 25 min
REFRESH_AHEAD = 120         # ...and refreshed in the background this long before it is due
TEAM_REFRESH_IDLE = 3600    # team mode: refresh ahead only for users seen this recently
TEAM_FORGET_IDLE = 86400    # team mode: forget a user's token after a day unused
REJECTED_MEMORY = 60        # team mode: a token GitLab rejected is refused this long
FAILED_EXCHANGES_PER_MINUTE = 10  # team mode: per client address, then 429


class CredentialSource:
    """The user's GitLab token: a value, a file, or a command's output."""

    def __init__(self, config, runner=None):
        self._config = config
        self._runner = runner or run_command
        self._lock = threading.Lock()
        self._value = config.gitlab_token or None

    def get(self):
        with self._lock:
            if self._value is None:
                self._value = self._load()
            return self._value

    def refresh(self):
        """Read the token again after GitLab rejected it; True if it changed."""
        if not (self._config.gitlab_token_file or self._config.gitlab_token_command):
            return False
        with self._lock:
            old, self._value = self._value, self._load()
            return self._value != old

    def _load(self):
        config = self._config
        if config.gitlab_token:
            return config.gitlab_token
        if config.gitlab_token_file:
            return self._from_file(config.gitlab_token_file)
        return self._from_command(config.gitlab_token_command)

    @staticmethod
    def _from_file(path):
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as fh:
                token = first_line(fh.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise Unauthorized("cannot read GITLAB_TOKEN_FILE %s: %s"
                               % (path, exc.__class__.__name__)) from None
        if not token:
            raise Unauthorized("GITLAB_TOKEN_FILE %s is empty" % path)
        return token

    def _from_command(self, command):
        try:
            returncode, stdout = self._runner(command)
        except OSError as exc:  # subprocess errors included: run_command turns them into OSError
            raise Unauthorized("GITLAB_TOKEN_COMMAND could not run (%s); run it yourself to see "
                               "why" % exc.__class__.__name__) from None
        token = first_line(stdout.decode("utf-8", "replace"))
        if returncode != 0 or not token:
            # Its output may hold the secret, so it is never shown.
            raise Unauthorized("GITLAB_TOKEN_COMMAND failed (exit status %d%s); run it yourself "
                               "to see why" % (returncode, "" if token else ", no output"))
        return token


def run_command(command, timeout=60):
    """(exit status, stdout) of a shell command; its stderr goes to ours, never to a client."""
    try:
        done = subprocess.run(command, shell=True, stdout=subprocess.PIPE, timeout=timeout,
                              check=False)
    except subprocess.SubprocessError as exc:
        raise OSError(exc.__class__.__name__) from None
    return done.returncode, done.stdout


def first_line(text):
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class GatewayToken(collections.namedtuple("GatewayToken", "token headers expires due refresh_at")):
    """A gateway token and the headers that go with it. It serves until `due` (expires_at
    minus 5 minutes), is refreshed from `refresh_at` on, and may still be used up to
    `expires` while refreshing fails."""

    @classmethod
    def from_exchange(cls, payload, now):
        token = payload.get("token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not re.match(r"^[\x21-\x7e]+$", token):
            raise UpstreamUnreachable("GitLab's token exchange answered without a usable token; "
                                      "check that GITLAB_INSTANCE_URL is your GitLab instance")
        try:
            headers = clean_exchange_headers(payload.get("headers") or {})
        except ValueError as exc:
            raise UpstreamUnreachable("GitLab's token exchange returned headers the proxy cannot "
                                      "replay (%s); please report this" % exc) from None
        expires = payload.get("expires_at")
        if isinstance(expires, (int, float)) and not isinstance(expires, bool) and expires > now:
            due = max(now + (expires - now) / 2, expires - TOKEN_MARGIN)
        else:
            due = expires = now + TOKEN_FALLBACK_TTL
        refresh_at = due - min(REFRESH_AHEAD, (due - now) / 4)
        return cls(token, token_headers(token, headers), expires, due, refresh_at)


class TokenCache:
    """A gateway token shared by all requests: fetched once, then refreshed in the
    background before it is due (refresh_if_due, called by TokenRefresher), so after the
    first call no request waits for an exchange.

    Single-flight: however many requests find the cache cold, one exchange runs and all
    of them get its result. Failures are never cached; a failed refresh is retried with
    backoff while the current token keeps serving until its own expiry.
    """

    def __init__(self, exchange, clock=time.time, wait_timeout=120.0, on_result=None, key=None):
        self._exchange = exchange
        self._clock = clock
        self.key = key  # team mode: the SHA-256 of the user's GitLab token
        self.identity = self.user = None  # team mode: whose token it is, and their name
        self._wait_timeout = wait_timeout
        self._on_result = on_result or (lambda ok: None)  # counts exchanges for /metrics
        self._lock = threading.Lock()
        self._token = None
        self._flight = None
        self._failures = 0      # refreshes failed in a row
        self._retry_at = 0.0    # the next refresh after a failure, not before
        self.exchanges = 0
        self.last_used = clock()

    def get(self):
        now = self._clock()
        with self._lock:
            self.last_used = now
            token = self._token
            if token is not None and (now < token.due or (
                    now < token.expires and (self._flight or self._failures))):
                return token  # fresh, or being refreshed or retried in the background
            flight, leader = self._join()
        if leader:
            self._fly(flight)
        if not flight.done.wait(self._wait_timeout):
            raise UpstreamTimeout("the GitLab token exchange is taking too long; retry shortly")
        if flight.error is None:
            return flight.token
        if token is not None and self._clock() < token.expires:
            return token  # the refresh failed, but this token still works
        raise copy.copy(flight.error)  # each waiter its own, for its own traceback

    def for_client(self, key, address):
        """The token provider's one question (see UserTokens): whose token serves a client.
        Here, the one shared token, whoever asks; the proxy key is checked before."""
        return self

    def _join(self):
        """(the exchange in flight, whether the caller must run it); under the lock."""
        if self._flight is not None:
            return self._flight, False
        # One exchange in progress: whoever needs a token meanwhile waits for it.
        self._flight = types.SimpleNamespace(done=threading.Event(), token=None, error=None)
        self.exchanges += 1
        return self._flight, True

    def refresh_if_due(self):
        """Refresh the token now if it is time; True if an exchange ran and succeeded."""
        now = self._clock()
        with self._lock:
            token = self._token
            if token is None or self._flight or now < max(token.refresh_at, self._retry_at):
                return False
            flight, _ = self._join()
        self._fly(flight)
        if flight.error is not None:
            log.warning("refreshing the gateway token failed (%s); the current token serves "
                        "until it expires in %d s, next try in %d s",
                        redact_patterns(flight.error.message),
                        max(0, token.expires - now), max(0, self._retry_at - self._clock()))
        return flight.error is None

    def _fly(self, flight):
        try:
            flight.token = GatewayToken.from_exchange(self._exchange(), self._clock())
        except ProxyError as exc:
            flight.error = exc
        except Exception as exc:  # the waiters must never hang on an unexpected failure
            log.error("token exchange failed unexpectedly: %s", type(exc).__name__)
            flight.error = ProxyError("the GitLab token exchange failed unexpectedly (%s)"
                                      % type(exc).__name__, 502)
        with self._lock:
            if flight.token is not None:
                self._token, self._failures, self._retry_at = flight.token, 0, 0.0
            else:
                self._failures += 1
                self._retry_at = self._clock() + min(300.0, 10.0 * 2 ** (self._failures - 1))
            self._flight = None
        self._on_result(flight.error is None)
        flight.done.set()

    def caches(self):
        """The caches to refresh ahead."""
        return [self]

    def secrets(self):
        """The current gateway token's value, for scrubbing it from texts."""
        token = self._token
        return [token.token] if token is not None else []

    def invalidate(self, token):
        """Forget token (once: concurrent 401s for the same token cause one new exchange)."""
        with self._lock:
            if self._token is token:
                self._token = None

    def expires_in(self):
        token = self._token
        return None if token is None else token.expires - self._clock()

    def state(self):
        with self._lock:
            token, failures = self._token, self._failures
        now = self._clock()
        if token is None:
            return {"state": "not yet fetched", "exchanges": self.exchanges}
        if now >= token.expires:
            return {"state": "expired", "exchanges": self.exchanges}
        state = {"state": "valid", "expires_in": int(token.expires - now),
                 "refresh_in": int(max(0, token.refresh_at - now)), "exchanges": self.exchanges}
        if failures:
            state["refresh_failures"] = failures
        return state


class UserTokens:
    """Team mode's token provider: a token cache per GitLab user, keyed by a SHA-256 of
    their token (kept only inside the cache's exchange, for refreshing, and forgotten with
    it).

    Only tokens GitLab accepted are kept (least recently used dropped first, forgotten
    after a day unused), so clients sending junk cannot push real users out. GitLab's
    edge blocks an address that keeps sending it invalid tokens, and the whole team shares
    the proxy's: a token GitLab rejected outright is answered from memory for a minute,
    and an address whose tokens keep being rejected is throttled. Transient failures
    (GitLab down or slow) are never remembered.
    """

    def __init__(self, upstream, clock=time.time, max_users=256, on_result=None, on_rename=None):
        self._upstream = upstream
        self._clock = clock
        self._max = max_users
        self._on_result = on_result or (lambda ok: None)  # counts exchanges for /metrics
        self._on_rename = on_rename or (lambda old, new: None)  # merges /stats rows
        self._lock = threading.Lock()
        self._names = {}  # identity -> the name its requests count under
        self._members = collections.OrderedDict()  # key -> TokenCache, least recent first
        self._pending = {}  # key -> TokenCache whose first exchange has not succeeded yet
        self._rejected = {}  # key -> (until, the error GitLab's answer gave)
        self._failures = {}  # client address -> times of its rejected tokens

    def __len__(self):
        return len(self._members)

    def for_client(self, gitlab_token, address):
        """The token cache of the user whose GitLab token a client sent, once GitLab has
        accepted it."""
        if not gitlab_token:
            raise Unauthorized("team mode: send your own GitLab token as the API key "
                               "(x-api-key or Authorization: Bearer)", headers=CHALLENGE)
        key = hashlib.sha256(gitlab_token.encode("utf-8", "replace")).hexdigest()
        now = self._clock()
        with self._lock:
            cache = self._members.get(key)
            if cache is not None:
                self._members.move_to_end(key)
                return cache
            self._check_rejected(key, now)
            self._check_address(address, now)
            cache = self._pending.get(key)
            if cache is None:
                cache = self._pending[key] = self._new_cache(key, gitlab_token, address)
        token = cache.get()  # the first exchange, its answer checked
        if cache.user is None:  # asked once per new token, outside the exchange
            self._identify(cache, gitlab_token, token.headers)
        self._admit(cache)
        return cache

    def _identify(self, cache, gitlab_token, headers):
        """Name a new token's owner: their username when GitLab tells it (a token with
        read_user), else a name made from the x-gitlab-global-user-id every exchange
        carries, which is the same for all of a person's tokens. Two tokens of one person
        count as one user; a username learned later renames them everywhere."""
        identity = next((v for k, v in headers.items() if k.lower() == "x-gitlab-global-user-id"),
                        None) or cache.key  # (an instance too old to send it: the token)
        username = self._upstream.username(gitlab_token)
        with self._lock:
            old = self._names.get(identity)
            name = self._names[identity] = username or old or "user-" + hashlib.sha256(
                identity.encode("utf-8", "replace")).hexdigest()[:10]
            cache.identity = identity
            for other in list(self._members.values()) + [cache]:
                if other.identity == identity:
                    other.user = name
        if old and old != name:
            log.info("team user %s is GitLab user %s", old, name)
            self._on_rename(old, name)

    def _new_cache(self, key, gitlab_token, address):
        return TokenCache(lambda: self._exchange(key, gitlab_token, address), self._clock, key=key)

    def _exchange(self, key, gitlab_token, address):
        # A request that took the cache just before GitLab rejected its token gets the
        # remembered answer: GitLab is not asked twice.
        with self._lock:
            self._check_rejected(key, self._clock())
        try:
            payload = self._upstream.exchange_token(gitlab_token)
        except ProxyError as exc:
            self._on_result(False)
            self._failed(key, exc, address)
            raise
        self._on_result(True)
        return payload

    def _check_rejected(self, key, now):
        """Raise the error of GitLab's recent rejection of this token; under the lock."""
        rejected = self._rejected.get(key)
        if rejected is not None and now < rejected[0]:
            raise copy.copy(rejected[1])

    def _check_address(self, address, now):
        times = self._failures.get(address)
        while times and times[0] <= now - 60:
            times.popleft()
        if times and len(times) >= FAILED_EXCHANGES_PER_MINUTE:
            wait = int(times[0] + 60 - now) + 1
            raise RateLimited("GitLab rejected %d tokens from %s in the last minute; new tokens "
                              "from this address are not tried for %d s (GitLab blocks addresses "
                              "that keep sending invalid tokens). Check the GitLab token your "
                              "client sends." % (len(times), address, wait),
                              headers={"retry-after": str(wait)}, retry=True)

    def _failed(self, key, error, address):
        """A token whose exchange failed is not kept pending; a definitive rejection (401,
        or 403 for a missing scope) is remembered, and a new token's counts against the
        address."""
        now = self._clock()
        with self._lock:
            new = self._pending.pop(key, None) is not None
            if not error.definitive:
                return
            self._members.pop(key, None)
            self._rejected[key] = (now + REJECTED_MEMORY, error)
            if new:
                self._failures.setdefault(address, collections.deque()).append(now)
            self._prune(now)

    def _admit(self, cache):
        with self._lock:
            self._pending.pop(cache.key, None)
            self._members[cache.key] = cache
            while len(self._members) > self._max:
                self._members.popitem(last=False)

    def _prune(self, now):
        """Drop what has expired: memory stays bounded whatever clients send."""
        if len(self._rejected) > 1024:
            self._rejected = {k: v for k, v in self._rejected.items() if v[0] > now}
        if len(self._failures) > 1024:
            self._failures = {a: t for a, t in self._failures.items() if t and t[-1] > now - 60}

    def caches(self, refresh_idle=TEAM_REFRESH_IDLE):
        """The caches worth refreshing ahead (users seen in the last hour); users unseen
        for a day are forgotten on the way."""
        now = self._clock()
        with self._lock:
            while self._members:
                oldest = next(iter(self._members.values()))
                if now - oldest.last_used < TEAM_FORGET_IDLE:
                    break
                self._members.popitem(last=False)
            members = list(self._members.values())
            if len(self._names) > 2 * self._max:  # bounded, keeping the names of those kept
                self._names = {c.identity: c.user for c in members}
        return [c for c in members if now - c.last_used < refresh_idle]

    def secrets(self):
        return [s for cache in list(self._members.values()) for s in cache.secrets()]

    def state(self):
        return {"state": "per-user", "cached_users": len(self._members)}

    def expires_in(self):
        return None  # one per user: no single figure


class TokenRefresher:
    """The one thread that calls refresh_if_due on every TokenCache (see TokenCache)."""

    def __init__(self, caches, stopping, interval=10.0):
        self._caches = caches  # a callable: the TokenCaches to look after
        self._stopping = stopping
        self._interval = interval
        self._thread = None

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="token-refresher", daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stopping.wait(self._interval):
            self.tick()

    def tick(self):
        for cache in self._caches():
            try:
                cache.refresh_if_due()
            except Exception:  # this thread must outlive any one failure
                log.error("token refresh failed unexpectedly: %s", redact_patterns(
                    traceback.format_exc()))

    def join(self, timeout):
        if self._thread is not None:
            self._thread.join(timeout)


# === Upstream ===

class Endpoint(collections.namedtuple("Endpoint", "scheme host port path origin")):
    """Where a base URL points: scheme, host, port, path prefix, and scheme://host[:port]."""

    @classmethod
    def parse(cls, url):
        parts = urllib.parse.urlsplit(url)
        default = 443 if parts.scheme == "https" else 80
        port, host = parts.port or default, parts.hostname
        origin = "%s://%s%s" % (parts.scheme, "[%s]" % host if ":" in host else host,
                                "" if port == default else ":%d" % port)
        return cls(parts.scheme, host, port, parts.path.rstrip("/"), origin)


def client_ssl_context(ca_bundle=""):
    """TLS settings for GitLab and the gateway; SSL_CERT_FILE is honoured by OpenSSL itself."""
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=os.path.expanduser(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("GITLAB_CA_BUNDLE %s cannot be loaded: %s"
                              % (ca_bundle, exc)) from None
    return context


def describe_network_error(exc, endpoint):
    """A short reason for a failed connection, with what to check."""
    where = endpoint.origin
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ("the TLS certificate of %s is not trusted (%s); if your instance uses an internal "
                "CA, set GITLAB_CA_BUNDLE to its PEM file" % (where, exc.verify_message))
    if isinstance(exc, ssl.SSLError):
        return "TLS with %s failed (%s)" % (where, exc.reason or exc)
    if isinstance(exc, socket.gaierror):
        return "the name %s does not resolve (check the URL, DNS or HTTPS_PROXY)" % endpoint.host
    if isinstance(exc, ConnectionRefusedError):
        return "%s refused the connection (is it running? check the URL and port)" % where
    if isinstance(exc, socket.timeout):
        return "%s did not answer in time" % where
    if isinstance(exc, http.client.HTTPException):
        return "%s sent a broken HTTP answer (%s)" % (where, exc.__class__.__name__)
    text = getattr(exc, "strerror", None) or redact_patterns(str(exc)) or exc.__class__.__name__
    if "Tunnel connection failed" in text:
        return ("the corporate proxy refused the tunnel to %s (%s); check HTTPS_PROXY/HTTP_PROXY "
                "and its credentials, or NO_PROXY" % (where, text.split(": ", 1)[-1]))
    return "%s: %s" % (where, text)


class ConnectionPool:
    """Keeps http.client connections to GitLab and the gateway open between requests
    (per host, bounded, thread-safe), so a session pays TCP and TLS set-up a handful of
    times, not once per call."""

    def __init__(self, config, max_idle=128, idle_ttl=50.0, clock=time.monotonic):
        self._config = config
        # Loading the system's CAs takes a while: done for the first https connection, but a
        # CA bundle of the user's is checked at once (a bad one stops start-up).
        self._ssl = client_ssl_context(config.ca_bundle) if config.ca_bundle else None
        self._max_idle = max_idle
        self._idle_ttl = idle_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._idle = {}
        self.opened = collections.Counter()

    def _proxy_for(self, endpoint):
        url = self._config.https_proxy if endpoint.scheme == "https" else self._config.http_proxy
        if not url or proxy_bypassed(endpoint.host, endpoint.port, self._config.no_proxy):
            return None
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        headers = {}
        if parts.username:
            userinfo = "%s:%s" % (urllib.parse.unquote(parts.username),
                                  urllib.parse.unquote(parts.password or ""))
            basic = base64.b64encode(userinfo.encode()).decode()
            headers["Proxy-Authorization"] = "Basic " + basic
        return parts.hostname, parts.port or 8080, headers

    def _connect(self, endpoint):
        proxy = self._proxy_for(endpoint)
        host, port = (proxy[0], proxy[1]) if proxy else (endpoint.host, endpoint.port)
        timeout = self._config.connect_timeout
        if endpoint.scheme == "https":
            self._ssl = self._ssl or client_ssl_context()
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if proxy:
            conn.set_tunnel(endpoint.host, endpoint.port, proxy[2])
        conn.connect()  # http.client sets TCP_NODELAY: head and body never wait for an ACK
        with self._lock:
            self.opened[endpoint.origin] += 1
        return conn

    def _take_idle(self, endpoint):
        now = self._clock()
        with self._lock:
            idle = self._idle.get(endpoint.origin, [])
            while idle:
                conn, since = idle.pop()
                # Readable while idle means the server closed it, unless TLS has a
                # post-handshake message waiting.
                state = peer_state(conn.sock) if now - since < self._idle_ttl else "old"
                if state == "idle" or state == "data" and isinstance(conn.sock, ssl.SSLSocket):
                    return conn
                conn.close()
        return None

    def release(self, endpoint, conn, resp):
        """Put a connection back for reuse if its answer was read to the end, else close it."""
        if conn.sock is None or not resp.isclosed() or resp.will_close:
            conn.close()
            return
        with self._lock:
            idle = self._idle.setdefault(endpoint.origin, [])
            if len(idle) < self._max_idle:
                idle.append((conn, self._clock()))
                return
        conn.close()

    def request(self, endpoint, method, path, body, headers, timeout):
        """(connection, response) of a request, the response's head read; a dead pooled
        connection is replaced once. The caller gives the connection back (release) or
        closes it."""
        for attempt in (0, 1):
            conn = self._take_idle(endpoint) if attempt == 0 else None
            reused = conn is not None
            conn = conn or self._connect(endpoint)
            conn.sock.settimeout(timeout)
            try:
                conn.request(method, path, body, headers)
                return conn, conn.getresponse()
            except (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
                conn.close()
                # A kept-alive connection the server closed meanwhile: nothing was processed.
                if not reused:
                    raise
                log.debug("pooled connection to %s was dead (%s); reconnecting",
                          endpoint.origin, exc.__class__.__name__)
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()


def read_whole(pool, endpoint, conn, resp):
    """The whole body of an answer; its connection goes back to the pool."""
    try:
        data = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise UpstreamUnreachable("the gateway's answer broke off: %s"
                                  % describe_network_error(exc, endpoint)) from None
    pool.release(endpoint, conn, resp)
    return data


# What Upstream.call found: the answer's status, headers and body (None for a stream, whose
# response and connection the caller then owns), the model that served, whether the token
# was renewed on the way, and the seconds to the answer's head.
Result = collections.namedtuple("Result", "status headers body response conn model refreshed "
                                          "seconds")


class Upstream:
    """Calls GitLab (token exchange) and the AI gateway: retries, one token refresh, one
    retry of a transient entitlement failure and one model fallback per request (the newest
    of the family, remembered for an hour: a model GitLab adds later is then found), all
    before any byte reaches the client."""

    def __init__(self, config, pool, stopping, catalog=None, rng=random.random,
                 clock=time.monotonic, max_fallbacks=256):
        self.config, self.pool, self.stopping, self.catalog = config, pool, stopping, catalog
        self.rng, self._clock, self._max_fallbacks = rng, clock, max_fallbacks
        self.gitlab = Endpoint.parse(config.instance_url)
        self.gateway = Endpoint.parse(config.gateway_base)
        self._lock = threading.Lock()
        self.fallbacks = collections.OrderedDict()  # requested -> (served, until)
        wait = max(1, round(2 * config.retry_base_delay))
        self._retry_later = {"retry-after": "%d" % wait}

    def exchange(self, credentials):
        """GitLab's direct_access answer for the user's token; one re-read of a token file
        or command when GitLab says the token is invalid."""
        try:
            return self.exchange_token(credentials.get())
        except ProxyError as exc:
            if exc.status != 401 or not credentials.refresh():
                raise
            log.info("GitLab rejected the token; using the token read again from %s",
                     self.config.token_source or "its source")
            return self.exchange_token(credentials.get())

    def exchange_token(self, gitlab_token):
        if not re.match(r"^[\x21-\x7e]+$", gitlab_token):
            raise Unauthorized("the GitLab token contains spaces or control characters; check "
                               "%s" % (self.config.token_source or "the token you sent"))
        headers = {"Authorization": "Bearer " + gitlab_token, "Content-Type": "application/json",
                   "Accept": "application/json", "User-Agent": USER_AGENT}
        where = self.gitlab.origin
        try:
            conn, resp = self.pool.request(self.gitlab, "POST", self.gitlab.path +
                                           DIRECT_ACCESS_PATH, DIRECT_ACCESS_BODY, headers,
                                           self.config.token_timeout)
            raw = read_whole(self.pool, self.gitlab, conn, resp)
        except socket.timeout:
            raise ProxyError("GitLab at %s did not answer the token exchange within %g s; it may "
                             "be down or slow, retry shortly" % (where, self.config.token_timeout),
                             503) from None
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamUnreachable("cannot reach GitLab for the token exchange: %s"
                                      % describe_network_error(exc, self.gitlab)) from None
        if not 200 <= resp.status < 300:
            raise translate_token_error(resp.status, raw, retry_after_seconds(resp.headers))
        payload = parse_json_or_none(raw)
        if payload is None:
            raise UpstreamUnreachable("GitLab's token exchange at %s did not answer JSON; check "
                                      "GITLAB_INSTANCE_URL" % where)
        return payload

    def gitlab_json(self, path, token=None):
        """(status, JSON or None) of a GET on the GitLab API, with a user's token if given."""
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = "Bearer " + token
        conn, resp = self.pool.request(self.gitlab, "GET", self.gitlab.path + path, None,
                                       headers, self.config.token_timeout)
        return resp.status, parse_json_or_none(read_whole(self.pool, self.gitlab, conn, resp))

    def username(self, gitlab_token):
        """The GitLab username a token belongs to; None when GitLab will not say."""
        try:
            status, user = self.gitlab_json("/api/v4/user", gitlab_token)
        except (OSError, http.client.HTTPException, ProxyError):
            return None
        name = user.get("username") if status == 200 and isinstance(user, dict) else None
        return safe_for_log(name, 64) if isinstance(name, str) and name else None

    def call(self, adapter, tokens, headers):
        """POST the adapter's body to the gateway with the client's headers (a dict); one
        Result with any status, after retries and second tries. Raises only when no answer
        came at all."""
        target = self.gateway.path + PROXY_PATHS[adapter.api] + adapter.path
        deadline = time.monotonic() + self.config.retry_max_seconds
        model, attempt, tried = self._remembered(adapter.model), 0, set()
        while True:
            body, token = adapter.body(model), tokens.get()
            try:
                result = self._send(target, token, headers, body)
            except ProxyError as exc:  # no answer: a network failure or a timeout
                wait, reason = self._retry_wait(attempt, {}, deadline), exc.message
                if wait is None:
                    raise
            else:
                again, model = self._second_try(result, adapter.model, model, tried)
                if again == "token":
                    tokens.invalidate(token)
                if again:
                    tried.add(again)
                    continue
                wait = self._retry_wait(attempt, result.headers, deadline) \
                    if result.status in RETRY_STATUSES else None
                if wait is None:
                    return result._replace(model=model, refreshed="token" in tried)
                reason = "answered %d" % result.status
            log.info("gateway %s; retry %d in %.2fs", reason, attempt + 1, wait)
            self._pause(wait)
            attempt += 1

    def _send(self, target, token, client_headers, body):
        """One POST: the Result, its body read unless it is a stream."""
        headers = dict(token.headers)
        headers.update(client_headers)
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            log.debug("gateway request POST %s headers %s", target, redact_headers(headers.items()))
        started = time.monotonic()
        try:
            conn, resp = self.pool.request(self.gateway, "POST", target, body, headers,
                                           self.config.read_timeout)
        except socket.timeout:
            raise UpstreamTimeout("GitLab's AI gateway did not answer within %g s (READ_TIMEOUT)"
                                  % self.config.read_timeout, retry=True,
                                  headers=self._retry_later) from None
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamUnreachable("cannot reach GitLab's AI gateway: %s"
                                      % describe_network_error(exc, self.gateway), retry=True,
                                      headers=self._retry_later) from None
        seconds = time.monotonic() - started
        if debug:
            log.debug("gateway answered %d headers %s", resp.status,
                      redact_headers(resp.headers.items()))
        kind = (resp.headers.get("content-type") or "").lower()
        if resp.status < 400 and kind.startswith("text/event-stream"):
            return Result(resp.status, resp.headers, None, resp, conn, None, False, seconds)
        body = read_whole(self.pool, self.gateway, conn, resp)
        return Result(resp.status, resp.headers, body, None, None, None, False, seconds)

    def _second_try(self, result, requested, model, tried):
        """(why this answer deserves one more attempt, the model for it). Each reason once
        per request: "token" after a 401, "entitlement" after a not_entitled 403 (GitLab's
        billing check fails closed when it times out), "model" when a fallback serves a
        model GitLab does not. (None, model) when it deserves none."""
        if result.status == 401 and "token" not in tried:
            log.info("gateway rejected the token (401); exchanging a new one and replaying")
            return "token", model
        problem = gateway_problem(result.body) if result.status in (400, 403) else None
        if problem == "not_entitled" and result.status == 403 and "entitlement" not in tried:
            log.info("gateway answered 403 not_entitled; retrying once in case it was transient")
            self._pause(backoff_delay(1, self.config.retry_base_delay, rng=self.rng))
            return "entitlement", model
        if problem == "unsupported_model" and result.status == 400:
            served = self._fall_back(requested, model)
            if served:
                return "model", served
        return None, model

    def _remembered(self, model):
        """The model serving requests for model (itself, unless a fallback is remembered)."""
        with self._lock:
            entry = self.fallbacks.get(model)
            if entry is not None and entry[1] > self._clock():
                return entry[0]
            self.fallbacks.pop(model, None)
            return model

    def _fall_back(self, requested, rejected):
        """The model to try after GitLab rejected `rejected` for a request for `requested`
        (None: no fallback: it is off, the name has no known family, or the fallback
        itself was rejected, which is then forgotten)."""
        served = None
        if self.config.model_fallback and rejected == requested and self.catalog:
            served = self.catalog.fallback_for(requested)
        with self._lock:
            self.fallbacks.pop(requested, None)
            if served is not None:
                self.fallbacks[requested] = (served, self._clock() + FALLBACK_MEMORY)
                while len(self.fallbacks) > self._max_fallbacks:
                    self.fallbacks.popitem(last=False)
        if served is not None:
            log.warning("GitLab does not serve model %s: serving it with %s (the newest of its "
                        "family) for the next hour; set MODEL_FALLBACK=off to get GitLab's "
                        "error instead", safe_for_log(requested), served)
        return served

    def release(self, result, whole):
        """A streamed answer's connection: back to the pool if the stream ended whole."""
        if whole:
            self.pool.release(self.gateway, result.conn, result.response)
        else:
            result.conn.close()

    def _pause(self, seconds):
        if self.stopping.wait(seconds):
            raise ProxyError("the proxy is shutting down", 503, retry=True)

    def _retry_wait(self, attempt, headers, deadline):
        """Seconds to wait before the next attempt, or None to give up now."""
        if attempt >= self.config.retries:
            return None
        hinted = retry_after_seconds(headers)
        wait = hinted if hinted is not None else backoff_delay(
            attempt, self.config.retry_base_delay, rng=self.rng)
        return None if time.monotonic() + wait > deadline else wait


# === Relay ===

class Relay:
    """One answer's event stream on its way to the client, whole events at a time, as they
    arrive, through the adapter (which passes the bytes on or translates them); only a
    trailing partial event waits for its end, so a broken upstream never leaves a torn
    frame before the error. The DisconnectWatcher calls cut() when the client hangs up:
    the upstream read ends at once, even while the gateway is silent."""

    def __init__(self, client, upstream, wfile=None, chunked=True):
        self.client, self.upstream, self.wfile, self.chunked = client, upstream, wfile, chunked
        self.fd = client.fileno()  # what the watcher's selector knows it by, even once closed
        self.lock = threading.Lock()
        self.gone = threading.Event()

    def run(self, response, adapter, config):
        """Relay to the end; returns None, or why the stream was cut."""
        self.upstream.settimeout(config.stream_idle_timeout)
        deadline = time.monotonic() + config.stream_max_seconds
        pending, broken = b"", None
        while True:
            try:
                data = response.read1(16384)  # what has arrived, without waiting
            except socket.timeout:
                return "GitLab's AI gateway sent nothing for %g s (STREAM_IDLE_TIMEOUT)" % (
                    config.stream_idle_timeout)
            except (OSError, http.client.HTTPException) as exc:
                data, broken = b"", exc.__class__.__name__
            if self.gone.is_set():  # the watcher cut the upstream read
                raise ClientGone("closed during the stream")
            if broken:
                return "the connection to GitLab's AI gateway broke mid-stream (%s)" % broken
            # At the end, what is left is sent as it is: there is no more to wait for.
            events, pending = sse_split(pending + data) if data else (pending, b"")
            try:
                out = adapter.feed(events) if events else b""
            except ProxyError as exc:  # the gateway sent what the translation cannot take
                return exc.message
            if out:
                self.write(out)
            if not data:
                break
            if time.monotonic() > deadline:
                return "the stream lasted longer than %g s (STREAM_MAX_SECONDS)" % (
                    config.stream_max_seconds)
        return None if adapter.complete else ("GitLab's AI gateway ended the stream before it "
                                              "was complete")

    def write(self, data):
        """To the client at once: chunked for HTTP/1.1 (b"" ends the body), raw bytes until
        close otherwise."""
        try:
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        except OSError as exc:
            raise ClientGone(exc.__class__.__name__) from None

    def cut(self):
        """The client left (the watcher's thread): stop the upstream read."""
        with self.lock:
            self.gone.set()
            if self.upstream is None:
                return
            try:
                # The plain-socket method: SSLSocket.shutdown would also drop its TLS state
                # under the reading thread's feet.
                socket.socket.shutdown(self.upstream, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its owner: nothing left to interrupt

    def detach(self):
        """The stream is over: from now on the upstream connection may serve another
        request, so a client hanging up must not cut it."""
        with self.lock:
            self.upstream = None


class DisconnectWatcher:
    """One thread for the whole server that notices clients hanging up mid-stream and
    cuts their upstream connection, even while the upstream is silent: a client that gave
    up stops spending the user's Duo credits at once. A stream registers its socket and
    wakes the thread (select() reads its list only when called; epoll and kqueue would
    not need it, but one way for every platform is simpler)."""

    def __init__(self, selector_class=selectors.DefaultSelector):
        self._lock = threading.Lock()  # guards the selector's map
        self._selector = selector_class()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = None
        self._closed = False

    def watch(self, relay):
        with self._lock:
            if self._closed:
                return relay
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="disconnect-watcher",
                                                daemon=True)
                self._thread.start()
            try:
                self._selector.register(relay.client, selectors.EVENT_READ, relay)
            except KeyError:
                # A socket closed while registered left its number behind, now reused.
                self._selector.unregister(relay.client)
                self._selector.register(relay.client, selectors.EVENT_READ, relay)
            except (OSError, ValueError):
                return relay  # closed before we got to it: nothing left to watch
        self._wake()
        return relay

    def unwatch(self, relay):
        relay.detach()
        with self._lock:
            if not self._closed:
                self._forget(relay)

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # its buffer is full of wake-ups the thread has yet to read: it will look

    def _run(self):
        while True:
            try:
                ready = self._selector.select()
            except (OSError, ValueError):
                self._drop_closed()  # a socket closed while still registered: forget it
                continue
            for key, _ in ready:
                if key.data is not None:
                    self._check(key.data)
                elif not self._woken():
                    return

    def _woken(self):
        """Read the wake-up bytes; False once the watcher is closed."""
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        return not self._closed

    def _drop_closed(self):
        with self._lock:
            for key in list(self._selector.get_map().values()):
                if key.data is not None and key.fileobj.fileno() == -1:
                    self._forget(key.data)

    def _forget(self, relay):
        """Unregister relay; True if it was still registered (by its number, as its socket
        may be closed and the number reused)."""
        key = self._selector.get_map().get(relay.fd)
        if key is None or key.data is not relay:
            return False
        self._selector.unregister(relay.fd)
        return True

    def _check(self, relay):
        with self._lock:
            state = peer_state(relay.client) if self._forget(relay) else None
            if state == "idle":  # nothing arrived after all: keep watching
                self._selector.register(relay.client, selectors.EVENT_READ, relay)
        # Else the stream ended meanwhile (this readiness is not ours to judge), or the
        # client is gone or sending a next request: either way of no more interest.
        if state == "gone":
            relay.cut()

    def close(self):
        with self._lock:
            self._closed = True
            running = self._thread is not None
        if running:
            self._wake()
            self._thread.join(2.0)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def peer_state(sock):
    """What a client socket holds: "gone" (it hung up: EOF, a reset or a TLS alert),
    "data" (a next request) or "idle" (nothing)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return "idle"  # and so the peek below never waits for the socket's timeout
        first = socket.socket.recv(sock, 1, socket.MSG_PEEK)
    except (OSError, ValueError, TypeError):
        return "gone"
    if first == b"" or (isinstance(sock, ssl.SSLSocket) and first == b"\x15"):
        return "gone"
    return "data"


# === Handler ===

class RequestContext:
    """What one request did, for its log line and the statistics."""

    def __init__(self, method, request_id):
        self.method, self.request_id = method, request_id  # the gateway's replaces ours
        self.dialect = ANTHROPIC  # the shape errors take: OpenAI's on the OpenAI routes
        self.path = self.route = self.model = self.status = None
        self.upstream_seconds = self.fallback = None  # fallback: (requested, served) models
        self.user = None  # team mode: whose GitLab token it was
        self.client = None  # the client's address (behind a trusted proxy: the forwarded one)
        self.stream = self.refreshed = self.head_sent = self.body_read = False
        self.usage = {}
        self.started = time.monotonic()
        self.outcome = ""

    def log_line(self, redact):
        usage = self.usage
        parts = ["%s %s" % (safe_for_log(self.method or "-"), safe_for_log(self.path or "-")),
                 self.client and "client=%s" % self.client,
                 self.model and "model=%s" % safe_for_log(self.model),
                 self.fallback and "fallback-from=%s" % safe_for_log(self.fallback[0]),
                 "status=%s" % (self.status or "-"),
                 "%.0fms" % ((time.monotonic() - self.started) * 1000),
                 self.stream and "stream",
                 usage and "in=%s out=%s" % (usage.get("input", "-"), usage.get("output", "-")),
                 self.user and "user=%s" % self.user,
                 self.refreshed and "token-refreshed",
                 self.request_id and "request-id=%s" % self.request_id,
                 self.outcome and "(%s)" % redact(self.outcome)]
        return " ".join(p for p in parts if p)


# Each route by the path /stats shows for it; its methods, and their handlers.
ROUTES = {
    "/": {"GET": "status", "HEAD": "status"},
    "/api/hello": {"GET": "health", "HEAD": "health"},  # Claude Code's connectivity probe
    "/livez": {"GET": "health", "HEAD": "health"},  # for load balancers and Kubernetes
    "/readyz": {"GET": "health", "HEAD": "health"},
    "/v1/messages": {"POST": "messages"},
    "/v1/messages/count_tokens": {"POST": "messages"},
    "/v1/models": {"GET": "list_models"},
    "/v1/models/{id}": {"GET": "get_model"},
    "/v1/chat/completions": {"POST": "chat_completions"},
    "/v1/responses": {"POST": "responses"},
    "/stats": {"GET": "stats"},
    "/metrics": {"GET": "metrics"},
}
OPEN_ROUTES = frozenset(("status", "health"))
PROBES = frozenset(("/livez", "/readyz"))  # polled every few seconds: not usage, not logged
API_ROUTES = [(m, p) for p, methods in ROUTES.items() if p.startswith("/v1/") and "{" not in p
              for m in methods]
ROUTE_SUMMARY = "POST %s and GET %s" % tuple(", ".join(p for m, p in API_ROUTES if m == method)
                                             for method in ("POST", "GET"))
HTTP_ERROR_TEXT = {
    414: "the request URL is too long (limit 64 KiB)",
    431: "the request headers are too many or too long", 505: "HTTP version not supported",
}
CHALLENGE = {"WWW-Authenticate": 'Basic realm="%s", charset="UTF-8"' % NAME}


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One client connection (HTTP/1.1 keep-alive); do_* dispatch through ROUTES to a
    route_* method, which reads the request, picks the dialect's adapter, asks Upstream
    and answers with what comes back, relayed as a stream or whole."""

    protocol_version = "HTTP/1.1"
    server_version = "%s/%s" % (NAME, __version__)
    sys_version = ""
    disable_nagle_algorithm = True  # with Nagle, a small answer can wait 40 ms for an ACK

    def setup(self):
        self.timeout = self.server.config.client_timeout
        tls = self.server.tls_context
        if tls is not None:
            # The handshake runs here, in the connection's own thread, not in the accept loop;
            # if it fails, socketserver closes the connection (handle and finish never run).
            self.request.settimeout(self.timeout)
            try:
                self.request = self.connection = tls.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.info("TLS handshake with %s failed (%s)", self.client_address[0],
                         getattr(exc, "reason", None) or exc.__class__.__name__)
                raise ConnectionAbortedError("TLS handshake failed") from None
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            linger_close(self.connection)

    def parse_request(self):
        """http.server's parse_request, then the checks it does not make."""
        if not super().parse_request():
            return False
        if self.headers.defects:  # its parser stops at a malformed line, dropping the rest
            self.send_error(400, "malformed header line in the request")
            return False
        return True


    def dispatch(self):
        """Every method's entry (do_GET and the rest): route, answer, count, log."""
        server = self.server
        self.ctx = ctx = RequestContext(self.command, server.new_request_id())
        ctx.client = client_address(self.client_address[0],
                                    self.headers.get_all("X-Forwarded-For") or (),
                                    server.config.trusted_proxies)
        server.inflight.enter(self.client_address)
        try:
            self.route()
        except ProxyError as exc:
            self.send_error_response(exc)
        except ClientGone as exc:
            self.client_gone(str(exc))
        except socket.timeout:
            self.client_gone("it sent or read nothing for %g s, CLIENT_TIMEOUT" % self.timeout,
                             "dropped")
        except ConnectionError as exc:
            self.client_gone(exc.__class__.__name__)
        except Exception:
            log.error("internal error on %s %s: %s", self.command, safe_for_log(ctx.path),
                      server.redact(traceback.format_exc()))
            self.send_error_response(ProxyError("internal proxy error (request %s); see the "
                                                "proxy's log" % ctx.request_id, 500))
        finally:
            probe = ctx.route in PROBES and ctx.status in (200, 503)
            if not probe:
                server.stats.record(ctx)
            log.log(logging.DEBUG if probe else logging.INFO, ctx.log_line(server.redact))
            server.inflight.leave(self.client_address)
        if server.stopping.is_set():
            self.close_connection = True  # answered after the listener closed: nothing follows

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    def route(self):
        ctx = self.ctx
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s %s headers %s", self.command, safe_for_log(self.path),
                      redact_headers(self.headers.items()))
        ctx.path, query = split_target(self.path)
        ctx.route = ctx.path if ctx.path in ROUTES else (
            "/v1/models/{id}" if ctx.path.startswith("/v1/models/") else None)
        methods = ROUTES.get(ctx.route)
        if methods is None:
            raise NotFound("no such route: %s %s. This proxy serves %s" % (
                safe_for_log(self.command), safe_for_log(ctx.path), ROUTE_SUMMARY))
        if self.command == "OPTIONS" and self.server.cors_origin(self.headers.get("Origin")):
            return self.respond(204, b"", [("Access-Control-Max-Age", "600")])
        name = methods.get(self.command)
        if name is None:
            raise MethodNotAllowed("%s is not allowed on %s; use %s" % (
                safe_for_log(self.command), ctx.path, " or ".join(sorted(methods))),
                headers={"Allow": ", ".join(sorted(methods))})
        if name not in OPEN_ROUTES:
            self.authorize()
        getattr(self, "route_" + name)(query)

    def authorize(self):
        """Check the proxy key, then ask the token provider whose token serves the client
        (team mode: the client's own GitLab token, which GitLab must accept)."""
        server = self.server
        key = presented_key(self.headers)
        if server.api_key_bytes and not hmac.compare_digest(key.encode("latin-1", "replace"),
                                                            server.api_key_bytes):
            raise Unauthorized("missing or wrong proxy API key: send PROXY_API_KEY as x-api-key "
                               "or Authorization: Bearer (browsers: any user name, the key as "
                               "password)", headers=CHALLENGE)
        self.tokens = server.tokens.for_client(key, self.ctx.client)

    def request_json(self):
        """(raw body, its members, the model it asks for, resolved)."""
        self.ctx.body_read = True
        try:
            raw = read_body(self.headers, self.rfile, self.server.config.max_body)
        except LengthRequired:
            raise
        except ProxyError:
            self.close_connection = True  # the rest of the body is still on the socket
            raise
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # framing we did not choose: never reuse
        members = parse_body(raw)
        self.ctx.stream = members.get("stream") is True
        self.ctx.model = self.server.catalog.resolve(members.get("model") or "")
        return raw, members, self.ctx.model

    # --- routes

    def route_status(self, query):
        # Browsers get the usage page (behind the key); API clients the open health answer.
        if "text/html" in (self.headers.get("Accept") or ""):
            self.authorize()
            page = render_status_page(self.server.stats_snapshot()).encode("utf-8")
            return self.respond(200, page, [("Content-Type", "text/html; charset=utf-8"),
                                            ("Cache-Control", "no-store")])
        self.respond_json(200, self.server.status())

    def route_health(self, query):
        """/api/hello and /livez: the process serves; /readyz: it takes work, until the
        shutdown signal."""
        if self.ctx.route == "/readyz" and self.server.draining.is_set():
            return self.respond_json(503, {"status": "draining"})
        self.respond_json(200, {"status": "ok"})

    def route_stats(self, query):
        self.respond_json(200, self.server.stats_snapshot(), [("Cache-Control", "no-store")])

    def route_metrics(self, query):
        self.respond(200, self.server.metrics_text().encode("utf-8"), [
            ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
            ("Cache-Control", "no-store")])

    def route_list_models(self, query):
        limit, after_id, before_id = parse_page_args(query)
        # Anthropic clients can only use Claude models; OpenAI clients see everything.
        api = ANTHROPIC if self.headers.get("anthropic-version") else None
        models, has_more = self.server.catalog.page(limit, after_id, before_id, api)
        self.respond_json(200, {"data": [model_entry(m) for m in models], "has_more": has_more,
                                "first_id": models[0].id if models else None,
                                "last_id": models[-1].id if models else None, "object": "list"})

    def route_get_model(self, query):
        name = urllib.parse.unquote(self.ctx.path[len("/v1/models/"):])
        catalog = self.server.catalog
        model = catalog.by_id.get(catalog.resolve(name))
        if model is None:
            raise NotFound("model %r is not in this proxy's catalog; GET /v1/models lists them "
                           "(MODELS changes the list)" % safe_for_log(name))
        self.respond_json(200, model_entry(model))

    def route_messages(self, query):
        """/v1/messages and /v1/messages/count_tokens, which the gateway serves only with
        ?beta=true, whatever the client sent."""
        raw, members, model = self.request_json()
        catalog = self.server.catalog
        if catalog.spec(model).api == OPENAI:
            raise BadRequest("%s is an OpenAI model; call it through POST /v1/chat/completions "
                             "or /v1/responses" % model)
        beta = query.get("beta") == "true" or self.ctx.route.endswith("count_tokens")
        path = self.ctx.route + ("?beta=true" if beta else "")
        self.forward(Adapter(path, members, raw, model, catalog))

    def route_chat_completions(self, query):
        self.ctx.dialect = OPENAI
        raw, members, model = self.request_json()
        catalog = self.server.catalog
        if catalog.spec(model).api == OPENAI:
            return self.forward(OpenAIAdapter(self.ctx.route, members, raw, model, catalog))
        self.forward(ChatAdapter(members, model, catalog, int(time.time())))

    def route_responses(self, query):
        self.ctx.dialect = OPENAI
        raw, members, model = self.request_json()
        catalog = self.server.catalog
        if catalog.spec(model).api != OPENAI:
            raise BadRequest("%s is a Claude model: this proxy serves the Responses API for GPT "
                             "and Codex models only. Call Claude through POST "
                             "/v1/chat/completions (OpenAI format) or POST /v1/messages "
                             "(Anthropic format)." % model)
        self.forward(OpenAIAdapter(self.ctx.route, members, raw, model, catalog))

    def forward(self, adapter):
        """Send the adapter's request to the gateway and answer the client with what comes
        back, through the adapter: a stream event by event, anything else whole."""
        server, ctx = self.server, self.ctx
        ctx.user = self.tokens.user  # team mode: usage counts for whose token it is
        result = server.upstream.call(adapter, self.tokens,
                                      request_headers(self.headers, adapter.api))
        ctx.model, ctx.refreshed, ctx.upstream_seconds = result.model, result.refreshed, \
            result.seconds
        if result.model != adapter.model and result.status < 400:
            ctx.fallback = (adapter.model, result.model)
        gateway_id = re.sub(r"[^A-Za-z0-9_.:-]", "",  # it is echoed to the client
                            result.headers.get("x-request-id") or "")[:128]
        ctx.request_id = gateway_id or ctx.request_id
        if result.status >= 400:
            raise gateway_error(result, adapter, server.catalog)
        headers = response_headers_for_client(result.headers) if adapter.relays_headers else []
        if result.response is not None:
            return self.relay_stream(result, adapter, headers)
        data = adapter.answer(result.body)
        ctx.usage = adapter.usage
        self.respond(result.status, data, headers)

    def relay_stream(self, result, adapter, headers):
        ctx, server = self.ctx, self.server
        ctx.stream = True
        chunked = self.request_version != "HTTP/1.0"
        if not chunked:
            self.close_connection = True
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(("Content-Type", "text/event-stream"))
        headers += [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
        headers += [("Transfer-Encoding", "chunked")] if chunked else []
        relay = Relay(self.connection, result.conn.sock, self.wfile, chunked)
        failure = "the client left"  # unless the relay ends otherwise
        if self.client_address not in server.shut:
            server.watcher.watch(relay)
        try:
            self.wfile.write(self.head_bytes(result.status, headers))
            failure = relay.run(result.response, adapter, server.config)
        finally:
            # Before the connection may go back to the pool: a client hanging up from now
            # on must not cut it under the next request that uses it.
            server.watcher.unwatch(relay)
            server.upstream.release(result, failure is None)
            ctx.usage = adapter.usage
        if failure:
            ctx.outcome = "cut: " + failure
            log.warning("stream %s cut: %s", ctx.request_id, failure)
            relay.write(adapter.error_frame(failure + "; retry the request."))
        if chunked:
            relay.write(b"")  # the end of the body

    # --- writing answers

    def head_bytes(self, status, fields):
        ctx = self.ctx
        ctx.status, ctx.head_sent = status, True
        fields = [("Date", email.utils.formatdate(usegmt=True)),
                  ("Server", self.server_version),
                  ("request-id", ctx.request_id)] + list(fields)
        headers = getattr(self, "headers", None)  # absent when the request line was unreadable
        origin = headers.get("Origin") if headers else None
        if origin and self.server.cors_origin(origin):
            fields += [("Access-Control-Allow-Origin", origin)] + CORS_FIELDS
        if self.server.draining.is_set():
            self.close_connection = True  # shutting down: a next request must go elsewhere
        if self.close_connection:
            fields.append(("Connection", "close"))
        elif self.request_version == "HTTP/1.0":
            fields.append(("Connection", "keep-alive"))
        return response_head(status, fields)

    def respond(self, status, body, headers=()):
        """Headers and body in one write."""
        headers = list(headers)
        if not any(k.lower() == "content-type" for k, _ in headers) and status != 204:
            headers.append(("Content-Type", "application/json"))
        headers.append(("Content-Length", str(len(body))))
        head = self.head_bytes(status, headers)
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def respond_json(self, status, obj, headers=()):
        self.respond(status, json.dumps(obj).encode(), headers)

    def send_error_response(self, exc):
        if self.ctx.head_sent:
            self.close_connection = True  # an answer is under way: nothing more can be said
            return
        if self.command in ("POST", "PUT", "PATCH") and not self.ctx.body_read:
            self.close_connection = True  # its body is still unread on the socket
        headers = list(exc.headers.items())
        if exc.retry is not None:
            headers.append(("x-should-retry", "true" if exc.retry else "false"))
        self.ctx.outcome = self.ctx.outcome or exc.message
        try:
            self.respond(exc.status, exc.body(self.ctx.dialect), headers)
        except OSError as error:
            self.client_gone(error.__class__.__name__)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, huge headers) as Anthropic JSON."""
        self.close_connection = True
        if code == 501:
            code, text = 405, "method %s is not supported" % safe_for_log(self.command)
        else:
            text = HTTP_ERROR_TEXT.get(code) or "malformed HTTP request: %s" % (message or "error")
        self.ctx = RequestContext(self.command or "", self.server.new_request_id())
        self.ctx.path = safe_for_log(getattr(self, "path", "") or "-")
        self.send_error_response(ProxyError(text, code))
        log.info(self.ctx.log_line(self.server.redact))

    def client_gone(self, why, what="closed the connection"):
        self.close_connection = True
        self.ctx.outcome = "client %s (%s)" % (what, why)
        if not self.ctx.status:
            self.ctx.status = 499

    def log_message(self, fmt, *args):
        log.debug("http.server: " + fmt, *args)


def gateway_error(result, adapter, catalog):
    """The error a client gets for a gateway answer of 400 or above, with retry advice
    for the statuses worth another try."""
    error = translate_gateway_error(result.status, result.body, result.model,
                                    catalog.ids(adapter.api), adapter.api, adapter.dialect)
    if result.status in RETRY_STATUSES or result.status >= 500:
        hinted = retry_after_seconds(result.headers)
        error.headers.update({"x-should-retry": "true",
                              "retry-after": "%d" % max(1, math.ceil(hinted or 1))})
    return error


def linger_close(sock, seconds=0.25, limit=MIB):
    """Close after reading what the client still sends, for a moment: closing with unread
    input makes the kernel send a reset, which can destroy the answer before it is read."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
        sock.settimeout(seconds)
        deadline, drained = time.monotonic() + seconds, 0
        while drained < limit and time.monotonic() < deadline:
            data = socket.socket.recv(sock, 65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass  # reset, timeout or already closed: all mean there is nothing left to wait for
    finally:
        sock.close()


CORS_FIELDS = [("Vary", "Origin"), ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
               ("Access-Control-Allow-Headers",
                "authorization, content-type, x-api-key, anthropic-version, anthropic-beta"),
               ("Access-Control-Expose-Headers", "request-id")]


# === Server and main ===

class Occupancy:
    """The requests (or connections) in progress, by client address, with an optional
    limit; shutdown (and the tests) can wait for them to end."""

    def __init__(self, limit=None):
        self._cond = threading.Condition(threading.Lock())
        self.items = {}  # client address (host, port) -> its socket, for connections
        self.limit = limit

    @property
    def count(self):
        return len(self.items)

    def enter(self, key, value=None):
        with self._cond:
            if self.limit is not None and len(self.items) >= self.limit:
                return False
            self.items[key] = value
            return True

    def leave(self, key):
        with self._cond:
            self.items.pop(key, None)
            self._cond.notify_all()

    def wait_until(self, count, timeout):
        """True once at most `count` are in progress; False after timeout seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.items) <= count, timeout)

    def wait_idle(self, timeout):
        return self.wait_until(0, timeout)


LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MAX_MODEL_SERIES = 100    # models that served requests; any others count as "other"
MAX_FALLBACK_NAMES = 50   # requested names of fallbacks; any others count as "other"
MAX_USER_SERIES = 1000    # team mode users


class Stats:
    """What the proxy did, for /stats, the status page and /metrics: bounded whatever
    clients send (a model gets entries of its own once it has served a request)."""

    def __init__(self, clock=time.time):
        self._lock = threading.Lock()
        self._clock = clock
        self.started = clock()
        self.requests = collections.Counter()  # (route, model, status) -> requests
        self.models = {}  # model -> Counter of requests, errors and token kinds
        self.users = {}   # team mode: username -> the same
        self.fallbacks = collections.Counter()  # (requested, served) -> requests
        self.exchanges = collections.Counter()  # "ok" / "failed" -> token exchanges
        self.latency = {}  # route -> [cumulative bucket counts, sum of seconds, count]
        self.recent = collections.deque(maxlen=2000)  # upstream latencies (ms), for percentiles
        self.rejected_connections = 0

    def record(self, ctx):
        failed = int((ctx.status or 500) >= 400)
        model, served = ctx.model or "", ctx.upstream_seconds is not None and not failed
        with self._lock:
            if model and model not in self.models and not (
                    served and len(self.models) < MAX_MODEL_SERIES):
                model = "other"
            self.requests[(ctx.route or "other", model, str(ctx.status or 0))] += 1
            if model:
                self._count(self.models, model, failed, ctx.usage)
            if ctx.user:
                user = ctx.user if ctx.user in self.users or len(self.users) < MAX_USER_SERIES \
                    else "other"
                self._count(self.users, user, failed, ctx.usage)
            if ctx.fallback:
                self._count_fallback(*ctx.fallback)
            if ctx.upstream_seconds is not None:
                seconds = ctx.upstream_seconds
                entry = self.latency.setdefault(ctx.route or "other",
                                                [[0] * len(LATENCY_BUCKETS), 0.0, 0])
                for i, bound in enumerate(LATENCY_BUCKETS):
                    entry[0][i] += seconds <= bound
                entry[1] += seconds
                entry[2] += 1
                self.recent.append(seconds * 1000)

    def _count_fallback(self, requested, served):
        names = {r for r, _ in self.fallbacks}
        if requested not in names and len(names) >= MAX_FALLBACK_NAMES:
            requested = "other"
        self.fallbacks[(requested, served)] += 1

    @staticmethod
    def _count(table, key, failed, usage):
        counter = table.setdefault(key, collections.Counter())
        counter["requests"] += 1
        counter["errors"] += failed
        counter.update(usage)

    def rename_user(self, old, new):
        """Team mode: count what a user did so far under the name they turned out to have."""
        with self._lock:
            counts = self.users.pop(old, None)
            if counts:
                self.users.setdefault(new, collections.Counter()).update(counts)

    def count_exchange(self, ok):
        with self._lock:
            self.exchanges["ok" if ok else "failed"] += 1

    def count_rejected(self):
        with self._lock:
            self.rejected_connections += 1

    def snapshot(self):
        """A consistent copy of everything, for one page or scrape."""
        with self._lock:
            return {"uptime_seconds": int(self._clock() - self.started),
                    "requests": dict(self.requests),
                    "models": {k: dict(v) for k, v in self.models.items()},
                    "users": {k: dict(v) for k, v in self.users.items()},
                    "fallbacks": dict(self.fallbacks), "exchanges": dict(self.exchanges),
                    "latency": copy.deepcopy(self.latency), "recent": sorted(self.recent),
                    "rejected_connections": self.rejected_connections}


def stats_json(snap):
    """/stats from a Stats snapshot: counts by route (its path), model and user."""
    routes = collections.defaultdict(collections.Counter)
    for (route, _, status), count in snap["requests"].items():
        routes[route]["requests"] += count
        routes[route]["errors"] += count if int(status) >= 400 or status == "0" else 0
    recent = snap["recent"]
    pick = lambda q: round(recent[min(len(recent) - 1, int(q * len(recent)))], 1)  # noqa: E731
    latency = {"count": len(recent)}
    if recent:
        latency.update(p50=pick(0.5), p90=pick(0.9), p99=pick(0.99))
    return {"uptime_seconds": snap["uptime_seconds"],
            "routes": {k: dict(v) for k, v in routes.items()}, "models": snap["models"],
            "model_fallbacks": [{"requested": r, "served": s, "requests": n}
                                for (r, s), n in sorted(snap["fallbacks"].items())],
            "token_exchanges": {"ok": snap["exchanges"].get("ok", 0),
                                "failed": snap["exchanges"].get("failed", 0)},
            "upstream_latency_ms": latency}


def render_status_page(snap):
    """The statistics as one self-contained HTML page (inline CSS, no scripts, refreshes)."""
    esc = html.escape
    token = snap["gateway_token"]
    latency = snap["upstream_latency_ms"]
    token_text = token["state"] + (" (expires in %d min)" % (token["expires_in"] // 60)
                                   if "expires_in" in token else "")
    kinds = ("requests", "errors") + TOKEN_KINDS
    return STATUS_PAGE % {
        "version": esc(snap["version"]), "uptime": format_duration(snap["uptime_seconds"]),
        "token": esc(token_text), "p50": latency.get("p50", "-"), "p90": latency.get("p90", "-"),
        "p99": latency.get("p99", "-"), "count": latency["count"],
        "routes": html_rows(snap["routes"], ("requests", "errors"), "no requests yet"),
        "models": html_rows(snap["models"], kinds, "no model calls yet"),
        "users": USERS_TABLE % html_rows(snap["users"], kinds, "no users yet")
                 if "users" in snap else "",
        "connections": "%(open)d open of %(max)d, %(rejected)d refused" % snap["connections"]}


def html_rows(table, columns, empty):
    rows = "".join("<tr><td>%s</td>%s</tr>" % (html.escape(name), "".join(
        "<td>%d</td>" % counts.get(c, 0) for c in columns)) for name, counts in sorted(
            table.items()))
    return rows or '<tr><td colspan="%d">%s</td></tr>' % (len(columns) + 1, empty)


def metric_labels(labels):
    """{label="value",...} with values escaped as the exposition format wants."""
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (name, str(value).replace("\\", "\\\\").replace(
        "\n", "\\n").replace('"', '\\"')) for name, value in labels)


def metric_family(out, name, kind, help_text, samples):
    """One metric: its HELP and TYPE lines, then (suffix, labels, value) samples."""
    out.append("# HELP %s %s" % (name, help_text))
    out.append("# TYPE %s %s" % (name, kind))
    for suffix, labels, value in samples:
        out.append("%s%s%s %s" % (name, suffix, metric_labels(labels), repr(value)
                                  if isinstance(value, float) else value))


def render_metrics(snap, gauges, team_mode):
    """Prometheus' text exposition format (0.0.4) of a Stats snapshot and the gauges."""
    out, prefix = [], "gitlab_duo_proxy_"
    tokens = [(m, k, c.get(k, 0)) for m, c in sorted(snap["models"].items()) for k in TOKEN_KINDS]
    metric_family(out, prefix + "requests_total", "counter", "Requests answered, by route, the "
                  "model that served them and HTTP status.",
                  [("", (("route", r), ("model", m), ("status", s)), n)
                   for (r, m, s), n in sorted(snap["requests"].items())])
    metric_family(out, prefix + "tokens_total", "counter", "Tokens the answers reported, by model "
                  "and kind.", [("", (("model", m), ("kind", k)), n) for m, k, n in tokens])
    metric_family(out, prefix + "upstream_latency_seconds", "histogram", "Time from sending a "
                  "request to the gateway to the head of its answer.", latency_samples(snap))
    metric_family(out, prefix + "token_exchanges_total", "counter", "GitLab token exchanges.",
                  [("", (("result", r),), snap["exchanges"].get(r, 0)) for r in ("ok", "failed")])
    metric_family(out, prefix + "model_fallbacks_total", "counter", "Requests served by another "
                  "model of the same family because GitLab does not serve the one asked for.",
                  [("", (("requested", r), ("served", s)), n)
                   for (r, s), n in sorted(snap["fallbacks"].items())])
    for name, help_text in (("in_flight_requests", "Requests being answered."),
                            ("open_connections", "Client connections open."),
                            ("token_expires_in_seconds", "Seconds until the gateway token expires "
                             "(single-user mode, once fetched).")):
        value = gauges[name]
        metric_family(out, prefix + name, "gauge", help_text,
                      [] if value is None else [("", (), value)])
    metric_family(out, prefix + "connections_rejected_total", "counter", "Connections refused "
                  "because MAX_CONNECTIONS were open.", [("", (), snap["rejected_connections"])])
    if team_mode:
        users = sorted(snap["users"].items())
        metric_family(out, prefix + "user_requests_total", "counter", "Requests by GitLab user.",
                      [("", (("user", u),), c.get("requests", 0)) for u, c in users])
        metric_family(out, prefix + "user_tokens_total", "counter", "Tokens by GitLab user and "
                      "kind.", [("", (("user", u), ("kind", k)), c.get(k, 0))
                                for u, c in users for k in TOKEN_KINDS])
    return "\n".join(out) + "\n"


def latency_samples(snap):
    samples = []
    for route, (buckets, total, count) in sorted(snap["latency"].items()):
        bounds = [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for bound, value in zip(bounds, buckets + [count]):
            samples.append(("_bucket", (("route", route), ("le", bound)), value))
        samples += [("_sum", (("route", route),), float(total)),
                    ("_count", (("route", route),), count)]
    return samples


def format_duration(seconds):
    hours, rest = divmod(int(seconds), 3600)
    return "%dh %02dm" % (hours, rest // 60) if hours else "%dm %02ds" % divmod(rest, 60)


STATUS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>gitlab-duo-proxy</title>
<style>body{font:15px/1.4 system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ddd;padding:.6em 1em}
.card b{display:block;font-size:1.3em}table{border-collapse:collapse;width:100%%}
td,th{border-bottom:1px solid #eee;padding:.3em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}</style></head><body>
<h1>gitlab-duo-proxy %(version)s</h1>
<div class="cards">
<div class="card">uptime<b id="uptime">%(uptime)s</b></div>
<div class="card">gateway token<b id="token">%(token)s</b></div>
<div class="card">connections<b id="connections">%(connections)s</b></div>
<div class="card">upstream latency p50 / p90 / p99
<b id="latency">%(p50)s / %(p90)s / %(p99)s ms</b> over %(count)s calls</div></div>
<h2>Requests by route</h2>
<table id="routes"><tr><th>route</th><th>requests</th><th>errors</th></tr>
%(routes)s</table>
<h2>Tokens by model</h2><table id="models"><tr><th>model</th><th>requests</th><th>errors</th>
<th>input</th><th>output</th><th>cache read</th><th>cache write</th></tr>
%(models)s</table>
%(users)s
</body></html>
"""
USERS_TABLE = ("<h2>Usage by user</h2>\n<table id=\"users\"><tr><th>user</th><th>requests</th>"
               "<th>errors</th><th>input</th><th>output</th><th>cache read</th>"
               "<th>cache write</th></tr>\n%s</table>")


class ShutdownRequested(Exception):
    """Raised on the serving thread, between requests, once a signal asked to stop."""


class ProxyServer(http.server.ThreadingHTTPServer):
    """The listening proxy: owns config, catalog, token caches, pool and statistics."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config, clock=time.time, handler_class=ProxyHandler, runner=None):
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        self.config = config
        self.catalog = Catalog.from_config(config)
        self.draining = threading.Event()  # set by the first SIGINT/SIGTERM
        self.drain_until = None
        self.stopping = threading.Event()  # set when the listener closes
        self.shut = set()  # connections whose reading side close_idle shut
        self.stats = Stats(clock)
        self.pool = ConnectionPool(config)
        self.upstream = Upstream(config, self.pool, self.stopping, self.catalog, clock=clock)
        count = self.stats.count_exchange
        if config.per_user:
            self.tokens = UserTokens(self.upstream, clock, on_result=count,
                                     on_rename=self.stats.rename_user)
        else:
            credentials = CredentialSource(config, runner)
            self.tokens = TokenCache(lambda: self.upstream.exchange(credentials), clock,
                                     on_result=count)
        self.refresher = TokenRefresher(self.tokens.caches, self.stopping)
        self.api_key_bytes = config.api_key.encode("utf-8")
        self.tls_context = server_ssl_context(config)
        self.watcher = DisconnectWatcher()
        self.inflight = Occupancy()
        self.connections = Occupancy(config.max_connections)
        self._cors = frozenset(o.strip() for o in config.cors_origins.split(",") if o.strip())
        self._request_ids = itertools.count(1)
        self._id_prefix = "req_proxy_%s_" % os.urandom(6).hex()
        super().__init__((config.host, config.port), handler_class)

    def serve_forever(self, poll_interval=0.5):
        self.refresher.start()
        super().serve_forever(poll_interval)

    def service_actions(self):  # serve_forever calls it between requests: a safe point
        if self.draining.is_set() and self.drain_until is None:
            self.drain_until = time.monotonic() + self.config.drain_seconds
            if self.config.drain_seconds:
                log.info("draining for %gs: /readyz answers 503, every answer closes its "
                         "connection", self.config.drain_seconds)
        if self.stopping.is_set() or self.drain_until is not None and \
                time.monotonic() >= self.drain_until:
            raise ShutdownRequested()

    def close_idle(self):
        """Close the kept-alive connections waiting for a next request (how many). Only their
        reading side is shut: a request that arrived a moment ago is still answered, and its
        relay does not take the end of its input for the client leaving (self.shut)."""
        busy = set(self.inflight.items)
        idle = [(key, sock) for key, sock in list(self.connections.items.items())
                if key not in busy]
        for key, sock in idle:
            self.shut.add(key)
            try:
                socket.socket.shutdown(sock, socket.SHUT_RD)
            except OSError:
                pass  # closed meanwhile
        return len(idle)

    def process_request(self, request, client_address):
        """A thread per connection, up to MAX_CONNECTIONS; past it an immediate 503."""
        if not self.connections.enter(client_address, request):
            return self.refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.leave(client_address)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.leave(client_address)

    def refuse(self, sock):
        """Answer 503 and close, from the accepting thread and without waiting: a fresh
        socket's send buffer takes the whole answer. (Over TLS it is just closed: the
        handshake would mean waiting for the client.)"""
        self.stats.count_rejected()
        body = anthropic_error_body("overloaded_error", "the proxy has its maximum of %d "
                                    "connections open (MAX_CONNECTIONS); retry shortly"
                                    % self.config.max_connections)
        head = response_head(503, [
            ("Date", email.utils.formatdate(usegmt=True)), ("Server", ProxyHandler.server_version),
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("retry-after", "1"), ("x-should-retry", "true"),
            ("request-id", self.new_request_id()), ("Connection", "close")])
        try:
            sock.setblocking(False)
            if self.tls_context is None:
                sock.send(head + body)
                for _ in range(16):  # what the client sent already: unread, closing resets
                    if not sock.recv(65536):
                        break
        except OSError:
            pass  # the client is gone, or has sent all it had so far
        self.shutdown_request(sock)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, ssl.SSLError)):
            log.debug("connection from %s ended: %s", client_address[0], exc.__class__.__name__)
        else:
            log.error("unexpected error serving %s: %s", client_address[0],
                      self.redact(traceback.format_exc()))

    def new_request_id(self):
        return "%s%d" % (self._id_prefix, next(self._request_ids))

    @property
    def url(self):
        host, port = self.server_address[:2]
        host = "[%s]" % host if ":" in host else host
        return "%s://%s:%d" % ("https" if self.tls_context else "http", host, port)

    def cors_origin(self, origin):
        return origin if origin and ("*" in self._cors or origin in self._cors) else None

    def status(self):
        config = self.config
        return {"name": NAME, "version": __version__, "status": "ok",
                "gitlab_instance": config.instance_url, "ai_gateway": config.gateway_base,
                "anthropic_base": config.gateway_base + PROXY_PATHS[ANTHROPIC],
                "default_model": self.catalog.default_model, "models": len(self.catalog.models),
                "gateway_token": self.tokens.state()}

    def stats_snapshot(self):
        snap = self.stats.snapshot()
        result = stats_json(snap)
        if self.config.per_user:
            result["users"] = snap["users"]
        result.update(name=NAME, version=__version__, gateway_token=self.tokens.state(),
                      upstream_connections_opened=dict(self.pool.opened),
                      connections={"open": self.connections.count,
                                   "max": self.config.max_connections,
                                   "rejected": snap["rejected_connections"]})
        return result

    def metrics_text(self):
        expires = self.tokens.expires_in()
        gauges = {"in_flight_requests": self.inflight.count,
                  "open_connections": self.connections.count,
                  "token_expires_in_seconds": None if expires is None else round(expires, 3)}
        return render_metrics(self.stats.snapshot(), gauges, self.config.per_user)

    def redact(self, text):
        """text with every secret the proxy knows, and anything token-shaped, masked."""
        known = [self.config.gitlab_token, self.config.api_key] + self.tokens.secrets()
        for secret in filter(None, known):
            text = text.replace(secret, "[redacted]")
        return redact_patterns(text)

    def server_close(self):
        self.stopping.set()
        super().server_close()
        self.pool.close()
        self.watcher.close()
        self.refresher.join(2.0)


def server_ssl_context(config):
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("cannot load --tls-cert/--tls-key: %s" % exc) from None
    return context


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, message (and a traceback, if any)."""

    def format(self, record):
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_handler(config, stream=None):
    """Where log lines go: LOG_FILE, else stream (stderr), as text or JSON."""
    if config.log_file and stream is None:
        try:
            handler = logging.FileHandler(os.path.expanduser(config.log_file), encoding="utf-8")
        except OSError as exc:
            raise ConfigError("LOG_FILE %s cannot be opened: %s"
                              % (config.log_file, exc.strerror)) from None
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler


def setup_logging(config, stream=None):
    log.handlers[:] = [log_handler(config, stream)]
    log.setLevel(logging.DEBUG if config.debug else logging.INFO)
    log.propagate = False


def install_signal_handlers(server):
    """SIGINT/SIGTERM (Ctrl-C, Ctrl-Break on Windows) ask for a graceful stop, a second
    signal exits at once. The handler only sets an Event: it runs between any two
    bytecodes of the main thread, where taking a lock or starting a thread could deadlock;
    serve_forever notices within its poll interval (service_actions)."""
    def on_signal(signum, frame):
        if server.draining.is_set():
            log.warning("second signal: exiting without waiting")
            os._exit(1)
        server.draining.set()
    for name in ("SIGINT", "SIGTERM", "SIGBREAK", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)


def serve(server):
    """Serve until a signal asks to stop, and DRAIN_SECONDS more (see service_actions);
    then close the listener and the idle kept-alive connections, and give in-flight
    requests SHUTDOWN_GRACE. Every answer from the signal on closes its connection, so no
    client sends a next request on a connection about to close."""
    grace = server.config.shutdown_grace
    try:
        server.serve_forever(poll_interval=0.25)
    except ShutdownRequested:
        pass
    server.socket.close()  # refuse new connections at once
    server.stopping.set()
    idle = server.close_idle()
    log.info("shutting down: no new connections, %d idle connection(s) closed; waiting up to "
             "%gs for %d request(s)", idle, grace, server.inflight.count)
    # Connections, not only requests: one whose request arrived just now is not yet counted.
    if not server.connections.wait_idle(grace):
        log.warning("%d request(s) still running after %gs; closing them",
                    server.connections.count, grace)
    server.server_close()
    log.info("stopped")
    return 0


def add_action_arguments(parser):
    group = parser.add_argument_group("actions (instead of serving)")
    group.add_argument("--check", action="store_true",
                       help="diagnose: configuration, GitLab, token, Duo token exchange, gateway")
    group.add_argument("--no-inference", action="store_true",
                       help="with --check: skip the one-token request to the default model")
    group.add_argument("--models", dest="check_models", action="store_true",
                       help="with --check: try every catalog model (Claude models through "
                            "count_tokens, which GitLab does not bill)")
    group.add_argument("--goose-config", nargs="?", const=default_goose_path(), metavar="PATH",
                       help="write Goose's custom provider file (default: %s)"
                            % default_goose_path())
    group.add_argument("--force", action="store_true",
                       help="with --goose-config: replace a different file")
    group.add_argument("--print-env", metavar="TOOL", choices=sorted(CLIENT_ENV),
                       help="print shell exports for %s" % ", ".join(sorted(CLIENT_ENV)))
    group.add_argument("--shell", choices=("posix", "powershell"), default="posix",
                       help="with --print-env: syntax of the exports (default: posix)")


def run_action(config, args):
    """--print-env, --goose-config or --check; None when the proxy should serve instead."""
    if args.print_env:
        print("\n".join(client_env_lines(config, args.print_env, args.shell)))
        return 0
    if args.goose_config:
        status, message = write_goose_config(config, os.path.expanduser(args.goose_config),
                                             args.force)
        print(message, file=sys.stderr if status else sys.stdout)
        return status
    if args.check:
        doctor = Doctor(config, sys.stdout)
        return 0 if doctor.run(inference=not args.no_inference, models=args.check_models) else 1
    return None


def main(argv=None):
    try:
        config, args, warnings = load_config(argv)
        setup_logging(config)
        for warning in warnings:
            log.warning(warning)
        status = run_action(config, args)
        server = ProxyServer(config) if status is None else None
    except ConfigError as exc:
        print("%s: error: %s" % (NAME, exc), file=sys.stderr)
        return 2
    except BrokenPipeError:  # an action's reader left (| head): the rest would go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        print("%s: error: cannot listen on %s:%s: %s" % (NAME, config.host, config.port,
                                                         exc.strerror or exc), file=sys.stderr)
        return 1
    if server is None:
        return status
    # Signals are handled before anyone learns the port: a SIGTERM right after the
    # "listening" line must already mean a graceful stop.
    install_signal_handlers(server)
    log.info("%s %s listening on %s -> %s (token from %s)", NAME, __version__, server.url,
             config.gateway_base, config.token_source or "each client")
    if not is_loopback(config.host) and not (config.api_key or config.per_user):
        log.warning("listening on %s WITHOUT a proxy API key (--allow-unauthenticated): anyone "
                    "who can reach this port uses your GitLab Duo seat and quota", config.host)
    return serve(server)


# === Doctor and client set-up ===

CHECK_MARKS = ("\u2713", "\u2717")
# Scopes that let a token change things; write_* too. The proxy needs only ai_features.
BROAD_SCOPES = ("api", "sudo", "admin_mode", "create_runner", "manage_runner", "k8s_proxy")
PING = [{"role": "user", "content": "ping"}]


class Doctor:
    """--check: each step prints one line, with a fix on failure; later steps need the
    earlier ones, so the first failure ends the run (except among the model checks)."""

    def __init__(self, config, out, runner=None, clock=time.time):
        self.config, self.out, self.clock = config, out, clock
        self.pool = ConnectionPool(config)
        self.upstream = Upstream(config, self.pool, threading.Event())  # no fallbacks here
        self.credentials = CredentialSource(config, runner)
        self.catalog = Catalog.from_config(config)
        self.payload = None
        encoding = getattr(out, "encoding", None) or "ascii"
        try:
            "".join(CHECK_MARKS).encode(encoding)
            self.marks = CHECK_MARKS
        except (UnicodeEncodeError, LookupError):
            self.marks = ("OK  ", "FAIL")

    def run(self, inference=True, models=False):
        """Each step needs the ones before it, so the first failure ends the run; but the
        inference step and the model table need only the exchange, and both run."""
        steps = [self.check_config, self.check_instance]
        if self.config.per_user and not self.config.token_source:
            self.line(True, "team mode: each client brings its own token; set GITLAB_TOKEN to "
                            "check one")
        else:
            steps += [self.check_token, self.check_exchange]
        try:
            if not all(step() for step in steps):
                return False
            if self.payload is None:  # team mode without a token: nothing more to check
                return True
            results = [self.check_inference()] if inference else []
            results += [self.check_models()] if models else []
            return all(results)
        finally:
            self.pool.close()

    def line(self, ok, text, fix=None, note=None):
        self.out.write("%s %s\n" % (self.marks[0 if ok else 1], text))
        for label, extra in (("fix", None if ok else fix), ("note", note)):
            if extra:
                self.out.write("    %s: %s\n" % (label, extra))
        self.out.flush()
        return ok

    def check_config(self):
        config = self.config
        return self.line(True, "configuration: GitLab %s, gateway %s, default model %s, token "
                         "from %s" % (config.instance_url, config.gateway_base,
                                      self.catalog.default_model,
                                      config.token_source or "each client"))

    def check_instance(self):
        where = self.config.instance_url
        try:
            status, _ = self.upstream.gitlab_json("/api/v4/version", None)
        except (OSError, http.client.HTTPException, ProxyError) as exc:
            reason = exc.message if isinstance(exc, ProxyError) else \
                describe_network_error(exc, self.upstream.gitlab)
            return self.line(False, "GitLab instance %s is not reachable: %s" % (where, reason),
                             "check GITLAB_INSTANCE_URL, your network, HTTPS_PROXY/NO_PROXY and "
                             "GITLAB_CA_BUNDLE")
        if status not in (200, 401, 403):  # the API answers 401 without a token: that is fine
            return self.line(False, "%s answered HTTP %d for /api/v4/version" % (where, status),
                             "GITLAB_INSTANCE_URL must be the address of a GitLab instance, e.g. "
                             "https://gitlab.example.com")
        return self.line(True, "GitLab instance %s is reachable" % where)

    def check_token(self):
        """Any valid token passes: GitLab tells a token without read_user, read_api or api
        only that it lacks the scope (403 insufficient_scope, never 401), which proves the
        token itself valid. Whether it can use Duo is the exchange's question."""
        try:
            token = self.credentials.get()
            status, user = self.upstream.gitlab_json("/api/v4/user", token)
            scopes, expires = self.token_scopes(token)
        except ProxyError as exc:
            return self.line(False, "GitLab token: %s" % exc.message,
                             "fix %s" % self.config.token_source)
        except (OSError, http.client.HTTPException) as exc:
            return self.line(False, "GitLab token check failed: %s"
                             % describe_network_error(exc, self.upstream.gitlab))
        user = user if isinstance(user, dict) else {}
        narrow = status == 403 and user.get("error") == "insufficient_scope"
        if status != 200 and not narrow:
            return self.line(False, "GitLab rejected the token (HTTP %d)" % status,
                             "create a personal access token with scope ai_features (User "
                             "settings > Access tokens) and put it in %s"
                             % (self.config.token_source or "GITLAB_TOKEN"))
        who = ("GitLab names its user only to a token with scope read_user (optional)" if narrow
               else "signed in as %s" % user.get("username", "?"))
        shown = "; token scopes: %s%s" % (", ".join(scopes), expires) if scopes else ""
        broad = [s for s in scopes if s in BROAD_SCOPES or s.startswith("write_")]
        return self.line(True, "token valid: %s%s" % (who, shown), note=broad and (
            "scope %s gives this token far more than the proxy needs (%s can read and change "
            "everything you can reach); a token with only ai_features is enough, so a leaked "
            "copy cannot become a full account compromise" % (broad[0], broad[0])))

    def token_scopes(self, token):
        """(scopes, " (expires ...)") GitLab tells for a personal access token, whatever its
        scopes; ([], "") for an OAuth token, or an instance too old to say."""
        status, info = self.upstream.gitlab_json("/api/v4/personal_access_tokens/self", token)
        if status != 200 or not isinstance(info, dict) or not isinstance(info.get("scopes"), list):
            return [], ""
        expiry = " (expires %s)" % info["expires_at"] if info.get("expires_at") else ""
        return [str(s) for s in info["scopes"]], expiry

    def check_exchange(self):
        try:
            self.payload = self.upstream.exchange(self.credentials)
            token = GatewayToken.from_exchange(self.payload, self.clock())
        except ProxyError as exc:
            status = " (HTTP %d)" % exc.upstream_status if exc.upstream_status else ""
            return self.line(False, "Duo token exchange failed%s: %s" % (status, exc.message))
        headers = clean_exchange_headers(self.payload.get("headers") or {})
        return self.line(True, "Duo token exchange works (expires in %d min, %d gateway headers)"
                         % ((token.expires - self.clock()) // 60, len(headers)))

    def tiny_request(self, model, free=False):
        """None if the gateway serves model; else why not. Free: Claude models through
        count_tokens, whose answer carries no usage, so GitLab does not bill it."""
        if self.catalog.spec(model).api == OPENAI:
            adapter = OpenAIAdapter("/v1/chat/completions", {"max_completion_tokens": 16,
                                                             "messages": PING}, None, model, None)
        else:
            path, body = ("/v1/messages/count_tokens?beta=true", {}) if free else (
                "/v1/messages", {"max_tokens": 1})
            adapter = Adapter(path, dict(body, messages=PING), None, model, None)
        tokens = TokenCache(lambda: self.payload, self.clock)
        try:
            result = self.upstream.call(adapter, tokens,
                                        request_headers(http.client.HTTPMessage(), adapter.api))
        except ProxyError as exc:
            return exc.message
        if result.status == 200:
            return None
        error = translate_gateway_error(result.status, result.body, model, self.catalog.ids(),
                                        adapter.api)
        message = error.message
        if isinstance(error, PassThrough):
            message = error_message_of(parse_json_or_none(result.body)) or short_text(result.body)
        return "HTTP %d: %s" % (result.status, message)

    def check_inference(self):
        model, fix = self.catalog.default_model, ("check DEFAULT_MODEL against GitLab's model "
                                                  "list, and GITLAB_AI_GATEWAY_URL")
        problem = self.tiny_request(model)
        if problem is None:
            return self.line(True, "gateway %s answers with %s" % (self.config.gateway_base,
                                                                   model))
        served = self.config.model_fallback and "does not serve model" in problem and \
            self.catalog.fallback_for(model)
        if served and self.tiny_request(served) is None:
            problem += " The proxy's model fallback serves requests for it with %s." % served
            fix = "set DEFAULT_MODEL=%s" % served
        return self.line(False, "gateway %s refused %s: %s" % (self.config.gateway_base, model,
                                                              problem), fix)

    def check_models(self):
        ok = True
        for model in self.catalog.ids():
            problem = self.tiny_request(model, free=True)
            text = "model %s%s" % (model, ": " + problem if problem else "")
            fix = "remove it with MODELS=-%s, or pick the models GitLab lists" % model
            ok = self.line(problem is None, text, fix) and ok
        return ok


def default_goose_path():
    if os.name == "nt":
        base = os.path.join(os.path.expandvars("%APPDATA%"), "Block", "goose", "config")
    else:
        base = os.path.join(os.path.expanduser("~"), ".config", "goose")
    return os.path.join(base, "custom_providers", "gitlab_duo.json")


def proxy_base_url(config):
    """The address clients on this machine use (a wildcard bind is reached on loopback)."""
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = "[%s]" % host if ":" in host else host
    return "%s://%s:%d" % ("https" if config.tls_cert else "http", host, config.port)


def goose_provider(config, catalog):
    """Goose's custom provider definition for this proxy (the key stays in the environment)."""
    return {"name": "gitlab_duo", "engine": "anthropic", "display_name": "GitLab Duo",
            "description": "Claude through your GitLab Duo subscription, via gitlab-duo-proxy",
            "api_key_env": "GITLAB_DUO_PROXY_KEY", "base_url": proxy_base_url(config),
            "models": [{"name": m.id, "context_limit": m.context_window} for m in catalog.models
                       if m.api == ANTHROPIC],
            "supports_streaming": True, "requires_auth": bool(config.api_key or config.per_user),
            "timeout_seconds": 600}


def write_goose_config(config, path, force=False):
    """(exit status, message): writes the file unless a different one is there."""
    provider = goose_provider(config, Catalog.from_config(config))
    text = json.dumps(provider, indent=2) + "\n"
    try:
        with open(path, encoding="utf-8") as fh:
            current = fh.read()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        return 1, "cannot read %s: %s" % (path, exc.strerror)
    if current == text:
        return 0, "%s is already up to date" % path
    if current is not None and not force:
        return 1, "%s exists with other content; pass --force to replace it" % path
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        return 1, "cannot write %s: %s" % (path, exc.strerror)
    note = "" if not provider["requires_auth"] else \
        "; export GITLAB_DUO_PROXY_KEY with your proxy key before starting Goose"
    return 0, "wrote %s (provider gitlab_duo, %d models)%s" % (path, len(provider["models"]), note)


CLIENT_ENV = {
    "claude-code": lambda base, key, c: [
        ("ANTHROPIC_BASE_URL", base), ("ANTHROPIC_AUTH_TOKEN", key),
        ("ANTHROPIC_MODEL", c.default_model), ("ANTHROPIC_DEFAULT_OPUS_MODEL", c.resolve("opus")),
        ("ANTHROPIC_DEFAULT_SONNET_MODEL", c.resolve("sonnet")),
        ("ANTHROPIC_DEFAULT_HAIKU_MODEL", c.resolve("haiku")),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")],
    "goose": lambda base, key, c: [
        ("GOOSE_PROVIDER", "anthropic"), ("ANTHROPIC_HOST", base), ("ANTHROPIC_API_KEY", key),
        ("GOOSE_MODEL", c.default_model)],
    "anthropic-sdk": lambda base, key, c: [("ANTHROPIC_BASE_URL", base),
                                           ("ANTHROPIC_API_KEY", key)],
    "openai-sdk": lambda base, key, c: [("OPENAI_BASE_URL", base + "/v1"),
                                        ("OPENAI_API_KEY", key)],
    "codex": lambda base, key, c: [("OPENAI_BASE_URL", base + "/v1"), ("OPENAI_API_KEY", key)],
}


def client_env_lines(config, tool, shell="posix"):
    """Ready-to-paste exports pointing tool at this proxy."""
    catalog = Catalog.from_config(config)
    key = "<your GitLab token>" if config.per_user else (config.api_key or "not-needed")
    pairs = CLIENT_ENV[tool](proxy_base_url(config), key, catalog)
    if shell == "powershell":
        return ["$env:%s = '%s'" % (k, v.replace("'", "''")) for k, v in pairs]
    return ["export %s=%s" % (k, shlex.quote(v)) for k, v in pairs]


if __name__ == "__main__":
    sys.exit(main())
