"""Gateway settings: one definition, flags and ``GATEWAY_*`` variables built from it."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings, parse, parser

KEYS = ["--api-key", "k1", "--worker-token", "t1"]


def test_defaults_and_flags():
    s = parse([*KEYS, "--api-key", "k2", "--pickup-timeout", "5", "--model", "m"], {})
    assert s.api_keys == ["k1", "k2"] and s.worker_tokens == ["t1"] and s.models == ["m"]
    assert s.pickup_timeout_seconds == 5.0
    assert (s.host, s.port, s.lease_seconds, s.max_attempts) == ("127.0.0.1", 8000, 30.0, 3)
    assert (s.request_timeout_seconds, s.worker_ttl_seconds) == (600.0, 30.0)


def test_every_setting_from_the_environment():
    env = {
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_PORT": "9000",
        "GATEWAY_API_KEYS": "a, b,",
        "GATEWAY_WORKER_TOKENS": "w",
        "GATEWAY_MODELS": "m1,m2",
        "GATEWAY_LEASE_SECONDS": "4",
        "GATEWAY_MAX_ATTEMPTS": "5",
        "GATEWAY_PICKUP_TIMEOUT_SECONDS": "300",
        "GATEWAY_REQUEST_TIMEOUT_SECONDS": "60",
        "GATEWAY_WORKER_TTL_SECONDS": "9",
        "GATEWAY_QUEUE_URL": "redis://redis:6379/1",
        "GATEWAY_QUEUE_PASSWORD_FILE": __file__,
        "GATEWAY_MAX_QUEUED_INPUTS": "1000",
        "GATEWAY_DRAIN_TIMEOUT_SECONDS": "20",
        "LOG_LEVEL": "DEBUG",
    }
    s = parse([], env)
    assert s == GatewaySettings(
        host="0.0.0.0",
        port=9000,
        api_keys=["a", "b"],
        worker_tokens=["w"],
        models=["m1", "m2"],
        lease_seconds=4,
        max_attempts=5,
        pickup_timeout_seconds=300,
        request_timeout_seconds=60,
        worker_ttl_seconds=9,
        queue_url="redis://redis:6379/1",
        queue_password_file=__file__,
        max_queued_inputs=1000,
        drain_timeout_seconds=20,
        log_level="DEBUG",
    )
    assert len(GatewaySettings.model_fields) == len(env)  # every field has its variable


def test_a_flag_wins_over_the_environment():
    s = parse(
        [*KEYS, "--lease-seconds", "7"],
        {"GATEWAY_LEASE_SECONDS": "4", "GATEWAY_API_KEYS": "env-key"},
    )
    assert s.lease_seconds == 7 and s.api_keys == ["k1"]


@pytest.mark.parametrize(
    "argv,env,needle",
    [
        ([], {}, "--api-key / $GATEWAY_API_KEYS"),
        ([*KEYS, "--port", "x"], {}, "--port / $GATEWAY_PORT: Input should be a valid integer"),
        (KEYS, {"GATEWAY_MAX_ATTEMPTS": "0"}, "--max-attempts / $GATEWAY_MAX_ATTEMPTS"),
        ([*KEYS, "--lease-seconds", "-1"], {}, "--lease-seconds"),
        ([*KEYS, "--queue-url", "postgres://db"], {}, "--queue-url / $GATEWAY_QUEUE_URL"),
        (
            KEYS,
            {"GATEWAY_QUEUE_PASSWORD_FILE": "/nonexistent/pw"},
            "$GATEWAY_QUEUE_PASSWORD_FILE: Value error, cannot read /nonexistent/pw",
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
