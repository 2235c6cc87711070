"""/docs and /redoc work without the internet: every script, style and icon they load is served by us."""
from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import urljoin

import pytest


def asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html) + re.findall(
        r"""(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_page_loads_only_local_assets_and_each_is_served(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = asset_urls(response.text)
    assert any(url.endswith(".js") for url in urls) and "/openapi.json" in urls, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        assert client.get(urljoin(page, url)).status_code == 200, url
    assert not re.search(r"https?://", response.text), "an absolute URL in the page"


def test_the_root_leads_to_the_dashboard(client):
    response = client.get("/", follow_redirects=False)
    assert response.is_redirect and response.headers["location"] == "/dashboard"


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_the_docs_pages_send_the_dashboards_policy_and_admit_only_their_own_inline_scripts(client, page):
    response = client.get(page)
    assert response.status_code == 200
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"
    assert policy["base-uri"] == "'none'" and response.headers["x-content-type-options"] == "nosniff"
    inline = re.findall(r"<script>(.*?)</script>", response.text, re.S)
    hashes = {f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline}
    assert set(policy["script-src"].split()) == {"'self'", *hashes}, "an inline script the policy would block"
    assert (page == "/redoc") != bool(inline)  # Swagger's pages start from inline scripts; ReDoc's has none
