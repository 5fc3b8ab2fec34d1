"""The HTTP API's wiring: ``create_app(runtime)``. It never talks to Kubernetes."""

from __future__ import annotations

import time

import structlog
from flask import Flask, Response, g, request

from services.api.admin import admin as admin_blueprint
from services.api.admin_failed import FailureIdConverter, admin_failed
from services.api.admin_regions import admin_regions
from services.api.context import RUNTIME_KEY
from services.api.docs import docs
from services.api.errors import register_error_handlers
from services.api.json_bodies import BoundedJSONProvider
from services.api.limits import install_limits
from services.api.metrics import metrics
from services.api.ops_ui import ops_ui
from services.api.views import blueprint
from shared.runtime import Runtime

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024


def create_app(runtime: Runtime) -> Flask:
    app = Flask("labvirt.api", static_folder=None)  # it serves no files of its own
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json = BoundedJSONProvider(app)
    app.json.sort_keys = False
    app.extensions[RUNTIME_KEY] = runtime
    register_error_handlers(app)

    @app.before_request
    def bind_request() -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            process="api", method=request.method, path=request.path
        )
        g.started = time.perf_counter()

    @app.after_request
    def log_request(response: Response) -> Response:
        elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        log.info("api.request", status=response.status_code, ms=round(elapsed, 1))
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    app.url_map.converters["failure"] = FailureIdConverter  # before the routes that use it
    app.register_blueprint(blueprint)
    app.register_blueprint(admin_blueprint)
    app.register_blueprint(admin_regions)
    app.register_blueprint(admin_failed)
    app.register_blueprint(docs)
    app.register_blueprint(metrics)
    app.register_blueprint(ops_ui)  # the operators' dashboard, /ui/ops
    install_limits(app)
    return app
