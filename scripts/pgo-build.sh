#!/usr/bin/env bash
# Builds callmeter with profile-guided optimisation (PGO), the build to deploy when CPU per
# call matters: README "Performance" measures it against the plain release build.
#
#   1. builds an instrumented callmeter (target/pgo-gen);
#   2. trains it on 127.0.0.1 for about 20 s with the proxy's everyday work, the workload of
#      benches/load.sh: the fake origin (benches/origin.rs) behind callmeter's benchmark config
#      (metering on, three integrations), metered REST GETs from wrk at 1, 32 and 256
#      connections, POSTs with a 2 KiB body, h2c GETs from h2load;
#   3. merges the profiles and builds the optimised binary: target/pgo/release/callmeter.
#
# PGO changes how the compiler lays out and inlines the code, never what it does; calls the
# training did not make are compiled as usual, only not favoured. The profile fits the source
# and compiler it was made with, so the script makes a fresh one each time (two release builds,
# about 10 minutes on 2 cores).
# Usage: scripts/pgo-build.sh   Needs: rustup's llvm-tools component (added when missing),
# wrk and h2load (Debian: wrk, nghttp2-client; installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=benches/common.sh
. benches/common.sh
ensure_tools wrk:wrk h2load:nghttp2-client curl:curl python3:python3

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | awk '/^host:/ { print $2 }')
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  echo "adding rustup's llvm-tools (for llvm-profdata)..." >&2
  rustup component add llvm-tools
fi

gen=$PWD/target/pgo-gen
data=$PWD/target/pgo-data
rm -rf "$data"
echo "1/3 building the instrumented callmeter..." >&2
RUSTFLAGS="-Cprofile-generate=$data" CARGO_TARGET_DIR=$gen \
  cargo build --release --locked --quiet --bin callmeter
# Build scripts ran instrumented too: only the proxy's own runs are wanted.
rm -rf "$data"

echo "2/3 training it (about 20 s)..." >&2
CALLMETER_BIN=$gen/release/callmeter
export CALLMETER_BIN
build_bins
start_work pgo
origin_port=$(free_port) port=$(free_port) admin=$(free_port)
"$origin_bin" --listen "127.0.0.1:$origin_port" >"$work/origin.log" 2>&1 &
pids+=($!)
callmeter_config "$work/callmeter.toml" "$port" "$admin" 0
"$callmeter_bin" serve --config "$work/callmeter.toml" >"$work/callmeter.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
wait_up "http://127.0.0.1:$admin/readyz" "$work/callmeter.log"
url="http://127.0.0.1:$port/salesloft/services/data/v62.0/query?q=SELECT+Id+FROM+Account"
cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 2048)
wrk.headers["Content-Type"] = "application/json"
LUA
wrk -t1 -c32 -d5s "$url" >/dev/null
wrk -t1 -c256 -d3s "$url" >/dev/null
wrk -t1 -c1 -d2s "$url" >/dev/null
wrk -t1 -c8 -d3s -s "$work/post.lua" \
  "http://127.0.0.1:$port/salesloft/services/data/v62.0/sobjects/Account" >/dev/null
h2load -c8 -m10 -D 3 "$url" >/dev/null
curl -sf -o /dev/null "http://127.0.0.1:$admin/metrics"
# A clean shutdown writes the profile.
kill "$proxy_pid"
wait "$proxy_pid" || true
ls "$data"/*.profraw >/dev/null 2>&1 || {
  echo "the instrumented callmeter wrote no profile (see $work/callmeter.log)" >&2
  exit 1
}

echo "3/3 building the optimised callmeter..." >&2
"$profdata" merge -o "$data/merged.profdata" "$data"/*.profraw
RUSTFLAGS="-Cprofile-use=$data/merged.profdata" CARGO_TARGET_DIR=$PWD/target/pgo \
  cargo build --release --locked --quiet --bin callmeter
echo "built $PWD/target/pgo/release/callmeter" >&2
echo "compare it with the plain build: bash benches/ab.sh target/release/callmeter target/pgo/release/callmeter" >&2
