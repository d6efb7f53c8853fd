#!/usr/bin/env bash
# `just bench-serve`: all-MiniLM-L6-v2 Q8_0 served by `kasmina serve` on loopback, loaded by
# Debian's wrk. Prints a markdown table: latency and throughput at 1, 8 and 32 clients with
# batching on and off, overload (4x capacity) with shedding, peak RSS and cold start.
# Usage: run.sh KASMINA_BINARY ARTIFACT_DIR [SECONDS]
set -euo pipefail
bin=$1
artifact=$2
seconds=${3:-10}
here=$(cd "$(dirname "$0")" && pwd)
digest="sha256:$(sha256sum "$artifact/manifest.json" | cut -d' ' -f1)"
port=18080
url="http://127.0.0.1:$port"

start() {
  "$bin" serve --host 127.0.0.1 --port "$port" --artifact "$artifact" --expect-digest "$digest" "$@" \
    2>/tmp/kasmina-bench-serve.log &
  pid=$!
  started=$(date +%s.%N)
  until curl -sf "$url/v2/health/ready" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || { cat /tmp/kasmina-bench-serve.log; exit 1; }
    sleep 0.005
  done
  ready=$(date +%s.%N)
  cold_ms=$(python3 -c "print(f'{($ready - $started) * 1000:.0f}')")
}

stop() {
  kill -TERM "$pid"
  wait "$pid" || true
}

rss_mib() {
  awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status"
}

load() { # connections [pace ms]
  PACE_MS=${2:-0} wrk -t1 -c"$1" -d"${seconds}s" --timeout 10s -s "$here/infer.lua" "$url" | sed -n 's/^RESULT //p'
}

field() { # name line
  sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$2"
}

echo "| batching | clients | p50 ms | p99 ms | req/s | 200 | 503 | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|"
for mode in on off; do
  if [ "$mode" = on ]; then start --max-batch 8 --max-batch-delay 2ms; else start --max-batch 1; fi
  [ "$mode" = on ] && cold_on=$cold_ms
  for c in 1 8 32; do
    r=$(load "$c")
    echo "| $mode | $c | $(field p50_ms "$r") | $(field p99_ms "$r") | $(field rps "$r") | $(field ok "$r") | $(field shed "$r") | $(rss_mib) |"
  done
  stop
done

# Overload: 128 clients, each sending a request a random (exponential, mean 100 ms) time
# after its last answer, offer about 1,250 req/s: 4x what the replica computes (~320 req/s
# at 8 clients above). The replica sheds (503 + Retry-After) whatever would wait longer
# than --max-queue-delay for a worker, so admitted requests keep their latency; batching
# is as shipped (on, adaptive). wrk shares the 2 cores with the server.
start --max-queue 8 --max-queue-delay 2ms
unloaded=$(load 1)
over=$(load 128 100)
echo
echo "| overload (queue delay ≤ 2 ms) | clients | offered req/s | admitted p50 ms (server) | admitted p99 ms (server) | 200/s | 503 share |"
echo "|---|---|---|---|---|---|---|"
for pair in "unloaded:1:$unloaded" "4x capacity:128:$over"; do
  IFS=: read -r label c r <<<"$pair"
  ok=$(field ok "$r"); shed=$(field shed "$r")
  share=$(python3 -c "print(f'{$shed / max(1, $ok + $shed):.0%}')")
  okps=$(python3 -c "print(f'{$ok / $seconds:.1f}')")
  echo "| $label | $c | $(field rps "$r") | $(field ok_server_p50_ms "$r") | $(field ok_server_p99_ms "$r") | $okps | $share |"
done
stop
echo
echo "cold start (process start → ready, verify + load included): ${cold_on} ms"
sed 's/\x1b\[[0-9;]*m//g' /tmp/kasmina-bench-serve.log | grep -o 'verify_ms=[0-9.]*\|load_ms=[0-9.]*' | tr '\n' ' ' || true
echo
