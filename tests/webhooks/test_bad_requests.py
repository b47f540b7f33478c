"""Every `/twilio/*` webhook and `/api/*` route answers bad requests with a 4xx, never a 500:
wrong content types, missing and malformed fields, broken encodings, huge bodies, odd paths
and query strings, wrong methods. Routes are read from the app, so new ones are covered too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator

from tests.fakes.engines import instant_engines
from tests.limitkit import install_limits
from voicebot.app import create_app
from voicebot.settings import Settings, load_settings

AUTH_TOKEN = "bad-requests-token"
FORM = "application/x-www-form-urlencoded"
BASE = "http://testserver"

# (content type, body): what a confused client or an attacker might post.
BAD_BODIES: list[tuple[str | None, bytes]] = [
    (None, b""),
    (FORM, b""),
    (FORM, b"CallSid="),
    (FORM, b"CallSid=CA1&CallStatus=exploded"),
    (FORM, b"CallSid=" + b"A" * 5000 + b"&CallStatus=completed"),
    (FORM, b"CallSid=CA%00%ff&CallStatus=completed&CallDuration=-5&Timestamp=yesterday"),
    (FORM, b"CallSid=CA1&CallStatus=completed&CallDuration=1e99"),
    (FORM, b"CallSid=CA1&StreamSid=MZ1&StreamEvent=stream-exploded"),
    (FORM, b"CallSid=CA1&AnsweredBy="),
    (FORM, b"\xff\xfe\xfd=\x80"),  # not UTF-8
    (FORM, b"%%%&&&===;;;"),
    (FORM, b"&".join(b"k%d=v" % i for i in range(3000))),  # thousands of fields
    ("application/json", b'{"CallSid": "CA1", "CallStatus": "completed"}'),
    ("application/json", b"{not json"),
    ("text/plain", b"hello"),
    ("application/xml", b"<Response/>"),
    ("multipart/form-data", b"--x\r\n"),  # no boundary
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\n"),
    ("multipart/form-data; boundary=x",
     b'--x\r\nContent-Disposition: form-data; name="f"; filename="a.wav"\r\n\r\n'
     + b"\x00" * 30_000 + b"\r\n--x--\r\n"),
    (FORM + "; charset=utf-16", "CallSid=CA1".encode("utf-16")),
    ("", b"CallSid=CA1"),
    (FORM, b"x" * 200_000),  # over the body limit
]
ODD_PATH_SUFFIXES = ["", "/", "/..%2f..%2fetc%2fpasswd", "?CallSid=%ff%fe", "?" + "a=1&" * 2000,
                     "?page=-1&page_size=99999&since=not-a-date&until=%00",
                     "?since=2024-05-02&until=2024-05-01", "?number=" + "9" * 5000]
ODD_CALL_SIDS = ["CA" + "A" * 5000, "%ff%fe", "..", "CA1%00", "%F0%9F%93%9E", "CA1;DROP TABLE"]


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    directory: Path = tmp_path_factory.mktemp("bad-requests")
    return load_settings(database_url=f"sqlite:///{directory}/calls.db", public_url=None,
                         db_spool_dir=str(directory / "spool"))


def _client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, engines=instant_engines())
    install_limits(app, settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def open_client(app_settings: Settings) -> Iterator[TestClient]:
    """Signature checks off (no TWILIO_AUTH_TOKEN): bad requests reach the handlers."""
    yield from _client(app_settings)


@pytest.fixture(scope="module")
def signed_client(app_settings: Settings) -> Iterator[TestClient]:
    yield from _client(app_settings.model_copy(update={"twilio_auth_token": AUTH_TOKEN}))


def http_routes(client: TestClient, prefixes: tuple[str, ...]) -> list[tuple[str, set[str]]]:
    routes = [(r.path, set(r.methods or ())) for r in client.app.routes  # type: ignore[attr-defined]
              if isinstance(r, Route) and r.path.startswith(prefixes)]
    assert routes
    return routes


def _concrete(path: str) -> str:
    return path.replace("{call_sid}", "CA" + "0" * 32)


def _assert_4xx(response: Any, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:200]}"


def test_twilio_webhooks_answer_bad_bodies_with_4xx(open_client: TestClient) -> None:
    for path, methods in http_routes(open_client, ("/twilio/",)):
        for content_type, body in BAD_BODIES:
            headers = {"content-type": content_type} if content_type is not None else {}
            for method in methods - {"HEAD", "GET"}:
                response = open_client.request(method, path, content=body, headers=headers)
                _assert_4xx(response, f"{method} {path} {content_type} {body[:40]!r}")
                if len(body) > 64 * 1024:
                    assert response.status_code == 413


def test_webhooks_that_need_fields_refuse_requests_without_them(open_client: TestClient) -> None:
    for path in ("/twilio/status", "/twilio/stream-status", "/twilio/amd"):
        response = open_client.post(path, content=b"", headers={"content-type": FORM})
        assert response.status_code == 400, path


def test_signed_but_bad_webhooks_get_4xx(signed_client: TestClient) -> None:
    """Correctly signed requests whose content is wrong still get 4xx; unsigned get 403."""
    validator = RequestValidator(AUTH_TOKEN)
    for path, methods in http_routes(signed_client, ("/twilio/",)):
        for content_type, body in BAD_BODIES:
            for method in methods - {"HEAD", "GET"}:
                params: dict[str, str] = {}
                if content_type == FORM:
                    try:
                        from urllib.parse import parse_qsl

                        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
                    except UnicodeDecodeError:
                        params = {}
                headers = {"X-Twilio-Signature": validator.compute_signature(BASE + path, params)}
                if content_type is not None:
                    headers["content-type"] = content_type
                response = signed_client.request(method, path, content=body, headers=headers)
                _assert_4xx(response, f"signed {method} {path} {content_type} {body[:40]!r}")
            unsigned = signed_client.post(path, content=body,
                                          headers={"content-type": content_type or FORM})
            assert unsigned.status_code in (403, 413), (path, unsigned.status_code)


def test_odd_paths_query_strings_and_methods_get_4xx(open_client: TestClient) -> None:
    for path, methods in http_routes(open_client, ("/twilio/", "/api/")):
        for suffix in ODD_PATH_SUFFIXES:
            for method in methods:
                response = open_client.request(method, _concrete(path) + suffix)
                _assert_4xx(response, f"{method} {path}{suffix[:60]}")
        for method in {"PUT", "DELETE", "PATCH"} - methods:
            assert open_client.request(method, _concrete(path)).status_code == 405


def test_api_call_lookups_with_odd_sids_get_4xx(open_client: TestClient) -> None:
    for call_sid in ODD_CALL_SIDS:
        response = open_client.get(f"/api/calls/{call_sid}")
        _assert_4xx(response, f"/api/calls/{call_sid[:40]}")
        assert response.status_code in (404, 400)


def test_api_with_bodies_and_odd_headers_gets_4xx(open_client: TestClient) -> None:
    for path, _ in http_routes(open_client, ("/api/",)):
        for content_type, body in BAD_BODIES:
            headers = {"content-type": content_type} if content_type is not None else {}
            response = open_client.request("GET", _concrete(path), content=body, headers=headers)
            _assert_4xx(response, f"GET {path} with {content_type} body")
        for headers in ({"accept": "text/html"}, {"authorization": "Bearer nope"},
                        {"cookie": "voicebot_session=garbage"}, {"content-length": "abc"}):
            response = open_client.get(_concrete(path), headers=headers)
            _assert_4xx(response, f"GET {path} {headers}")


def test_voice_webhook_answers_twiml_for_a_bare_get(open_client: TestClient) -> None:
    query = urlencode({"From": "+1555<script>", "Direction": "outbound-api"})
    response = open_client.get(f"/twilio/voice?{query}")
    assert response.status_code == 200 and "<Connect" in response.text
    assert "<script>" not in response.text
