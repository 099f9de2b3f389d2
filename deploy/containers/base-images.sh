#!/usr/bin/env bash
# Base images made locally, for machines that reach no image registry (run as root, after setup.sh):
#
#   debian:bookworm-slim       debootstrap --variant=minbase bookworm from the Debian mirror apt uses here
#                              (read from the host's apt sources, never written in the repository), imported
#                              with `podman import`
#   python:3.11-slim-bookworm  Debian's python3.11 (+ venv, pip) on top, with the host's locally added CA
#                              certificates (/usr/local/share/ca-certificates) trusted, so pip inside a build
#                              reaches the package index through a TLS-inspecting proxy
#
# Both are tagged under the official short names deploy/Dockerfile names in FROM; podman finds them in local
# storage (localhost/...) and never pulls. Skips an image that already exists unless --force is given.
#
#   deploy/containers/base-images.sh [--force]
set -euo pipefail
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1
DEBIAN_TAG=debian:bookworm-slim
PYTHON_TAG=python:3.11-slim-bookworm
NICE=(nice -n 10)

have() { podman image exists "$1"; }

mirror() {
  # The first mirror apt uses for bookworm main (deb822 .sources or a one-line sources.list alike).
  local m
  m=$(apt-cache policy | awk '$2 ~ /^https?:\/\// && $3 == "bookworm/main" {print $2; exit}')
  [[ -n $m ]] || { echo "base-images: no bookworm mirror in the host's apt sources" >&2; exit 1; }
  echo "$m"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ((FORCE)) || ! have "$DEBIAN_TAG"; then
  m=$(mirror)
  echo "base-images: debootstrap --variant=minbase bookworm from $m"
  "${NICE[@]}" debootstrap --variant=minbase bookworm "$work/rootfs" "$m" >"$work/debootstrap.log" 2>&1 ||
    { tail -30 "$work/debootstrap.log" >&2; exit 1; }
  # As the official slim image: no apt caches or lists in the image, no man pages or docs.
  rm -rf "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/lib/apt/lists/"* \
    "$work/rootfs/usr/share/doc/"* "$work/rootfs/usr/share/man/"* "$work/rootfs/tmp/"*
  tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" .
  podman import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' "$work/rootfs.tar" "$DEBIAN_TAG" >/dev/null
  rm -rf "$work/rootfs" "$work/rootfs.tar"
  echo "base-images: $DEBIAN_TAG imported"
fi

if ((FORCE)) || ! have "$PYTHON_TAG"; then
  mkdir -p "$work/py/ca"
  shopt -s nullglob
  for c in /usr/local/share/ca-certificates/*.crt; do cp "$c" "$work/py/ca/"; done
  shopt -u nullglob
  cat >"$work/py/Containerfile" <<CONTAINERFILE
FROM $DEBIAN_TAG
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      python3.11 python3.11-venv python3-pip ca-certificates \\
 && rm -rf /var/lib/apt/lists/* \\
 && ln -s /usr/bin/python3.11 /usr/local/bin/python && ln -s /usr/bin/python3.11 /usr/local/bin/python3
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8
CMD ["python3"]
CONTAINERFILE
  echo "base-images: building $PYTHON_TAG from Debian's python3.11"
  "${NICE[@]}" podman build --network host -q -t "$PYTHON_TAG" "$work/py" >/dev/null
  echo "base-images: $PYTHON_TAG built"
fi
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'debian:bookworm-slim|python:3.11-slim-bookworm'
