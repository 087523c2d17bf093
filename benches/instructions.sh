#!/usr/bin/env bash
# User-space instructions callmeter executes per proxied request, counted by valgrind's
# callgrind: a figure that does not move with the machine's load, unlike req/s and CPU time on
# a shared VM, so it tells whether a change to the request path made it cheaper.
#
# Starts the fake origin (benches/origin.rs) and `callmeter serve` (one tokio worker, the
# config of benches/load.sh) under callgrind, sends 2,000 requests to warm up, zeroes the
# counters, sends N more (h2load, HTTP/1.1 unless --h2, 8 connections, the counted REST call of load.sh),
# dumps the counters and prints:
#   - instructions per request;
#   - their split by the crate of the function they run in (code inlined into a function
#     counts for its crate): callmeter, hyper, hyper-util, http, tokio, the C library's
#     allocator and memcpy, ...;
#   - the top functions by their own instructions.
# Kernel work (syscalls, loopback TCP: about 60 % of the CPU time, see benches/profile.sh) is
# not counted. Under callgrind everything runs ~50 times slower; a run takes about a minute.
# Usage: benches/instructions.sh [-n N] [-c C] [--h2] [--nginx] [--cache] [-o FILE]   (N
# requests, default 10000, over C connections, default 8; --h2: h2c with 10 streams per
# connection, as load.sh; --nginx: measures nginx instead, configured as in load.sh but as one
# process (`master_process off`), for the same count on the reference proxy; --cache: also
# simulates this VM's per-core caches (L1d 32 KiB, L2 512 KiB as the last level) and prints
# the misses per request, to compare how much memory a request touches that is not in the
# cache, e.g. at -c 256 against -c 8; -o keeps the raw callgrind profile in FILE for
# callgrind_annotate, e.g. `--tree=caller` to see who calls a function, or
# `--sort=DLmr` with --cache to see where the misses are)
# Needs valgrind and h2load (Debian: valgrind, nghttp2-client; installed when missing), and
# nginx for --nginx.
set -euo pipefail
cd "$(dirname "$0")/.."

requests=10000
conns=8
keep=
cache=()
proto=(--h1)
target=callmeter
while [ $# -gt 0 ]; do
  case $1 in
    -n) requests=$2 && shift 2 ;;
    -c) conns=$2 && shift 2 ;;
    -o) keep=$2 && shift 2 ;;
    --h2) proto=(-m 10) && shift ;;
    --nginx) target=nginx && shift ;;
    --cache) cache=(--cache-sim=yes --D1=32768,8,64 --LL=524288,8,64) && shift ;;
    *) echo "usage: benches/instructions.sh [-n N] [-c C] [--h2] [--nginx] [--cache] [-o FILE]" >&2 && exit 2 ;;
  esac
done

# shellcheck source=benches/common.sh
. benches/common.sh
# nginx lives in /usr/sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin
ensure_tools valgrind:valgrind h2load:nghttp2-client curl:curl python3:python3
[ "$target" = callmeter ] || ensure_tools nginx:nginx
build_bins

start_work instructions
origin_port=$(free_port) port=$(free_port) admin=$(free_port) h2port=$(free_port)
"$origin_bin" --listen "127.0.0.1:$origin_port" >"$work/origin.log" 2>&1 &
pids+=($!)
path=/salesloft/services/data/v62.0/query?q=SELECT+Id+FROM+Account
if [ "$target" = callmeter ]; then
  callmeter_config "$work/callmeter.toml" "$port" "$admin" 0 1
  valgrind --tool=callgrind "${cache[@]}" --callgrind-out-file="$work/callgrind.out" \
    "$callmeter_bin" serve --config "$work/callmeter.toml" >"$work/callmeter.log" 2>&1 &
  proxy_pid=$!
  pids+=("$proxy_pid")
  wait_up "http://127.0.0.1:$admin/readyz" "$work/callmeter.log" 600
  url="http://127.0.0.1:$port$path"
  label="callmeter, 1 worker"
else
  # load.sh's nginx, in one process so that callgrind sees all of it.
  nginx_config "$work/nginx" "$port" "$h2port" 256
  valgrind --tool=callgrind "${cache[@]}" --callgrind-out-file="$work/callgrind.out" \
    nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" \
    -g 'daemon off; master_process off;' >"$work/nginx.log" 2>&1 &
  proxy_pid=$!
  pids+=("$proxy_pid")
  url="http://127.0.0.1:$([ "${proto[0]}" = --h1 ] && echo "$port" || echo "$h2port")$path"
  wait_up "http://127.0.0.1:$port$path" "$work/nginx.log" 600
  label="nginx, 1 process"
