#!/usr/bin/env bash
# Where callmeter spends its CPU under load: a perf profile of the proxy while wrk drives it.
#
# Starts the fake origin (benches/origin.rs) on core 1 and `callmeter serve` with one tokio
# worker on core 0 (the one-core setup of benches/load.sh, same config: three path-prefix
# integrations, the driven one with a quota, daily_limit 5,000,000), drives the counted REST
# call with wrk (-t1, -c32 unless --conc N) from core 1, and records the proxy with
# `perf record --call-graph dwarf` for 6 s in the middle of a 12 s run. Then it prints:
#   - req/s and the proxy's CPU per request split into user and kernel time (/proc/PID/stat),
#     from a 5 s run without perf;
#   - system calls per request by kind (`perf stat` on the syscall tracepoints, another 5 s run);
#   - the share of samples in the kernel, in callmeter's binary and in libc, and the share
#     spent waking the process that reads the other end of a socket (`sock_def_readable`:
#     wrk or the origin, asleep when their core has idle time, which costs the writer more);
#   - the top symbols (self time);
#   - user-space samples by the nearest "owner" frame from the leaf upward: callmeter's own
#     functions (header rewriting, RateLimit headers, routing, metering...) and the libraries
#     under them (hyper's client pool and dispatch channel, hyper's HTTP/1 codec, tokio).
# --nginx profiles load.sh's nginx (one process, `master_process off`) in the same place
# instead, for the same figures on the reference proxy (the owner split is callmeter's only).
# Usage: benches/profile.sh [--conc N] [--nginx] [--keep DIR]   (--keep: leave perf.data and
# logs in DIR)
# Needs perf (Debian: linux-perf; installed when missing) and root or perf_event_paranoid <= 1.
set -euo pipefail
cd "$(dirname "$0")/.."

conc=32
keep=
target=callmeter
while [ $# -gt 0 ]; do
  case $1 in
    --conc) conc=$2 && shift 2 ;;
    --keep) keep=$2 && shift 2 ;;
    --nginx) target=nginx && shift ;;
    *) echo "usage: benches/profile.sh [--conc N] [--nginx] [--keep DIR]" >&2 && exit 2 ;;
  esac
done

# shellcheck source=benches/common.sh
. benches/common.sh
# nginx lives in /usr/sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin
ensure_tools perf:linux-perf wrk:wrk curl:curl python3:python3
[ "$target" = callmeter ] || ensure_tools nginx:nginx
build_bins

work=${keep:-$(mktemp -d "${TMPDIR:-/tmp}/callmeter-profile.XXXXXX")}
mkdir -p "$work"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -n "$keep" ] || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
origin_port=$(free_port) port=$(free_port) admin=$(free_port) h2port=$(free_port)
url="http://127.0.0.1:$port/salesloft/services/data/v62.0/query?q=SELECT+Id+FROM+Account"

taskset -c 1 "$origin_bin" --listen "127.0.0.1:$origin_port" >"$work/origin.log" 2>&1 &
pids+=($!)
if [ "$target" = callmeter ]; then
  callmeter_config "$work/callmeter.toml" "$port" "$admin" 0 1
  taskset -c 0 "$callmeter_bin" serve --config "$work/callmeter.toml" \
    >"$work/callmeter.log" 2>&1 &
  proxy_pid=$!
  label="callmeter, 1 worker"
  wait_up "http://127.0.0.1:$admin/readyz" "$work/callmeter.log"
else
  nginx_config "$work/nginx" "$port" "$h2port" 256
  taskset -c 0 nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" \
    -g 'daemon off; master_process off;' >"$work/nginx.log" 2>&1 &
  proxy_pid=$!
  label="nginx, 1 process"
  wait_up "$url" "$work/nginx.log"
fi
pids+=("$proxy_pid")
taskset -c 1 wrk -t1 -c"$conc" -d3s "$url" >/dev/null

# First a run without perf, for req/s and the CPU per request split into user and kernel time.
cpu() { awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$proxy_pid/stat"; }
read -r u0 s0 < <(cpu)
taskset -c 1 wrk -t1 -c"$conc" -d5s "$url" >"$work/wrk.out"
read -r u1 s1 < <(cpu)
requests=$(awk '/ requests in / { print $1 }' "$work/wrk.out")
rps=$(awk '/^Requests\/sec:/ { print $2 }' "$work/wrk.out")
printf '%s on core 0, wrk -t1 -c%s for 5 s: %.0f req/s; CPU per request:\n' "$label" "$conc" "$rps"
awk -v u="$((u1 - u0))" -v s="$((s1 - s0))" -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN {
  printf "  user %.1f us + kernel %.1f us = %.1f us\n", u / hz * 1e6 / n, s / hz * 1e6 / n,
         (u + s) / hz * 1e6 / n }'

# System calls per request, counted on their tracepoints over another 5 s run.
events=raw_syscalls:sys_enter
for call in recvfrom read readv sendto write writev epoll_wait epoll_ctl futex; do
  events+=,syscalls:sys_enter_$call
done
perf stat -x, -e "$events" -p "$proxy_pid" -o "$work/syscalls.csv" &
stat_pid=$!
sleep 0.2
taskset -c 1 wrk -t1 -c"$conc" -d5s "$url" >"$work/wrk-syscalls.out"
kill -INT "$stat_pid"
wait "$stat_pid" || true
requests=$(awk '/ requests in / { print $1 }' "$work/wrk-syscalls.out")
printf '\nsystem calls per request:\n'
awk -F, -v n="$requests" '$3 ~ /sys_enter/ && $1 + 0 > 0 {
  name = $3; sub(/.*sys_enter_?/, "", name); if (name == "") name = "all"
  printf "  %5.2f  %s\n", $1 / n, name }' "$work/syscalls.csv"

