"""The interactive API docs work offline: /docs loads Swagger UI from the package, not a CDN."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from test_server_support import FakeBackend, make_models_dir
from underpaint.server.app import create_app
from underpaint.server.config import Credential, ServerConfig


def test_docs_page_uses_only_local_assets(tmp_path):
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False), loader=FakeBackend())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        page = client.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text) + re.findall(r"url: '([^']+)'", page.text)
        assert urls and all(u.startswith("/") for u in urls), urls
        for url in urls:
            assert client.get(url).status_code == 200, url
        assert client.get("/docs-assets/swagger-ui-bundle.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
        assert client.get("/docs-assets/../app.py").status_code == 404


def test_docs_assets_need_auth_when_auth_is_on(tmp_path):
    config = ServerConfig(models_dir=make_models_dir(tmp_path), preload=False, api_auth=(Credential("me", "pw"),))
    with TestClient(create_app(config, loader=FakeBackend()), base_url="http://127.0.0.1") as client:
        assert client.get("/docs").status_code == 401
        assert client.get("/docs-assets/swagger-ui.css").status_code == 401
        assert client.get("/docs-assets/swagger-ui.css", auth=("me", "pw")).status_code == 200