fi
h2load "${proto[@]}" -n 2000 -c "$conns" "$url" >/dev/null
callgrind_control -z "$proxy_pid" >/dev/null
h2load "${proto[@]}" -n "$requests" -c "$conns" "$url" >"$work/h2load.out"
callgrind_control -d "$proxy_pid" >/dev/null
ok=$(awk '/^status codes:/ { print $3 }' "$work/h2load.out")
[ "$ok" = "$requests" ] || {
  echo "only $ok of $requests requests answered 2xx:" >&2
  cat "$work/h2load.out" >&2
  exit 1
}

[ -z "$keep" ] || cp "$work/callgrind.out.1" "$keep"
callgrind_annotate --threshold=100 --inclusive=no --auto=no --show=Ir "$work/callgrind.out.1" 2>/dev/null |
  python3 -c '
import collections, re, sys
n = int(sys.argv[1])
total, rows = 0, []
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*)$", line)
    if not m:
        continue
    ir, what = int(m.group(1).replace(",", "")), m.group(2)
    if "PROGRAM TOTALS" in what:
        total = ir
    elif ":" in what and ir < total / 3:
        # (callgrind_annotate also lists the thread entry points with everything under them.)
        rows.append((ir, what))
print(f"{sys.argv[4]}: {total / n:,.0f} user-space instructions per request "
      f"({n:,} requests over {sys.argv[2]} connections, {sys.argv[3]})")
def origin(what):
    path, _, func = what.partition(":")
    # The crate of the function (code inlined into it counts for it), else the C library part.
    m = re.match(r"<*&?(?:mut )?([a-z_][a-z0-9_]*)::", func)
    if m:
        return m.group(1).replace("_", "-") if m.group(1) != "core" else "core/std"
    if func.startswith("ngx_") or what.endswith("/nginx]"):
        return "nginx"
    if "malloc" in path:
        return "libc malloc/free"
    if re.search(r"mem(move|cpy|set)|/string/", path):
        return "libc memcpy/memset"
    return "other (libc, vDSO)"
by = collections.Counter()
for ir, what in rows:
    by[origin(what)] += ir
print("\nby origin of the code (share of instructions):")
for name, ir in by.most_common(14):
    print(f"  {100 * ir / total:5.1f}%  {ir / n:7,.0f}/request  {name}")
print("\ntop functions (own instructions per request):")
for ir, what in sorted(rows, reverse=True)[:25]:
    what = re.sub(r"/root/.cargo/registry/src/[^/]+/|/rustc/[0-9a-f]+/library/", "", what)
    what = re.sub(r" \[/[^]]*\]$", "", what)
    print(f"  {ir / n:7,.0f}  {what[:150]}")
' "$requests" "$conns" "$([ "${proto[0]}" = --h1 ] && echo HTTP/1.1 || echo h2c)" "$label"
[ ${#cache[@]} -eq 0 ] || callgrind_annotate --threshold=100 --auto=no "$work/callgrind.out.1" 2>/dev/null |
  python3 -c '
import re, sys
n = int(sys.argv[1])
events, totals = [], []
for line in sys.stdin:
    if line.startswith("Events shown:"):
        events = line.split()[2:]
    elif "PROGRAM TOTALS" in line:
        # "1,234 (100.0%)" per event, "." where it is zero.
        cells = re.sub(r"\([^)]*\)", " ", line.split("PROGRAM TOTALS")[0]).split()
        totals = [0 if c == "." else int(c.replace(",", "")) for c in cells]
t = dict(zip(events, (v / n for v in totals)))
d1r, d1w, i1, llr, llw, lli = (t[e] for e in ("D1mr", "D1mw", "I1mr", "DLmr", "DLmw", "ILmr"))
print("\nsimulated cache misses per request (L1 32 KiB, L2 512 KiB as the last level):")
print(f"  L1d: {d1r:7,.1f} read {d1w:7,.1f} write    L1i: {i1:7,.1f}")
print(f"  L2:  {llr:7,.1f} read {llw:7,.1f} write    (data; instructions {lli:,.1f})")
' "$requests"
