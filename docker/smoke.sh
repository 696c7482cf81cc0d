#!/usr/bin/env bash
# The containers end to end, on this machine:
#   1. cold start: `docker run` of the dicom-node image until it answers C-ECHO (echoscu);
#   2. docker/compose.yaml up (PostgreSQL, Redis, the node, one CPU worker);
#   3. a synthetic portal-venous CT study (docker/smoke_study.py, made in the worker image)
#      sent from the host with DCMTK storescu to the node's published DICOM port;
#   4. the tumour SEG awaited in an Orthanc started on the host as the PACS, fetched over
#      its REST API and checked (its study and source series, Dice >= 0.9 against the
#      phantom's truth);
#   5. the stack stopped (SIGTERM: every container must exit 0) and removed, volumes too.
# Prints one line: `SMOKE OK ...` or `SMOKE FAILED: <reason>` (exit 1) after the logs that
# explain it.
#
#   docker/smoke.sh [--build]        --build: run docker/build.sh --no-gpu first (it runs
#                                    anyway when an image is missing)
#
# Needs: a running dockerd, docker-compose (v1.28+) or `docker compose`, DCMTK (storescu,
# echoscu), Orthanc (Debian package orthanc), curl, python3. Nothing of the project's
# Python on the host: what runs Python runs in the images.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
started=$SECONDS

