#!/usr/bin/env bash
# A whole sdlm cluster as processes on loopback: etcd, N workers, a scheduler, a gateway, and a
# real Prometheus (Debian's) scraping every /metrics with deploy/prometheus/alerts.yml loaded.
# Logs and pid files live under the run directory; `down` stops exactly the processes `up`
# started (by their pid files) and nothing else.
#
#   deploy/local/cluster.sh up [--workers N] [--model PATH]
#   deploy/local/cluster.sh status
#   deploy/local/cluster.sh down
#
# Environment: SDLM_CLUSTER_DIR (run directory, default runs/local-cluster), SDLM_CLUSTER_PORT
# (first of the ports it uses, default 52000), SDLM_BIN (the sdlm binary, default the release
# build, built when missing).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
dir=${SDLM_CLUSTER_DIR:-$repo/runs/local-cluster}
base=${SDLM_CLUSTER_PORT:-52000}
cmd=${1:-}
shift || true
workers=2
model=$repo/models/sdlm-tiny-code
while [[ $# -gt 0 ]]; do
  case $1 in
    --workers) workers=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    *) echo "unknown option $1 (options: --workers N, --model PATH)" >&2; exit 2 ;;
  esac
done
[[ $workers =~ ^[1-9][0-9]?$ ]] || { echo "--workers must be 1..99, got $workers" >&2; exit 2; }

etcd_port=$base; etcd_peer=$((base + 1))
gateway=$((base + 10)); gateway_metrics=$((base + 11))
scheduler=$((base + 20)); scheduler_metrics=$((base + 21))
prometheus_port=$((base + 90))
worker_port() { echo $((base + 30 + 2 * $1)); }
worker_metrics() { echo $((base + 31 + 2 * $1)); }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# start NAME COMMAND...: in a session of its own, output to NAME.log, pid to NAME.pid.
start() {
  local name=$1; shift
  setsid "$@" >"$dir/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
}

# wait_http PORT PATH WHAT: until http://127.0.0.1:PORT/PATH answers (60 s).
wait_http() {
  for _ in $(seq 600); do
    curl -fsS "http://127.0.0.1:$1$2" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$3 did not come up; see $dir" >&2
  return 1
}

up() {
  mkdir -p "$dir"
  for p in "$dir"/*.pid; do
    if alive "$p"; then echo "already up ($p); run down first" >&2; exit 1; fi
  done
  rm -f "$dir"/*.pid
  local sdlm=${SDLM_BIN:-$repo/target/release/sdlm}
  if [[ ! -x $sdlm ]]; then
    (cd "$repo" && cargo build --release --bin sdlm >&2)
  fi
  local etcd prometheus
  etcd=$("$repo/scripts/install-etcd.sh")
  prometheus=$("$repo/scripts/install-prometheus.sh")
  local etcd_url=http://127.0.0.1:$etcd_port
  start etcd "$etcd" --name local --data-dir "$dir/etcd-data" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "local=http://127.0.0.1:$etcd_peer"
  wait_http "$etcd_port" /health etcd
  local targets=""
  for ((i = 0; i < workers; i++)); do
    start "worker-$i" "$sdlm" worker --model "$model" --id "worker-$i" \
      --listen "127.0.0.1:$(worker_port $i)" --advertise "127.0.0.1:$(worker_port $i)" \
      --metrics-listen "127.0.0.1:$(worker_metrics $i)" --etcd "$etcd_url" \
      --kv-cache-bytes $((256 << 20)) --drain-seconds 5
    targets+="'127.0.0.1:$(worker_metrics $i)', "
  done
  start scheduler "$sdlm" scheduler --listen "127.0.0.1:$scheduler" \
    --advertise "127.0.0.1:$scheduler" --metrics-listen "127.0.0.1:$scheduler_metrics" \
    --etcd "$etcd_url"
  start gateway "$sdlm" gateway --listen "127.0.0.1:$gateway" \
    --metrics-listen "127.0.0.1:$gateway_metrics" --etcd "$etcd_url"
  cat >"$dir/prometheus.yml" <<YAML
# Written by deploy/local/cluster.sh: every service's /metrics every 2 s.
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files:
  - $repo/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: sdlm-worker
    static_configs: [{targets: [${targets%, }]}]
  - job_name: sdlm-scheduler
    static_configs: [{targets: ['127.0.0.1:$scheduler_metrics']}]
  - job_name: sdlm-gateway
    static_configs: [{targets: ['127.0.0.1:$gateway_metrics']}]
YAML
  start prometheus "$prometheus" --config.file "$dir/prometheus.yml" \
    --storage.tsdb.path "$dir/prometheus-data" --web.listen-address "127.0.0.1:$prometheus_port"
  for ((i = 0; i < workers; i++)); do wait_http "$(worker_metrics $i)" /metrics "worker-$i"; done
  wait_http "$scheduler_metrics" /metrics scheduler
  wait_http "$gateway_metrics" /metrics gateway
  wait_http "$prometheus_port" /-/ready prometheus
  # Ready when the scheduler sees every worker alive.
  for _ in $(seq 600); do
    live=$(curl -fsS "http://127.0.0.1:$scheduler_metrics/metrics" | awk '$1 == "sdlm_workers_live" { print $2 }')
    [[ ${live:-0} -ge $workers ]] && break
    sleep 0.1
  done
  [[ ${live:-0} -ge $workers ]] || { echo "the scheduler sees ${live:-0} of $workers workers; see $dir" >&2; exit 1; }
  # And when the gateway follows the elected scheduler (it polls etcd every half second).
  for _ in $(seq 600); do
    grep -q 'following the scheduler leader.*Some' "$dir/gateway.log" && break
    sleep 0.1
  done
  grep -q 'following the scheduler leader.*Some' "$dir/gateway.log" ||
    { echo "the gateway found no scheduler leader; see $dir" >&2; exit 1; }
  echo "gRPC on 127.0.0.1:$gateway, Prometheus on http://127.0.0.1:$prometheus_port, $workers workers, logs in $dir"
}

status() {
  local any=0
  for p in "$dir"/*.pid; do
    [[ -f $p ]] || continue
    any=1
    if alive "$p"; then echo "$(basename "$p" .pid): running (pid $(cat "$p"))"
    else echo "$(basename "$p" .pid): stopped"; fi
  done
  [[ $any == 1 ]] || echo "not up ($dir has no pid files)"
}

# stop NAME: SIGTERM, then SIGKILL after 20 s; only the pid its file names.
stop() {
  local p=$dir/$1.pid
  [[ -f $p ]] || return 0
  local pid; pid=$(cat "$p")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$p"
}

down() {
  # Front to back: nothing new arrives while the rest drains; etcd goes last.
  stop prometheus
  stop gateway
  stop scheduler
  for p in "$dir"/worker-*.pid; do [[ -f $p ]] && stop "$(basename "$p" .pid)"; done
  stop etcd
  echo "down"
}

case $cmd in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up [--workers N] [--model PATH] | status | down" >&2; exit 2 ;;
esac
