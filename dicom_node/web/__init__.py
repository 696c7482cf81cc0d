"""The node's web side: admin pages, JSON API, health and Prometheus metrics.

``create_app`` takes the node's ``ServiceView`` and is imported lazily, so importing this
package does not pull in FastAPI.
"""

from __future__ import annotations

from typing import Any


def create_app(service: Any) -> Any:
    from dicom_node.web.app import create_app as _create_app

    return _create_app(service)


__all__ = ["create_app"]
