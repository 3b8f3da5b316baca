"""The gateway's edge on a real ``inference-gateway`` process (uvicorn on loopback), against
clients written with plain sockets: what they cost the gateway is bounded (memory, connections,
time). Each test reports its before/after figures in the run's summary ("figures of the
fault, fuzz and batch tests")."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from devstack import localstack as ls
from tests.support.reports import FAULT_REPORTS

HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def edge_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls.Proc]:
    """A gateway of its own with short head/body timeouts and few connections."""
    proc = ls.start_gateway(
        tmp_path_factory.mktemp("edge"),
        args=[
            "--header-timeout",
            str(HEAD_TIMEOUT),
            "--body-timeout",
            str(BODY_TIMEOUT),
            "--max-connections",
            str(MAX_CONNECTIONS),
            "--max-body-bytes",
            str(8 * 1024 * 1024),
        ],
    )
    try:
        yield proc
    finally:
        proc.stop()


def _connect(gw: ls.Proc) -> socket.socket:
    host, port = gw.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _rss_mb(gw: ls.Proc) -> float:
    return float(psutil.Process(gw.pid).memory_info().rss) / 2**20


def _status(s: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1") else 0


def _send_big_body(gw: ls.Proc, auth: str | None, mb: int) -> tuple[int, int]:
    """POST a ``mb`` MB body; returns (status, MB the server took before answering)."""
    s = _connect(gw)
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: {mb * 2**20}\r\n" + (f"Authorization: Bearer {auth}\r\n" if auth else "")
    )
    s.sendall(head.encode() + b"\r\n")
    chunk = b"x" * 2**20
    sent = 0
    s.settimeout(0.05)
    try:
        for _ in range(mb):
            s.sendall(chunk)
            sent += 1
    except (BlockingIOError, TimeoutError, ConnectionError, OSError):
        pass  # the server stopped reading (it answered and closes)
    s.settimeout(10)
    try:
        return _status(s), sent
    finally:
        s.close()


def test_big_bodies_without_credentials_or_over_the_limit_cost_nothing(edge_gateway):
    """Finding: a 205 MB body without credentials took the gateway from 65 to 665 MB before
    its 401. Now the 401 (and the 413 for a declared size over the limit) come before the
    body is read."""
    before = _rss_mb(edge_gateway)
    statuses = [_send_big_body(edge_gateway, None, 200) for _ in range(3)]
    statuses.append(_send_big_body(edge_gateway, ls.API_KEY, 200))
    after = _rss_mb(edge_gateway)
    assert [s for s, _ in statuses] == [401, 401, 401, 413]
    assert after - before < 20, (before, after)
    FAULT_REPORTS.append(
        f"edge: 3 x 200 MB bodies without credentials + 1 over --max-body-bytes: "
        f"{[s for s, _ in statuses]}, gateway RSS {before:.0f} -> {after:.0f} MB, "
        f"MB sent before the answer: {[n for _, n in statuses]}"
    )


def test_slow_request_heads_are_cut_off_and_connections_are_bounded(edge_gateway):
    """Finding: 200 half-sent requests were still held after 25 s. Now a connection without
    a whole request head is closed after --header-timeout; over --max-connections a new
    connection closes the one idle longest (a head never finished is idle), so a request
    meanwhile is served at once (it got 503 while uvicorn counted idle connections)."""
    url = edge_gateway.url
    held = []
    for _ in range(200):
        s = _connect(edge_gateway)
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\n")  # the head never ends
        held.append(s)
    time.sleep(0.2)
    crowded = httpx.get(url + "/healthz", timeout=5).status_code
    t0 = time.monotonic()
    closed = 0
    for s in held:
        s.settimeout(HEAD_TIMEOUT + 5 - (time.monotonic() - t0))
        with contextlib.suppress(TimeoutError, ConnectionError):
            closed += s.recv(1) == b""
        s.close()
    waited = time.monotonic() - t0
    assert crowded == 200  # over --max-connections: the oldest half-sent head made room
    assert closed == 200 and waited < HEAD_TIMEOUT + 2
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    FAULT_REPORTS.append(
        f"edge: 200 half-sent request heads (--max-connections {MAX_CONNECTIONS}): a new "
        f"request meanwhile {crowded}; "
        f"{closed} closed by the gateway within {waited:.1f} s (--header-timeout "
        f"{HEAD_TIMEOUT:g}); /healthz 200 again"
    )


def test_a_body_that_stalls_is_408_after_the_body_timeout(edge_gateway):
    s = _connect(edge_gateway)
    s.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\nAuthorization: Bearer "
        + ls.API_KEY.encode()
        + b'\r\n\r\n{"model": "m", "input": '
    )
    t0 = time.monotonic()
    status = _status(s)
    waited = time.monotonic() - t0
    s.close()
    assert status == 408 and BODY_TIMEOUT - 0.1 <= waited < BODY_TIMEOUT + 2
    FAULT_REPORTS.append(f"edge: a stalled body: {status} after {waited:.1f} s")


def test_the_gateway_log_has_no_traceback(edge_gateway):
    """Hostile requests of its own first (whatever ran before): a big body without
    credentials, one over the limit, a malformed head, a connection dropped mid-body."""
    assert _send_big_body(edge_gateway, None, 16)[0] == 401
    assert _send_big_body(edge_gateway, ls.API_KEY, 16)[0] == 413
    s = _connect(edge_gateway)
    s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    s.close()
    s = _connect(edge_gateway)
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: 1000\r\nAuthorization: Bearer {ls.API_KEY}\r\n\r\n"
    )
    s.sendall(head.encode() + b'{"model": "m", "inp')
    s.close()
    assert httpx.get(edge_gateway.url + "/healthz").status_code == 200
    text = Path(edge_gateway.log_path).read_text()
    assert "Traceback" not in text, text[-3000:]
