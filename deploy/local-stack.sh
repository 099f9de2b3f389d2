#!/usr/bin/env bash
# The local stack: the reference PACS (Orthanc + DICOMweb plugin), the node and the viewer, on loopback only.
#
#   deploy/local-stack.sh up STATE_DIR     start them; returns once Orthanc /system, the node /api/health and
#                                          the viewer answer
#   deploy/local-stack.sh down STATE_DIR   stop them (waits until Orthanc has really exited: stack.md G5)
#   deploy/local-stack.sh status STATE_DIR
#
# Everything the stack writes (configs, Orthanc storage, the node's data dir, logs, pid files) lives under
# STATE_DIR; the repository is never written to. Flow: a modality (AE MODALITY or STORESCU) sends CT to Orthanc,
# Orthanc auto-routes each stable CT image series to the node (autoroute.lua), the node sends SR + SC back.
#
# Environment (all optional; tests set free ports):
#   ORTHANC_DICOM_PORT (4242)  ORTHANC_HTTP_PORT (8042)  NODE_DICOM_PORT (11112)  NODE_HTTP_PORT (8000)
#   MODALITY_PORT (11113)      STABLE_AGE (3)            orthanc's StableAge in seconds
#   NODE_DESTINATION (dimse)   "dimse" = results go back over C-STORE, "dicomweb" = over STOW-RS, "both"
#   NODE_SERIES_QUIET (2) NODE_STUDY_QUIET (2)  completion quiet periods of the node, seconds
#   NODE_START (1)             0 = start Orthanc only (tests that run their own node processes)
#   OHIF_PORT (3000)           the bundled viewer (OHIF, installed by ./setup.sh into .ohif/) on this port,
#                              serving Orthanc's DICOMweb on its own origin (deploy/ohif_server.py)
#   OHIF_START (auto)          1 = start the viewer (fail without .ohif/), 0 = not, auto = when installed
#   OHIF_DIST (.ohif/dist)     the viewer's build
#   NODE_EXTRA_CONFIG          a YAML fragment appended to the generated node config
#   DICOMNODE_ADMIN_PASSWORD   the node's admin password (admin UI, REST API, STOW-RS into the node); when
#                              unset the node generates one and prints it once into STATE_DIR/logs/node.log
#   DICOMNODE (.venv/bin/dicomnode)  PYTHON (.venv/bin/python)  ORTHANC (Orthanc)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ORTHANC_DICOM_PORT=${ORTHANC_DICOM_PORT:-4242}
ORTHANC_HTTP_PORT=${ORTHANC_HTTP_PORT:-8042}
NODE_DICOM_PORT=${NODE_DICOM_PORT:-11112}
NODE_HTTP_PORT=${NODE_HTTP_PORT:-8000}
MODALITY_PORT=${MODALITY_PORT:-11113}
STABLE_AGE=${STABLE_AGE:-3}
NODE_DESTINATION=${NODE_DESTINATION:-dimse}
NODE_SERIES_QUIET=${NODE_SERIES_QUIET:-2}
NODE_STUDY_QUIET=${NODE_STUDY_QUIET:-2}
NODE_START=${NODE_START:-1}
OHIF_PORT=${OHIF_PORT:-3000}
OHIF_START=${OHIF_START:-auto}
OHIF_DIST=${OHIF_DIST:-$REPO/.ohif/dist}
DICOMNODE=${DICOMNODE:-$REPO/.venv/bin/dicomnode}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
ORTHANC=${ORTHANC:-Orthanc}

die() { echo "local-stack: $*" >&2; exit 1; }

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Wait until URL answers HTTP 200, or the process in PIDFILE died, or TIMEOUT seconds passed.
wait_http() {
  local url=$1 pidfile=$2 timeout=$3 log=$4 t0=$SECONDS
  until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
    alive "$pidfile" || { tail -n 30 "$log" >&2; die "process of $pidfile exited before $url answered (log: $log)"; }
    ((SECONDS - t0 < timeout)) || { tail -n 30 "$log" >&2; die "$url did not answer within ${timeout}s (log: $log)"; }
    sleep 0.2
  done
}

