#!/usr/bin/env bash
# Settings for Debian's podman running as root on these machines (called by setup.sh; idempotent):
#   runtime = runc, cgroup_manager = cgroupfs (no systemd as PID 1), events_logger = file (no journald),
#   default ulimits nofile=20000:20000 and nproc=32768:32768, netavark networks (DNS between containers),
# in /etc/containers/containers.conf (or $CONTAINERS_CONF when set). An existing file is kept as .orig once,
# then replaced by this one: these are the only settings we rely on. With --check: exit 0 when the file is
# already so, 1 otherwise, changing nothing (no root needed).
set -euo pipefail
CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1
CONF=${CONTAINERS_CONF:-/etc/containers/containers.conf}
mkdir -p "$(dirname "$CONF")"
want=$(
  cat <<'TOML'
# Written by dicomnode deploy/containers/configure-podman.sh
[containers]
default_ulimits = [
  "nofile=20000:20000",
  "nproc=32768:32768",
]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
TOML
)
if [[ -f $CONF ]] && [[ "$(cat "$CONF")" == "$want" ]]; then
  exit 0
fi
((CHECK)) && exit 1
if [[ -f $CONF && ! -f $CONF.orig ]]; then
  cp -p "$CONF" "$CONF.orig"
fi
printf '%s\n' "$want" >"$CONF.tmp"
mv "$CONF.tmp" "$CONF"
echo "configure-podman: wrote $CONF (runc, cgroupfs, file events, default ulimits)"
