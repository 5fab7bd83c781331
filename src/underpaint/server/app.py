"""The app factory: routes, error handlers and the guards around them; ``run`` starts uvicorn.

Nothing happens at import. ``create_app`` builds one independent app per call; the model is
loaded by the first job (at start-up when ``preload`` is on), never while building the app.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from .a1111 import adetailer, controlnet, extras, generation, lists, settings
from .config import LOOPBACK_NAMES, ServerConfig
from .engine_slot import EngineLoader
from .errors import install_handlers
from .extra_networks import router as extra_networks_router
from .merger import router as merger_router
from .native import router as native_router
from .security import BasicAuth, BodyLimit, HostGuard, OriginGuard
from .state import ServerState

log = logging.getLogger("underpaint.server")

DESCRIPTION = """\
underpaint's HTTP API. `/sdapi/v1/*` speaks AUTOMATIC1111 1.10's API, so A1111 clients work
unchanged; `/underpaint/v1/*` adds the job queue, per-job progress and cancel.
Errors are JSON: `{"error": kind, "field": name or null, "detail": message}`.
"""


def engine_loader(config: ServerConfig) -> EngineLoader:
    """Load checkpoints (with a separate VAE file when sd_vae names one) with the server's device, dtype,
    memory mode, speed switches and VAE precision (torch is imported only here, on first load)."""

    def load(path: Path, vae: Path | None = None):
        from ..pipeline.engine import Engine

        return Engine.load(path, models_dir=config.models_dir, device=config.device, dtype=config.dtype,
                           vram=config.vram, optimize=config.optimize, attention=config.attention,
                           vae_precision=config.vae_precision, vae=vae)

    return load


def create_app(config: ServerConfig | None = None, *, loader: EngineLoader | None = None) -> FastAPI:
    """An app serving ``config``; ``loader`` replaces ``Engine.load`` (tests use a fake engine)."""
    config = config or ServerConfig()
    state = ServerState(config, loader or engine_loader(config))
    app = FastAPI(title="underpaint", version=__version__, description=DESCRIPTION, lifespan=_lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.underpaint = state
    install_handlers(app)
    for router in (generation.router, settings.router, lists.router, extras.router, controlnet.router,
                   adetailer.router, native_router, merger_router, extra_networks_router):
        app.include_router(router)
    _add_docs(app)

    @app.get("/internal/ping", summary="A1111's liveness check (launchers and health checks call it)")
    def ping() -> dict:
        return {}

    if config.webui:
        _mount_webui(app)
    _add_guards(app, config)
    return app


def _add_docs(app: FastAPI) -> None:
    """Interactive API docs at ``/docs`` from Swagger UI files shipped in the package (no CDN: offline)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    assets = Path(__file__).with_name("docs_assets")
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="underpaint API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


#: Paths that are the API's alone: the browser UI's files never answer for them.
API_PREFIXES = ("/sdapi/", "/controlnet/", "/adetailer/", "/underpaint/", "/internal/")


def _mount_webui(app: FastAPI) -> None:
    """The browser UI's static files at ``/``, after every API route so those match first.

    Starlette's StaticFiles serves only files inside its folder (it refuses ``..`` and links out).
    API paths are left to the API routes, so an unknown endpoint is a 404 and a known one called
    with the wrong method a 405, as in A1111 (not the static files' 405 or 404).
    """
    from fastapi.staticfiles import StaticFiles
    from starlette.routing import Match, Mount

    from ..webui import static_dir

    class WebUIMount(Mount):
        def matches(self, scope):
            if scope["type"] == "http" and scope["path"].startswith(API_PREFIXES):
                return Match.NONE, {}
            return super().matches(scope)

    folder = static_dir()
    if (folder / "index.html").is_file():
        app.router.routes.append(WebUIMount("/", app=StaticFiles(directory=folder, html=True), name="webui"))


def _add_guards(app: FastAPI, config: ServerConfig) -> None:
    """Middleware, innermost first (Starlette wraps each new one around the previous ones)."""
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(OriginGuard, allowed_origins=config.cors_allow_origins)
    if config.api_auth:
        app.add_middleware(BasicAuth, credentials=config.api_auth)
    if config.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=bool(config.api_auth),
                           expose_headers=[generation.JOB_HEADER])
    app.add_middleware(HostGuard, allowed=config.allowed_hosts, loopback_only=config.is_loopback)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.underpaint
    state.queue.start()
    if state.config.preload:
        _preload(state)
    try:
        yield
    finally:
        state.queue.stop()


def _preload(state: ServerState) -> None:
    """Load the default checkpoint in the background, as A1111 does at start-up; failures are logged."""
    job = state.queue.submit("load_checkpoint", lambda job: state.slot.engine_for())

    def report(future) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning("no model loaded at start-up: %s", exc)
        elif state.slot.info is not None:
            log.info("loaded %s", state.slot.info.name)

    job.future.add_done_callback(report)


def run(config: ServerConfig) -> None:
    """Serve until interrupted; refuses a network-facing start without credentials (unless insecure)."""
    import uvicorn

    config.check_exposure()
    if not config.is_loopback and not config.api_auth:
        log.warning("listening on %s without --api-auth (--insecure): anyone who can reach it can use it", config.host)
    app = create_app(config)
    shown = "localhost" if config.host in LOOPBACK_NAMES else config.host
    log.info("underpaint API on http://%s:%d (docs at /docs)", shown, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", server_header=False,
                timeout_keep_alive=5)
