#!/usr/bin/env bash
# Makes the local base image of the fedsb containers (default tag fedsb-base:bookworm): Debian with iproute2
# (`tc`, `ip`, for network shaping) and python3-minimal (the delay proxy used where the kernel lacks netem).
#
#   bash scripts/docker-base.sh [--rebuild]
#
# Nothing is done when the image exists. Otherwise, in this order:
#   1. with a reachable image registry: `docker pull debian:SUITE-slim` and install the two packages on it;
#   2. without one: a minimal root filesystem made with debootstrap from the Debian package mirror, then
#      `docker import`ed. The tarball is cached under ~/.cache/fedsb/docker/ and reused next time.
# debootstrap's mirror is FEDSB_DEBIAN_MIRROR, else the first Debian mirror of this machine's apt sources
# (/etc/apt/sources.list and sources.list.d/, see scripts/apt-mirror.sh), else http://deb.debian.org/debian;
# the script prints which. FEDSB_BASE_FROM=pull|debootstrap forces one way. The binaries copied into the fedsb
# image are built on this host, so the image's glibc must be at least the host's: keep SUITE
# (FEDSB_DEBIAN_SUITE, default bookworm) at or above the build machine's Debian release.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/apt-mirror.sh
. scripts/apt-mirror.sh

TAG="${FEDSB_BASE_IMAGE:-fedsb-base:bookworm}"
SUITE="${FEDSB_DEBIAN_SUITE:-bookworm}"
FROM="${FEDSB_BASE_FROM:-auto}"
PKGS="iproute2,python3-minimal"
CACHE="${FEDSB_CACHE:-$HOME/.cache/fedsb}/docker"
REBUILD=0
[ "${1:-}" = "--rebuild" ] && REBUILD=1

log() { printf '[docker-base] %s\n' "$*" >&2; }

if [ "$REBUILD" = 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG is present"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if [ "$FROM" != "debootstrap" ]; then
  log "trying the registry: docker pull debian:$SUITE-slim"
  if timeout 300 docker pull -q "debian:$SUITE-slim" >/dev/null 2>&1; then
    docker build -q -t "$TAG" --label org.fedsb.base=registry - <<EOF
FROM debian:$SUITE-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${PKGS//,/ } \
 && rm -rf /var/lib/apt/lists/*
EOF
    log "built $TAG from debian:$SUITE-slim"
    exit 0
  fi
  [ "$FROM" = "pull" ] && { log "docker pull failed and FEDSB_BASE_FROM=pull"; exit 1; }
  log "no registry reachable: making the base with debootstrap"
fi

# The cache key covers what goes into the root filesystem.
key="$(printf '%s %s %s' "$SUITE" "$PKGS" "minbase" | sha256sum | cut -c1-12)"
tarball="$CACHE/rootfs-$SUITE-$key.tar"
if [ ! -s "$tarball" ]; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq debootstrap >/dev/null
  fi
  MIRROR="$(debian_mirror "")"
  mkdir -p "$CACHE"
  root="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap '$SUDO rm -rf "$root"' EXIT
  log "debootstrap --variant=minbase --include=$PKGS $SUITE ($MIRROR); takes a few minutes"
  if ! $SUDO debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1; then
    tail -n 30 "$root.log" >&2
    log "debootstrap failed (full log: $root.log)"
    exit 1
  fi
  rm -f "$root.log"
  # Smaller and reproducible-ish: no package lists or caches, no documentation.
  $SUDO rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*
  $SUDO tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
  $SUDO chown "$(id -u):$(id -g)" "$tarball.tmp"
  mv "$tarball.tmp" "$tarball"
  log "cached $tarball ($(du -h "$tarball" | cut -f1))"
fi
docker import -m "fedsb base: debootstrap $SUITE minbase + $PKGS" \
  -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  "$tarball" "$TAG" >/dev/null
log "imported $TAG from $tarball"
