#!/usr/bin/env bash
# Peak memory of the proxy while a 1 GiB Bulk API upload streams through it.
#
# Starts the simulated org and `callmeter serve` (release build) on free loopback ports, sends
# 1 GiB with curl (chunked, from /dev/zero) to a Bulk API 1.0 batch URL, and prints the proxy's
# peak resident set size (VmHWM) before and after. Stops everything it started. With --h2 the
# upload reaches the proxy over HTTP/2 (h2c, prior knowledge), where hyper's flow-control
# windows (1 MiB per stream and per connection, its defaults) bound what the proxy accepts
# ahead of the upstream.
# Usage: benches/upload_rss.sh [--h2] [SIZE_MIB]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
proto=()
if [ "${1:-}" = --h2 ]; then proto=(--http2-prior-knowledge) && shift; fi
size_mib=${1:-1024}
command -v curl >/dev/null || { echo "needs curl" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/callmeter
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cat > "$work/callmeter.toml" <<TOML
[admin]
listen = "127.0.0.1:$admin_port"
[log]
level = "warn"
[[listener]]
name = "main"
listen = "127.0.0.1:$proxy_port"
[[org]]
id = "acme"
instance_url = "http://127.0.0.1:$sim_port"
allow_plain_http = true
[[integration]]
id = "bulk"
org = "acme"
match = { path_prefix = "/bulk" }
TOML

"$bin" sim --listen "127.0.0.1:$sim_port" 2>/dev/null & pids+=($!)
"$bin" serve --config "$work/callmeter.toml" & proxy_pid=$!; pids+=($proxy_pid)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null && break; sleep 0.1; done

hwm() { awk '/VmHWM/ {print $2 " " $3}' "/proc/$proxy_pid/status"; }
echo "proxy peak RSS before upload: $(hwm)"
start=$(date +%s.%N)
head -c "$((size_mib * 1024 * 1024))" /dev/zero |
  curl -sS "${proto[@]}" -o /dev/null -w 'upload: HTTP/%{http_version} %{http_code}, %{size_upload} bytes sent\n' \
    -X POST -H 'Content-Type: text/csv' -T - \
    "http://127.0.0.1:$proxy_port/bulk/services/async/62.0/job/750000000000001AAA/batch"
end=$(date +%s.%N)
echo "proxy peak RSS after ${size_mib} MiB upload: $(hwm)  ($(echo "$end - $start" | bc) s)"
curl -s "http://127.0.0.1:$sim_port/_sim/count" | head -c 300; echo
