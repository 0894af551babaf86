"""Configuration from BEDSIDE_* variables: validated once, frozen, and never quoting a value in an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from service.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the developer's or CI's own BEDSIDE_* variables must not leak in."""
    for name in list(os.environ):
        if name.upper().startswith("BEDSIDE_"):
            monkeypatch.delenv(name)


def test_defaults_are_embedded_mode_on_loopback() -> None:
    settings = load_settings()

    assert settings.embedded
    assert settings.database_url is None
    assert settings.data_dir == Path(".bedside")
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.audience == "bedside"
    assert settings.jwt_leeway_seconds == 60
    assert settings.jwt_max_lifetime_seconds == 3600
    assert settings.max_json_body_bytes == 1024 * 1024
    assert (settings.log_format, settings.log_level) == ("auto", "info")


def test_environment_is_read_with_the_bedside_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_PORT", "9090")
    monkeypatch.setenv("BEDSIDE_DATABASE_URL", "postgresql://bedside:pw@db.internal/bedside")
    monkeypatch.setenv("PORT", "1")

    settings = load_settings()

    assert settings.port == 9090
    assert not settings.embedded


def test_explicit_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_PORT", "9090")
    assert load_settings(port=7070).port == 7070


def test_port_that_is_not_a_number_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_PORT", "notaport")

    with pytest.raises(SettingsError) as raised:
        load_settings()

    assert "BEDSIDE_PORT" in str(raised.value)
    assert "notaport" not in str(raised.value)