# Stop the process in PIDFILE: SIGTERM, wait up to TIMEOUT seconds for it to exit, then SIGKILL and wait.
stop_pid() {
  local pidfile=$1 timeout=$2 name=$3 pid t0=$SECONDS
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ((SECONDS - t0 < timeout)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "local-stack: $name did not stop within ${timeout}s, killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
  fi
  rm -f "$pidfile"
}

write_orthanc_config() {
  local dir=$1
  mkdir -p "$dir"
  cp "$REPO/orthanc-config/autoroute.lua" "$dir/autoroute.lua"
  # A copy of the reference config with this stack's ports and paths. Relative paths in an Orthanc config
  # resolve against the folder of the config file, so storage and index land in STATE_DIR/orthanc/.
  "$PYTHON" - "$REPO/orthanc-config/orthanc.json" "$dir/orthanc.json" <<PY
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["StorageDirectory"] = cfg["IndexDirectory"] = "orthanc-db"
cfg["LuaScripts"] = ["autoroute.lua"]
cfg["DicomPort"] = int("$ORTHANC_DICOM_PORT")
cfg["HttpPort"] = int("$ORTHANC_HTTP_PORT")
cfg["StableAge"] = int("$STABLE_AGE")
# Loopback only and no users: authentication is switched off in the local stack only.
cfg["AuthenticationEnabled"] = False
cfg["RemoteAccessAllowed"] = False
cfg["DicomModalities"]["dicomnode"]["Port"] = int("$NODE_DICOM_PORT")
cfg["DicomModalities"]["modality"]["Port"] = int("$MODALITY_PORT")
# No fixed DicomWeb Host: Orthanc writes bulk-data URIs for the origin a request came through (its own, or
# the viewer's, which passes DICOMweb through with a Forwarded header), so both origins work.
cfg["DicomWeb"].pop("Host", None)
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PY
}

write_node_config() {
  local file=$1 state=$2
  local dimse="  - {kind: dimse, name: orthanc, ae_title: ORTHANC, host: 127.0.0.1, port: $ORTHANC_DICOM_PORT}"
  local web="  - {kind: dicomweb, name: orthanc-web, url: \"http://127.0.0.1:$ORTHANC_HTTP_PORT/dicom-web\"}"
  local dests
  case $NODE_DESTINATION in
    dimse) dests=$dimse ;;
    dicomweb) dests=$web ;;
    both) dests="$dimse"$'\n'"$web" ;;
    *) die "NODE_DESTINATION must be dimse, dicomweb or both, not '$NODE_DESTINATION'" ;;
  esac
  cat >"$file" <<YAML
# Generated by deploy/local-stack.sh; edit the script, not this file.
data_dir: "$state/node-data"
dicom:
  ae_title: DICOMNODE
  host: 127.0.0.1
  port: $NODE_DICOM_PORT
  allowed_calling_aets: [ORTHANC, MODALITY, STORESCU]
http:
  host: 127.0.0.1
  port: $NODE_HTTP_PORT
completion:
  series_quiet_seconds: $NODE_SERIES_QUIET
  study_quiet_seconds: $NODE_STUDY_QUIET
delivery:
  max_attempts: 6
  backoff_base_seconds: 2
  backoff_max_seconds: 30
destinations:
$dests
YAML
  if [[ -n ${NODE_EXTRA_CONFIG:-} ]]; then printf '%s\n' "$NODE_EXTRA_CONFIG" >>"$file"; fi
}

# The bundled viewer: OHIF's build and Orthanc's DICOMweb on one origin (deploy/ohif_server.py).
start_viewer() {
  local state=$1
  [[ $OHIF_START == 0 ]] && return 0
  if [[ ! -f $OHIF_DIST/index.html ]]; then
    [[ $OHIF_START == 1 ]] && die "no OHIF build in $OHIF_DIST (run ./setup.sh --no-demo)"
    echo "local-stack: viewer not installed ($OHIF_DIST; ./setup.sh --no-demo installs it), not started"
    return 0
  fi
  if alive "$state/ohif.pid"; then
    echo "local-stack: viewer already running (pid $(cat "$state/ohif.pid"))"
  elif (: >"/dev/tcp/127.0.0.1/$OHIF_PORT") 2>/dev/null; then
    # something else listens there (another stack's viewer, a dev server): never take it for ours
    [[ $OHIF_START == 1 ]] && die "port $OHIF_PORT is in use: set OHIF_PORT to a free port"
    echo "local-stack: port $OHIF_PORT is in use, viewer not started (set OHIF_PORT to a free port)"
    return 0
  else
    ("$PYTHON" "$REPO/deploy/ohif_server.py" --dist "$OHIF_DIST" --port "$OHIF_PORT" \
      --orthanc "http://127.0.0.1:$ORTHANC_HTTP_PORT" >>"$state/logs/ohif.log" 2>&1) &
    echo $! >"$state/ohif.pid"
  fi
  if [[ $OHIF_START == 1 ]]; then
    wait_http "http://127.0.0.1:$OHIF_PORT/app-config.js" "$state/ohif.pid" 30 "$state/logs/ohif.log"
  else  # auto: the viewer is a convenience, never a reason for the stack not to come up
    local t0=$SECONDS
    until curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$OHIF_PORT/app-config.js" 2>/dev/null; do
      if ! alive "$state/ohif.pid" || ((SECONDS - t0 > 30)); then
        echo "local-stack: viewer did not start (log: $state/logs/ohif.log), going on without it" >&2
        stop_pid "$state/ohif.pid" 5 viewer
        return 0
      fi
      sleep 0.2
    done
  fi
  echo "local-stack: viewer up: OHIF http://127.0.0.1:$OHIF_PORT/ (studies of Orthanc; a study: /viewer?StudyInstanceUIDs=<uid>)"
}

