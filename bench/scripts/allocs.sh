#!/usr/bin/env bash
# Heap allocations per delivered message in the relay, for each relay
# binary given, alternating: during closed-loop `live` traffic (64 pairs,
# the library's clients) it counts the relay's malloc and realloc calls for
# 6 s with perf uprobes on libc, and reads the relay's own delivered counter
# (its /metrics) at both ends of the same window. A count, unlike CPU time,
# does not move with a noisy host. The probes slow the relay (each call
# traps), so the message rate in the window says nothing. A lower bound:
# calloc and aligned allocations are not counted (the relay's hot path
# makes neither), nor threads started after the window opens.
# Needs perf and root (uprobes). Build first:
#   cargo build --release -p relay-bench --bin relay-bench -p signal-relay --bin relay
# Usage: bench/scripts/allocs.sh OUT ROUNDS NAME=RELAY_BIN [NAME=RELAY_BIN]...
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1
rounds=$2
shift 2
bench=$PWD/target/release/relay-bench
libc=$(ldconfig -p | awk '/libc\.so\.6 .*x86-64/ {print $NF; exit}')
for fn in malloc realloc; do
  perf probe -q -x "$libc" "$fn" 2>/dev/null || true # already there
done
mkdir -p "$out"

delivered() {
  curl -sf -m 2 "http://127.0.0.1:$1/metrics" |
    awk '/^relay_messages_total\{outcome="delivered"\}/ {print $2}'
}

for round in $(seq 1 "$rounds"); do
  for spec in "$@"; do
    name=${spec%%=*}
    bin=$(realpath "${spec#*=}")
    "$bench" live --relay-bin "$bin" --target relay --mode closed --runs 1 --pairs 64 \
      --window 32 --duration 10 --warmup 2 --json --quiet > "$out/$name-$round.json" &
    bench_pid=$!
    # Each wait gives up after a minute: a bench that failed to start its
    # relay or its traffic must not hang the script.
    pid=""
    for _ in $(seq 600); do
      pid=$(pgrep -f "^$bin --listen" | head -1 || true)
      [ -n "$pid" ] && break
      sleep 0.1
    done
    [ -n "$pid" ] || { echo "$name: no relay started" >&2; exit 1; }
    # The relay's admin port is whichever of its listeners serves /metrics.
    port=""
    for _ in $(seq 300); do
      for p in $(ss -ltnpH | grep "pid=$pid," | awk '{print $4}' | sed 's/.*://'); do
        if curl -sf -m 2 "http://127.0.0.1:$p/metrics" > /dev/null; then port=$p; fi
      done
      [ -n "$port" ] && break
      sleep 0.2
    done
    [ -n "$port" ] || { echo "$name: the relay serves no /metrics" >&2; exit 1; }
    # Traffic has begun once something was delivered; skip two seconds more.
    for _ in $(seq 300); do
      [ "$(delivered "$port")" -gt 0 ] 2>/dev/null && break
      sleep 0.2
    done
    sleep 2
    before=$(delivered "$port")
    # Every thread of the relay (-p alone followed only the main one here).
    perf stat -x, -e probe_libc:malloc,probe_libc:realloc \
      -t "$(ls "/proc/$pid/task" | paste -sd,)" -- sleep 6 2> "$out/$name-$round.perf"
    after=$(delivered "$port")
    wait "$bench_pid"
    calls=$(awk -F, '/probe_libc/ {n += $1} END {print n}' "$out/$name-$round.perf")
    echo "$name round $round: $((after - before)) delivered, $calls allocations," \
      "$(python3 -c "print(round($calls / max(1, $after - $before), 2))") per message" |
      tee -a "$out/summary.txt"
  done
done
