"""The node's web side: admin pages, JSON API, health and Prometheus metrics.

``create_app`` is imported lazily so that the one-line metric hooks in the DICOM stages
(``dicom_node.web.metrics``) do not pull in FastAPI.
"""

from __future__ import annotations

from typing import Any


def create_app(node: Any) -> Any:
    from dicom_node.web.app import create_app as _create_app

    return _create_app(node)


__all__ = ["create_app"]
