#!/usr/bin/env bash
# The docker-compose federation, tested for real (the docker step of .ci/run):
#
#   bash scripts/compose-test.sh [basic|faults|all]      (default all)
#
# basic:  3 clients, 2 rounds on MiniLM: the coordinator and every client must finish cleanly.
# faults: 3 clients, 3 rounds, quorum 2 (all three sampled every round):
#   round 1  client-3's container is killed (docker kill) while it trains; client-2 is disconnected from the
#            network (docker network disconnect) once its round-1 update is in. The round closes at its
#            deadline with the quorum: contributed client-1, client-2; lost client-3.
#   round 2  client-3's container is started again and rejoins; client-2 is still cut off. Closes at its
#            deadline: contributed client-1, client-3; lost client-2.
#   round 3  client-2 is reconnected and rejoins: all three contribute; the run completes.
# metrics.jsonl (`lost` per round) is checked against that. Each run is a compose project of its own, torn
# down afterwards (also on failure or interruption); nothing is left behind (checked).
# Needs a Docker daemon; builds the images first (scripts/docker-build.sh; FEDSB_NO_BUILD=1 skips it).
# shellcheck disable=SC2016  # the conditions of wait_for are evaluated later, on purpose
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/compose-lib.sh
. scripts/compose-lib.sh
CLOG_TAG=compose-test

