#!/bin/sh
# pip install into /opt/venv, used by the build stages of docker/Dockerfile.*.
# Build arguments arrive as environment variables: empty PIP_* ones are dropped (pip would
# take an empty index URL literally), and a CA bundle that build.sh placed in the build
# context (docker/.build/ca.crt, for package indexes behind a TLS-inspecting proxy) is
# used for the downloads only: it never reaches the final image.
set -eu
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST; do
  eval "value=\${$var:-}"
  if [ -z "$value" ]; then unset "$var"; else export "$var"; fi
done
if [ -f /tmp/req/ca.crt ]; then
  export PIP_CERT=/tmp/req/ca.crt
fi
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
exec /opt/venv/bin/python -m pip install "$@"
