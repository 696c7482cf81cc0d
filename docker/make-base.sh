#!/usr/bin/env bash
# Makes a local Python 3.11 base image from Debian's own packages, for machines that reach
# Debian's mirror but no image registry (so `FROM python:3.11-slim-bookworm` cannot be
# pulled). The result plays the part of the official slim image in docker/Dockerfile.*:
# Debian bookworm (minbase) + python3 (3.11, its standard library compiled) and
# ca-certificates, with the same slimming as Debian's container images (no docs, man pages
# or locales; no recommended packages; apt caches emptied). python3-venv is left out: the
# build stages install it (docker/make-venv.sh), the final images need no venv tooling.
#
#   docker/make-base.sh [TAG]        default TAG: dicom-node-base:bookworm
#
# Needs root, debootstrap and a running dockerd. The mirror is the host's Debian mirror
# (the first bookworm entry in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list;
# DEBIAN_MIRROR overrides it); the image's apt sources are the host's bookworm entries,
# security updates included, and the packages are upgraded to them.
set -euo pipefail

TAG=${1:-dicom-node-base:bookworm}
SUITE=bookworm

[ "$(id -u)" = 0 ] || { echo "make-base.sh: must run as root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || {
  echo "make-base.sh: debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

# The host's Debian entries for the suite, as deb822 stanzas (one per URI and suite set).
host_sources() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && awk -v RS= -v ORS='\n\n' "/Suites:[^\\n]*$SUITE/" "$f"
  done
  if [ -f /etc/apt/sources.list ]; then
    awk -v s="$SUITE" '$1 == "deb" && $3 ~ "^"s {
      printf "Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n\n", $2, $3 }' /etc/apt/sources.list
  fi
}

sources=$(host_sources | grep -v '^#' || true)
mirror=${DEBIAN_MIRROR:-$(printf '%s\n' "$sources" | awk -v s="$SUITE" '
  /^URIs:/ { uri = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s && uri !~ /security/) { print uri; exit } }')}
mirror=${mirror:-http://deb.debian.org/debian}
if [ -z "$sources" ]; then
  sources=$(printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' \
    "$mirror" "$SUITE" "$SUITE")
fi

root=$(mktemp -d /tmp/dicom-node-base.XXXXXX)
cleanup() { rm -rf "$root"; }
trap cleanup EXIT

echo "== debootstrap --variant=minbase $SUITE from $mirror"
debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# Slimming as in Debian's container images, in force before anything else is installed.
cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
cat >"$root/etc/apt/apt.conf.d/slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
EOF
rm -f "$root/etc/apt/sources.list"
printf '%s\n' "$sources" >"$root/etc/apt/sources.list.d/debian.sources"
cp /etc/resolv.conf "$root/etc/resolv.conf"

echo "== apt-get install python3 ca-certificates (and security updates)"
# The standard library's bytecode (compiled by the packages' own postinst) stays: a
# non-root process cannot write it later, and without it every start compiles it anew.
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -ec 'apt-get -o APT::Sandbox::User=root update -qq
          apt-get -o APT::Sandbox::User=root upgrade -y -qq
          apt-get -o APT::Sandbox::User=root install -y -qq python3 ca-certificates
          apt-get clean
          rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old
          rm -rf /usr/share/doc/*/changelog* /usr/share/man/* /usr/share/info/* /usr/share/locale/*' \
  >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
: >"$root/etc/resolv.conf"

echo "== docker import $TAG"
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null
docker run --rm --network none "$TAG" python3 -c 'import sys, venv, ssl; print("base", sys.version.split()[0])'
docker image ls "$TAG" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
