"""Gateway settings: one definition, flags and ``GATEWAY_*`` variables built from it."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings, parse, parser

K1, K2 = "client-key-one-0001", "client-key-two-0002"
T1 = "worker-token-one-0001"
KEYS = ["--api-key", K1, "--worker-token", T1]


def test_defaults_and_flags():
    s = parse([*KEYS, "--api-key", K2, "--pickup-timeout", "5", "--model", "m"], {})
    assert s.api_keys == [K1, K2] and s.worker_tokens == [T1] and s.models == ["m"]
    assert s.pickup_timeout_seconds == 5.0
    assert (s.host, s.port, s.lease_seconds, s.max_attempts) == ("127.0.0.1", 8000, 30.0, 3)
    assert (s.request_timeout_seconds, s.worker_ttl_seconds) == (600.0, 30.0)


@pytest.mark.parametrize(
    "url",
    [
        "memory",
        "redis://redis:6379/0",
        "rediss://redis:6380/0?ssl_ca_certs=/run/ca.pem",
        "unix:///run/redis/redis.sock?db=0",
        "redis+cluster://node-1:6379",
        "rediss+cluster://node-1:6380",
    ],
)
def test_every_queue_store_url_the_help_names_is_accepted(url):
    assert parse([*KEYS, "--queue-url", url], {}).queue_url == url


def test_every_setting_from_the_environment(tmp_path):
    keys, tokens = tmp_path / "keys", tmp_path / "tokens"
    keys.write_text(f"# client keys\n{K2}\n")
    tokens.write_text(f"{T1} model-a model-b\n")
    env = {
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_PORT": "9000",
        "GATEWAY_API_KEYS": f"{K1}, {K2},",
        "GATEWAY_API_KEY_FILE": str(keys),
        "GATEWAY_WORKER_TOKENS": T1,
        "GATEWAY_WORKER_TOKEN_FILE": str(tokens),
        "GATEWAY_MODELS": "m1,m2",
        "GATEWAY_DEFAULT_MODEL": "m2",
        "GATEWAY_LEASE_SECONDS": "4",
        "GATEWAY_MAX_ATTEMPTS": "5",
        "GATEWAY_PICKUP_TIMEOUT_SECONDS": "300",
        "GATEWAY_REQUEST_TIMEOUT_SECONDS": "60",
        "GATEWAY_WORKER_TTL_SECONDS": "9",
        "GATEWAY_QUEUE_URL": "redis://redis:6379/1",
        "GATEWAY_QUEUE_PASSWORD_FILE": __file__,
        "GATEWAY_MAX_QUEUED_INPUTS": "1000",
        "GATEWAY_DRAIN_TIMEOUT_SECONDS": "20",
        "GATEWAY_MAX_BODY_BYTES": "100000",
        "GATEWAY_MAX_CHARS_PER_TOKEN": "8",
        "GATEWAY_MAX_RERANK_BYTES": "200000",
        "GATEWAY_BODY_TIMEOUT_SECONDS": "5",
        "GATEWAY_HEADER_TIMEOUT_SECONDS": "3",
        "GATEWAY_MAX_CONNECTIONS": "64",
        "GATEWAY_FILES_DIR": "/data/files",
        "GATEWAY_MAX_FILE_BYTES": "5000",
        "GATEWAY_MAX_BATCH_LINES": "100",
        "GATEWAY_MAX_BATCHES_PER_KEY": "2",
        "GATEWAY_BATCH_INPUTS_IN_FLIGHT": "512",
        "GATEWAY_MAX_QUEUED_BATCH_INPUTS": "3000",
        "GATEWAY_ADVERT_TTL_SECONDS": "120",
        "GATEWAY_WRITE_TIMEOUT_SECONDS": "7",
        "GATEWAY_INTERNAL_PORT": "9001",
        "GATEWAY_MAX_FILES_PER_KEY": "50",
        "GATEWAY_MAX_FILE_BYTES_PER_KEY": "500000",
        "GATEWAY_FILE_EXPIRY_SECONDS": "7200",
        "GATEWAY_MAX_BATCH_RECORDS_PER_KEY": "20",
        "GATEWAY_BATCH_RETENTION_SECONDS": "3600",
        "GATEWAY_MAX_BATCH_LINE_BYTES": "65536",
        "LOG_LEVEL": "DEBUG",
    }
    s = parse([], env)
    assert s == GatewaySettings(
        host="0.0.0.0",
        port=9000,
        api_keys=[K1, K2],
        api_key_file=str(keys),
        worker_tokens=[T1],
        worker_token_file=str(tokens),
        models=["m1", "m2"],
        default_model="m2",
        lease_seconds=4,
        max_attempts=5,
        pickup_timeout_seconds=300,
        request_timeout_seconds=60,
        worker_ttl_seconds=9,
        queue_url="redis://redis:6379/1",
        queue_password_file=__file__,
        max_queued_inputs=1000,
        drain_timeout_seconds=20,
        max_body_bytes=100_000,
        max_chars_per_token=8,
        max_rerank_bytes=200_000,
        body_timeout_seconds=5,
        header_timeout_seconds=3,
        max_connections=64,
        files_dir="/data/files",
        max_file_bytes=5000,
        max_batch_lines=100,
        max_batches_per_key=2,
        batch_inputs_in_flight=512,
        max_queued_batch_inputs=3000,
        advert_ttl_seconds=120,
        write_timeout_seconds=7,
        internal_port=9001,
        max_files_per_key=50,
        max_file_bytes_per_key=500_000,
        file_expiry_seconds=7200,
        max_batch_records_per_key=20,
        batch_retention_seconds=3600,
        max_batch_line_bytes=65536,
        log_level="DEBUG",
    )
    assert len(GatewaySettings.model_fields) == len(env)  # every field has its variable


def test_a_flag_wins_over_the_environment():
    s = parse(
        [*KEYS, "--lease-seconds", "7"],
        {"GATEWAY_LEASE_SECONDS": "4", "GATEWAY_API_KEYS": K2},
    )
    assert s.lease_seconds == 7 and s.api_keys == [K1]


@pytest.mark.parametrize(
    "argv,env,needle",
    [
        ([], {}, "no client API key: give --api-key-file, $GATEWAY_API_KEYS or --api-key"),
        (
            ["--api-key", K1],
            {},
            "no worker token: give --worker-token-file, $GATEWAY_WORKER_TOKENS or --worker-token",
        ),
        (
            ["--worker-token", T1],
            {"GATEWAY_API_KEYS": "REPLACE-with-client-api-keys-comma-separated"},
            "--api-key / $GATEWAY_API_KEYS: a placeholder (from the manifests in deploy/k8s?)",
        ),
        (
            [*KEYS, "--queue-url", "redis://:REPLACE-with-a-random-redis-password@r:6379/0"],
            {},
            "--queue-url / $GATEWAY_QUEUE_URL: a placeholder in the URL's password",
        ),
        (
            ["--api-key", K1, "--worker-token", "short-token"],
            {},
            "--worker-token / $GATEWAY_WORKER_TOKENS: a key or token has 11 characters",
        ),
        (
            [*KEYS, "--api-key-file", "/nonexistent/keys"],
            {},
            "--api-key-file / $GATEWAY_API_KEY_FILE: cannot read /nonexistent/keys: No such file",
        ),
        ([*KEYS, "--port", "x"], {}, "--port / $GATEWAY_PORT: Input should be a valid integer"),
        (KEYS, {"GATEWAY_MAX_ATTEMPTS": "0"}, "--max-attempts / $GATEWAY_MAX_ATTEMPTS"),
        ([*KEYS, "--lease-seconds", "-1"], {}, "--lease-seconds"),
        ([*KEYS, "--queue-url", "postgres://db"], {}, "--queue-url / $GATEWAY_QUEUE_URL"),
        (
            KEYS,
            {"GATEWAY_QUEUE_PASSWORD_FILE": "/nonexistent/pw"},
            "$GATEWAY_QUEUE_PASSWORD_FILE: cannot read /nonexistent/pw",
        ),
    ],
)
def test_bad_settings_exit_2_naming_flag_and_variable(argv, env, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv, env)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_lists_every_setting_with_its_variable():
    text = parser().format_help()
    for field in GatewaySettings.model_fields.values():
        extra = field.json_schema_extra
        assert isinstance(extra, dict)
        assert str(extra["flag"]) in text
    assert "GATEWAY_PICKUP_TIMEOUT_SECONDS" in text and "LOG_LEVEL" in text


def test_a_short_key_in_a_file_is_refused_without_printing_it(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.write_text(f"{K1}\nshort-s3cret\n")
    with pytest.raises(SystemExit) as e:
        parse(["--api-key-file", str(keys), "--worker-token", T1], {})
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"a key or token in {keys} has 12 characters" in err
    assert "s3cret" not in err and K1 not in err


def test_a_secret_on_the_command_line_is_warned_about(caplog):
    """A key, token or Redis password given as a flag is visible in ``ps``: warned, without
    the secret; the file flags and the environment are not."""
    import logging

    from gateway.cli import _warn_about_secrets_in

    secret = "sk-a-secret-given-on-the-command-line"
    for argv in (
        ["--api-key", secret],
        [f"--worker-token={secret}"],
        ["--queue-url", f"redis://:{secret}@redis:6379/0"],
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _warn_about_secrets_in(argv)
        assert "visible to every user of this host" in caplog.text, argv
        assert secret not in caplog.text
    for argv in (
        ["--api-key-file", "/run/keys"],
        ["--worker-token-file", "/run/tokens"],
        ["--queue-url", "redis://redis:6379/0", "--queue-password-file", "/run/pw"],
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _warn_about_secrets_in(argv)
        assert caplog.text == "", argv


def test_keys_from_flags_and_a_file_are_all_accepted(tmp_path):
    """A key file adds to the keys given as flags (as the docs say), it does not replace them;
    a worker token from a file keeps its model scope beside an unscoped one from a flag."""
    from gateway.errors import APIError
    from gateway.http.auth import Credentials

    keys, tokens = tmp_path / "keys", tmp_path / "tokens"
    keys.write_text(f"{K2}\n")
    tokens.write_text("worker-token-two-0002 model-a\n")
    s = parse(
        [
            "--api-key",
            K1,
            "--api-key-file",
            str(keys),
            "--worker-token",
            T1,
            "--worker-token-file",
            str(tokens),
        ],
        {},
    )
    creds = Credentials.load(s)
    for key in (K1, K2):
        creds.client(f"Bearer {key}")  # no APIError
    with pytest.raises(APIError):
        creds.client("Bearer client-key-three-003")
    assert creds.worker(f"Bearer {T1}").models is None
    assert creds.worker("Bearer worker-token-two-0002").models == frozenset({"model-a"})
