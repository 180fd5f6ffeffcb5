#!/bin/bash
# Entrypoint of the fedsb image (docker/Dockerfile); the services of docker-compose.yml are its commands:
#
#   setup        into /setup: certificates (CA, server, client-1..N), the data shards, run.toml
#   coordinator  fedsb-server run --config /setup/run.toml (or $FEDSB_CONFIG) on 0.0.0.0:7443, mutual TLS
#   client       fedsb-client join as one of client-1..N (claimed in /clients, kept across restarts of the
#                same container) or as $FEDSB_CLIENT_NAME, with optional network shaping (fedsb-netshape)
#   status       fedsb-client status: the coordinator's JSON status
#   help         this text
# Anything else runs as given (e.g. `fedsb-server certs --help`). Every setting is an environment variable,
# listed with its default in docs/docker.md.
set -euo pipefail

die() { printf 'fedsb-entrypoint: %s\n' "$*" >&2; exit 1; }
log() { printf '[%s] %s\n' "${ROLE:-fedsb}" "$*" >&2; }

SETUP="${FEDSB_SETUP_DIR:-/setup}"
N="${FEDSB_CLIENTS:-3}"
PORT="${FEDSB_PORT:-7443}"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "FEDSB_CLIENTS must be a positive integer, got '$N'"

client_names() { seq -s, -f 'client-%g' 1 "$N"; }

# The run configuration from the environment (docs/docker.md lists the variables).
run_toml() {
  local quorum="${FEDSB_QUORUM:-$N}" eval_data="${FEDSB_EVAL:-/assets/data/rotten-tomatoes/test.jsonl}"
  cat <<EOF
# Written by the fedsb \`setup\` service from its environment (FEDSB_*); see docs/docker.md.
rounds = ${FEDSB_ROUNDS:-5}
clients_per_round = ${FEDSB_CLIENTS_PER_ROUND:-$N}
min_clients = ${FEDSB_MIN_CLIENTS:-$N}
quorum = $quorum
round_deadline_secs = ${FEDSB_DEADLINE_SECS:-900}
on_quorum_miss = "${FEDSB_ON_QUORUM_MISS:-retry}"
max_retries = ${FEDSB_MAX_RETRIES:-2}
seed = ${FEDSB_SEED:-42}
method = "${FEDSB_METHOD:-fedsb}"
wire_dtype = "${FEDSB_WIRE_DTYPE:-f32}"
state_dir = "/state"

[model]
path = "${FEDSB_MODEL:-/assets/models/all-minilm-l6-v2}"
num_labels = ${FEDSB_NUM_LABELS:-2}

[adapter]
rank = ${FEDSB_RANK:-16}

[local]
steps = ${FEDSB_LOCAL_STEPS:-40}
batch_size = ${FEDSB_BATCH_SIZE:-32}
lr = ${FEDSB_LR:-0.005}
max_len = ${FEDSB_MAX_LEN:-64}

[init]
data = "$SETUP/data/public.jsonl"
EOF
  if [ "$eval_data" != "none" ]; then
    printf '\n[eval]\ndata = "%s"\nlimit = %s\n' "$eval_data" "${FEDSB_EVAL_LIMIT:-1000}"
  fi
}

cmd_setup() {
  ROLE=setup
  local names server_names want
  names="$(client_names)"
  server_names="${FEDSB_SERVER_NAMES:-coordinator,localhost,127.0.0.1}"
  mkdir -p "$SETUP"
  # Certificates: made once; made again when the client list or the server names change.
  want="$server_names|$names|${FEDSB_CERT_DAYS:-30}"
  if [ "$(cat "$SETUP/certs/.made-for" 2>/dev/null)" != "$want" ]; then
    local args=() s
    IFS=, read -ra s <<<"$server_names"
    for x in "${s[@]}"; do args+=(--server-name "$x"); done
    rm -rf "$SETUP/certs.new"
    fedsb-server certs --out "$SETUP/certs.new" "${args[@]}" --clients "$names" --days "${FEDSB_CERT_DAYS:-30}"
    echo "$want" >"$SETUP/certs.new/.made-for"
    rm -rf "$SETUP/certs"
    mv "$SETUP/certs.new" "$SETUP/certs"
  else
    log "certificates in $SETUP/certs are current (for $names)"
  fi
  # Data: the first FEDSB_PUBLIC_EXAMPLES examples are the coordinator's public data for the LoRA-SB init;
  # the rest is dealt round-robin into one shard per client (an IID split of shuffled data).
  local train="${FEDSB_TRAIN:-/assets/data/rotten-tomatoes/train.jsonl}" p="${FEDSB_PUBLIC_EXAMPLES:-256}"
  [ -s "$train" ] || die "$train is missing: run \`bash scripts/fetch-assets.sh\` on the host (mounted from FEDSB_ASSETS)"
  rm -rf "$SETUP/data.new"
  mkdir -p "$SETUP/data.new"
  head -n "$p" "$train" >"$SETUP/data.new/public.jsonl"
  tail -n +"$((p + 1))" "$train" | awk -v n="$N" -v d="$SETUP/data.new" \
    'NF { f = sprintf("%s/shard-%d.jsonl", d, (c++ % n) + 1); print > f }'
  rm -rf "$SETUP/data"
  mv "$SETUP/data.new" "$SETUP/data"
  log "data: $(wc -l <"$SETUP/data/public.jsonl") public examples, shards $(wc -l "$SETUP"/data/shard-*.jsonl | awk '$2 != "total" {printf "%s ", $1}')"
  run_toml >"$SETUP/run.toml.new"
  mv "$SETUP/run.toml.new" "$SETUP/run.toml"
  log "run.toml: $(grep -E '^(rounds|quorum|round_deadline_secs|method) ' "$SETUP/run.toml" | tr '\n' ' ')"
  # Identity claims of an earlier `up` no longer hold (those containers are being replaced).
  if [ -d /clients ]; then rm -rf /clients/claims; fi
  log "ready"
}

