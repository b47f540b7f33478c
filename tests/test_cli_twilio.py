import argparse
import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.fakes.loopback import LoopbackServer
from tests.fakes.twilio_server import FakeTwilio
from voicebot.cli_twilio import add_parsers

OURS = "+15550001111"
PUBLIC = "https://abc.ngrok.app"


def voicebot(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="voicebot")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def fake_twilio_server() -> Iterator[FakeTwilio]:
    with FakeTwilio() as server:
        yield server


@pytest.fixture
def fake(
    fake_twilio_server: FakeTwilio, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> FakeTwilio:
    """The fake Twilio with one number, and the settings (environment) pointing at it."""
    fake_twilio_server.reset()
    fake_twilio_server.add_number(OURS)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("PUBLIC_URL", PUBLIC)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", fake_twilio_server.account_sid)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", fake_twilio_server.auth_token)
    monkeypatch.setenv("TWILIO_API_BASE", fake_twilio_server.url)
    return fake_twilio_server


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    """Our server as seen through PUBLIC_URL: something that answers GET /healthz."""

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    with LoopbackServer(Starlette(routes=[Route("/healthz", healthz)])) as server:
        yield server.url


def test_configure_points_the_number_at_public_url_and_prints_the_change(
    fake: FakeTwilio, capsys: pytest.CaptureFixture[str]
) -> None:
    assert voicebot("twilio", "configure", "--number", OURS) == 0
    out = capsys.readouterr().out
    assert f"voice_url: (none) -> {PUBLIC}/twilio/voice" in out
    assert f"status_callback: (none) -> {PUBLIC}/twilio/status" in out
    assert fake.of("POST", ".json")[-1].form == {
        "VoiceUrl": f"{PUBLIC}/twilio/voice", "VoiceMethod": "POST",
        "StatusCallback": f"{PUBLIC}/twilio/status", "StatusCallbackMethod": "POST"}
    assert voicebot("twilio", "configure", "--number", OURS) == 0
    assert "nothing changed" in capsys.readouterr().out


def test_missing_settings_are_named_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("PUBLIC_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert voicebot("twilio", "configure", "--number", OURS) == 2
    err = capsys.readouterr().err
    assert "missing settings: PUBLIC_URL, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN" in err


def test_a_number_that_is_not_e164_or_not_ours_is_reported(
    fake: FakeTwilio, capsys: pytest.CaptureFixture[str]
) -> None:
    assert voicebot("twilio", "configure", "--number", "555-0100") == 2
    assert "not an E.164 phone number" in capsys.readouterr().err
    assert voicebot("twilio", "configure", "--number", "+15550009999") == 1
    assert "+15550009999 is not a phone number of this Twilio account" in capsys.readouterr().err


def test_check_reports_configuration_and_a_healthy_server(
    fake: FakeTwilio, local_server: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PUBLIC_URL", local_server)
    assert voicebot("twilio", "configure", "--number", OURS) == 0
    capsys.readouterr()
    assert voicebot("twilio", "check", "--number", OURS) == 0
    out = capsys.readouterr().out
    assert f"voice URL        POST {local_server}/twilio/voice" in out
    assert f"GET {local_server}/healthz: 200" in out
    assert "ok: calls to this number reach this server" in out


def test_check_reports_an_unconfigured_number_and_a_server_that_does_not_answer(
    fake: FakeTwilio, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("PUBLIC_URL", dead)
    assert voicebot("twilio", "check", "--number", OURS) == 1
    out = capsys.readouterr().out
    assert "voice URL        POST (none)" in out
    assert f"problem: voice URL is not {dead}/twilio/voice" in out
    assert f"problem: {dead} does not answer /healthz" in out


def test_call_places_an_outbound_call_connected_to_our_media_stream(
    fake: FakeTwilio, capsys: pytest.CaptureFixture[str]
) -> None:
    code = voicebot("call", "+15559998888", "--from", OURS, "--greeting", "Hi, it's the dentist.",
                    "--system-prompt", "Confirm the appointment.", "--amd")
    assert code == 0
    [call_sid] = fake.calls
    assert f"call_sid={call_sid}" in capsys.readouterr().out
    form = fake.of("POST", "/Calls.json")[-1].form
    assert (form["To"], form["From"]) == ("+15559998888", OURS)
    assert form["StatusCallback"] == f"{PUBLIC}/twilio/status"
    assert form["MachineDetection"] == "DetectMessageEnd"
    assert form["AsyncAmdStatusCallback"] == f"{PUBLIC}/twilio/amd"
    stream = ET.fromstring(str(form["Twiml"])).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://abc.ngrok.app/twilio/media"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"direction": "outbound", "from": OURS, "to": "+15559998888",
                      "greeting": "Hi, it's the dentist.",
                      "system_prompt": "Confirm the appointment.", "amd": "true"}


def test_call_without_a_from_number_names_the_setting(
    fake: FakeTwilio, capsys: pytest.CaptureFixture[str]
) -> None:
    assert voicebot("call", "+15559998888") == 2
    assert "--from (or TWILIO_FROM_NUMBER) is required" in capsys.readouterr().err
    assert fake.requests == []