# Then the profile: 6 s in the middle of a 12 s run.
taskset -c 1 wrk -t1 -c"$conc" -d12s "$url" >/dev/null &
wrk_pid=$!
sleep 3
perf record -q -F 997 --call-graph dwarf,16384 -p "$proxy_pid" -o "$work/perf.data" -- sleep 6 \
  2>"$work/perf-record.log"
wait "$wrk_pid"
printf '\nsamples by binary:\n'
perf report -i "$work/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null |
  awk '/%/ && !/^#/ { printf "  %s %s\n", $1, $2 }' | head -n 6
perf script -i "$work/perf.data" -F ip,sym 2>/dev/null | awk '
  NF == 0 { if (seen) { n++; wake += waking } seen = 0; waking = 0; next }
  { seen = 1 } /sock_def_readable/ { waking = 1 }
  END { if (seen) { n++; wake += waking }
        printf "  of all samples, %.1f%% wake the reader of a socket written to (sock_def_readable)\n",
               100 * wake / (n ? n : 1) }'
printf '\ntop symbols (self):\n'
perf report -i "$work/perf.data" --no-children --sort dso,sym --stdio -g none --percent-limit 0.6 2>/dev/null |
  awk '/%/ && !/^#/' | sed 's/  */ /g' | cut -c1-150 | head -n 30
[ "$target" = callmeter ] || exit 0
printf '\nuser-space samples by nearest owner frame (share of all samples):\n'
perf script -i "$work/perf.data" -F comm,tid,ip,sym,dso 2>/dev/null | python3 -c '
import collections, re, sys
OWNERS = [
    ("callmeter: reject::add_ratelimit_headers (RateLimit headers)", r"add_ratelimit_headers"),
    ("callmeter: headers::to_upstream (hop-by-hop, X-Forwarded-*, call options)", r"headers::to_upstream"),
    ("callmeter: headers::to_client", r"headers::to_client"),
    ("callmeter: Upstream::uri (upstream URI)", r"Upstream::uri"),
    ("callmeter: RouteTable::route", r"RouteTable::route"),
    ("callmeter: classify", r"callmeter::proxy::classify|salesforce::classify"),
    ("callmeter: meter decide", r"IntegrationMeter::decide|OrgMeter::try_count"),
    ("callmeter: observe::response (Sforce-Limit-Info)", r"observe::response"),
    ("callmeter: metrics record", r"IntegrationMetrics::record"),
    ("callmeter: handle (method/path copies)", r"^callmeter::proxy::handle"),
    ("callmeter: ResponseBody", r"callmeter::proxy::body"),
    ("tokio timer (per-request response timeout)", r"tokio::runtime::time::|sleep::Sleep|Sleep::"),
    ("hyper-util legacy client (pool checkout/put, ResponseFuture)", r"hyper_util::client::legacy"),
    ("hyper client dispatch channel (mpsc/oneshot to the connection task)",
     r"hyper::client::dispatch|tokio::sync::mpsc|tokio::sync::oneshot"),
    ("hyper HTTP/1 parse/encode", r"Http1Transaction>::(parse|encode)|httparse|hyper::proto::h1::role"),
    ("hyper HTTP/1 io/dispatch", r"hyper::proto::h1"),
    ("callmeter: proxy() itself (incl. inlined code)", r"^callmeter::proxy::proxy::"),
    ("tokio io/scheduler", r"tokio::"),
]
samples, cur = [], None
for line in sys.stdin:
    if not line.strip():
        if cur is not None:
            samples.append(cur)
        cur = None
    elif not line[0].isspace():
        cur = []
    else:
        m = re.match(r"\s+[0-9a-f]+ (.*?) \((inlined|[^)]*)\)\s*$", line)
        if m and cur is not None:
            cur.append((m.group(1), m.group(2)))
if cur:
    samples.append(cur)
n = len(samples) or 1
kernel = sum(1 for s in samples if s and s[0][1].endswith("kallsyms]"))
counts = collections.Counter()
for s in samples:
    if not s or s[0][1].endswith("kallsyms]"):
        continue
    owner = "other user space"
    for sym, _ in s:
        hit = next((name for name, pat in OWNERS if re.search(pat, sym)), None)
        if hit:
            owner = hit
            break
    counts[owner] += 1
print(f"  {100 * kernel / n:5.1f}%  kernel (syscalls, loopback TCP)")
for owner, c in counts.most_common():
    print(f"  {100 * c / n:5.1f}%  {owner}")
alloc = sum(1 for s in samples if s and re.search(r"malloc|_int_free|^free$|realloc", s[0][0]))
copy = sum(1 for s in samples if s and re.search(r"memmove|memcpy", s[0][0]))
print(f"  (leaf in malloc/free: {100 * alloc / n:.1f}%, in memmove/memcpy: {100 * copy / n:.1f}%,"
      " spread over the rows above)")
'
[ -z "$keep" ] || echo "perf data and logs kept in $work" >&2
