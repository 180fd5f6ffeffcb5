#!/bin/bash
# fedsb-netshape URL: gives this container's network link a limited bandwidth and an added latency, so that a
# client sees what a slow link does to a round; prints "URL SERVER_NAME" for fedsb-client to connect with.
#
#   FEDSB_NET_RATE      rate in each direction, in tc units (e.g. 10mbit, 512kbit); empty: not limited
#   FEDSB_NET_DELAY_MS  latency added to every round trip, in ms; empty or 0: none
#   FEDSB_NET_DEV       the interface (default eth0)
#
# Upload (egress): `tc netem delay D rate R` where the kernel has sch_netem, else a token bucket (tbf).
# Download (ingress): redirected through an ifb device with a tbf of the same rate.
# Without netem, the delay comes from a small user-space proxy (fedsb-delay-proxy) on 127.0.0.1 that holds
# each byte going to the coordinator for D ms; the client then connects through it, verifying the
# coordinator's certificate under its real name (--server-name). Needs the NET_ADMIN capability and `tc`.
set -euo pipefail
log() { printf '[netshape] %s\n' "$*" >&2; }

url="${1:?usage: fedsb-netshape URL}"
dev="${FEDSB_NET_DEV:-eth0}"
rate="${FEDSB_NET_RATE:-}"
delay="${FEDSB_NET_DELAY_MS:-0}"
[ -n "$delay" ] || delay=0
[[ "$delay" =~ ^[0-9]+$ ]] || { log "FEDSB_NET_DELAY_MS must be whole milliseconds, got '$delay'"; exit 1; }
hostport="${url#*://}"
hostport="${hostport%%/*}"
host="${hostport%:*}"
port="${hostport##*:}"
host="${host#[}"
host="${host%]}"
# A token bucket's burst: at least one 1 ms tick of traffic and a few full packets.
tbf_args() { echo "rate $1 burst 64kb latency 200ms"; }

tc qdisc del dev "$dev" root 2>/dev/null || true
tc qdisc del dev "$dev" ingress 2>/dev/null || true
netem=0
if [ "$delay" -gt 0 ] && tc qdisc add dev "$dev" root handle 1: netem delay "${delay}ms" ${rate:+rate "$rate"} limit 100000 2>/dev/null; then
  netem=1
  log "$dev egress: netem delay ${delay}ms${rate:+ rate $rate}"
elif [ -n "$rate" ]; then
  # shellcheck disable=SC2046
  tc qdisc add dev "$dev" root handle 1: tbf $(tbf_args "$rate")
  log "$dev egress: tbf rate $rate"
fi
if [ -n "$rate" ]; then
  ip link show fedsb-ifb >/dev/null 2>&1 || ip link add fedsb-ifb type ifb
  ip link set fedsb-ifb up
  tc qdisc del dev fedsb-ifb root 2>/dev/null || true
  tc qdisc add dev "$dev" handle ffff: ingress
  tc filter add dev "$dev" parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev fedsb-ifb
  # shellcheck disable=SC2046
  tc qdisc add dev fedsb-ifb root tbf $(tbf_args "$rate")
  log "$dev ingress: tbf rate $rate (through fedsb-ifb)"
fi
if [ "$delay" -gt 0 ] && [ "$netem" = 0 ]; then
  lport="${FEDSB_NET_PROXY_PORT:-17443}"
  log "no sch_netem in this kernel: +${delay}ms round trip from fedsb-delay-proxy 127.0.0.1:$lport -> $host:$port"
  nohup fedsb-delay-proxy --listen "127.0.0.1:$lport" --upstream "$host:$port" --delay-ms "$delay" \
    >/proc/1/fd/2 2>&1 </dev/null &
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$lport") 2>/dev/null && break
    sleep 0.1
  done
  echo "https://127.0.0.1:$lport $host"
else
  echo "$url $host"
fi
