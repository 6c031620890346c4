#!/usr/bin/env bash
# Runs the benchmark suite behind BENCHMARKS.md: every scenario at its
# published size, RUNS times, each run's JSON report into OUT. Build first:
#   cargo build --release -p relay-bench --bin relay-bench -p signal-relay --bin relay
# Usage: bench/scripts/suite.sh [OUT] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/bench-results}
runs=${2:-3}
bench=target/release/relay-bench
mkdir -p "$out"

# Live: closed loop alternating the relay (with the library's clients, then
# with raw ones), the baseline and the answered baseline, then open loop at
# half the relay's median, in one invocation so ratios come from the same
# run; then the same offered rate over 16 pairs.
"$bench" live --pairs 64 --window 32 --runs "$runs" --duration 10 --warmup 2 \
  --answered-baseline --raw-client --quiet --json --plot "$out/live.svg" > "$out/live.json"
rate=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["summary"]["open_loop_offered_msgs_per_s"])' \
  < "$out/live.json")
"$bench" live --pairs 16 --mode open --rate "$rate" --duration 10 --warmup 2 \
  --answered-baseline --quiet --json > "$out/live-open-16.json"
for i in $(seq 1 "$runs"); do
  "$bench" offline --messages 200000 --senders 16 --quiet --json > "$out/offline-$i.json"
  "$bench" connections --connections 19000 --per-agent 9500 --hold 5 \
    --quiet --json > "$out/connections-$i.json"
  "$bench" reconnect --clients 10000 --per-agent 5000 --concurrency 1000 \
    --quiet --json > "$out/reconnect-$i.json"
  "$bench" login --logins 300 --concurrency 32 --quiet --json > "$out/login-$i.json"
  "$bench" prekeys --targets 100 --keys 1000 --duration 10 --quiet --json > "$out/prekeys-$i.json"
done
"$bench" reconnect --clients 10000 --per-agent 5000 --concurrency 1000 \
  --quiet --json --plot "$out/reconnect.svg" > "$out/reconnect-plot.json"
echo "reports in $out"
