#!/usr/bin/env bash
# Two (or more) callmeter binaries compared on CPU per request, alternating A B A B ... so that
# the VM's drift between minutes hits each alike: the way a change's effect on CPU time is
# checked when the instruction count (benches/instructions.sh) is not enough, e.g. for a
# change to memory layout, or to tell a slower VM from slower code.
#
# Starts the fake origin (benches/origin.rs) on core 1; then for each round and each binary:
# `BIN serve` with the config of benches/load.sh and one worker on core 0, wrk -t1 from core 1
# for 2 s (warm-up) and 5 s (measured), and prints req/s, p99 and the proxy's CPU per request
# (user + kernel, /proc/PID/stat). A binary of an older commit can be built with
#   git worktree add /tmp/old COMMIT && (cd /tmp/old && cargo build --release --bin callmeter)
# Usage: benches/ab.sh [--conc N] [--rounds R] [--script LUA] BIN_A BIN_B [BIN ...]
#   (defaults: 32 connections, 3 rounds; --script: a wrk Lua script for the requests, e.g. a
#   POST with a body)
set -euo pipefail
cd "$(dirname "$0")/.."

conc=32
rounds=3
script=()
bins=()
while [ $# -gt 0 ]; do
  case $1 in
    --conc) conc=$2 && shift 2 ;;
    --rounds) rounds=$2 && shift 2 ;;
    --script) script=(-s "$(realpath "$2")") && shift 2 ;;
    -*) echo "usage: benches/ab.sh [--conc N] [--rounds R] [--script LUA] BIN_A BIN_B [BIN ...]" >&2 && exit 2 ;;
    *) bins+=("$(realpath "$1")") && shift ;;
  esac
done
[ ${#bins[@]} -ge 2 ] || {
  echo "usage: benches/ab.sh [--conc N] [--rounds R] [--script LUA] BIN_A BIN_B [BIN ...]" >&2
  exit 2
}

# shellcheck source=benches/common.sh
. benches/common.sh
ensure_tools wrk:wrk curl:curl
build_bins

start_work ab
origin_port=$(free_port)
taskset -c 1 "$origin_bin" --listen "127.0.0.1:$origin_port" >"$work/origin.log" 2>&1 &
pids+=($!)

cpu() { awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$1/stat"; }
printf 'wrk -t1 -c%s, 5 s per run, %s round(s); CPU per request = user + kernel\n' "$conc" "$rounds"
for ((round = 1; round <= rounds; round++)); do
  for bin in "${bins[@]}"; do
    port=$(free_port) admin=$(free_port)
    rm -f "$work"/callmeter.db*
    callmeter_config "$work/callmeter.toml" "$port" "$admin" 0 1
    taskset -c 0 "$bin" serve --config "$work/callmeter.toml" >"$work/callmeter.log" 2>&1 &
    proxy_pid=$!
    pids+=("$proxy_pid")
    wait_up "http://127.0.0.1:$admin/readyz" "$work/callmeter.log"
    url="http://127.0.0.1:$port/salesloft/services/data/v62.0/query?q=SELECT+Id+FROM+Account"
    taskset -c 1 wrk -t1 -c"$conc" -d2s "${script[@]}" "$url" >/dev/null
    read -r u0 s0 < <(cpu "$proxy_pid")
    taskset -c 1 wrk -t1 -c"$conc" -d5s --latency "${script[@]}" "$url" >"$work/wrk.out"
    read -r u1 s1 < <(cpu "$proxy_pid")
    kill "$proxy_pid"
    wait "$proxy_pid" 2>/dev/null || true
    awk -v bin="$bin" -v u="$((u1 - u0))" -v s="$((s1 - s0))" -v hz="$(getconf CLK_TCK)" '
      / requests in / { n = $1 } /^Requests\/sec:/ { rps = $2 } $1 == "50%" { p50 = $2 }
      $1 == "99%" { p99 = $2 } /Non-2xx/ { bad = "  non-2xx: " $NF }
      END { printf "%-50s %7.0f req/s  p50 %8s  p99 %8s  %5.1f us (%4.1f + %4.1f)%s\n", bin, rps, p50, p99,
            (u + s) / hz * 1e6 / n, u / hz * 1e6 / n, s / hz * 1e6 / n, bad }' "$work/wrk.out"
  done
done
