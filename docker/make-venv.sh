#!/bin/sh
# /opt/venv for the build stages of docker/Dockerfile.*. The official Python images can
# make one as they are; the local Debian base (docker/make-base.sh) leaves Debian's
# python3-venv out of the image (its bundled pip and setuptools wheels are of no use at
# run time), so it is installed here, in the build stage only.
set -eu
if ! python3 -c 'import ensurepip' 2>/dev/null || ! python3 -m venv /opt/venv 2>/dev/null; then
  rm -rf /opt/venv
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  rm -rf /var/lib/apt/lists/*
  python3 -m venv /opt/venv
fi