cmd_up() {
  local state=$1
  mkdir -p "$state/logs"
  state=$(cd "$state" && pwd)
  command -v "$ORTHANC" >/dev/null || die "Orthanc not found (apt-get install orthanc orthanc-dicomweb)"
  if alive "$state/orthanc.pid"; then
    echo "local-stack: Orthanc already running (pid $(cat "$state/orthanc.pid"))"
  else
    write_orthanc_config "$state/orthanc"
    # TCP_NODELAY=1: DCMTK (and so Orthanc) keeps Nagle on otherwise, ~15 images/s instead of ~100 (stack.md G1).
    (cd "$state/orthanc" && TCP_NODELAY=1 exec "$ORTHANC" "$state/orthanc/orthanc.json" \
      >>"$state/logs/orthanc.log" 2>&1) &
    echo $! >"$state/orthanc.pid"
  fi
  wait_http "http://127.0.0.1:$ORTHANC_HTTP_PORT/system" "$state/orthanc.pid" 60 "$state/logs/orthanc.log"
  echo "local-stack: Orthanc up: DICOM 127.0.0.1:$ORTHANC_DICOM_PORT AET ORTHANC, HTTP http://127.0.0.1:$ORTHANC_HTTP_PORT"
  start_viewer "$state"
  [[ $NODE_START == 1 ]] || return 0
  if alive "$state/node.pid"; then
    echo "local-stack: node already running (pid $(cat "$state/node.pid"))"
  else
    write_node_config "$state/dicomnode.yaml" "$state"
    (TCP_NODELAY=1 exec "$DICOMNODE" -v serve --config "$state/dicomnode.yaml" >>"$state/logs/node.log" 2>&1) &
    echo $! >"$state/node.pid"
  fi
  wait_http "http://127.0.0.1:$NODE_HTTP_PORT/api/health" "$state/node.pid" 120 "$state/logs/node.log"
  echo "local-stack: node up: DICOM 127.0.0.1:$NODE_DICOM_PORT AET DICOMNODE, HTTP http://127.0.0.1:$NODE_HTTP_PORT"
}

cmd_down() {
  local state=$1
  [[ -d $state ]] || die "no such state dir: $state"
  stop_pid "$state/node.pid" 30 node
  stop_pid "$state/ohif.pid" 10 viewer
  # Orthanc takes 2-3.5 s to stop; a restart before it exited fails with "database is locked" (stack.md G5).
  stop_pid "$state/orthanc.pid" 30 Orthanc
  echo "local-stack: stopped"
}

cmd_status() {
  local state=$1 rc=0
  if alive "$state/orthanc.pid"; then echo "orthanc: running (pid $(cat "$state/orthanc.pid"))"; else echo "orthanc: stopped"; rc=1; fi
  if alive "$state/node.pid"; then echo "node: running (pid $(cat "$state/node.pid"))"; else echo "node: stopped"; rc=1; fi
  if alive "$state/ohif.pid"; then echo "viewer: running (pid $(cat "$state/ohif.pid")) on port $OHIF_PORT"; else echo "viewer: stopped"; fi
  return $rc
}

[[ $# -eq 2 ]] || usage
case $1 in
  up) cmd_up "$2" ;;
  down) cmd_down "$2" ;;
  status) cmd_status "$2" ;;
  *) usage ;;
esac
