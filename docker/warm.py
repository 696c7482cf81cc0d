"""The node started once in the build stage of docker/Dockerfile.node.

Two jobs. It proves at build time that the node starts and answers C-ECHO with the
image's packages (no torch, nnU-Net, SimpleITK, SciPy or NiBabel: the build fails if
anything imports them). And, run after every ``__pycache__`` was removed, it leaves
bytecode for exactly what the node imports (start, listener, web app, PostgreSQL, Celery
publishing over Redis): the rest of site-packages keeps its source only and is compiled in
memory if it is ever imported. The bytecode the node never reads is about a third of it.
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

MODEL_SIDE = ("torch", "nnunetv2", "totalsegmentator", "SimpleITK", "scipy", "nibabel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(config_root: Path) -> int:
    from dicom_node.echo import echo
    from dicom_node.service import Node
    from kernel.settings import load_settings

    with tempfile.TemporaryDirectory() as data_dir:
        settings = load_settings(
            None,
            data_dir=Path(data_dir),
            port=free_port(),
            bind_address="127.0.0.1",
            peers=[{"ae_title": "*", "host": "127.0.0.1"}],
            rules_file=config_root / "routing_rules.yaml",
            models_file=config_root / "models.yaml",
            web={"host": "127.0.0.1", "port": 0},
            worker={"enabled": False},
        )
        node = Node(settings, stop_grace_s=5).start()
        try:
            if not echo("127.0.0.1", settings.port, settings.ae_title, "WARM"):
                print("warm.py: the node did not answer C-ECHO", file=sys.stderr)
                return 1
        finally:
            node.stop()
    # What a configured node imports later: PostgreSQL, Celery publishing over Redis.
    import kombu.transport.redis  # noqa: F401
    import psycopg2  # noqa: F401
    import redis  # noqa: F401
    import sqlalchemy.dialects.postgresql.psycopg2  # noqa: F401

    import inference.celery_app  # noqa: F401

    loaded = sorted(m for m in MODEL_SIDE if m in sys.modules)
    if loaded:
        print(f"warm.py: the node imported {loaded}", file=sys.stderr)
        return 1
    print(f"warm.py: node started, answered C-ECHO, stopped; {len(sys.modules)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
