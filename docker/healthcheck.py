"""Container health check, the HEALTHCHECK of the docker/Dockerfile.* images.

    healthcheck.py          the mode of the running `dicom-node` command (serve or worker)
    healthcheck.py web      GET http://127.0.0.1:$DICOM_NODE_WEB__PORT/healthz (default 8080):
                            healthy while the node serves (200, also when "degraded": its
                            reasons are printed, alert on them, a restart does not help)
    healthcheck.py worker   a Celery worker (`dicom-node worker`): its broker and database
                            answer. A busy worker (solo pool, one long job) cannot answer a
                            Celery ping, so its own liveness is the container's: PID 1.

Exit status 0 healthy, 1 not; one line on stdout says why. Standard library only for
``web``, so it also runs where the node's packages cannot be imported.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def web() -> int:
    port = os.environ.get("DICOM_NODE_WEB__PORT", "8080")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as answer:
            body = json.load(answer)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    reasons = "; ".join(str(r) for r in body.get("reasons") or [])
    print(f"{body.get('status', '?')}{': ' + reasons if reasons else ''}")
    return 0


def worker() -> int:
    from kombu import Connection
    from sqlalchemy import create_engine, text

    from kernel.settings import load_settings

    settings = load_settings(os.environ.get("DICOM_NODE_CONFIG"))
    broker = settings.worker.broker_url
    if not broker:
        print("unhealthy: worker.broker_url is not set")
        return 1
    try:
        with Connection(broker, connect_timeout=4) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        print(f"unhealthy: broker: {type(exc).__name__}: {exc}")
        return 1
    engine = create_engine(settings.db_url, pool_pre_ping=True)
    try:
        with engine.connect() as db:
            db.execute(text("SELECT 1"))
    except Exception as exc:
        print(f"unhealthy: database: {type(exc).__name__}: {exc}")
        return 1
    finally:
        engine.dispose()
    print("ok: broker and database answer")
    return 0


def running_mode() -> str:
    """``worker`` when this container runs ``dicom-node worker``, else ``web``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        names = [Path(a.decode(errors="replace")).name for a in args]
        if "dicom-node" in names:
            return "worker" if "worker" in names else "web"
    return "web"


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else running_mode()
    sys.exit({"web": web, "worker": worker}[mode]())
