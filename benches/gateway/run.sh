#!/usr/bin/env bash
# `just bench-gateway`: what `kasmina gateway` costs and what its balancing buys, on loopback,
# in one run on this machine.
#   1. Overhead: wrk against one `kasmina serve` directly and through the gateway (fixed
#      --backend), at 1 and 8 clients, on the runtime's health route (the proxy's own cost
#      with next to nothing behind it) and on an all-MiniLM infer; p50/p99 and what the
#      gateway adds.
#   2. Balancing: two runtimes of unequal capacity (one with 1 worker and no batching, or on
#      the portable kernel; the other with the defaults) behind a round-robin gateway (what a
#      Service's spread amounts to) and a power-of-two-choices one, same wrk load; p99 ratio.
# Usage: run.sh KASMINA_BINARY ARTIFACT_DIR SECONDS
set -euo pipefail
bin=$1
artifact=$2
seconds=${3:-10}
here=$(cd "$(dirname "$0")" && pwd)
digest="sha256:$(sha256sum "$artifact/manifest.json" | cut -d' ' -f1)"
pids=()
trap 'kill ${pids[@]} 2>/dev/null || true' EXIT

wait_ready() { # url path
  for _ in $(seq 1 2000); do
    curl -sf "$1$2" >/dev/null && return 0
    sleep 0.01
  done
  echo "not ready: $1$2" >&2
  exit 1
}

serve() { # port options...
  local port=$1; shift
  "$bin" serve --host 127.0.0.1 --port "$port" --artifact "$artifact" --expect-digest "$digest" "$@" \
    2>>/tmp/kasmina-bench-gateway.log &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port" /v2/health/ready
}

gateway() { # port options...
  local port=$1; shift
  "$bin" gateway --host 127.0.0.1 --port "$port" "$@" 2>>/tmp/kasmina-bench-gateway.log &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port" /readyz
}

load() { # url clients [infer]
  INFER=${3:-0} wrk -t1 -c"$2" -d"${seconds}s" --timeout 10s -s "$here/get.lua" "$1" | sed -n 's/^RESULT //p'
}

field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
ms() { python3 -c "print(f'{$1 / 1000:.3f}')"; }
delta() { python3 -c "print(f'{($1 - $2) / 1000:+.3f}')"; }

: >/tmp/kasmina-bench-gateway.log
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs"
echo
echo "## Overhead: direct against through the gateway (ms)"
echo
echo "| route | clients | direct p50 / p99 | gateway p50 / p99 | added p50 / p99 | req/s direct / gateway |"
echo "|---|---|---|---|---|---|"
serve 18180
gateway 18181 --backend s=127.0.0.1:18180
for route in health infer; do
  infer=0; [ "$route" = infer ] && infer=1
  for c in 1 8; do
    d=$(load http://127.0.0.1:18180 "$c" "$infer")
    g=$(load http://127.0.0.1:18181 "$c" "$infer")
    echo "| $route | $c | $(ms "$(field p50_us "$d")") / $(ms "$(field p99_us "$d")") | $(ms "$(field p50_us "$g")") / $(ms "$(field p99_us "$g")") | $(delta "$(field p50_us "$g")" "$(field p50_us "$d")") / $(delta "$(field p99_us "$g")" "$(field p99_us "$d")") | $(field rps "$d") / $(field rps "$g") |"
  done
done
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

balance() { # title, options of the weaker runtime
  echo
  echo "## Balancing, 8 clients: one runtime with $1, one with the defaults"
  echo
  echo "| gateway balancing | p50 ms | p99 ms | req/s | errors |"
  echo "|---|---|---|---|---|"
  shift
  serve 18182 "$@"
  serve 18183
  gateway 18184 --balancing RoundRobin --backend s=127.0.0.1:18182 --backend s=127.0.0.1:18183
  gateway 18185 --balancing PowerOfTwoChoices --backend s=127.0.0.1:18182 --backend s=127.0.0.1:18183
  rr=$(load http://127.0.0.1:18184 8 1)
  p2c=$(load http://127.0.0.1:18185 8 1)
  for row in "RoundRobin|$rr" "PowerOfTwoChoices|$p2c"; do
    r=${row#*|}
    echo "| ${row%%|*} | $(ms "$(field p50_us "$r")") | $(ms "$(field p99_us "$r")") | $(field rps "$r") | $(( $(field errors "$r") + $(field non2xx "$r") )) |"
  done
  echo
  echo "p99 PowerOfTwoChoices / RoundRobin: $(python3 -c "print(f'{$(field p99_us "$p2c") / $(field p99_us "$rr"):.2f}')") (target <= 0.5)"
  kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
}

balance "1 worker and no batching" --workers 1 --max-batch 1
balance "the portable kernel (a CPU without SIMD int8, ~10x slower)" --kernel portable
