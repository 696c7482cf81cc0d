"""Rewrite a JSON file without indentation, failing unless it loads back equal.

Used in the build stage of docker/Dockerfile.node for highdicom's table of the
standard's modules (22 MB indented, 16 MB without; highdicom reads it with json.load).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def compact(path: Path) -> int:
    data = json.loads(path.read_text(encoding="utf-8"))
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if json.loads(text) != data:
        print(f"compact_json.py: {path} does not load back equal", file=sys.stderr)
        return 1
    before = path.stat().st_size
    path.write_text(text, encoding="utf-8")
    print(f"compact_json.py: {path.name} {before / 1e6:.1f} MB -> {len(text) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(max(compact(Path(p)) for p in sys.argv[1:]))
