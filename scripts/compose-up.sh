#!/usr/bin/env bash
# Runs the docker-compose federation to its end and prints the coordinator's per-round metrics:
#
#   bash scripts/compose-up.sh [--keep] [--no-build]
#
# 1. builds the images (scripts/docker-build.sh: cargo build --release, base image, fedsb image) unless
#    --no-build; 2. `docker-compose up -d` (project $COMPOSE_PROJECT_NAME, default fedsb); 3. follows the
# coordinator's output until the run ends; 4. prints STATE/metrics.jsonl as a table and saves it to
# $FEDSB_METRICS_OUT when set; 5. `docker-compose down -v` unless --keep (then inspect with
# `docker-compose -p fedsb logs`, `... exec`, and remove with `docker-compose -p fedsb down -v`).
# The run is configured with FEDSB_* variables (docs/docker.md), e.g. with shaped client links:
#   FEDSB_NET_RATE=10mbit FEDSB_NET_DELAY_MS=50 FEDSB_METHOD=fedit bash scripts/compose-up.sh
# Exit status: 0 when the run completed and every client left cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/compose-lib.sh
. scripts/compose-lib.sh
CLOG_TAG=compose-up

keep=0
build=1
for a in "$@"; do
  case "$a" in
    --keep) keep=1 ;;
    --no-build) build=0 ;;
    *) echo "usage: $0 [--keep] [--no-build]" >&2; exit 2 ;;
  esac
done
PROJECT="${COMPOSE_PROJECT_NAME:-fedsb}"
export FEDSB_ASSETS="${FEDSB_ASSETS:-$HOME/.cache/fedsb/assets}"
[ -d "$FEDSB_ASSETS/models/all-minilm-l6-v2" ] || bash scripts/fetch-assets.sh
compose_detect
[ "$build" = 0 ] || bash scripts/docker-build.sh
[ "$keep" = 1 ] || trap 'compose_teardown' EXIT
trap 'exit 130' INT TERM

compose_teardown
start=$(date +%s)
fc up -d
coord="$(coordinator_id)"
docker logs -f "$coord" &
follow=$!
rc="$(docker wait "$coord")"
wait "$follow" 2>/dev/null || true
clients_ok=1
for c in $(service_containers client) $(service_containers client-gpu); do
  crc="$(timeout 120 docker wait "$c" || echo timeout)"
  name="$(docker inspect -f '{{.Name}}' "$c")"
  if [ "$crc" != 0 ]; then
    clients_ok=0
    clog "client ${name#/} exited with $crc; its last lines:"
    docker logs --tail 20 "$c" 2>&1 | sed 's/^/    /' >&2
  fi
done
m="$(metrics)"
[ -z "${FEDSB_METRICS_OUT:-}" ] || printf '%s\n' "$m" >"$FEDSB_METRICS_OUT"
summary_py="$(cat <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
print("%5s %9s %11s %-20s %8s %10s %11s %8s" % ("round", "status", "contributed", "lost", "seconds", "up/client",
                                               "down/client", "accuracy"))
for r in rows:
    acc = (r.get("eval") or {}).get("accuracy")
    print("%5d %9s %11d %-20s %8.1f %10d %11d %8s" % (
        r["round"], r["status"], len(r["contributed"]), ",".join(r["lost"]) or "-", r["seconds"],
        r["up_payload_per_client"], r["down_payload_per_client"], "-" if acc is None else "%.1f%%" % (100 * acc)))
done = [r for r in rows if r["status"] == "completed"]
if done:
    print("mean seconds per completed round: %.1f" % (sum(r["seconds"] for r in done) / len(done)))
PY
)"
printf '%s\n' "$m" | python3 -c "$summary_py"
clog "coordinator exited with $rc after $(($(date +%s) - start))s"
[ "$rc" = 0 ] && [ "$clients_ok" = 1 ]