def test_non_postgres_database_url_is_refused_without_quoting_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_DATABASE_URL", "mysql://user:SECRETPW@host/db")

    with pytest.raises(SettingsError) as raised:
        load_settings()

    message = str(raised.value)
    assert "BEDSIDE_DATABASE_URL" in message
    assert "SECRETPW" not in message
    assert "SECRETPW" not in repr(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


def test_empty_database_url_means_embedded_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_DATABASE_URL", "")
    assert load_settings().embedded


@pytest.mark.parametrize("leeway", ["120", "61", "-1"])
def test_jwt_leeway_above_a_minute_or_negative_is_refused(monkeypatch: pytest.MonkeyPatch, leeway) -> None:
    monkeypatch.setenv("BEDSIDE_JWT_LEEWAY_SECONDS", leeway)

    with pytest.raises(SettingsError, match="BEDSIDE_JWT_LEEWAY_SECONDS"):
        load_settings()


def test_every_bad_variable_is_named_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_PORT", "70000")
    monkeypatch.setenv("BEDSIDE_LOG_LEVEL", "chatty")

    with pytest.raises(SettingsError) as raised:
        load_settings()

    assert "BEDSIDE_PORT" in str(raised.value)
    assert "BEDSIDE_LOG_LEVEL" in str(raised.value)


def test_settings_are_frozen() -> None:
    settings = load_settings()

    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    assert settings.port == 8080


def test_database_url_is_a_secret_whose_repr_hides_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_DATABASE_URL", "postgresql://bedside:SECRETPW@db.internal/bedside")

    settings = load_settings()

    assert isinstance(settings.database_url, SecretStr)
    assert settings.database_url.get_secret_value() == "postgresql://bedside:SECRETPW@db.internal/bedside"
    for shown in (repr(settings.database_url), str(settings.database_url), repr(settings), str(settings)):
        assert "SECRETPW" not in shown
    assert "SECRETPW" not in settings.model_dump_json()


def test_unknown_override_is_refused() -> None:
    with pytest.raises(SettingsError):
        load_settings(no_such_setting=1)


def test_settings_class_refuses_extra_fields_directly() -> None:
    with pytest.raises(ValidationError):
        Settings(no_such_setting=1)  # type: ignore[call-arg]


def test_serve_connections_count_every_process_pool_and_sequencer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().serve_connections == 21  # one process: a pool of 20 and the sequencer's own

    monkeypatch.setenv("BEDSIDE_PROCESSES", "4")
    monkeypatch.setenv("BEDSIDE_DB_POOL_MAX", "30")
    assert load_settings().serve_connections == 4 * 31

    monkeypatch.setenv("BEDSIDE_DB_POOL_MIN", "40")  # the pool is never smaller than its minimum
    assert load_settings().serve_connections == 4 * 41

    monkeypatch.setenv("BEDSIDE_AUDIT_SEQUENCER", "false")
    assert load_settings().serve_connections == 4 * 40


def test_the_webhook_reap_interval_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().webhook_reap_interval_seconds == 10.0

    monkeypatch.setenv("BEDSIDE_WEBHOOK_REAP_INTERVAL_SECONDS", "0.5")
    assert load_settings().webhook_reap_interval_seconds == 0.5


@pytest.mark.parametrize("interval", ["0", "-1", "3601", "soon"])
def test_a_webhook_reap_interval_of_zero_or_past_an_hour_is_refused(
    monkeypatch: pytest.MonkeyPatch, interval: str
) -> None:
    """Zero would reap on every turn of the loop (a cross-tenant update several times a second); past an
    hour (the longest lease), a dead worker's deliveries would wait longer for the reaper than for their
    lease to run out."""
    monkeypatch.setenv("BEDSIDE_WEBHOOK_REAP_INTERVAL_SECONDS", interval)

    with pytest.raises(SettingsError, match="BEDSIDE_WEBHOOK_REAP_INTERVAL_SECONDS"):
        load_settings()


def test_uploads_at_once_per_caller_default_to_two(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().max_uploads_per_principal == 2

    monkeypatch.setenv("BEDSIDE_MAX_UPLOADS_PER_PRINCIPAL", "1")
    assert load_settings().max_uploads_per_principal == 1


def test_uploads_holding_connections_default_to_8_or_half_a_smaller_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().upload_connections == 8  # the pool's 20 by default
    monkeypatch.setenv("BEDSIDE_DB_POOL_MAX", "6")
    assert load_settings().upload_connections == 3
    monkeypatch.setenv("BEDSIDE_DB_POOL_MAX", "40")
    monkeypatch.setenv("BEDSIDE_MAX_CONCURRENT_UPLOADS", "30")
    assert load_settings().upload_connections == 30


@pytest.mark.parametrize("uploads", ["20", "21"])
def test_uploads_that_could_hold_the_whole_pool_are_refused(monkeypatch: pytest.MonkeyPatch, uploads: str) -> None:
    monkeypatch.setenv("BEDSIDE_MAX_CONCURRENT_UPLOADS", uploads)

    refusal = r"BEDSIDE_MAX_CONCURRENT_UPLOADS \(\d+\) must be below .* \(BEDSIDE_DB_POOL_MAX, at least 2\)"
    with pytest.raises(SettingsError, match=refusal):
        load_settings()


def test_a_pool_of_one_connection_is_not_left_to_uploads_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """BEDSIDE_MAX_CONCURRENT_UPLOADS=1 is refused with a pool of one ("uploads never hold every connection the
    other requests need"); unset, the default must not come to that very value: either such a pool is refused,
    or the uploads' share leaves a connection."""
    monkeypatch.setenv("BEDSIDE_DB_POOL_MIN", "1")
    monkeypatch.setenv("BEDSIDE_DB_POOL_MAX", "1")
    monkeypatch.setenv("BEDSIDE_MAX_CONCURRENT_UPLOADS", "1")
    with pytest.raises(SettingsError, match="BEDSIDE_MAX_CONCURRENT_UPLOADS"):
        load_settings()
    monkeypatch.delenv("BEDSIDE_MAX_CONCURRENT_UPLOADS")

    try:
        settings = load_settings()
    except SettingsError:
        return  # a pool too small to share is refused: fine
    assert settings.upload_connections < max(settings.db_pool_min, settings.db_pool_max)


def test_no_uploads_at_once_per_caller_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_MAX_UPLOADS_PER_PRINCIPAL", "0")

    with pytest.raises(SettingsError, match="BEDSIDE_MAX_UPLOADS_PER_PRINCIPAL"):
        load_settings()


def test_an_upload_may_take_five_minutes_and_be_silent_for_thirty_seconds_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 s: a file of the default largest size (25 MiB) at a modest 100 KB/s takes 262 s."""
    defaults = load_settings()
    assert (defaults.upload_deadline_seconds, defaults.upload_idle_seconds) == (300.0, 30.0)
    assert defaults.max_attachment_bytes / 100_000 < defaults.upload_deadline_seconds

    monkeypatch.setenv("BEDSIDE_UPLOAD_DEADLINE_SECONDS", "0.5")
    monkeypatch.setenv("BEDSIDE_UPLOAD_IDLE_SECONDS", "0.25")
    configured = load_settings()
    assert (configured.upload_deadline_seconds, configured.upload_idle_seconds) == (0.5, 0.25)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BEDSIDE_UPLOAD_DEADLINE_SECONDS", "0"),
        ("BEDSIDE_UPLOAD_DEADLINE_SECONDS", "86401"),
        ("BEDSIDE_UPLOAD_IDLE_SECONDS", "0"),
        ("BEDSIDE_UPLOAD_IDLE_SECONDS", "3601"),
    ],
)
def test_upload_time_limits_of_zero_or_past_their_bound_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_trusted_proxies_are_none_by_default_and_read_as_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().trusted_proxies == ()

    monkeypatch.setenv("BEDSIDE_TRUSTED_PROXIES", " 10.0.0.0/8, 192.0.2.10,2001:db8::/32 ")

    assert [str(n) for n in load_settings().trusted_proxies] == ["10.0.0.0/8", "192.0.2.10/32", "2001:db8::/32"]


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "proxy.internal", "10.0.0.1/8", "2001:db8::/129", "10.0.0.0-24"])
def test_a_trusted_proxy_that_is_no_network_stops_the_start_naming_the_entry(
    monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    monkeypatch.setenv("BEDSIDE_TRUSTED_PROXIES", f"10.0.0.0/8,{entry}")

    with pytest.raises(SettingsError) as raised:
        load_settings()

    message = str(raised.value)
    assert "BEDSIDE_TRUSTED_PROXIES" in message
    assert repr(entry) in message
    assert "CIDR" in message
