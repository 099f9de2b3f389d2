#!/usr/bin/env bash
# dicomnode set-up: installs everything (Debian packages and the Python environment in .venv/),
# then runs the main job on the embedded default unless --no-demo is given.
#
#   ./setup.sh            install, then the main job: local stack (Orthanc + dicomnode serve), a synthetic CT
#                         study pushed with storescu, SR + overlays back in the study (deploy/demo-stack.sh)
#   ./setup.sh --no-demo  install only (used by run-tests.sh on a fresh clone)
#
# Also installs the bundled viewer: OHIF's prebuilt build (npm package @ohif/app, pinned below) into .ohif/
# (git-ignored, like .venv), served by deploy/ohif_server.py in the local stack and used by the viewer test.
set -euo pipefail
cd "$(dirname "$0")"
DEMO=1
[[ "${1:-}" == "--no-demo" ]] && DEMO=0

APT_PACKAGES=(orthanc orthanc-dicomweb dcmtk dicom3tools chromium)
# Container tooling (deploy/Dockerfile, deploy/compose/, tests/e2e/test_containers.py): Debian's podman as root
# with runc, netavark + aardvark-dns (DNS between the compose services, iptables for their NAT), podman-compose,
# debootstrap for the locally made base images (deploy/containers/base-images.sh).
APT_PACKAGES+=(podman runc netavark aardvark-dns iptables catatonit podman-compose debootstrap)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm fetches the viewer's build (below); any npm on PATH will do, else Debian's
command -v npm >/dev/null || missing+=(nodejs npm)
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# podman's settings on these machines (runc, cgroupfs, file events, default ulimits), written as root
if [[ $(id -u) -eq 0 ]]; then
  deploy/containers/configure-podman.sh
elif ! deploy/containers/configure-podman.sh --check; then
  sudo deploy/containers/configure-podman.sh
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# torch first, pinned: the CPU wheel provided on these machines. A resolver must never pick plain torch
# (that pulls the CUDA build and gigabytes of GPU libraries).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU wheel)"
  .venv/bin/pip install -q "torch==2.13.0"
fi
stamp=.venv/.dicomnode-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing dicomnode and its dependencies into .venv"
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi
.venv/bin/python -c "import torch,sys; v=torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch '+v+' is not the pinned CPU build')"

# The bundled viewer: OHIF's production build (index.html, bundles, wasm; about 200 MB) from the npm package,
# unpacked once into .ohif/dist. `npm pack` fetches the one tarball, no dependency tree and no install scripts.
OHIF_VERSION=3.13.2
if [[ "$(cat .ohif/VERSION 2>/dev/null)" != "$OHIF_VERSION" || ! -f .ohif/dist/index.html ]]; then
  echo "setup: installing the OHIF viewer @ohif/app@$OHIF_VERSION into .ohif/"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  rm -rf .ohif.new && mkdir -p .ohif.new
  tar -xzf "$tmp"/ohif-app-"$OHIF_VERSION".tgz -C .ohif.new package/dist package/LICENSE package/package.json
  mv .ohif.new/package/dist .ohif.new/dist && mv .ohif.new/package/LICENSE .ohif.new/package/package.json .ohif.new/
  rmdir .ohif.new/package
  echo "$OHIF_VERSION" >.ohif.new/VERSION
  rm -rf .ohif && mv .ohif.new .ohif
  rm -rf "$tmp"
fi

if ((DEMO)); then
  exec deploy/demo-stack.sh "${DEMO_STATE_DIR:-state}"
fi