fail() { echo "SMOKE FAILED: $*"; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

for tool in docker storescu echoscu curl python3; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done
ORTHANC=$(command -v Orthanc || echo /usr/sbin/Orthanc)
[ -x "$ORTHANC" ] || fail "Orthanc is not installed (apt-get install orthanc)"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else fail "neither 'docker compose' nor docker-compose is installed"; fi
docker info >/dev/null 2>&1 || fail "dockerd does not answer (start it: dockerd &, as root)"

TAG=${DICOM_NODE_TAG:-latest}
need_build=0
[ "${1:-}" = --build ] && need_build=1
for image in "dicom-node:$TAG" "dicom-node-worker:$TAG"; do
  docker image inspect "$image" >/dev/null 2>&1 || need_build=1
done
[ -f docker/.env ] || need_build=1
if [ "$need_build" = 1 ]; then
  docker/build.sh --no-gpu --tag "$TAG" >/tmp/dicom-node-smoke-build.log 2>&1 ||
    { tail -30 /tmp/dicom-node-smoke-build.log; fail "docker/build.sh failed (log: /tmp/dicom-node-smoke-build.log)"; }
fi

work=$(mktemp -d /tmp/dicom-node-smoke.XXXXXX)
project="dicomnode-smoke-$$"
orthanc_pid=""
cold_cid=""
cleanup() {
  [ -n "$cold_cid" ] && docker rm -f -v "$cold_cid" >/dev/null 2>&1
  "${COMPOSE[@]}" -p "$project" -f docker/compose.yaml -f "$work/smoke.yaml" down -v -t 30 >/dev/null 2>&1
  [ -n "$orthanc_pid" ] && kill "$orthanc_pid" 2>/dev/null && wait "$orthanc_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# --- 1. cold start of the node image to a C-ECHO answer ------------------------------------
port=$(free_port)
t0=$(date +%s.%N)
cold_cid=$(docker run -d --init -p "127.0.0.1:$port:11112" \
  -e 'DICOM_NODE_PEERS=[{"ae_title": "*", "host": "0.0.0.0/0"}]' "dicom-node:$TAG") ||
  fail "docker run dicom-node:$TAG failed"
until echoscu -to 1 -aec DICOM_NODE 127.0.0.1 "$port" >/dev/null 2>&1; do
  [ "$(docker inspect -f '{{.State.Running}}' "$cold_cid")" = true ] ||
    { docker logs "$cold_cid" 2>&1 | tail -20; fail "the node container exited at start"; }
  python3 -c "import sys, time; sys.exit(time.time() - $t0 < 60)" && fail "no C-ECHO answer within 60 s"
  sleep 0.05
done
cold_s=$(python3 -c "import time; print(f'{time.time() - $t0:.2f}')")
t0=$(date +%s.%N)
docker stop -t 30 "$cold_cid" >/dev/null
stop_s=$(python3 -c "import time; print(f'{time.time() - $t0:.2f}')")
code=$(docker inspect -f '{{.State.ExitCode}}' "$cold_cid")
docker rm -v "$cold_cid" >/dev/null && cold_cid=""
[ "$code" = 0 ] || fail "the node exited $code on SIGTERM"

# --- 2. Orthanc on the host: the PACS ------------------------------------------------------
pacs_dicom=$(free_port)
pacs_http=$(free_port)
mkdir -p "$work/orthanc" "$work/segs"
cat >"$work/orthanc/orthanc.json" <<EOF
{"Name": "smoke-pacs", "StorageDirectory": "$work/orthanc/db", "IndexDirectory": "$work/orthanc/db",
 "Plugins": [], "HttpPort": $pacs_http, "RemoteAccessAllowed": false,
 "AuthenticationEnabled": false, "DicomAet": "ORTHANC", "DicomPort": $pacs_dicom,
 "DicomCheckCalledAet": true, "DicomAlwaysAllowStore": true, "DicomAlwaysAllowEcho": true,
 "SaveJobs": false, "HttpProxy": ""}
EOF
"$ORTHANC" "$work/orthanc/orthanc.json" >"$work/orthanc/orthanc.log" 2>&1 &
orthanc_pid=$!
orthanc="http://127.0.0.1:$pacs_http"
for _ in $(seq 100); do curl -sf "$orthanc/system" >/dev/null && break; sleep 0.2; done
curl -sf "$orthanc/system" >/dev/null || { tail -20 "$work/orthanc/orthanc.log"; fail "Orthanc did not start"; }

# --- 3. the study, made in the worker image from this checkout ---------------------------------
docker run --rm --network none --user "$(id -u):$(id -g)" -v "$ROOT:/src:ro" -v "$work:/out" \
  -e PYTHONPATH=/src "dicom-node-worker:$TAG" python3 /src/docker/smoke_study.py make /out \
  >"$work/make.log" 2>&1 || { tail -20 "$work/make.log"; fail "making the synthetic study failed"; }
study_uid=$(python3 -c "import json; print(json.load(open('$work/study.json'))['study_uid'])")

# --- 4. the stack --------------------------------------------------------------------------
dicom_port=$(free_port)
web_port=$(free_port)
cat >"$work/smoke.yaml" <<EOF
# docker/smoke.sh: the PACS is Orthanc on this host; any peer may send (storescu reaches
# the node through Docker's port forwarding, from the network's gateway address).
services:
  node:
    extra_hosts: ["host.docker.internal:host-gateway"]
  worker:
    extra_hosts: ["host.docker.internal:host-gateway"]
EOF
export DICOM_NODE_TAG=$TAG DICOM_NODE_DICOM_PORT=$dicom_port DICOM_NODE_WEB_PORT=$web_port
export DICOM_NODE_QUIET_PERIOD_S=1 DICOM_NODE_LOG_LEVEL=INFO
export DICOM_NODE_PEERS='[{"ae_title": "*", "host": "0.0.0.0/0"}]'
export DICOM_NODE_DESTINATIONS="[{\"name\": \"pacs\", \"ae_title\": \"ORTHANC\", \"host\": \"host.docker.internal\", \"port\": $pacs_dicom}]"
compose=("${COMPOSE[@]}" -p "$project" -f docker/compose.yaml -f "$work/smoke.yaml")
show_logs() {
  "${compose[@]}" ps 2>&1 | tail -8
  "${compose[@]}" logs --no-color --tail 30 node worker 2>&1 | tail -60
}
"${compose[@]}" up -d >"$work/up.log" 2>&1 || { tail -20 "$work/up.log"; show_logs; fail "compose up failed"; }
deadline=$((SECONDS + 180))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$("${compose[@]}" ps -q worker)" 2>/dev/null)" = healthy ]; do
  [ $SECONDS -lt $deadline ] || { show_logs; fail "the stack did not become healthy within 180 s"; }
  sleep 1
done
healthz=$(curl -sf "http://127.0.0.1:$web_port/healthz") || { show_logs; fail "/healthz does not answer"; }

sent=$SECONDS
mapfile -t files < <(find "$work/study" -type f | sort)
TCP_NODELAY=1 storescu -aet SMOKE_CT -aec DICOM_NODE 127.0.0.1 "$dicom_port" "${files[@]}" \
  >"$work/storescu.log" 2>&1 || { tail -5 "$work/storescu.log"; show_logs; fail "storescu failed"; }

seg_ids() {  # the instance IDs of every SEG series of the study in Orthanc
  curl -sf -X POST "$orthanc/tools/find" \
    -d "{\"Level\": \"Series\", \"Query\": {\"StudyInstanceUID\": \"$study_uid\", \"Modality\": \"SEG\"}}" |
    python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)))' |
    while read -r series; do
      [ -n "$series" ] && curl -sf "$orthanc/series/$series/instances" |
        python3 -c 'import json, sys; print("\n".join(x["ID"] for x in json.load(sys.stdin)))'
    done
}
deadline=$((SECONDS + 600))
while :; do
  [ $SECONDS -lt $deadline ] || { show_logs; cat "$work/check.log" 2>/dev/null; fail "no tumour SEG arrived in Orthanc within 600 s"; }
  sleep 2
  new=0
  for id in $(seg_ids); do
    [ -f "$work/segs/$id.dcm" ] && continue
    curl -sf "$orthanc/instances/$id/file" -o "$work/segs/$id.dcm" && new=1
  done
  [ "$new" = 1 ] || continue
  # The check runs in the worker image (pydicom, highdicom, the phantom's truth).
  if docker run --rm --network none --user "$(id -u):$(id -g)" -v "$ROOT:/src:ro" \
      -v "$work:/out" -e PYTHONPATH=/src "dicom-node-worker:$TAG" \
      python3 /src/docker/smoke_study.py check /out >"$work/check.log" 2>&1; then
    break
  fi
  grep -q "^no tumour SEG" "$work/check.log" || { show_logs; fail "$(tail -1 "$work/check.log")"; }
done
check=$(tail -1 "$work/check.log")
seg_s=$((SECONDS - sent))

# --- 5. down: SIGTERM to every container, each must exit 0 ---------------------------------
t0=$(date +%s.%N)
"${compose[@]}" stop -t 120 >/dev/null 2>&1
down_s=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
bad=""
for service in node worker postgres redis; do
  code=$(docker inspect -f '{{.State.ExitCode}}' "$("${compose[@]}" ps -q "$service")" 2>/dev/null)
  [ "$code" = 0 ] || bad+=" $service=$code"
done
[ -z "$bad" ] || { show_logs; fail "exit codes after SIGTERM:$bad"; }
"${compose[@]}" down -v >/dev/null 2>&1
echo "SMOKE OK cold_start_echo_s=$cold_s node_stop_s=$stop_s $check seg_after_send_s=$seg_s" \
  "stack_stop_s=$down_s seconds=$((SECONDS - started))"
