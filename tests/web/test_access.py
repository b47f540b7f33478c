"""Who gets in: the viewer's login, the API token, and the endpoints that stay open."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.web.viewerkit import call_free_settings, idle_engines, viewer_app

HTML = {"accept": "text/html"}
PASSWORD = "correct horse battery staple"
TOKEN = "t0ken-for-scripts"


@contextmanager
def viewer(tmp_path: Path, *, listen_host: str | None = None, https: bool = False,
           **ui: object) -> Iterator[TestClient]:
    settings = call_free_settings(tmp_path, **ui)
    app = viewer_app(settings, idle_engines(settings), listen_host)
    base_url = "https://testserver" if https else "http://testserver"
    with TestClient(app, base_url=base_url, follow_redirects=False) as client:
        yield client


def log_in(client: TestClient, password: str = PASSWORD, **extra: str) -> httpx.Response:
    form = client.get("/login", headers=HTML)
    token = re.search(r'name="form_token" value="([^"]+)"', form.text)
    assert token, form.text
    return client.post("/login", data={"password": password, "form_token": token[1],
                                       "next": extra.pop("next", "/")}, headers=extra)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[TestClient]:
    with viewer(tmp_path, ui_password=PASSWORD, ui_token=TOKEN) as client:
        yield client


def test_anonymous_requests_are_refused_when_a_password_is_set(guarded: TestClient) -> None:
    page = guarded.get("/calls/CA1?x=1", headers=HTML)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Fcalls%2FCA1%3Fx%3D1"
    for path in ("/api/calls", "/api/calls/CA1", "/events", "/calls/CA1/timeline"):
        response = guarded.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert guarded.get("/talk", headers=HTML).status_code == 303
    with pytest.raises(WebSocketDisconnect) as refused, guarded.websocket_connect("/web/media"):
        pass
    assert refused.value.code == 1008


def test_twilio_and_health_endpoints_stay_open(guarded: TestClient) -> None:
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/readyz").status_code == 200
    twiml = guarded.post("/twilio/voice", data={"From": "+15550101234", "To": "+18005550000"})
    assert twiml.status_code == 200 and "<Stream" in twiml.text
    assert guarded.get("/static/viewer.css").status_code == 200
    assert guarded.get("/login", headers=HTML).status_code == 200


def test_the_right_password_gives_a_session_cookie_that_opens_the_viewer(
    guarded: TestClient,
) -> None:
    response = log_in(guarded, next="/talk")
    assert response.status_code == 303 and response.headers["location"] == "/talk"
    cookie = response.headers["set-cookie"]
    assert "voicebot_session=" in cookie and "HttpOnly" in cookie
    assert "SameSite=lax" in cookie and "Secure" not in cookie
    assert guarded.get("/", headers=HTML).status_code == 200
    assert guarded.get("/talk", headers=HTML).status_code == 200
    assert guarded.get("/api/calls").status_code == 200
    with guarded.websocket_connect("/web/media"):
        pass  # accepted; closing it ends the (never started) call


def test_the_session_cookie_is_secure_over_https(tmp_path: Path) -> None:
    with viewer(tmp_path, https=True, ui_password=PASSWORD) as client:
        cookie = log_in(client).headers["set-cookie"]
    assert "Secure" in cookie


def test_a_tampered_session_cookie_is_refused(guarded: TestClient) -> None:
    log_in(guarded)
    value = guarded.cookies["voicebot_session"]
    body, mac = value.split(".")
    guarded.cookies.clear()
    guarded.cookies.set("voicebot_session", body[:-2] + "AA." + mac)
    assert guarded.get("/api/calls").status_code == 401
    guarded.cookies.set("voicebot_session", value)
    assert guarded.get("/api/calls").status_code == 200


def test_wrong_passwords_are_rate_limited_per_client(guarded: TestClient) -> None:
    for _ in range(5):
        assert log_in(guarded, "guess").status_code == 401
    blocked = log_in(guarded)  # even the right password, until the window passes
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) > 0
    assert "voicebot_session" not in guarded.cookies


def test_login_posts_need_the_form_token_and_our_own_origin(guarded: TestClient) -> None:
    no_token = guarded.post("/login", data={"password": PASSWORD})
    assert no_token.status_code == 403
    cross_site = log_in(guarded, origin="https://evil.example")
    assert cross_site.status_code == 403
    assert "voicebot_session" not in guarded.cookies
    same_site = log_in(guarded, origin="http://testserver")
    assert same_site.status_code == 303


def test_login_never_redirects_off_site(guarded: TestClient) -> None:
    assert log_in(guarded, next="//evil.example/x").headers["location"] == "/"


def test_logout_needs_the_form_token(guarded: TestClient) -> None:
    log_in(guarded)
    page = guarded.get("/", headers=HTML)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf
    assert guarded.post("/logout", data={"csrf": "forged"}).status_code == 403
    out = guarded.post("/logout", data={"csrf": csrf[1]})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert guarded.get("/api/calls").status_code == 401


def test_a_bearer_token_opens_the_api_for_scripts(guarded: TestClient) -> None:
    ok = guarded.get("/api/calls", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["total"] == 0
    assert guarded.get("/api/calls", headers={"authorization": "Bearer nope"}).status_code == 401


def test_wrong_tokens_are_rate_limited_too(guarded: TestClient) -> None:
    for _ in range(5):
        guarded.get("/api/calls", headers={"authorization": "Bearer nope"})
    limited = guarded.get("/api/calls", headers={"authorization": f"Bearer {TOKEN}"})
    assert limited.status_code == 429


def test_on_loopback_without_a_password_the_viewer_is_open(tmp_path: Path) -> None:
    with viewer(tmp_path) as client:  # no listen_host: the CLI's default, 127.0.0.1
        assert client.get("/", headers=HTML).status_code == 200
        assert client.get("/api/calls").status_code == 200
        assert client.get("/login", headers=HTML).status_code == 303


def test_beyond_loopback_a_login_is_needed_even_without_a_password(tmp_path: Path) -> None:
    with viewer(tmp_path, listen_host="0.0.0.0") as client:
        assert client.get("/", headers=HTML).status_code == 303
        assert client.get("/api/calls").status_code == 401
        form = client.get("/login", headers=HTML)
        assert "no password is set" in form.text and "UI_PASSWORD" in form.text
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("mode", "host", "status"),
                         [("always", "127.0.0.1", 401), ("never", "0.0.0.0", 200)])
def test_ui_require_login_overrides_the_automatic_choice(
    tmp_path: Path, mode: str, host: str, status: int
) -> None:
    with viewer(tmp_path, listen_host=host, ui_require_login=mode) as client:
        assert client.get("/api/calls").status_code == status


def test_browser_calls_from_another_origin_are_refused_even_when_open(tmp_path: Path) -> None:
    with viewer(tmp_path) as client:
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(
                "/web/media", headers={"origin": "https://evil.example"}):
            pass
        assert refused.value.code == 1008
        with client.websocket_connect("/web/media", headers={"origin": "http://testserver"}):
            pass


def test_after_a_wrong_password_the_login_still_leads_where_it_was_going(
    guarded: TestClient,
) -> None:
    failed = log_in(guarded, "guess", next="/talk")
    assert 'name="next" value="/talk"' in failed.text
    assert log_in(guarded, next="/talk").headers["location"] == "/talk"


def test_behind_a_trusted_proxy_the_forwarded_client_and_scheme_count(tmp_path: Path) -> None:
    with viewer(tmp_path, ui_password=PASSWORD, trusted_proxies="*") as client:
        for _ in range(5):
            log_in(client, "guess", **{"x-forwarded-for": "203.0.113.7"})
        assert log_in(client, **{"x-forwarded-for": "203.0.113.7"}).status_code == 429
        other = log_in(client, **{"x-forwarded-for": "198.51.100.2", "x-forwarded-proto": "https"})
    assert other.status_code == 303
    assert "Secure" in other.headers["set-cookie"]


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(guarded: TestClient) -> None:
    for i in range(5):
        log_in(guarded, "guess", **{"x-forwarded-for": f"203.0.113.{i}"})
    assert log_in(guarded, **{"x-forwarded-for": "198.51.100.2"}).status_code == 429
