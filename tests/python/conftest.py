"""Shared fixtures for the client-compatibility tests.

These tests talk to an already running `llmops serve`; `tests/it/clients.rs`
starts one and runs this suite against it. To run them by hand, start a
server and set:

    LLMOPS_TEST_HTTP           HTTP address, `host:port` or `http://host:port`
    LLMOPS_TEST_GRPC           gRPC address, `host:port`
    LLMOPS_TEST_MODEL          a served model that writes text (the stop,
                               usage and error tests use it)
    LLMOPS_TEST_SLOW_MODEL     a served model with a long context, so a long
                               generation outlasts the client's cancel
                               (the cancel and queue tests use it)
    LLMOPS_TEST_ADMIN_KEY      secret of a key with the admin role
    LLMOPS_TEST_INFERENCE_KEY  secret of a key with the inference role
    LLMOPS_TEST_LIMITED_KEY    secret of an inference key with a small
                               `requests_per_minute`
    LLMOPS_TEST_LIMITED_RPM    that key's `requests_per_minute`
    LLMOPS_TEST_MAX_RUNNING    the server's `--max-running` (keep it small)
    LLMOPS_TEST_MAX_WAITING    the server's `--max-waiting` (keep it small)

The rate-limit test expects the limited key's budget to be untouched, so
use a fresh server for each run.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

REQUIRED = (
    "LLMOPS_TEST_HTTP",
    "LLMOPS_TEST_GRPC",
    "LLMOPS_TEST_MODEL",
    "LLMOPS_TEST_SLOW_MODEL",
    "LLMOPS_TEST_ADMIN_KEY",
    "LLMOPS_TEST_INFERENCE_KEY",
    "LLMOPS_TEST_LIMITED_KEY",
    "LLMOPS_TEST_LIMITED_RPM",
    "LLMOPS_TEST_MAX_RUNNING",
    "LLMOPS_TEST_MAX_WAITING",
)


@dataclass(frozen=True)
class Server:
    http: str  # http://host:port, no trailing slash
    grpc: str  # host:port
    model: str
    slow_model: str
    admin_key: str
    inference_key: str
    limited_key: str
    limited_rpm: int
    max_running: int
    max_waiting: int

    # --- raw HTTP helpers (stdlib only, independent of the SDK under test) ---

    def request(self, method: str, path: str, body: object | None = None, key: str | None = None, timeout: float = 30.0):
        """Returns (status, headers, parsed JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http + path, data=data, method=method)
        if data is not None:
            req.add_header("content-type", "application/json")
        if key is not None:
            req.add_header("authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, headers, raw = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, headers, raw = e.code, e.headers, e.read()
        text = raw.decode()
        ctype = headers.get("content-type", "")
        return status, headers, json.loads(text) if "json" in ctype else text

    def tokenize(self, **fields) -> dict:
        status, _, body = self.request("POST", "/tokenize", {"model": self.model, **fields}, key=self.inference_key)
        assert status == 200, body
        assert body["count"] == len(body["tokens"]), body
        return body

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample in /metrics as (name, labels, value)."""
        status, _, text = self.request("GET", "/metrics")
        assert status == 200, text
        out = []
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
            if m:
                labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
                out.append((m.group(1), labels, float(m.group(4))))
        return out

    def metric_sum(self, name: str, samples=None, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        samples = self.metrics() if samples is None else samples
        return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))

    def running(self, model: str | None = None) -> float:
        """`llmops_num_requests_running` of `model` (the text model by default)."""
        model = model or self.model
        samples = self.metrics()
        assert any(n == "llmops_num_requests_running" and ls.get("model") == model for n, ls, _ in samples), (
            f"/metrics has no llmops_num_requests_running for {model}"
        )
        return self.metric_sum("llmops_num_requests_running", samples, model=model)

    def busy(self) -> dict[str, float]:
        """Running and waiting counts of every model, where not zero."""
        samples = self.metrics()
        return {
            f"{n}{{model={ls.get('model')}}}": v
            for n, ls, v in samples
            if n in ("llmops_num_requests_running", "llmops_num_requests_waiting") and v != 0
        }

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Waits until no model has anything running or waiting; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while (busy := self.busy()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not busy, f"the server did not become idle within {timeout}s: {busy}"


@pytest.fixture(scope="session")
def server() -> Server:
    missing = [v for v in REQUIRED if not os.environ.get(v)]
    if missing:
        pytest.fail(
            "these tests need a running `llmops serve` described by environment variables; "
            f"missing: {', '.join(missing)} (run `cargo test --release --test it clients`, which sets them)",
            pytrace=False,
        )
    http = os.environ["LLMOPS_TEST_HTTP"].rstrip("/")
    if not http.startswith(("http://", "https://")):
        http = "http://" + http
    s = Server(
        http=http,
        grpc=os.environ["LLMOPS_TEST_GRPC"],
        model=os.environ["LLMOPS_TEST_MODEL"],
        slow_model=os.environ["LLMOPS_TEST_SLOW_MODEL"],
        admin_key=os.environ["LLMOPS_TEST_ADMIN_KEY"],
        inference_key=os.environ["LLMOPS_TEST_INFERENCE_KEY"],
        limited_key=os.environ["LLMOPS_TEST_LIMITED_KEY"],
        limited_rpm=int(os.environ["LLMOPS_TEST_LIMITED_RPM"]),
        max_running=int(os.environ["LLMOPS_TEST_MAX_RUNNING"]),
        max_waiting=int(os.environ["LLMOPS_TEST_MAX_WAITING"]),
    )
    status, _, body = s.request("GET", "/ready")
    assert status == 200, f"the server at {s.http} is not ready: {status} {body}"
    return s


@pytest.fixture(autouse=True)
def _idle_between_tests(request):
    """Every test starts and ends with an idle engine, so one test's leftover
    work cannot trip another's queue limit, and a leak is caught where it
    happens."""
    if "server" not in request.fixturenames:
        yield
        return
    s: Server = request.getfixturevalue("server")
    s.wait_idle()
    yield
    s.wait_idle()
