"""The Redis store as docs/security.md asks an operator to run it: a password from
``--queue-password-file`` and TLS (``rediss://``), against a real redis-server that requires
both (Debian's package is built with TLS; the certificate is made here with ``openssl``)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack import localstack as ls
from tests.support.stack import MODEL, embed_worker_config

PASSWORD = "a-redis-password-made-for-this-test"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """redis-server with TLS only (no plain port) and a password; (TLS port, CA file)."""
    import redis

    d = tmp_path_factory.mktemp("redis-tls")
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test's certificate"
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = ls.free_port()
    binary = shutil.which("redis-server")
    assert binary, "install Debian's redis-server (make test does)"
    proc = ls.start(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--dir", str(d), "--save", "", "--appendonly", "no"],
        d / "redis.log",
    )  # fmt: skip
    try:
        client = redis.Redis(
            host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert), password=PASSWORD
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert proc.popen.poll() is None, proc.log_tail()
                assert time.monotonic() < deadline, proc.log_tail()
                time.sleep(0.1)
        client.close()
        # what the gateway must get right: without the password, or without TLS, no service
        anonymous = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert))
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        plain = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=5)
        with pytest.raises(redis.exceptions.ConnectionError):
            plain.ping()
        yield port, cert
    finally:
        proc.stop(10)


def test_a_gateway_serves_through_redis_over_tls_with_a_password_file(
    tls_redis: tuple[int, Path], stack_dir: Path, tmp_path: Path
) -> None:
    port, ca = tls_redis
    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    gateway = ls.start_gateway(
        tmp_path / "gw", args=["--queue-url", url, "--queue-password-file", str(password_file)]
    )
    worker = ls.start_worker(embed_worker_config(gateway.url), stack_dir, "worker-tls")
    try:
        assert httpx.get(gateway.url + "/readyz").status_code == 200
        r = httpx.post(
            gateway.url + "/v1/embeddings",
            json={"model": MODEL, "input": ["over TLS", "with a password"]},
            headers={"Authorization": f"Bearer {ls.API_KEY}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 2
        assert PASSWORD not in gateway.log_path.read_text()
    finally:
        worker.stop()
        gateway.stop()
