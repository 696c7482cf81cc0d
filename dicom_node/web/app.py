"""The FastAPI application: wiring of auth, pages, API, health and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.view import ServiceView
from dicom_node.web import admin_api, api, inference_api, pages, queries, retrievals, stow
from dicom_node.web.auth import LoginLimiter, LoginRequired, Principal, check_routes
from dicom_node.web.checks import run_checks
from dicom_node.web.display import Clock, zone
from dicom_node.web.metrics import make_registry
from dicom_node.web.viewer import VolumeCache
from inference.results import product_version

HERE = Path(__file__).resolve().parent


def workers(service: ServiceView) -> dict[str, Any]:
    """Loop threads and the devices the local workers run on (no engine, no torch)."""
    device = ", ".join(service.devices) or None
    if device is None and service.settings.worker.broker_url:
        device = f"Celery workers (queue {service.settings.worker.celery_queue})"
    return {"threads": service.loops(), "device": device, "devices": list(service.devices)}


def identity(service: ServiceView) -> dict[str, Any]:
    """What the header of every page says about the node: AE title, address, version."""
    address = service.listener_address()
    return {
        "ae_title": service.settings.ae_title,
        "port": address[1] if address else service.settings.port,
        "version": product_version(),
    }


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
    app.state.limiter = LoginLimiter()
    app.state.slice_views = {}  # (user, result id) -> when its slices were last audited
    app.state.metrics = make_registry(service)
    app.state.clock = Clock(zone(service.settings))
    app.state.volumes = VolumeCache()  # the result viewer's last volumes
    node = service

    def viewer(who: Principal | None) -> queries.Viewer:
        """What ``who`` may see (patient IDs: operators and admins), with the catalog in
        force and the node's clock."""
        rules = node.rules.get() if node.rules is not None else None
        return queries.Viewer(
            settings=node.settings,
            sees_patient_ids=bool(who and who.sees_patient_ids),
            pipelines=rules.pipelines if rules is not None else None,
            clock=app.state.clock.short,
            study_timeout_s=rules.spec.study_timeout_s if rules is not None else None,
        )

    def dashboard(who: Principal | None = None) -> dict[str, Any]:
        with node.db.session() as s:
            data = queries.dashboard(s, viewer(who))
        data["workers"] = workers(node)
        data["destinations"] = [
            {**h, "pending": data["pending_sends"].get(name, 0)}
            for name, h in data["health"].items()
        ]
        return data

    app.state.viewer = viewer
    app.state.dashboard = dashboard
    app.state.identity = lambda: identity(node)

    @app.exception_handler(LoginRequired)
    def _to_login(request: Request, _exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={request.url.path}", 303)

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        """Liveness, open to load balancers: always 200 while the node serves, with
        ``status`` ok | degraded and the reasons (no patient data)."""
        return JSONResponse(run_checks(node).as_dict(), 200)

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Readiness: 503 when the node cannot take studies (database, spool, listener,
        loop threads); an unreachable destination alone does not make it unready."""
        checks = run_checks(node)
        return JSONResponse(checks.as_dict(), 200 if checks.ready else 503)

    @app.get("/metrics", tags=["health"])
    def metrics() -> Response:
        """Prometheus text format; counts only, no identifiers."""
        return Response(generate_latest(app.state.metrics), media_type=CONTENT_TYPE_LATEST)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(admin_api.router)
    app.include_router(inference_api.router)
    app.include_router(retrievals.router)
    app.include_router(stow.router)
    app.include_router(pages.router)
    app.include_router(retrievals.pages)
    check_routes(app)  # every route declares its role, or is open by design
    return app