cmd_coordinator() {
  ROLE=coordinator
  local config="${FEDSB_CONFIG:-$SETUP/run.toml}" certs="${FEDSB_CERTS:-$SETUP/certs}"
  local extra=()
  # Extra flags, e.g. FEDSB_COORDINATOR_ARGS="--resume --h2-window-kib 1024".
  read -ra extra <<<"${FEDSB_COORDINATOR_ARGS:-}"
  exec fedsb-server run --config "$config" --listen "0.0.0.0:$PORT" \
    --tls-cert "$certs/server.pem" --tls-key "$certs/server.key" --client-ca "$certs/ca.pem" "${extra[@]}"
}

# Prints this container's client name: $FEDSB_CLIENT_NAME, else the first of client-1..N that no other
# container holds. A claim is a folder /clients/claims/client-I holding the claiming container's hostname
# (its id), so a restarted container (docker start) keeps its identity.
claim_identity() {
  if [ -n "${FEDSB_CLIENT_NAME:-}" ]; then
    echo "$FEDSB_CLIENT_NAME"
    return
  fi
  local me i d
  me="$(hostname)"
  mkdir -p /clients/claims
  for i in $(seq 1 "$N"); do
    d="/clients/claims/client-$i"
    if mkdir "$d" 2>/dev/null; then
      echo "$me" >"$d/owner"
      echo "client-$i"
      return
    fi
    if [ "$(cat "$d/owner" 2>/dev/null)" = "$me" ]; then
      echo "client-$i"
      return
    fi
  done
  die "all $N client identities are taken: more client containers than FEDSB_CLIENTS=$N"
}

cmd_client() {
  local name
  name="$(claim_identity)"
  ROLE="$name"
  echo "$name" >/tmp/fedsb-identity
  local certs="${FEDSB_CERTS:-$SETUP/certs}" idx="${name##*-}"
  local ca="${FEDSB_CA:-$certs/ca.pem}" cert="${FEDSB_CERT:-$certs/clients/$name.pem}"
  local key="${FEDSB_KEY:-$certs/clients/$name.key}"
  local data="${FEDSB_DATA:-$SETUP/data/shard-$idx.jsonl}"
  local server="${FEDSB_SERVER:-https://coordinator:$PORT}"
  local model="${FEDSB_MODEL:-/assets/models/all-minilm-l6-v2}"
  local work="${FEDSB_WORK_DIR:-/clients/$name}"
  local conn=(--server "$server")
  if [ -z "${RAYON_NUM_THREADS:-}" ]; then
    # The clients of one machine share its cores.
    RAYON_NUM_THREADS=$(($(nproc) / N))
    [ "$RAYON_NUM_THREADS" -ge 1 ] || RAYON_NUM_THREADS=1
    export RAYON_NUM_THREADS
  fi
  if [ -n "${FEDSB_NET_RATE:-}${FEDSB_NET_DELAY_MS:-}" ]; then
    # Shapes eth0; prints the server URL and name to use (a local delay proxy where the kernel lacks netem).
    local shaped
    shaped="$(fedsb-netshape "$server")" || die "network shaping failed (needs cap_add NET_ADMIN)"
    read -r url sni <<<"$shaped"
    conn=(--server "$url" --server-name "$sni")
  fi
  local extra=()
  read -ra extra <<<"${FEDSB_CLIENT_ARGS:-}"
  log "joining $server as $name (data $data, $RAYON_NUM_THREADS threads, device ${FEDSB_DEVICE:-cpu})"
  exec fedsb-client join "${conn[@]}" --ca "$ca" --cert "$cert" --key "$key" --model "$model" --data "$data" \
    --work-dir "$work" --device "${FEDSB_DEVICE:-cpu}" --retry-secs "${FEDSB_RETRY_SECS:-900}" "${extra[@]}" "$@"
}

cmd_status() {
  local certs="${FEDSB_CERTS:-$SETUP/certs}" name="${FEDSB_CLIENT_NAME:-client-1}"
  exec fedsb-client status --server "${FEDSB_SERVER:-https://coordinator:$PORT}" --ca "${FEDSB_CA:-$certs/ca.pem}" \
    --cert "${FEDSB_CERT:-$certs/clients/$name.pem}" --key "${FEDSB_KEY:-$certs/clients/$name.key}"
}

case "${1:-help}" in
  setup) cmd_setup ;;
  coordinator) cmd_coordinator ;;
  client) shift; cmd_client "$@" ;;
  status) cmd_status ;;
  help | --help | -h) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) exec "$@" ;;
esac
