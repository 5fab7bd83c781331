"""Each safety rule of the server has a test: auth, origins, hosts, body size, pixel bombs, base64, URLs."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from test_server_support import FakeBackend, live_server, make_models_dir, png_b64
from underpaint.errors import InvalidParameter, UnderpaintError
from underpaint.server.app import create_app
from underpaint.server.config import Limits, ServerConfig, parse_api_auth

SMALL = {"width": 64, "height": 64, "steps": 1}


def _app(tmp_path, **config):
    return create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False, **config), loader=FakeBackend())


@pytest.fixture()
def client(tmp_path):
    with TestClient(_app(tmp_path), base_url="http://127.0.0.1") as c:
        yield c


def _routes(app):
    """Every (method, path) the app serves, with path parameters filled in: the API from its
    OpenAPI document (independent of how FastAPI stores included routers), plus the docs."""
    for path, operations in app.openapi()["paths"].items():
        for method in operations:
            yield method.upper(), path.replace("{job_id}", "some-job")
    yield from (("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/docs/oauth2-redirect"))


# --------------------------------------------------------------------------- HTTP Basic


def test_auth_is_required_on_every_route(tmp_path):
    app = _app(tmp_path, api_auth=parse_api_auth("alice:wonder:land,bob:builder"))
    routes = list(_routes(app))
    assert len(routes) > 40 and ("GET", "/docs") in routes and ("GET", "/openapi.json") in routes
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for method, path in routes + [("GET", "/no/such/route")]:
            for auth in (None, ("alice", "wrong"), ("mallory", "wonder:land"), ("bob", "wonder:land")):
                r = c.request(method, path, auth=auth, json={})
                assert r.status_code == 401, (method, path, auth, r.status_code)
                assert r.headers["WWW-Authenticate"].startswith("Basic")
                assert r.json()["error"] == "unauthorized"
        # The right passwords (one containing ':') open every route.
        assert c.get("/sdapi/v1/sd-models", auth=("alice", "wonder:land")).status_code == 200
        assert c.get("/openapi.json", auth=("bob", "builder")).status_code == 200
        r = c.post("/sdapi/v1/txt2img", json=SMALL, auth=("bob", "builder"))
        assert r.status_code == 200
        # Malformed headers are refused, not crashed on.
        for header in ("Basic", "Basic !!!", "Bearer abc", "Basic " + base64.b64encode(b"nocolon").decode()):
            assert c.get("/sdapi/v1/options", headers={"Authorization": header}).status_code == 401


def test_listen_without_auth_refuses_to_start():
    with pytest.raises(UnderpaintError, match="--api-auth"):
        ServerConfig(host="0.0.0.0").check_exposure()
    ServerConfig(host="0.0.0.0", insecure=True).check_exposure()
    ServerConfig(host="0.0.0.0", api_auth=parse_api_auth("a:b")).check_exposure()
    ServerConfig().check_exposure()  # 127.0.0.1


def test_serve_cli_refuses_listen_without_auth(monkeypatch):
    from underpaint.cli.main import main

    monkeypatch.delenv("UNDERPAINT_API_AUTH", raising=False)
    assert main(["serve", "--listen"]) == 2


def test_serve_cli_builds_the_config(monkeypatch):
    import argparse

    from underpaint.server.cli import add_serve_command, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    monkeypatch.setenv("UNDERPAINT_API_AUTH", "u:hunter2")
    args = parser.parse_args(["serve", "--listen", "--port", "9000", "--cors-allow-origins", "http://a.test, http://b.test",
                              "--queue-size", "3", "--max-steps", "40", "--max-body-mb", "2"])
    config = config_from_args(args)
    assert (config.host, config.port, config.queue_size) == ("0.0.0.0", 9000, 3)
    assert config.api_auth[0].user == "u" and "hunter2" not in repr(config.api_auth)
    assert config.cors_allow_origins == ("http://a.test", "http://b.test")
    assert config.limits.max_steps == 40 and config.limits.max_body_bytes == 2 * 2**20
    config.check_exposure()


@pytest.mark.parametrize(("text", "secret"), [("nocolon", "nocolon"), ("user:", None), (":hunter2", "hunter2"),
                                              ("a:b,,", None)])
def test_bad_api_auth_never_echoes_the_password(text, secret):
    with pytest.raises(UnderpaintError) as exc:
        parse_api_auth(text)
    assert "api_auth" in str(exc.value)
    if secret:
        assert secret not in str(exc.value)


# --------------------------------------------------------------------------- origins, CORS, hosts


def test_cross_origin_state_changes_are_refused(client):
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "http://localhost:3000"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        for path in ("/sdapi/v1/txt2img", "/sdapi/v1/options", "/sdapi/v1/interrupt"):
            r = client.post(path, json=SMALL, headers=headers)
            assert r.status_code == 403, (path, headers)
            assert r.json()["error"] == "cross_origin"
    # Reading is not a state change; same-origin pages and non-browser clients may post.
    assert client.get("/sdapi/v1/options", headers={"Origin": "http://evil.example"}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json=SMALL, headers={"Origin": "http://127.0.0.1"}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json=SMALL, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


def test_cors_is_off_by_default(client):
    r = client.options("/sdapi/v1/txt2img", headers={"Origin": "http://app.example",
                                                    "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/sdapi/v1/options", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in r.headers


def test_configured_cors_origin_may_call(tmp_path):
    app = _app(tmp_path, cors_allow_origins=("http://app.example",))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        pre = c.options("/sdapi/v1/txt2img", headers={"Origin": "http://app.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        r = c.post("/sdapi/v1/txt2img", json=SMALL, headers={"Origin": "http://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert c.post("/sdapi/v1/txt2img", json=SMALL, headers={"Origin": "http://other.example"}).status_code == 403


def test_foreign_host_names_are_refused_on_loopback(tmp_path):
    """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name as Host."""
    with TestClient(_app(tmp_path), base_url="http://attacker.example:7860") as c:
        r = c.get("/sdapi/v1/options")
        assert r.status_code == 403 and r.json()["error"] == "forbidden_host"
    for base in ("http://localhost:7860", "http://127.0.0.1", "http://[::1]:7860"):
        with TestClient(_app(tmp_path), base_url=base) as c:
            assert c.get("/sdapi/v1/options").status_code == 200, base
    with TestClient(_app(tmp_path, allowed_hosts=("sd.example",)), base_url="http://sd.example") as c:
        assert c.get("/sdapi/v1/options").status_code == 200
    with TestClient(_app(tmp_path), base_url="http://127.0.0.1") as c:  # malformed IPv6 literals: refused, no 500
        r = c.get("/sdapi/v1/options", headers={"Host": "[::1"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden_host"
        r = c.post("/sdapi/v1/options", json={}, headers={"Origin": "http://[::1", "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403 and r.json()["error"] == "cross_origin"


# --------------------------------------------------------------------------- body size


def _asgi_post(app, chunks, headers=()):
    """Drive the ASGI app directly with a streamed body; returns (status, body, bytes the app pulled)."""
    sent = {"count": 0, "status": None, "body": b""}
    pending = list(chunks)

    async def receive():
        if pending:
            chunk = pending.pop(0)
            sent["count"] += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    scope = {"type": "http", "method": "POST", "path": "/sdapi/v1/txt2img", "raw_path": b"/sdapi/v1/txt2img",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                                              *headers], "scheme": "http", "http_version": "1.1",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return sent["status"], sent["body"], sent["count"]


def test_body_limit_counts_streamed_bytes(tmp_path):
    limit = 1 << 20
    app = _app(tmp_path, limits=Limits(max_body_bytes=limit))
    chunk = b" " * 65536
    chunks = [chunk] * (100 * 16)  # 100 MiB, but only references to one 64 KiB buffer
    status, body, pulled = _asgi_post(app, chunks)
    assert status == 413 and b"body_too_large" in body
    assert pulled <= limit + len(chunk)  # stopped reading right after the limit


def test_body_limit_trusts_a_large_content_length_at_once(tmp_path):
    app = _app(tmp_path, limits=Limits(max_body_bytes=1 << 20))
    status, body, pulled = _asgi_post(app, [b"{}"], headers=[(b"content-length", str(100 << 20).encode())])
    assert status == 413 and pulled == 0


def test_json_values_are_bounded_before_parsing(tmp_path):
    """50 MB of "{}," parses into 17 million objects (over a gigabyte, half a minute of the event
    loop): a body may hold at most max_json_values values; text in strings does not count."""
    backend = FakeBackend()
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False,
                                  limits=Limits(max_json_values=50)), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for path, payload in (("/sdapi/v1/txt2img", {**SMALL, "script_args": [1] * 60}),
                              ("/sdapi/v1/txt2img", {**SMALL, "comments": {"a": [{}] * 30, "b": [[]] * 30}}),
                              ("/sdapi/v1/options", {f"setting{i}": i for i in range(60)}),
                              ("/sdapi/v1/png-info", {"image": "x", "more": [0] * 60})):
            r = c.post(path, json=payload)
            assert r.status_code == 413 and r.json()["field"] == "body", (path, r.text[:200])
            assert "at most 50" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "[a|b], {c}, " * 200, "script_args": [1] * 20})
        assert r.status_code == 200, r.text[:200]
        assert len(backend.calls) == 1
    with TestClient(_app(tmp_path), base_url="http://127.0.0.1") as c:  # the default limit: 100000
        r = c.post("/sdapi/v1/txt2img", content=b'{"comments": [' + b"{}," * 200_000 + b"{}]}",
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "at most 100000" in r.json()["detail"]


def _raw_http(port: int, head: bytes, body_chunks=(), chunked=False) -> tuple[bytes, int]:
    """Send a request by hand (the body from a second thread, as a client streaming an upload would);
    returns the response and how many body bytes the server took before answering."""
    import threading

    written = {"bytes": 0}
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)

        def upload():
            try:
                for chunk in body_chunks:
                    s.sendall((b"%x\r\n" % len(chunk) + chunk + b"\r\n") if chunked else chunk)
                    written["bytes"] += len(chunk)
            except OSError:  # the server answered and closed: stop uploading
                pass

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        response = b""
        try:
            while not response.endswith(b"}"):
                more = s.recv(65536)
                if not more:
                    break
                response += more
        except (ConnectionResetError, socket.timeout):
            pass
        s.shutdown(socket.SHUT_RDWR)
        sender.join(30)
    return response, written["bytes"]


def test_100_mb_body_is_refused_by_the_real_server(tmp_path):
    app = _app(tmp_path)  # default limit: 50 MiB
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        head = (b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (100 << 20))
        response, _ = _raw_http(port, head)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        # Without a Content-Length (chunked), the server counts and answers once past the limit.
        head = (b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * (1 << 20)
        response, written = _raw_http(port, head, [chunk] * 100, chunked=True)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert written < 100 << 20
        assert httpx.get(base + "/sdapi/v1/options").status_code == 200  # still serving


# --------------------------------------------------------------------------- images


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_pixel_bomb_is_refused_before_decoding(client):
    bomb = base64.b64encode(_png_claiming(100_000, 100_000)).decode()
    r = client.post("/sdapi/v1/img2img", json={"init_images": [bomb], **SMALL})
    assert r.status_code == 422 and r.json()["field"] == "init_images[0]"
    assert "pixels" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={"init_images": [png_b64(Image.new("RGB", (8, 8)))], "mask": bomb, **SMALL})
    assert r.status_code == 422 and r.json()["field"] == "mask"


def test_server_pixel_limit_applies(tmp_path):
    with TestClient(_app(tmp_path, limits=Limits(max_image_pixels=100 * 100)), base_url="http://127.0.0.1") as c:
        r = c.post("/sdapi/v1/img2img", json={"init_images": [png_b64(Image.new("RGB", (101, 100)))], **SMALL})
        assert r.status_code == 422 and r.json()["field"] == "init_images[0]"


@pytest.mark.parametrize("data", ["not base64 at all!", "aGVsbG8gd29ybGQ=", "", "data:image/png;base64,@@@@",
                                  base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()])
def test_bad_base64_and_bad_images_name_the_field(client, data):
    good = png_b64(Image.new("RGB", (8, 8)))
    r = client.post("/sdapi/v1/img2img", json={"init_images": [good, data], **SMALL})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "init_images[1]"
    r = client.post("/sdapi/v1/img2img", json={"init_images": [good], "mask": data or "x", **SMALL})
    assert r.status_code == 422 and r.json()["field"] == "mask"
    r = client.post("/sdapi/v1/png-info", json={"image": data})
    assert r.status_code == 422 and r.json()["field"] == "image"


def test_wrong_types_are_422_not_500(client):
    for payload in ({"init_images": "abc"}, {"init_images": [1, 2]}, {"mask": 5}, {"steps": [1]},
                    {"override_settings": []}, {"alwayson_scripts": {"controlnet": {"args": "x"}}}):
        r = client.post("/sdapi/v1/img2img", json={"init_images": [png_b64(Image.new("RGB", (8, 8)))], **SMALL, **payload})
        assert r.status_code == 422, (payload, r.text)
        assert r.json()["field"]
    for raw in (b"{", b"[]", b"null", b"\xff\xfe"):
        r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, raw


@pytest.mark.parametrize(("payload", "field"), [
    ({"steps": 151}, "steps"), ({"width": 8192}, "width"), ({"height": 5000}, "height"),
    ({"batch_size": 9}, "batch_size"), ({"batch_size": 8, "n_iter": 9}, "n_iter"),
])
def test_workload_limits(client, payload, field):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **payload})
    assert r.status_code == 422 and r.json()["field"] == field
    assert "limit" in r.json()["detail"]


def test_pictures_per_request_are_counted_before_decoding(tmp_path):
    """Thousands of small PNGs that each decode to the pixel limit would take all the memory: a
    request carries at most max_input_images pictures, whichever fields they are in."""
    tiny = png_b64(Image.new("RGB", (8, 8)))
    with TestClient(_app(tmp_path, limits=Limits(max_input_images=3)), base_url="http://127.0.0.1") as c:
        assert c.post("/sdapi/v1/img2img", json={"init_images": [tiny] * 3, **SMALL}).status_code == 200
        unit = {"image": tiny, "module": "none"}
        for payload, field in (({"init_images": [tiny] * 4}, "init_images"),
                               ({"init_images": [tiny] * 3, "mask": tiny}, "mask"),
                               ({"init_images": [tiny] * 2, "alwayson_scripts": {"controlnet": {"args": [unit, unit]}}},
                                "alwayson_scripts.controlnet.args[1].image")):
            r = c.post("/sdapi/v1/img2img", json={**payload, **SMALL})
            assert r.status_code == 422 and r.json()["field"] == field, (field, r.text[:300])
            assert "at most 3 pictures" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit] * 4}}})
        assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.controlnet.args[3].image"
        r = c.post("/controlnet/detect", json={"controlnet_module": "none", "controlnet_input_images": [tiny] * 4})
        assert r.status_code == 422 and r.json()["field"] == "controlnet_input_images"
        r = c.post("/controlnet/detect", json={"controlnet_module": "none", "controlnet_input_images": [tiny] * 2,
                                               "controlnet_masks": [tiny] * 2})
        assert r.status_code == 422 and r.json()["field"] == "controlnet_masks"
        files = [{"data": tiny, "name": f"{i}.png"} for i in range(4)]
        r = c.post("/sdapi/v1/extra-batch-images", json={"imageList": files, "upscaler_1": "Nearest"})
        assert r.status_code == 422 and r.json()["field"] == "imageList"
        assert c.post("/sdapi/v1/extra-batch-images", json={"imageList": files[:3], "upscaler_1": "Nearest"}).status_code == 200
    with TestClient(_app(tmp_path), base_url="http://127.0.0.1") as c:  # the default limit: 16
        r = c.post("/sdapi/v1/img2img", json={"init_images": [tiny] * 17, **SMALL})
        assert r.status_code == 422 and "at most 16 pictures" in r.json()["detail"]


def test_prompt_text_styles_and_lora_tags_are_bounded(tmp_path):
    """A megabyte prompt (encoded again for each step of an alternation), styles that grow the
    prompt each time they apply, or thousands of LoRA merges would hold the engine for hours."""
    styles = tmp_path / "styles.csv"
    styles.write_text("name,prompt,negative_prompt\nplain,film grain,\ntwice,{prompt} {prompt},\n")
    limits = Limits(max_prompt_chars=100, max_styles=3, max_lora_tags=2, max_prompt_parts=3)
    backend = FakeBackend()
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False, styles_file=styles,
                                  limits=limits), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        def refused(payload, field, words):
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, **payload})
            assert r.status_code == 422 and r.json()["field"] == field, (payload, r.text[:300])
            assert words in r.json()["detail"], r.json()["detail"]

        for field in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            refused({field: "x" * 101, "enable_hr": True}, field, "at most 100 characters")
        refused({"styles": ["plain"] * 4}, "styles", "at most 3")
        refused({"prompt": "a cat " * 5, "styles": ["twice"] * 3}, "styles", "within 100 characters")
        refused({"prompt": "<lora:a:1> <lyco:b:1> <lora:a:0.5>"}, "prompt", "at most 2")
        refused({"prompt": "a AND b AND c AND d"}, "prompt", "at most 3")  # AND parts: each a UNet input
        assert backend.calls == []
        ok = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a cat", "negative_prompt": "y" * 100,
                                               "styles": ["twice", "plain", "twice"]})
        assert ok.status_code == 200 and backend.calls == ["a cat a cat, film grain a cat a cat, film grain"]
        refused({"prompt": "<lora:a:1> <hypernet:b:1> <lora:c:1>"}, "prompt", "at most 2")
        assert c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "<lora:a:1> <embedding:b:1> <hypernet:c:1>"}
                      ).status_code == 200  # only LoRA and hypernetwork tags count
    with TestClient(_app(tmp_path), base_url="http://127.0.0.1") as c:  # the default limit: 32768 characters
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "[cat|dog] " * 100_000})
        assert r.status_code == 422 and r.json()["field"] == "prompt" and "32768" in r.json()["detail"]


def test_text_must_be_valid_unicode(tmp_path):
    """JSON may hold a lone surrogate, which no UTF-8 encoder takes: it used to run the job, then
    fail writing the infotext or the response with a 500."""
    backend = FakeBackend()
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for field, value in (("prompt", '"a \\ud800 cat"'), ("negative_prompt", '"\\udfff"'),
                             ("hr_prompt", '"\\ud83d"'), ("infotext", '"x \\ud800"'),
                             ("override_settings", '{"note": ["\\ud800"]}')):
            body = '{"width": 64, "height": 64, "steps": 1, "enable_hr": true, "%s": %s}' % (field, value)
            r = c.post("/sdapi/v1/txt2img", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and r.json()["field"] == field, (field, r.text[:300])
            assert "lone surrogate" in r.json()["detail"]
        for path, body, field in (("/underpaint/v1/token-count", '{"prompt": "\\ud800 cat"}', "prompt"),
                                  ("/underpaint/v1/prompt-styles", '{"name": "s\\ud800"}', "name"),
                                  ("/underpaint/v1/merge-checkpoints",
                                   '{"primary_model_name": "a", "custom_name": "x\\ud800"}', "custom_name")):
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and r.json()["field"] == field, (path, r.text[:300])
        assert backend.calls == []
        ok = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a cat \U0001f431 é"})  # a real emoji is fine
        assert ok.status_code == 200 and backend.calls == ["a cat \U0001f431 é"]


def test_non_finite_numbers_in_controlnet_units_are_422(client):
    """Python clients may send NaN or Infinity inside the free-form ControlNet units."""
    tiny = png_b64(Image.new("RGB", (8, 8)))
    for key in ("processor_res", "threshold_a", "threshold_b", "weight", "guidance_end"):
        for value in ("NaN", "Infinity", "-Infinity"):
            body = ('{"width": 64, "height": 64, "steps": 1, "init_images": ["%s"], "alwayson_scripts": '
                    '{"controlnet": {"args": [{"image": "%s", "module": "none", "%s": %s}]}}}' % (tiny, tiny, key, value))
            r = client.post("/sdapi/v1/img2img", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (key, value, r.text[:300])
            assert r.json()["field"] == f"alwayson_scripts.controlnet.args[0].{key}"


def test_checkpoint_names_are_never_paths(tmp_path):
    """A checkpoint is named as /sd-models lists it; a path in a request is never looked up on the
    server's disk (an absolute path, a Windows share, a name longer than the file system takes),
    and the answer does not say whether the file exists or where the models folder is."""
    there, missing = tmp_path / "zz1.safetensors", tmp_path / "zz2.safetensors"
    there.write_bytes(b"placeholder")
    backend = FakeBackend()
    models = make_models_dir(tmp_path / "models")
    app = create_app(ServerConfig(models_dir=models, preload=False), loader=backend)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        def refusals(name):
            for r in (c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": name}}),
                      c.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})):
                assert r.status_code == 404 and r.json()["field"] == "sd_model_checkpoint", (name[:80], r.text[:300])
                assert str(models) not in r.json()["detail"].replace(name, ""), r.json()["detail"]
                yield r.json()["detail"]

        for name in (str(models / "checkpoints" / "alpha.safetensors"), "../zz1.safetensors",
                     "\\\\server\\share\\alpha.safetensors", "a" * 300, "b/" * 3000):
            assert all("is not a checkpoint in the models folder" in d for d in refusals(name))
        # The same answer whether the file exists or not.
        assert [d.replace("zz1", "zzN") for d in refusals(str(there))] == \
            [d.replace("zz2", "zzN") for d in refusals(str(missing))]
        assert backend.loads == []
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "alpha.safetensors"}).status_code == 200


def test_image_urls_are_refused_by_default(client):
    r = client.post("/sdapi/v1/img2img", json={"init_images": ["http://169.254.169.254/latest/meta-data"], **SMALL})
    assert r.status_code == 422 and r.json()["field"] == "init_images[0]" and "URL" in r.json()["detail"]


def test_allowed_image_urls_still_never_reach_private_addresses(tmp_path):
    with TestClient(_app(tmp_path, allow_image_urls=True), base_url="http://127.0.0.1") as c:
        for url in ("http://127.0.0.1:1/x.png", "http://169.254.169.254/", "https://10.0.0.1/a.png",
                    "http://[::1]/a.png", "http://localhost/a.png"):
            r = c.post("/sdapi/v1/img2img", json={"init_images": [url], **SMALL})
            assert r.status_code == 422 and "private or local" in r.json()["detail"], (url, r.text)


@pytest.mark.parametrize("drip", ["headers", "body", "none"])
def test_an_allowed_image_url_has_a_deadline(monkeypatch, drip):
    """The socket timeout bounds each read, not the fetch: a server sending a byte now and then
    held a request thread for as long as it liked. (The public-address check is bypassed so
    the test can serve from 127.0.0.1.)"""
    import threading
    import time

    from underpaint.errors import ImageError
    from underpaint.server import fetch

    monkeypatch.setattr(fetch, "_public_addresses", lambda host, port, field: ["127.0.0.1"])
    done = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
            if drip == "none":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nimage")
                return
            data = head + b"x" * 100000 if drip == "body" else head
            sent = len(head) if drip == "body" else 0
            if drip == "body":
                conn.sendall(head)
            try:
                while not done.is_set() and sent < len(data):
                    conn.sendall(data[sent:sent + 1])
                    sent += 1
                    time.sleep(0.05)
            except OSError:
                pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        url = f"http://images.example:{port}/a.png"
        if drip == "none":
            assert fetch.fetch_image_bytes(url, field="init_images[0]", max_bytes=100, deadline=5) == b"image"
        else:
            with pytest.raises(ImageError, match="did not arrive within 0.5 s") as exc:
                fetch.fetch_image_bytes(url, field="init_images[0]", max_bytes=1 << 20, timeout=5, deadline=0.5)
            assert exc.value.field == "init_images[0]"
    finally:
        done.set()
        server.join(5)
        listener.close()


def test_no_route_serves_files_by_path(client):
    from pathlib import Path

    from starlette.routing import Mount

    import underpaint.server.app
    from underpaint.webui import static_dir

    app = client.app
    mounts = [route for route in app.routes if isinstance(route, Mount)]
    docs = Path(underpaint.server.app.__file__).with_name("docs_assets")
    # Only fixed folders of the package: the API docs' assets and the UI.
    assert [(m.path, str(m.app.directory)) for m in mounts] == [("/docs-assets", str(docs)), ("", str(static_dir()))]
    for path, operations in app.openapi()["paths"].items():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                assert param["in"] != "path" or param["name"] == "job_id", (path, param)
    for path in ("/file=/etc/passwd", "/sdapi/v1/../../etc/passwd", "/static/../../etc/passwd", "/..%2f..%2fetc/passwd",
                 "/%2e%2e/%2e%2e/etc/passwd", "/../pyproject.toml", "/..%2f__init__.py"):
        r = client.get(path)
        assert r.status_code == 404 and "root:" not in r.text and "underpaint" not in r.text.lower(), path
        assert r.json()["error"] == "not_found"
    assert client.get("/").status_code == 200 and "<html" in client.get("/").text.lower()  # the UI itself


def test_errors_are_json_everywhere(client):
    assert client.get("/nope").json()["error"] == "not_found"
    assert client.put("/sdapi/v1/txt2img").json()["error"] == "method_not_allowed"
    assert client.get("/sdapi/v1/nope").json()["error"] == "not_found"


def test_underpaint_serve_starts_on_loopback_and_stops(tmp_path):
    """The real command in a subprocess: binds 127.0.0.1 by default, answers, and shuts down cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_server_support import free_port

    port = free_port()
    env = {**os.environ, "UNDERPAINT_API_AUTH": ""}
    proc = subprocess.Popen([sys.executable, "-m", "underpaint", "serve", "--port", str(port), "--models-dir",
                             str(tmp_path), "--nowebui"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        assert r.status_code == 200 and r.json() == []
        flags = httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/cmd-flags").json()
        assert flags["listen"] is False and flags["nowebui"] is True and flags["port"] == port
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 404  # --nowebui
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, 130), output
    assert "no model loaded at start-up" in output  # an empty folder is reported, not fatal


def test_model_files_whose_names_are_not_utf8_are_left_out_of_listings(tmp_path, caplog):
    """POSIX file names are bytes: one that is not UTF-8 cannot be sent as JSON, so it is left out
    (with a warning) instead of turning the whole listing into a 500."""
    root = make_models_dir(tmp_path)
    for sub, good in (("checkpoints", None), ("loras", "ink.safetensors"), ("embeddings", "grain.pt"),
                      ("controlnet", "control_canny.safetensors")):
        (root / sub).mkdir(exist_ok=True)
        if good:
            (root / sub / good).write_bytes(b"placeholder")
        try:
            with open(os.path.join(os.fsencode(root / sub), b"caf\xff.safetensors"), "wb") as f:
                f.write(b"placeholder")
        except OSError:
            pytest.skip("this file system refuses names that are not UTF-8")
    with TestClient(create_app(ServerConfig(models_dir=root, preload=False)), base_url="http://127.0.0.1") as c:
        r = c.get("/sdapi/v1/sd-models")
        assert r.status_code == 200 and sorted(m["model_name"] for m in r.json()) == ["alpha", "beta"]
        r = c.get("/sdapi/v1/loras")
        assert r.status_code == 200 and [m["name"] for m in r.json()] == ["ink"]
        r = c.get("/controlnet/model_list")
        assert r.status_code == 200 and all("caf" not in m for m in r.json()["model_list"])
        assert c.get("/sdapi/v1/embeddings").status_code == 200
    assert "not valid UTF-8" in caplog.text


def test_extras_requests_run_one_at_a_time(tmp_path, monkeypatch):
    """Each Extras request may hold max_input_images pictures at the pixel limit: they never overlap."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from underpaint.server.a1111 import extras

    running, most = [0], [0]
    lock = threading.Lock()
    real = extras._process_now

    def counted(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        try:
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(extras, "_process_now", counted)
    tiny = png_b64(Image.new("RGB", (8, 8)))
    with live_server(_app(tmp_path)) as base, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: httpx.post(base + "/sdapi/v1/extra-single-image", timeout=30,
                                                     json={"image": tiny, "upscaler_1": "Nearest"}), range(3)))
    assert [r.status_code for r in answers] == [200, 200, 200] and most[0] == 1



def test_override_settings_and_unit_switches_are_checked_for_every_request(client):
    """override_settings' upscaler and samples_format are checked on txt2img too (as /options checks them),
    a ControlNet unit's pixel_perfect must be a boolean, and a LoRA multiplier of 1e30 is refused by name."""
    from underpaint.models.lora import LoraRequest

    base = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    for overrides, field in (({"upscaler_for_img2img": "../../x"}, "override_settings.upscaler_for_img2img"),
                             ({"samples_format": "../../x"}, "override_settings.samples_format")):
        r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": overrides})
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    unit = {"enabled": True, "module": "canny", "image": png_b64(Image.new("RGB", (64, 64))), "pixel_perfect": "yes"}
    r = client.post("/sdapi/v1/txt2img", json={**base, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 422 and r.json()["field"].endswith("pixel_perfect"), r.text
    with pytest.raises(InvalidParameter, match="-100 to 100"):
        LoraRequest.from_args("style", ("1e30",))
    assert LoraRequest.from_args("style", ("-2.5",)).te == -2.5
