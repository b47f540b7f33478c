import socket
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from telephony.rest import (
    CallNotFound,
    NumberNotFound,
    TwilioNotConfigured,
    TwilioRest,
    TwilioRestError,
    TwilioUnreachable,
)
from tests.fakes.twilio_server import FakeTwilio, ScriptedError
from webhooks.outbound import amd_routes, busy_twiml, outbound_twiml, transfer_twiml

OURS = "+15550001111"
CALLEE = "+15559998888"


@pytest.fixture(scope="module")
def fake_twilio_server() -> Iterator[FakeTwilio]:
    with FakeTwilio() as server:
        yield server


@pytest.fixture
def fake(fake_twilio_server: FakeTwilio) -> FakeTwilio:
    fake_twilio_server.reset()
    fake_twilio_server.add_number(OURS)
    return fake_twilio_server


@pytest.fixture
def rest(fake: FakeTwilio) -> TwilioRest:
    return TwilioRest(fake.account_sid, fake.auth_token, api_base=fake.url)


def api(fake: FakeTwilio, tail: str) -> str:
    return f"/2010-04-01/Accounts/{fake.account_sid}/{tail}"


async def test_outbound_call_sends_twiml_status_events_and_async_amd(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    twiml = outbound_twiml("bot.example.com", greeting="Hi, this is the clinic.", amd=True)
    placed = await rest.place_call(
        CALLEE, OURS, twiml, status_callback="https://bot.example.com/twilio/status",
        machine_detection=True, amd_callback_url="https://bot.example.com/twilio/amd",
    )
    assert placed.sid in fake.calls and placed.status == "queued"
    assert (placed.to, placed.from_) == (CALLEE, OURS)
    [request] = fake.requests
    assert (request.method, request.path) == ("POST", api(fake, "Calls.json"))
    assert request.auth_user == fake.account_sid
    assert request.form == {
        "To": CALLEE,
        "From": OURS,
        "Twiml": twiml,
        "StatusCallback": "https://bot.example.com/twilio/status",
        "StatusCallbackMethod": "POST",
        "StatusCallbackEvent": ["initiated", "ringing", "answered", "completed"],
        "MachineDetection": "DetectMessageEnd",
        "AsyncAmd": "true",
        "AsyncAmdStatusCallback": "https://bot.example.com/twilio/amd",
        "AsyncAmdStatusCallbackMethod": "POST",
    }
    stream = ET.fromstring(twiml).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://bot.example.com/twilio/media"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"direction": "outbound", "greeting": "Hi, this is the clinic.",
                      "amd": "true"}


