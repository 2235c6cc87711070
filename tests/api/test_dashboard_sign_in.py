"""Every dashboard page sends a visitor who is not signed in to the sign-in page, and back after."""
from __future__ import annotations

from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_TOKEN

OPEN = {"/dashboard", "/dashboard/login", "/dashboard/logout", "/dashboard/static/{name}"}
# The event stream is fetched by a page script, which cannot follow a redirect to a form: a 401 there.
API_LIKE = {"/dashboard/jobs/{job_id}/events"}
SOME_JOB = "0123456789abcdef"


def guarded_pages() -> list[tuple[str, str]]:
    from api.dashboard.routes import router

    found = []
    for route in router.routes:
        path = route.path
        if path not in OPEN | API_LIKE:
            found += [(method, path.replace("{job_id}", SOME_JOB)) for method in sorted(route.methods - {"HEAD"})]
    return found


def test_the_pages_are_found():
    assert ("GET", "/dashboard/jobs") in guarded_pages() and ("POST", f"/dashboard/jobs/{SOME_JOB}/cancel") in guarded_pages()


@pytest.mark.parametrize("cookie", [None, "gs_unknown_token"], ids=["no cookie", "unknown token"])
def test_every_page_sends_a_visitor_not_signed_in_to_sign_in_and_back(client, cookie):
    visitor = TestClient(client.app, follow_redirects=False, cookies={"gs_session": cookie} if cookie else None)
    for method, path in guarded_pages():
        response = visitor.request(method, path, params={"limit": 5} if method == "GET" else None)
        target = path + ("?limit=5" if method == "GET" else "")
        assert response.status_code == 303, (method, path, response.text)
        assert response.headers["location"] == f"/dashboard/login?next={quote(target, safe='')}", (method, path)


def test_a_signed_in_visitor_gets_the_pages(client):
    member = TestClient(client.app, follow_redirects=False, cookies={"gs_session": ADMIN_TOKEN})
    assert member.get("/dashboard/jobs").status_code == 200
    assert member.get("/dashboard/compare").status_code == 200
    assert member.get(f"/dashboard/jobs/{SOME_JOB}").status_code == 404  # past the guard: no such job
    assert member.post(f"/dashboard/jobs/{SOME_JOB}/cancel").status_code == 403  # past the guard: no CSRF token


def test_keys_are_issued_listed_and_revoked_on_the_dashboard(client):
    admin = TestClient(client.app, follow_redirects=False, cookies={"gs_session": ADMIN_TOKEN})
    page = admin.get("/dashboard/keys")
    assert page.status_code == 200 and 'id="new-key"' in page.text
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    assert admin.post("/dashboard/keys", data={"name": "team-a"}).status_code == 403  # no CSRF token
    issued = admin.post("/dashboard/keys", data={"name": "team-a", "csrf": csrf})
    assert issued.status_code == 200 and "shown this once" in issued.text
    token = issued.text.split('id="created-token">')[1].split("<")[0]
    key_id = issued.text.split('<th>id</th><td class="mono">')[1].split("<")[0]

    tenant = TestClient(client.app, follow_redirects=False, cookies={"gs_session": token})
    own = tenant.get("/dashboard/keys")
    assert own.status_code == 200 and own.text.count("data-key-id=") == 1 and 'id="new-key"' not in own.text
    tenant_csrf = own.text.split('name="csrf" value="')[1].split('"')[0]
    assert tenant.post("/dashboard/keys", data={"name": "sneaky", "csrf": tenant_csrf}).status_code == 403
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    revoked = admin.post(f"/dashboard/keys/{key_id}/revoke", data={"csrf": csrf})
    assert revoked.status_code == 303
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert tenant.get("/dashboard/keys").status_code == 303  # its session ended with the key
