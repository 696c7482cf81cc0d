"""The FastAPI application: wiring of auth, pages, API, health and metrics."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from dicom_node.view import ServiceView
from dicom_node.web import api, inference_api, pages, queries
from dicom_node.web.auth import LoginLimiter, LoginRequired, SessionCodec, load_secret
from dicom_node.web.metrics import make_registry
from inference.results import product_version

HERE = Path(__file__).resolve().parent


def workers(service: ServiceView) -> dict[str, Any]:
    """Loop threads and the devices the local workers run on (no engine, no torch)."""
    device = ", ".join(service.devices) or None
    if device is None and service.settings.worker.broker_url:
        device = f"Celery workers (queue {service.settings.worker.celery_queue})"
    return {"threads": service.loops(), "device": device, "devices": list(service.devices)}


def create_app(service: ServiceView) -> FastAPI:
    """The web app of one node (pages, JSON API, path API, health, metrics)."""
    app = FastAPI(
        title="dicom-node",
        version=product_version(),
        openapi_url=None,  # served behind login at /api/openapi.json
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.sessions = SessionCodec(load_secret(service.settings.data_dir))
    app.state.limiter = LoginLimiter()
    app.state.echoes = {}  # destination name -> last C-ECHO {"at", "ok"}
    app.state.metrics = make_registry(service)
    node = service

    def dashboard() -> dict[str, Any]:
        with node.db.session() as s:
            data = queries.dashboard(s)
        data["workers"] = workers(node)
        data["destinations"] = [
            {
                "name": d.name,
                "ae_title": d.ae_title,
                "last_echo": app.state.echoes.get(d.name),
                "pending": data["pending_sends"].get(d.name, 0),
            }
            for d in node.settings.destinations
        ]
        return data

    app.state.dashboard = dashboard

    @app.exception_handler(LoginRequired)
    def _to_login(request: Request, _exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={request.url.path}", 303)

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        """Open to load balancers: no patient data, only yes/no checks and free space."""
        checks: dict[str, Any] = {}
        try:
            with node.db.session() as s:
                s.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # report, don't raise
            checks["database"] = f"error: {type(exc).__name__}"
        free = shutil.disk_usage(node.settings.spool_dir).free
        checks["spool_free_bytes"] = free
        checks["spool"] = "ok" if free >= node.settings.min_free_bytes else "below watermark"
        checks["scp_listening"] = node.listening()
        alive = node.loops()
        checks["threads"] = alive
        checks["workers_alive"] = all(alive.values())
        ok = (
            checks["database"] == "ok"
            and checks["spool"] == "ok"
            and checks["scp_listening"]
            and checks["workers_alive"]
        )
        return JSONResponse({"status": "ok" if ok else "degraded", **checks}, 200 if ok else 503)

    @app.get("/metrics", tags=["health"])
    def metrics() -> Response:
        """Prometheus text format; counts only, no identifiers."""
        return Response(generate_latest(app.state.metrics), media_type=CONTENT_TYPE_LATEST)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(inference_api.router)
    app.include_router(pages.router)
    return app
