#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the demo or the test suite.
#
#   ./run.sh demo    end-to-end demo on the embedded default
#   ./run.sh test    the whole test suite (ruff, import-linter, pytest)
#
# As root it installs the Debian packages it needs (dcmtk, orthanc, orthanc-dicomweb,
# dicom3tools, python3-venv); otherwise it says which are missing. The virtualenv is .venv,
# with the CPU build of torch installed first so no resolver swaps in a multi-GB CUDA build
# (set TORCH_INDEX_URL to take torch from another index, e.g. PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
VENV=.venv
mode=${1:-}
case "$mode" in
  demo|test) shift ;;
  *) echo "usage: $0 demo|test [pytest args...]" >&2; exit 2 ;;
esac

missing_debian_packages() {
  local missing=()
  command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
  { command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || missing+=(orthanc)
  # Orthanc's DICOMweb plugin: the tests' QIDO-RS / WADO-RS source
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
  command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3.11-venv)
  echo "${missing[@]:-}"
}

missing=$(missing_debian_packages)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq $missing >/dev/null
    missing=$(missing_debian_packages)
  fi
fi
if [ -n "$missing" ]; then
  echo "!! missing Debian packages: $missing" >&2
  echo "!! install them as root:  apt-get install -y $missing" >&2
  if [[ " $missing " == *" python3.11-venv "* ]] || [ "$mode" = test ]; then
    exit 1  # the tests need the real tools; the demo can fall back (and says so)
  fi
fi

PY=$(command -v python3.11 || command -v python3)
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  echo "!! Python 3.11 is required (found $("$PY" --version 2>&1))" >&2; exit 1; }

stamp="$VENV/.installed-$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== setting up $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel
  torch_args=()
  [ -n "${TORCH_INDEX_URL:-}" ] && torch_args=(--index-url "$TORCH_INDEX_URL")
  "$VENV/bin/python" -m pip install -q "${torch_args[@]}" "torch==$TORCH_VERSION"
  constraints=$(mktemp)
  printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$constraints"
  "$VENV/bin/python" -m pip install -q -c "$constraints" -e '.[test]'
  rm -f "$constraints" "$VENV"/.installed-*
  touch "$stamp"
fi

export PATH="$PWD/$VENV/bin:$PATH"
case "$mode" in
  demo) exec dicom-node demo "$@" ;;
  test)
    ruff check .
    lint-imports
    # Two worker processes by default (pytest-xdist, a file per worker at a time): most
    # tests wait on servers and child processes, so two share 2 cores well (21 -> 16 min).
    exec python -m pytest -n "${DICOM_NODE_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
esac