async def test_outbound_call_by_url_asks_twilio_to_post_for_twiml(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    await rest.place_call(CALLEE, OURS, "https://bot.example.com/twilio/voice")
    assert fake.requests[-1].form == {"To": CALLEE, "From": OURS, "Method": "POST",
                                      "Url": "https://bot.example.com/twilio/voice"}


async def test_twiml_longer_than_twilio_accepts_is_refused_before_sending(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    with pytest.raises(ValueError, match="32018"):
        await rest.place_call(CALLEE, OURS, outbound_twiml("h", system_prompt="x" * 4000))
    assert fake.requests == []


async def test_configure_number_points_the_exact_number_at_our_webhooks(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    # The PhoneNumber filter is a pattern on Twilio: a longer number matches it too.
    fake.add_number(OURS + "2", voice_url="https://elsewhere.example/voice")
    sid = next(s for s, n in fake.numbers.items() if n["phone_number"] == OURS)
    fake.numbers[sid]["voice_url"] = "https://demo.twilio.com/welcome/voice/"
    change = await rest.configure_number(OURS, "https://abc.ngrok.app/twilio/voice",
                                         "https://abc.ngrok.app/twilio/status")
    assert change.changes == {
        "voice_url": ("https://demo.twilio.com/welcome/voice/",
                      "https://abc.ngrok.app/twilio/voice"),
        "status_callback": (None, "https://abc.ngrok.app/twilio/status"),
    }
    lookup, update = fake.requests
    assert (lookup.method, lookup.path) == ("GET", api(fake, "IncomingPhoneNumbers.json"))
    assert lookup.query["PhoneNumber"] == OURS
    assert (update.method, update.path) == ("POST", api(fake, f"IncomingPhoneNumbers/{sid}.json"))
    assert update.form == {"VoiceUrl": "https://abc.ngrok.app/twilio/voice",
                           "VoiceMethod": "POST",
                           "StatusCallback": "https://abc.ngrok.app/twilio/status",
                           "StatusCallbackMethod": "POST"}


async def test_configure_detaches_a_twiml_app_that_would_override_the_voice_url(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    sid = next(iter(fake.numbers))
    fake.numbers[sid]["voice_application_sid"] = "AP" + "3" * 32
    change = await rest.configure_number(OURS, "https://h/twilio/voice", "https://h/twilio/status")
    assert fake.requests[-1].form["VoiceApplicationSid"] == ""
    assert change.after.voice_application_sid is None


async def test_unknown_number_raises_number_not_found(rest: TwilioRest) -> None:
    with pytest.raises(NumberNotFound) as missing:
        await rest.describe_number("+15550009999")
    assert missing.value.number == "+15550009999"


async def test_hang_up_ends_a_live_call(fake: FakeTwilio, rest: TwilioRest) -> None:
    call_sid = fake.add_call("in-progress")
    assert await rest.hang_up(call_sid) is True
    assert fake.calls[call_sid]["status"] == "completed"
    assert fake.requests[-1].path == api(fake, f"Calls/{call_sid}.json")
    assert fake.requests[-1].form == {"Status": "completed"}


async def test_hanging_up_a_call_twilio_no_longer_knows_is_not_an_error(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    assert await rest.hang_up("CA" + "9" * 32) is False  # 404, Twilio error 20404
    ended = fake.add_call("completed")
    assert await rest.hang_up(ended) is False  # 400, Twilio error 21220


async def test_transfer_redirects_the_live_call_to_dial_twiml(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    call_sid = fake.add_call("in-progress")
    await rest.redirect(call_sid, transfer_twiml("+15557776666", "Transferring you now."))
    [request] = fake.requests
    assert set(request.form) == {"Twiml"}
    root = ET.fromstring(str(request.form["Twiml"]))
    assert [child.tag for child in root] == ["Say", "Dial"]
    assert root.findtext("Say") == "Transferring you now."
    assert root.findtext("./Dial/Number") == "+15557776666"


async def test_redirecting_a_missing_call_raises_call_not_found(rest: TwilioRest) -> None:
    with pytest.raises(CallNotFound) as gone:
        await rest.redirect("CA" + "8" * 32, busy_twiml("Bye."))
    assert gone.value.call_sid == "CA" + "8" * 32 and gone.value.code == 20404


async def test_twilio_errors_carry_status_code_and_message(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    fake.next_error = ScriptedError(503, 20500, "Internal Server Error")
    with pytest.raises(TwilioRestError) as failed:
        await rest.hang_up(fake.add_call())
    assert (failed.value.status, failed.value.code) == (503, 20500)
    assert "Internal Server Error" in failed.value.message


async def test_wrong_credentials_are_an_error_that_does_not_show_the_token(
    fake: FakeTwilio,
) -> None:
    wrong = TwilioRest(fake.account_sid, "not-the-token-42", api_base=fake.url)
    with pytest.raises(TwilioRestError) as refused:
        await wrong.describe_number(OURS)
    assert (refused.value.status, refused.value.code) == (401, 20003)
    assert "not-the-token-42" not in str(refused.value) + repr(wrong)


async def test_an_api_that_does_not_answer_raises_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rest = TwilioRest("AC" + "0" * 32, "token", api_base=f"http://127.0.0.1:{port}")
    with pytest.raises(TwilioUnreachable):
        await rest.hang_up("CA" + "1" * 32)


def test_from_settings_names_every_missing_setting() -> None:
    with pytest.raises(TwilioNotConfigured) as missing:
        TwilioRest.from_settings(SimpleNamespace(twilio_account_sid=None, twilio_auth_token=""))
    assert missing.value.missing == ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"]


# -- the async AMD callback acts through the REST client ---------------------------------------------

def amd_client(fake: FakeTwilio, machine_message: str | None) -> TestClient:
    app = Starlette(routes=amd_routes())
    app.state.settings = SimpleNamespace(machine_message=machine_message)
    app.state.twilio_rest = TwilioRest(fake.account_sid, fake.auth_token, api_base=fake.url)
    return TestClient(app)


def test_machine_verdict_leaves_the_message_then_hangs_up(fake: FakeTwilio) -> None:
    call_sid = fake.add_call("in-progress", direction="outbound-api")
    response = amd_client(fake, "Please call us back.").post("/twilio/amd", data={
        "CallSid": call_sid, "AnsweredBy": "machine_end_beep", "MachineDetectionDuration": "4200"})
    assert response.status_code == 204
    root = ET.fromstring(str(fake.requests[-1].form["Twiml"]))
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root.findtext("Say") == "Please call us back."


def test_human_verdict_leaves_the_call_alone_and_fax_is_hung_up(fake: FakeTwilio) -> None:
    call_sid = fake.add_call("in-progress")
    client = amd_client(fake, None)
    assert client.post("/twilio/amd", data={"CallSid": call_sid, "AnsweredBy": "human"}
                       ).status_code == 204
    assert fake.requests == []
    assert client.post("/twilio/amd", data={"CallSid": call_sid, "AnsweredBy": "fax"}
                       ).status_code == 204
    assert fake.requests[-1].form == {"Status": "completed"}
