"""Who may talk to a stack server (``metaflow_stack.http_guard``), on the real apps: loopback names only
by default (no DNS rebinding), no cross-site pages, a key when one is set, the UI's sign-in cookie, and
no server bound beyond loopback without a key unless told."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LOOPBACK, run_cli
from fastapi.testclient import TestClient

from metaflow_stack.http_guard import SESSION_COOKIE, Guard
from metaflow_stack.service.app import ServiceConfig, create_app
from metaflow_stack.ui.app import OPEN_PATHS, SIGN_IN
from metaflow_stack.ui.app import create_app as create_ui
from metaflow_stack.ui.local_runs import LocalRuns


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServiceConfig(database_url=str(tmp_path / "m.db"))), base_url=LOOPBACK) as client:
        yield client


def test_a_loopback_server_answers_only_to_loopback_names(service: TestClient) -> None:
    for name in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"):
        assert service.get("/ping", headers={"host": name.removeprefix("http://")}).status_code == 200
    # A page whose own name now resolves to 127.0.0.1 (DNS rebinding) sends that name.
    rebound = service.get("/flows", headers={"host": "attacker.example:8080"})
    assert rebound.status_code == 403 and rebound.json()["code"] == "forbidden_host"
    assert "attacker.example" in rebound.json()["message"]


def test_cross_site_pages_are_refused(service: TestClient) -> None:
    page = service.post("/flows/F", json={}, headers={"origin": "https://attacker.example"})
    assert page.status_code == 403 and page.json()["code"] == "forbidden_origin"
    assert service.get("/flows/F").status_code == 404  # nothing was written
    sandboxed = service.get("/flows", headers={"origin": "null"})
    assert sandboxed.status_code == 403
    same_site = service.post("/flows/F", json={}, headers={"origin": LOOPBACK})  # the page this server served
    assert same_site.status_code == 200


def test_names_an_operator_allows_and_addresses_it_binds(tmp_path: Path) -> None:
    config = ServiceConfig(database_url=str(tmp_path / "m.db"), host="10.1.2.3", allowed_hosts=("meta.internal",))
    with TestClient(create_app(config), base_url="http://meta.internal") as client:
        assert client.get("/ping").status_code == 200
        assert client.get("/ping", headers={"host": "10.1.2.3:8080"}).status_code == 200
        assert client.get("/ping", headers={"host": "other.internal"}).status_code == 403
    wildcard = Guard(bind="0.0.0.0")
    assert wildcard.accepts_host("anything.svc.cluster.local")  # reachable by any name; the key guards it
    assert not Guard(bind="0.0.0.0", allowed_hosts=("meta.internal",)).accepts_host("other.internal")


def test_the_ui_signs_a_browser_in_with_a_strict_session_cookie(tmp_path: Path) -> None:
    (tmp_path / ".metaflow").mkdir()
    guard = Guard(key="k3y", open_paths=OPEN_PATHS, cookie=True)
    app = create_ui(LocalRuns(tmp_path / ".metaflow"), live=False, guard=guard)
    with TestClient(app, base_url=LOOPBACK, follow_redirects=False) as browser:
        refused = browser.get("/api/flows")
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        assert browser.get("/health").status_code == 200  # the probe stays open
        assert browser.get(SIGN_IN, params={"key": "guess"}).status_code == 401
        signed_in = browser.get(SIGN_IN, params={"key": "k3y"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
        cookie = signed_in.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=k3y") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert browser.get("/api/flows").status_code == 200  # the cookie now rides along
        # A page elsewhere cannot ride on that session: its requests carry its own origin.
        assert browser.get("/api/flows", headers={"origin": "https://attacker.example"}).status_code == 403
        assert browser.get("/api/flows", headers={"x-api-key": "k3y"}).status_code == 200  # scripts send the header


@pytest.mark.parametrize(
    "command",
    [
        ("service", "serve", "--host", "0.0.0.0"),
        ("ui", "--host", "0.0.0.0", "--no-browser"),
        ("function", "serve", "no-such-reference.json", "--host", "0.0.0.0"),
    ],
    ids=["service", "ui", "function"],
)
def test_no_server_listens_beyond_loopback_without_a_key(command: tuple[str, ...]) -> None:
    refused = run_cli(*command, env={"METAFLOW_STACK_AUTH_KEY": "", "METAFLOW_STACK_SERVICE_AUTH_KEY": ""})
    assert refused.returncode == 1, refused.stderr
    assert "error: listening on 0.0.0.0 would let anyone" in refused.stderr
    assert "METAFLOW_STACK_AUTH_KEY" in refused.stderr and "--insecure-no-auth" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_probes_answer_by_any_address_and_malformed_headers_are_refused_not_errors() -> None:
    from starlette.datastructures import Headers

    guard = Guard(bind="0.0.0.0", key="k", allowed_hosts=("meta.internal",), open_paths=frozenset({"/health"}))
    # A kubelet probes by the pod's address, which no operator lists: probes reveal and change nothing.
    assert guard.refusal("/health", Headers({"host": "10.2.3.4:8080"})) is None
    assert guard.refusal("/flows", Headers({"host": "10.2.3.4:8080"}))[1] == "forbidden_host"
    assert guard.refusal("/flows", Headers({"host": "["}))[1] == "forbidden_host"
    assert guard.refusal("/flows", Headers({"host": "meta.internal", "origin": "http://["}))[1] == "forbidden_origin"


def test_on_loopback_a_page_must_come_from_this_servers_own_port() -> None:
    from starlette.datastructures import Headers

    guard = Guard(bind="127.0.0.1")
    own = Headers({"host": "127.0.0.1:8080", "origin": "http://127.0.0.1:8080"})
    other = Headers({"host": "127.0.0.1:8080", "origin": "http://localhost:3000"})  # another local program's page
    assert guard.refusal("/flows", own) is None
    assert guard.refusal("/flows", other)[1] == "forbidden_origin"
    assert Guard(bind="127.0.0.2").accepts_host("127.0.0.2")  # its own loopback address, as printed


def test_another_programs_malformed_cookie_does_not_hide_the_session() -> None:
    from starlette.datastructures import Headers

    guard = Guard(key="k3y", cookie=True)
    cookies = f'theirs={{"x": 1}}; {SESSION_COOKIE}=k3y'
    assert guard.refusal("/api/flows", Headers({"host": "127.0.0.1:8324", "cookie": cookies})) is None


def test_past_its_limit_a_busy_route_is_answered_503_before_its_body_is_read() -> None:
    """The key release's releases waited for a slot with their bodies read (300 on a PCCS that never answered
    held 540 MB): past the limit one more is turned away unread; other routes pass."""
    import asyncio
    import json

    from metaflow_stack.http_guard import BusyLimitMiddleware

    release = asyncio.Event()

    async def app(scope: dict, receive, send) -> None:
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = BusyLimitMiddleware(app, limit=2, paths=frozenset({"/v1/releases"}))

    async def call(path: str) -> tuple[int, bytes, int]:
        reads, sent = 0, []

        async def receive() -> dict:
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"x" * 1000, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
        await limited(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), reads

    async def scenario() -> list[tuple[int, bytes, int]]:
        waiting = [asyncio.ensure_future(call("/v1/releases")) for _ in range(2)]
        other = asyncio.ensure_future(call("/v1/nonces"))
        await asyncio.sleep(0.1)
        turned_away = await call("/v1/releases")
        release.set()
        return [turned_away, *await asyncio.gather(*waiting, other), await call("/v1/releases")]

    turned_away, *served = asyncio.run(scenario())
    assert turned_away[0] == 503 and turned_away[2] == 0  # (its body never read)
    assert json.loads(turned_away[1])["code"] == "busy"
    assert [status for status, _, _ in served] == [200, 200, 200, 200]
