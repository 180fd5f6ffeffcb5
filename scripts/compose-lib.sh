# shellcheck shell=bash
# Helpers of scripts/compose-up.sh and scripts/compose-test.sh (sourced, not run).
#   compose_detect        sets COMPOSE to `docker compose` (v2 plugin) or `docker-compose` (v1), installing
#                         the Debian docker-compose package when neither exists and apt-get can
#   fc ARGS...            runs compose on the repository's docker-compose.yml, project $PROJECT
#   service_containers S  ids of the containers (running or not) of service S
#   coordinator_id        id of the coordinator container
#   metrics               the coordinator's /state/metrics.jsonl (running or stopped container)
#   compose_teardown      down -v --remove-orphans, then removes what is left of the project

REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

clog() { printf '[%s %s] %s\n' "${CLOG_TAG:-compose}" "$(date -u +%H:%M:%S)" "$*" >&2; }

compose_detect() {
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
  elif command -v apt-get >/dev/null 2>&1; then
    clog "no docker compose: installing the docker-compose package"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq docker-compose >/dev/null
    COMPOSE=(docker-compose)
  else
    clog "neither \`docker compose\` nor docker-compose is installed"
    return 1
  fi
  clog "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
}

fc() { "${COMPOSE[@]}" -p "$PROJECT" -f "$REPO/docker-compose.yml" "$@"; }

service_containers() {
  docker ps -aq --no-trunc --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1"
}

coordinator_id() { service_containers coordinator | head -n1; }

metrics() {
  local c
  c="$(coordinator_id)"
  [ -n "$c" ] || return 0
  docker cp "$c:/state/metrics.jsonl" - 2>/dev/null | tar -xO 2>/dev/null || true
}

# The networks a container is attached to.
container_networks() { docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$1"; }

compose_teardown() {
  [ -n "${PROJECT:-}" ] || return 0
  fc down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
  # Whatever `down` missed (a container it did not know, a network a test re-attached).
  local ids kind
  for kind in "ps -a" "network ls" "volume ls"; do
    # shellcheck disable=SC2086
    mapfile -t ids < <(docker $kind -q --filter "label=com.docker.compose.project=$PROJECT")
    [ "${#ids[@]}" -eq 0 ] && continue
    case "$kind" in
      ps*) docker rm -f "${ids[@]}" ;;
      network*) docker network rm "${ids[@]}" ;;
      volume*) docker volume rm -f "${ids[@]}" ;;
    esac >/dev/null 2>&1 || true
  done
}
