"""The approval page at /requests/{id}: sign-in, what it shows, CSRF, refusals in words."""
from __future__ import annotations

import logging
import re

import httpx
import pytest

from tests.support.approvals_env import LEDGER, approvals_env

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"
OUTSIDER = "mallory@example.com"


@pytest.fixture
def env(tmp_path):
    with approvals_env(tmp_path) as e:
        yield e


def browser(env, who: str | None = None) -> httpx.Client:
    """A cookie-keeping client signed in through the dev login form, like a browser."""
    c = httpx.Client(base_url=env.url, timeout=20, follow_redirects=False)
    if who:
        form = c.get("/login", params={"next": "/"})
        assert "DEVELOPMENT ONLY" in form.text
        nonce = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        resp = c.post("/login", data={"csrf_token": nonce, "username": who, "next": "/"})
        assert resp.status_code == 303, resp.text
        cookie = resp.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    return c


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def new_request(env, who=A, method="Adjust") -> str:
    resp = env.call("POST", "/api/v1/requests", who, json={
        "service": LEDGER, "method": method, "reason": "refund for ticket <4411> & co"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def test_signed_out_visitor_is_sent_to_sign_in(env):
    rid = new_request(env)
    resp = browser(env).get(f"/requests/{rid}")
    assert resp.status_code == 401
    assert f'href="/login?next=/requests/{rid}"' in resp.text
    assert "refund" not in resp.text  # nothing about the request before sign-in


def test_page_shows_everything_a_reviewer_needs_and_approve_works(env):
    rid = new_request(env)
    bob = browser(env, B)
    page = bob.get(f"/requests/{rid}")
    assert page.status_code == 200
    text = page.text
    for expected in (A, LEDGER, "Adjust", "ENGINEERS_WITH_APPROVAL",
                     "any engineer may call it once another engineer approves",
                     "refund for ticket &lt;4411&gt; &amp; co",  # escaped, not raw HTML
                     "any call to this method", "Expires unless approved", "nobody yet",
                     'id="approve"', 'id="reject"'):
        assert expected in text, expected
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    done = bob.post(f"/requests/{rid}/approve", data={"csrf_token": csrf(text), "comment": "fine"})
    assert done.status_code == 303 and done.headers["location"] == f"/requests/{rid}?done=approved"
    after = bob.get(done.headers["location"]).text
    assert "Your approval is recorded" in after and ">approved<" in after
    assert re.search(rf"{re.escape(B)}</td><td>\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC", after)
    assert 'id="approve"' not in after
    assert env.store.get_request(rid).state.value == "approved"


def test_requester_and_ineligible_see_why_not_and_no_buttons(env):
    rid = new_request(env, A, method="Close")  # contributors of the ledger only
    own = browser(env, A).get(f"/requests/{rid}").text
    assert "nobody approves their own request" in own and 'id="approve"' not in own
    assert 'id="cancel"' in own  # the requester may withdraw
    # Bob may not approve it, so he may not read it either (read scopes): 403, in words.
    resp = browser(env, B).get(f"/requests/{rid}")
    assert resp.status_code == 403
    bob = resp.text
    assert "may not see request" in bob and "a contributor of demo.v1.Ledger" in bob
    assert "refund for ticket" not in bob and 'id="approve"' not in bob and 'id="reject"' not in bob


def test_missing_or_wrong_csrf_token_is_refused_and_changes_nothing(env):
    rid = new_request(env)
    before = env.store.get_request(rid)
    bob = browser(env, B)
    page = bob.get(f"/requests/{rid}").text
    for data in ({}, {"csrf_token": "0" * 64}, {"csrf_token": ""}):
        resp = bob.post(f"/requests/{rid}/approve", data=data)
        assert resp.status_code == 403
        assert "CSRF token is missing or wrong" in resp.text
        assert env.store.get_request(rid) == before
    # a token from another session (carol's) does not work for bob
    carol_token = csrf(browser(env, C).get(f"/requests/{rid}").text)
    assert carol_token != csrf(page)
    assert bob.post(f"/requests/{rid}/approve", data={"csrf_token": carol_token}).status_code == 403
    assert env.store.get_request(rid) == before


def test_page_refusals_in_words(env):
    rid = new_request(env)
    alice = browser(env, A)
    token = csrf(alice.get(f"/requests/{rid}").text)
    before = env.store.get_request(rid)
    resp = alice.post(f"/requests/{rid}/approve", data={"csrf_token": token})
    assert resp.status_code == 403 and "cannot approve their own request" in resp.text
    assert env.store.get_request(rid) == before
    mallory = browser(env, OUTSIDER)
    token = csrf(mallory.get(f"/requests/{rid}").text)
    resp = mallory.post(f"/requests/{rid}/approve", data={"csrf_token": token})
    assert resp.status_code == 403 and "may not approve" in resp.text
    assert env.store.get_request(rid) == before
    missing = browser(env, B).get("/requests/nosuchrequest")
    assert missing.status_code == 404 and "There is no approval request with id nosuchrequest" in missing.text


def test_gateway_opened_request_takes_the_reason_on_the_page(env):
    gw = env.gateway_request(A)
    bob = browser(env, B).get(f"/requests/{gw.id}").text
    assert f"Waiting for {A} to give a reason" in bob and 'id="approve"' not in bob
    alice = browser(env, A)
    page = alice.get(f"/requests/{gw.id}").text
    assert 'name="reason"' in page
    short = alice.post(f"/requests/{gw.id}/complete", data={"csrf_token": csrf(page), "reason": "x"})
    assert short.status_code == 422 and "at least 10 characters" in short.text
    ok = alice.post(f"/requests/{gw.id}/complete",
                    data={"csrf_token": csrf(page), "reason": "reconcile ledger drift"})
    assert ok.status_code == 303
    assert env.store.get_request(gw.id).reason == "reconcile ledger drift"
    assert 'id="approve"' in browser(env, B).get(f"/requests/{gw.id}").text


def test_expired_session_and_forged_cookie_ask_to_sign_in_again(env, tmp_path):
    rid = new_request(env)
    c = httpx.Client(base_url=env.url, timeout=20)
    import time
    c.cookies.set("mpa_session", env.issuer.mint(B, now=time.time() - 7200, ttl_seconds=60))
    resp = c.get(f"/requests/{rid}")
    assert resp.status_code == 401 and "expired" in resp.text and "/login?next=" in resp.text
    from devstack.devissuer import DevIssuer
    c.cookies.set("mpa_session", DevIssuer(tmp_path / "forger.pem").mint(B))
    assert c.get(f"/requests/{rid}").status_code == 401


def test_login_form_refuses_without_its_csrf_token_and_open_redirects(env):
    c = httpx.Client(base_url=env.url, timeout=20)
    resp = c.post("/login", data={"username": B, "csrf_token": "x"})
    assert resp.status_code == 403 and "session" not in resp.cookies
    form = c.get("/login", params={"next": "https://evil.example/"})
    assert 'name="next" value="/"' in form.text
    form = c.get("/login", params={"next": "//evil.example/"})
    assert 'name="next" value="/"' in form.text


def test_no_tokens_or_reasons_in_logs(env, caplog):
    caplog.set_level(logging.DEBUG)
    rid = new_request(env)
    bob = browser(env, B)
    page = bob.get(f"/requests/{rid}").text
    bob.post(f"/requests/{rid}/approve", data={"csrf_token": csrf(page)})
    bob.post(f"/requests/{rid}/approve", data={})  # refused, logged
    token = bob.cookies.get("mpa_session")
    # the server's own logs (the test's HTTP client logs what it sends; that is not the server)
    server_log = "\n".join(r.getMessage() for r in caplog.records
                           if r.name.split(".")[0] in ("mpa", "uvicorn", "fastapi", "starlette", "policy"))
    assert "missing or wrong CSRF token" in server_log  # the refusal is logged...
    assert token and token not in server_log  # ...without the session token,
    assert csrf(page) not in server_log  # the CSRF token,
    assert "refund for ticket" not in server_log  # or the request's words


def test_body_scoped_request_shows_the_digest(env):
    import hashlib
    digest = hashlib.sha256(b"\x08\x01\x12\x03A-1").hexdigest()
    resp = env.call("POST", "/api/v1/requests", A, json={
        "service": LEDGER, "method": "Adjust", "reason": "refund for ticket 4411",
        "body_sha256": digest, "max_uses": 1})
    assert resp.status_code == 201 and resp.json()["body_sha256"] == digest
    page = browser(env, B).get(f"/requests/{resp.json()['id']}").text
    assert f"only the exact request body with SHA-256 <code>{digest}</code>" in page
    assert "at most 1 call (0 used)" in page


def test_page_comment_is_capped_like_the_api(env):
    """The form once stored a 900,000-character comment; the API caps at 2,000. Both refuse now."""
    rid = new_request(env)
    bob = browser(env, B)
    page = bob.get(f"/requests/{rid}").text
    assert 'maxlength="2000"' in page
    before = env.store.get_request(rid)
    resp = bob.post(f"/requests/{rid}/approve", data={"csrf_token": csrf(page), "comment": "x" * 900_000})
    assert resp.status_code == 422, resp.text[:500]
    assert "the comment is 900000 characters long; the limit is 2000" in resp.text
    assert env.store.get_request(rid) == before
    resp = bob.post(f"/requests/{rid}/reject", data={"csrf_token": csrf(page), "comment": "y" * 2001})
    assert resp.status_code == 422 and "the limit is 2000" in resp.text
    assert env.store.get_request(rid) == before
    resp = bob.post(f"/requests/{rid}/approve", data={"csrf_token": csrf(page), "comment": "z" * 2000})
    assert resp.status_code == 303
    assert env.store.get_request(rid).approvals[0].comment == "z" * 2000


@pytest.mark.parametrize("config, secure", [
    ({"public_url": "https://mpa.example.com"}, True),
    ({"public_url": "http://mpa.internal:8080"}, True),     # plaintext off the box: still Secure
    ({"public_url": "auto"}, False),                         # a dev box on 127.0.0.1
    ({"public_url": "https://mpa.example.com", "secure_cookies": False}, False),
])
def test_session_cookie_is_secure_by_default(tmp_path, config, secure):
    with approvals_env(tmp_path, config=config) as e:
        # The test talks plain http, where a client keeps Secure cookies to itself: carry the
        # login nonce by hand, as a browser on the HTTPS public URL would.
        form = httpx.get(f"{e.url}/login", params={"next": "/"}, timeout=20)
        nonce = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        cookies = form.headers.get_list("set-cookie")
        assert cookies and all(("; secure" in h.lower()) is secure for h in cookies), cookies
        resp = httpx.post(f"{e.url}/login", data={"csrf_token": nonce, "username": A, "next": "/"},
                          headers={"Cookie": cookies[0].split(";")[0]}, timeout=20)
        assert resp.status_code == 303, resp.text
        session = [h for h in resp.headers.get_list("set-cookie") if h.startswith("mpa_session=")]
        assert session and all(("; secure" in h.lower()) is secure for h in session), session