what="${1:-all}"
case "$what" in basic | faults | all) ;; *) echo "usage: $0 [basic|faults|all]" >&2; exit 2 ;; esac
TMP="$(mktemp -d "${TMPDIR:-/tmp}/fedsb-compose-test.XXXXXX")"
PROJECT=""
on_exit() {
  local rc=$?
  if [ -n "$PROJECT" ]; then
    if [ "$rc" != 0 ]; then
      clog "FAILED: the last lines of every container of $PROJECT:"
      for c in $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do
        echo "---- $(docker inspect -f '{{.Name}} ({{.State.Status}}, exit {{.State.ExitCode}})' "$c")" >&2
        docker logs --tail 25 "$c" 2>&1 | sed 's/^/    /' >&2
      done
    fi
    compose_teardown
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

fail() {
  clog "FAIL: $*"
  exit 1
}

# Waits (up to $2 s) until command $1 succeeds.
wait_for() {
  local cond="$1" limit="$2" what="$3" t0
  t0=$(date +%s)
  until eval "$cond"; do
    if [ $(($(date +%s) - t0)) -ge "$limit" ]; then fail "timed out after ${limit}s waiting for: $what"; fi
    if [ "$(docker inspect -f '{{.State.Running}}' "$(coordinator_id)" 2>/dev/null)" != true ]; then
      fail "the coordinator stopped while waiting for: $what"
    fi
    sleep 0.5
  done
  clog "$what ($(($(date +%s) - t0))s)"
}

# The container of client NAME (by the identity its entrypoint claimed).
client_container() {
  local c
  for c in $(service_containers client); do
    if [ "$(docker exec "$c" cat /tmp/fedsb-identity 2>/dev/null)" = "$1" ]; then
      echo "$c"
      return
    fi
  done
  return 1
}

# Round $1 of the metrics as "status|contributed,...|lost,..." (empty if not there yet).
round_line() {
  metrics | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
rows = [r for r in rows if r["round"] == int(sys.argv[1]) and r["status"] == "completed"]
if rows:
    r = rows[-1]
    print("%s|%s|%s" % (r["status"], ",".join(sorted(r["contributed"])), ",".join(sorted(r["lost"]))))
' "$1"
}

expect_round() {
  local got
  got="$(round_line "$1")"
  [ "$got" = "$2" ] || fail "round $1: expected $2, metrics say '${got:-nothing}'"
  clog "round $1 as expected: $got (status|contributed|lost)"
}

start_project() {
  PROJECT="fedsb-test-$1-$$"
  compose_teardown
  clog "== $1: project $PROJECT"
  fc up -d 2>&1 | sed 's/^/    /' >&2
}

finish_project() {
  local coord rc c crc
  coord="$(coordinator_id)"
  rc="$(timeout "$1" docker wait "$coord" || echo timeout)"
  [ "$rc" = 0 ] || fail "the coordinator exited with $rc"
  docker logs "$coord" 2>&1 | grep -E '^(round |run )|opened|accepted|joined' | sed 's/^/    /' >&2
  for c in $(service_containers client); do
    crc="$(timeout 60 docker wait "$c" || echo timeout)"
    [ "$crc" = 0 ] || fail "client container $c exited with $crc"
  done
  compose_teardown
  [ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ] || fail "containers left behind"
  [ -z "$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")" ] || fail "networks left"
  [ -z "$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")" ] || fail "volumes left"
  PROJECT=""
}

T0=$(date +%s)
export FEDSB_ASSETS="${FEDSB_ASSETS:-$HOME/.cache/fedsb/assets}"
[ -f "$FEDSB_ASSETS/models/all-minilm-l6-v2/model.safetensors" ] || bash scripts/fetch-assets.sh
compose_detect
[ "${FEDSB_NO_BUILD:-0}" = 1 ] || bash scripts/docker-build.sh

# Small and quick: 5 local steps of batch 16, 200 evaluation examples.
export FEDSB_CLIENTS=3 FEDSB_LOCAL_STEPS=5 FEDSB_BATCH_SIZE=16 FEDSB_EVAL_LIMIT=200 FEDSB_RETRY_SECS=900
export RAYON_NUM_THREADS=1

if [ "$what" != faults ]; then
  export FEDSB_ROUNDS=2 FEDSB_QUORUM=3 FEDSB_DEADLINE_SECS=600
  start_project basic
  finish_project 900
  clog "basic: passed"
fi

if [ "$what" != basic ]; then
  # The deadline bounds rounds 1 and 2 (each waits for a lost client); it must cover a restarted client's
  # join and training in round 2.
  export FEDSB_ROUNDS=3 FEDSB_QUORUM=2 FEDSB_DEADLINE_SECS="${FEDSB_FAULT_DEADLINE_SECS:-60}"
  start_project faults
  coord="$(coordinator_id)"
  wait_for '[ "$(service_containers client | wc -l)" = 3 ] && client_container client-3 >/dev/null && client_container client-2 >/dev/null' 120 "client identities claimed"
  c2="$(client_container client-2)"
  c3="$(client_container client-3)"
  net="$(container_networks "$c2" | awk '{print $1}')"
  [ -n "$net" ] || fail "no network for client-2"

  wait_for 'docker logs "$c3" 2>&1 | grep -q "round 1: training"' 300 "client-3 is training round 1"
  docker kill "$c3" >/dev/null
  clog "killed client-3's container mid-round"
  wait_for 'docker logs "$c2" 2>&1 | grep -q "round 1: update sent"' 300 "client-2 sent its round-1 update"
  docker network disconnect "$net" "$c2"
  clog "disconnected client-2 from $net"

  wait_for '[ -n "$(round_line 1)" ]' $((FEDSB_DEADLINE_SECS + 120)) "round 1 closed"
  expect_round 1 "completed|client-1,client-2|client-3"
  docker start "$c3" >/dev/null
  clog "started client-3's container again"

  wait_for '[ -n "$(round_line 2)" ]' $((FEDSB_DEADLINE_SECS + 120)) "round 2 closed"
  expect_round 2 "completed|client-1,client-3|client-2"
  docker network connect "$net" "$c2"
  clog "reconnected client-2 to $net"

  wait_for '[ -n "$(round_line 3)" ]' $((FEDSB_DEADLINE_SECS + 120)) "round 3 closed"
  expect_round 3 "completed|client-1,client-2,client-3|"
  finish_project 300
  clog "faults: passed"
fi
clog "all passed in $(($(date +%s) - T0))s"
