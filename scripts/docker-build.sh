#!/usr/bin/env bash
# Builds the fedsb image (default tag fedsb:local) from the binaries built on this host:
#   1. `cargo build --release -p fedsb-server -p fedsb-client` (a no-op when up to date; FEDSB_NO_CARGO=1 skips
#      it and takes the binaries as they are, from $FEDSB_BIN_DIR or $CARGO_TARGET_DIR/release);
#   2. the base image (scripts/docker-base.sh: from the registry, or debootstrap when none is reachable);
#   3. `docker build -f docker/Dockerfile` on a staging folder holding the binaries and docker/*.
# FEDSB_GPU=1 builds the `gpu` profile's image instead (fedsb:local-cuda): fedsb-client with `--features cuda`
# (needs the CUDA toolkit here) on a CUDA runtime base (FEDSB_CUDA_BASE, default
# nvidia/cuda:12.6.3-runtime-ubuntu24.04, from a registry or `docker load`ed beforehand).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[docker-build] %s\n' "$*" >&2; }

target="${CARGO_TARGET_DIR:-$PWD/target}"
gpu="${FEDSB_GPU:-0}"
if [ "$gpu" = 1 ]; then
  tag="${FEDSB_GPU_IMAGE:-fedsb:local-cuda}"
  base="${FEDSB_CUDA_BASE:-nvidia/cuda:12.6.3-runtime-ubuntu24.04}"
  # A separate target folder: the CPU build's fedsb-client stays as it is.
  cuda_target="${FEDSB_CUDA_TARGET_DIR:-$target/cuda}"
  extra_packages="iproute2 python3-minimal"
else
  tag="${FEDSB_IMAGE:-fedsb:local}"
  base="${FEDSB_BASE_IMAGE:-fedsb-base:bookworm}"
  extra_packages=""
fi

bin="${FEDSB_BIN_DIR:-$target/release}"
if [ "${FEDSB_NO_CARGO:-0}" != 1 ]; then
  log "cargo build --release -p fedsb-server -p fedsb-client (target $target)"
  cargo build --release --locked -p fedsb-server -p fedsb-client
  if [ "$gpu" = 1 ]; then
    log "cargo build --release -p fedsb-client --features cuda (target $cuda_target)"
    cargo build --release --locked -p fedsb-client --features cuda --target-dir "$cuda_target"
  fi
fi
client_bin="$bin/fedsb-client"
[ "$gpu" = 1 ] && client_bin="${FEDSB_CUDA_CLIENT:-$cuda_target/release/fedsb-client}"
for f in "$bin/fedsb-server" "$client_bin"; do
  [ -x "$f" ] || { log "$f is missing: build it (cargo build --release ...) or set FEDSB_BIN_DIR"; exit 1; }
done

if [ "$gpu" = 1 ]; then
  docker image inspect "$base" >/dev/null 2>&1 || docker pull "$base"
else
  FEDSB_BASE_IMAGE="$base" bash scripts/docker-base.sh
fi

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp "$bin/fedsb-server" "$stage/fedsb-server"
cp "$client_bin" "$stage/fedsb-client"
# The release profile keeps line tables (backtraces): not needed in the image, and 3/4 of its size.
if command -v strip >/dev/null 2>&1; then strip --strip-debug "$stage/fedsb-server" "$stage/fedsb-client"; fi
cp docker/Dockerfile docker/entrypoint.sh docker/netshape.sh docker/delay-proxy.py "$stage/"
log "docker build -t $tag (base $base)"
# The legacy builder when the CLI has no buildx (it reads the local base image just the same).
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
old="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
docker build -q -f "$stage/Dockerfile" -t "$tag" --build-arg BASE="$base" \
  --build-arg EXTRA_PACKAGES="$extra_packages" "$stage" >/dev/null
new="$(docker image inspect -f '{{.Id}}' "$tag")"
# The image this one replaces (unless a container still uses it).
if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
log "built $tag: $(echo "$new" | cut -c1-19), $(docker run --rm --entrypoint fedsb-server "$tag" --version)"
