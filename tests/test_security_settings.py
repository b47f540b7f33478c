"""Secrets: none has a default, none shows in `repr`, and none is ever logged, not at startup,
not during a call that uses every one of them, not even at DEBUG level."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import anyio
import httpx
import pytest

from db.migrate import upgrade_to_head_async
from media.vad import EnergyVad
from pipeline.conversation import Engines
from pipeline.llm_openai import OpenAiLlm
from pipeline.tts_piper import ToneTts
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import serving
from tests.conftest_db import create_pg_database, drop_pg_database, pg_url
from tests.fakes.engines import FixedStt
from tests.fakes.openai_server import FakeOpenAi, Rule
from voicebot.settings import Settings, SettingsError, load_settings

SECRET_NAME = re.compile(r"(_token|secret|password|api_key|hash_key)$")
SECRETS = {
    "twilio_auth_token": "sekrit-twilio-9f31c7d2",
    "llm_api_key": "sk-sekrit-llm-5be0a1",
    "stt_api_key": "sk-sekrit-stt-0a1b2c",
    "memory_hash_key": "sekrit-hash-c0ffee42",
    "ui_password": "sekrit-password-77aa",
    "ui_token": "sekrit-token-31415926",
    "ui_secret": "sekrit-cookie-key-2718",
}
DB_PASSWORD = "sekrit-db-pass-4242"


def secret_fields() -> list[str]:
    return [name for name in Settings.model_fields if SECRET_NAME.search(name)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_every_secret_setting_is_known_here() -> None:
    assert set(secret_fields()) == set(SECRETS), "a new secret setting: add it to SECRETS"


@pytest.mark.usefixtures("clean_env")
def test_secrets_have_no_defaults() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    for name in secret_fields():
        assert getattr(settings, name) is None, name
    # No other default carries a credential either.
    assert "@" not in settings.database_url
    assert settings.redis_url is None


def test_secrets_stay_out_of_repr_and_settings_errors() -> None:
    settings = load_settings(**SECRETS)
    for name in secret_fields():
        assert Settings.model_fields[name].repr is False, name
    shown = repr(settings) + str(settings)
    assert not [value for value in SECRETS.values() if value in shown]
    with pytest.raises(SettingsError) as bad:
        load_settings(public_url="ftp://" + SECRETS["ui_token"], endpoint_silence_ms=-1)
    assert SECRETS["ui_token"] not in str(bad.value)
    assert bad.value.keys == ["PUBLIC_URL", "ENDPOINT_SILENCE_MS"]


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def leaks(self, values: list[str]) -> list[str]:
        formatter = logging.Formatter()
        found = []
        for record in self.records:
            text = formatter.format(record) + repr(record.__dict__)
            found += [f"{record.name}: {v}" for v in values if v in text]
        return found


@pytest.fixture
def every_log_record() -> Iterator[_Everything]:
    """Every record of every logger, DEBUG included, for the length of the test."""
    handler = _Everything()
    root = logging.getLogger()
    loggers = [root] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def _call_with_every_secret(settings: Settings, fake_openai: FakeOpenAi) -> None:
    """Start the app, place a signed call that reaches the LLM with its key, use the API's
    bearer token and the login, then stop the app."""
    fake_openai.script(Rule(when="pressed", reply="Sure."))
    engines = Engines(stt=FixedStt(), llm=OpenAiLlm.from_settings(settings), tts=ToneTts(),
                      vad=EnergyVad, stt_limiter=anyio.CapacityLimiter(1))
    async with serving(settings, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=4.0,
                                 auth_token=settings.twilio_auth_token)
        result = await caller.run([CallerTurn(digit="1")])
        await served.ended(caller.call_sid)
        assert result.turns[0].latency_ms is not None  # the LLM (with the key) answered
        async with httpx.AsyncClient(base_url=served.base_url) as http:
            token = {"authorization": f"Bearer {settings.ui_token}"}
            assert (await http.get("/api/calls", headers=token)).status_code == 200
            await http.get("/api/calls", headers={"authorization": "Bearer wrong"})
            await http.post("/login", data={"password": settings.ui_password})
            await http.post("/login", data={"password": "wrong"})


async def test_secrets_are_never_logged_at_startup_or_during_a_call(
    fake_openai: FakeOpenAi, tmp_path, every_log_record: _Everything
) -> None:
    settings = load_settings(**SECRETS, llm_base_url=fake_openai.base_url, llm_model="scripted",
                             twilio_account_sid="AC" + "1" * 32, public_url=None,
                             database_url=f"sqlite:///{tmp_path}/calls.db",
                             db_spool_dir=str(tmp_path / "spool"))
    await _call_with_every_secret(settings, fake_openai)
    assert len(every_log_record.records) > 20  # the capture really saw the app
    assert fake_openai.chat_requests[-1].headers["authorization"] == (
        f"Bearer {SECRETS['llm_api_key']}")
    assert every_log_record.leaks(list(SECRETS.values())) == []


@pytest.mark.postgres
async def test_the_database_password_is_never_logged(
    fake_openai: FakeOpenAi, tmp_path, every_log_record: _Everything
) -> None:
    database = await create_pg_database("voicebot_secrets")
    try:
        # The test server trusts loopback, so any password works; it must still never show.
        url = pg_url(database).replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
        await upgrade_to_head_async(url)
        settings = load_settings(**SECRETS, llm_base_url=fake_openai.base_url,
                                 llm_model="scripted", public_url=None, database_url=url,
                                 db_spool_dir=str(tmp_path / "spool"))
        await _call_with_every_secret(settings, fake_openai)
    finally:
        await drop_pg_database(database)
    assert every_log_record.leaks([DB_PASSWORD, *SECRETS.values()]) == []


def test_llm_tools_on_with_the_local_model_is_a_settings_error_naming_the_key() -> None:
    with pytest.raises(SettingsError) as bad:
        load_settings(llm_tools="on")
    assert "LLM_TOOLS" in str(bad.value) and "function calling" in str(bad.value)
    assert load_settings(llm_tools="on", llm_base_url="http://127.0.0.1:9/v1").llm_tools == "on"
    assert load_settings(llm_tools="auto").llm_tools == "auto"
