#!/usr/bin/env bash
# callmeter against nginx and HAProxy as plain reverse proxies, on this machine, over loopback.
#
# What it measures
#   Four targets proxy the same counted REST call
#     GET /salesloft/services/data/v62.0/query?q=SELECT+Id+FROM+Account
#   to the same fast fake origin (benches/origin.rs: a small query-shaped JSON body and a
#   Sforce-Limit-Info header on every answer):
#     callmeter     `callmeter serve`, default runtime (one tokio worker per core), not pinned
#     callmeter-1w  the same with `worker_threads = 1`, pinned to the proxy core: the
#                   one-core match for nginx and HAProxy below
#     nginx         worker_processes 1, upstream keepalive 256, HTTP/1.1 to the origin
#     haproxy       nbthread 1, http-reuse always
#     direct        no proxy: the load generator straight to the origin. Its req/s is the most
#                   any proxy can show on this machine (the origin and the load generator
#                   share a core), so it says how much room there is above nginx.
#   callmeter meters the call (route, classify, decide + count against a quota and the org's
#   limit, read Sforce-Limit-Info, RateLimit headers); nginx and HAProxy only strip the
#   /salesloft prefix and forward. wrk drives HTTP/1.1 (-t1, -c1, -c32 then -c256), h2load drives
#   HTTP/2 with prior knowledge (h2c, -c32 -m10). Targets alternate A B C D A B C D ... so that
#   slow drifts of the machine (other tenants, thermal, page cache) spread over all of them.
#   Each run records req/s, p50 and p99 latency, and the proxy's CPU time (utime + stime from
#   /proc/PID/stat; nginx master + worker) per request. Tables show the median of the rounds.
#   At one connection (one call at a time, as an integration makes them) the table adds how
#   much each proxy adds to a call's median latency over `direct`: what an integration notices.
#   Then (unless --skip-rss): idle memory of callmeter with 10,000 integrations and the time
#   to render /metrics for them after one call to each of 1,000, then to each of all 10,000.
#
# Pinning, and its limits on a 2-core machine
#   Core 0 runs the proxy under test (nginx, HAProxy, callmeter-1w); core 1 runs the origin and
#   the load generator (wrk or h2load). `callmeter` (unpinned, two workers) floats over both
#   cores and so competes with the origin and the load generator: its row says what callmeter
#   does with the machine as deployed by default, not a one-core comparison. On two cores the
#   origin + load-generator core can itself saturate before the proxy does; the "CPU %" columns
#   (proxy, and busy % of core 0 / core 1 from /proc/stat) show which side was the limit. When
#   the proxy is not near 100 % of its core, req/s compares the load generator more than the
#   proxy, and CPU µs per request is the fairer figure. Runs on a shared VM are noisy: the
#   req/s range column shows the spread between rounds, the other% column the CPU that other
#   programs took during a run (a run where they took more than 15 % of a core is repeated, at
#   most twice, and 8 times in all). CPU µs per request counts the proxy's own process time; the kernel's loopback
#   TCP work done in softirq context is partly outside it (shown as softirq %). With fewer than
#   two cores nothing is pinned.
#
# Usage
#   benches/load.sh [--quick] [--pgo] [--skip-rss | --rss-only]
#     --quick     3 s runs, 1 round, 1 s warm-up (a smoke test: don't quote its numbers)
#     --pgo       measure the profile-guided build: runs scripts/pgo-build.sh first (about
#                 10 minutes more) and measures target/pgo/release/callmeter
#     --skip-rss  skip the 10,000-integration memory and /metrics section
#     --rss-only  only that section
#   A full run takes 12 to 16 minutes. Results go to stdout, progress to stderr; keep them with
#     benches/load.sh | tee "benches/results/load-$(date +%F).txt"
#   Builds callmeter (release) and the origin (bench profile); installs nginx, haproxy, wrk and
#   nghttp2-client (h2load) with apt-get when missing (installing the packages may start the
#   distribution's own nginx/haproxy services on their usual ports: they do not take part).
#   Everything listens on 127.0.0.1, on free ports; every process started here is stopped by
#   its PID when the script exits. KEEP_WORK=1 keeps the temporary directory (configs, logs);
#   NGINX_KEEPALIVE=N sets nginx's upstream `keepalive` (default 256, see below); MAX_OTHER=N
#   the share of a core (default 15 %) other programs may take before a run is repeated.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10 # seconds per run
rounds=3
warmup=2 # seconds per target before the first round, not recorded
run_load=1
run_rss=1
pgo=0
for arg in "$@"; do
  case $arg in
    --quick) duration=3 rounds=1 warmup=1 ;;
    --skip-rss) run_rss=0 ;;
    --rss-only) run_load=0 ;;
    --pgo) pgo=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

# Idle upstream connections nginx keeps per worker (the issue asks for `keepalive` without a
# number). 256, the most connections the runs use, so that nginx reuses a connection for every
# request as callmeter and HAProxy do; with less (say 64) nginx opens and closes upstream
# connections all the time at 256 client connections, which costs it throughput and makes
# the comparison flatter callmeter.
nginx_keepalive=${NGINX_KEEPALIVE:-256}
if [ "$pgo" = 1 ]; then
  [ -z "${CALLMETER_BIN:-}" ] || { echo "--pgo and CALLMETER_BIN both name a binary" >&2 && exit 2; }
  bash scripts/pgo-build.sh >&2
  export CALLMETER_BIN=$PWD/target/pgo/release/callmeter
fi
readonly QUERY_PATH="/salesloft/services/data/v62.0/query?q=SELECT+Id+FROM+Account"
readonly TARGETS=(callmeter callmeter-1w nginx haproxy direct)

log() { printf '%s\n' "$*" >&2; }
die() {
  log "load.sh: $*"
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Tools

# shellcheck source=benches/common.sh
. benches/common.sh
# nginx and haproxy live in /usr/sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin
ensure_tools nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client curl:curl python3:python3
build_bins

# ---------------------------------------------------------------------------------------------
# Processes

cores=$(nproc)
proxy_pin=()
load_pin=()
if [ "$cores" -ge 2 ]; then
  proxy_pin=(taskset -c 0)
  load_pin=(taskset -c 1)
else
  log "only $cores core: nothing is pinned"
fi
ulimit -n 65536 2>/dev/null || true
clk_tck=$(getconf CLK_TCK)

work=$(mktemp -d "${TMPDIR:-/tmp}/callmeter-load.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 30); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ "${KEEP_WORK:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# start NAME CMD...: runs CMD in the background, output to $work/NAME.log; sets $started.
started=
start() {
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  started=$!
  pids+=("$started")
}

# "utime stime": CPU ticks (all threads) of the given processes, summed.
ticks() {
  local pid user=0 sys=0 stat fields
  for pid in "$@"; do
    stat=$(<"/proc/$pid/stat")
    # The command name (field 2) may hold spaces: split after its closing parenthesis, so
    # fields[0] is field 3 (state) and utime, stime (fields 14, 15) are fields[11], fields[12].
    read -ra fields <<<"${stat##*) }"
    user=$((user + fields[11])) sys=$((sys + fields[12]))
  done
  echo "$user $sys"
}

# "busy0 softirq0 total0 busy1 softirq1 total1" from /proc/stat, in clock ticks. busy = user +
# nice + system + irq + softirq (guest time is inside user already; steal is nobody's here).
# softirq is mostly loopback TCP processing, which no process is charged for.
core_jiffies() {
  awk '/^cpu[01] / { busy = $2 + $3 + $4 + $7 + $8
                     printf "%d %d %d ", busy, $8, busy + $5 + $6 + $9 } END { print "" }' /proc/stat
}

# callmeter_config FILE PORT ADMIN_PORT [N [THREADS]]: see benches/common.sh (the origin is $origin_port).

origin_port=$(free_port)
start origin "${load_pin[@]}" "$origin_bin" --listen "127.0.0.1:$origin_port" --threads 1
origin_pid=$started
wait_up "http://127.0.0.1:$origin_port/" "$work/origin.log"

declare -A h1_url h2_url main_pid
h2_skip_note=

start_proxies() {
  local port admin h2port
  # callmeter, default runtime, not pinned
  port=$(free_port) admin=$(free_port)
  callmeter_config "$work/callmeter.toml" "$port" "$admin"
  start callmeter "$callmeter_bin" serve --config "$work/callmeter.toml"
  main_pid[callmeter]=$started
  h1_url[callmeter]="http://127.0.0.1:$port$QUERY_PATH"
  h2_url[callmeter]=${h1_url[callmeter]}
  wait_up "http://127.0.0.1:$admin/readyz" "$work/callmeter.log"

  # callmeter, one worker on the proxy core
  port=$(free_port) admin=$(free_port)
  callmeter_config "$work/callmeter-1w.toml" "$port" "$admin" 0 1
  start callmeter-1w "${proxy_pin[@]}" "$callmeter_bin" serve --config "$work/callmeter-1w.toml"
  main_pid[callmeter-1w]=$started
  h1_url[callmeter-1w]="http://127.0.0.1:$port$QUERY_PATH"
  h2_url[callmeter-1w]=${h1_url[callmeter-1w]}
  wait_up "http://127.0.0.1:$admin/readyz" "$work/callmeter-1w.log"

  # nginx: h2c (prior knowledge) needs its own `listen ... http2` port
  port=$(free_port) h2port=$(free_port)
  nginx_config "$work/nginx" "$port" "$h2port" "$nginx_keepalive"
  start nginx "${proxy_pin[@]}" nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" \
    -e "$work/nginx/error.log" -g 'daemon off;'
  main_pid[nginx]=$started
  h1_url[nginx]="http://127.0.0.1:$port$QUERY_PATH"
  h2_url[nginx]="http://127.0.0.1:$h2port$QUERY_PATH"
  wait_up "${h1_url[nginx]}" "$work/nginx.log"
  if [ "$(curl -s --http2-prior-knowledge -o /dev/null -w '%{http_version}' "${h2_url[nginx]}")" != 2 ]; then
    h2_skip_note="nginx: no HTTP/2 with prior knowledge on a plaintext listener here; skipped for h2c"
    unset 'h2_url[nginx]'
  fi

  # HAProxy
  port=$(free_port) h2port=$(free_port)
  cat >"$work/haproxy.cfg" <<HAPROXY
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend bench
    bind 127.0.0.1:$port
    bind 127.0.0.1:$h2port proto h2
    http-request replace-path ^/salesloft(/.*) \1
    default_backend origin
backend origin
    server origin 127.0.0.1:$origin_port
HAPROXY
  start haproxy "${proxy_pin[@]}" haproxy -db -f "$work/haproxy.cfg"
  main_pid[haproxy]=$started
  h1_url[haproxy]="http://127.0.0.1:$port$QUERY_PATH"
  h2_url[haproxy]="http://127.0.0.1:$h2port$QUERY_PATH"
  wait_up "${h1_url[haproxy]}" "$work/haproxy.log"

  # No proxy: the origin answers the same path without the integration prefix.
  h1_url[direct]="http://127.0.0.1:$origin_port${QUERY_PATH#/salesloft}"
  h2_url[direct]=${h1_url[direct]}

  local t
  for t in "${TARGETS[@]}"; do
    curl -sf -o /dev/null "${h1_url[$t]}" || die "$t does not answer ${h1_url[$t]}"
  done
}

# The processes whose CPU time counts for a target: nginx's master and worker(s); none for
# direct.
proxy_pids() {
  [ "$1" != direct ] || return 0
  local pid=${main_pid[$1]}
  echo "$pid"
  if [ "$1" = nginx ]; then pgrep -P "$pid"; fi
}

# ---------------------------------------------------------------------------------------------
# Runs

# One line per run: proto conc round target rps p50 p99 cpu_us proxy% origin% loadgen% core0%
# core1% softirq% other% errors usr_us sys_us (the proxy's CPU per request split into user and
# kernel time). The CPU percentages are of one core (100 = a whole core);
# other% is the CPU time of every process that is not this script's (see others_ticks): the
# noise from other programs on the machine. A run in which they took more than MAX_OTHER % of
# a core is repeated, at most twice; the run lines say so.
results=$work/runs.tsv
readonly MAX_OTHER=${MAX_OTHER:-15}
retries_left=8 # 8 repeated runs add at most 1.5 minutes

# CPU ticks used so far by every process not started by this script (nor ksoftirqd, which does
# this benchmark's deferred network work): utime + stime + the times of reaped children, so that
# short-lived processes (a compiler run by someone else) count too. The difference of two
# readings is the others' CPU time in between.
others_ticks() {
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v me="$$" '
    { pid = $1; rest = $0; sub(/^.*\) /, "", rest); split(rest, f, " ")
      comm = $0; sub(/^[0-9]+ \(/, "", comm); sub(/\) .*$/, "", comm)
      ppid[pid] = f[2]; t[pid] = f[12] + f[13] + f[14] + f[15]; name[pid] = comm }
    END { for (p in t) {
            q = p; ours = 0
            for (n = 0; n < 64 && q > 1; n++) { if (q == me) { ours = 1; break }; q = ppid[q] }
            if (!ours && name[p] !~ /^ksoftirqd/) s += t[p]
          }
          print s + 0 }'
}
: >"$results"

# wrk output -> "requests rps p50_ms p99_ms errors"
parse_wrk() {
  awk '
    function ms(v) { n = v + 0; if (v ~ /us$/) return n / 1000; if (v ~ /ms$/) return n;
                     if (v ~ /s$/) return n * 1000; return n }
    / requests in / { req = $1 }
    /^Requests\/sec:/ { rps = $2 }
    /^ +50% / { p50 = ms($2) }
    /^ +99% / { p99 = ms($2) }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { gsub(/[^0-9]+/, " "); for (i = 1; i <= NF; i++) err += $i }
    END { printf "%d %.2f %.3f %.3f %d\n", req, rps, p50, p99, err }'
}

# h2load output and its per-request log -> "requests rps p50_ms p99_ms errors"
parse_h2load() {
  local out=$1 reqlog=$2 pct
  pct=$(cut -f3 "$reqlog" | sort -n | awk '{ v[NR] = $1 }
    END { if (NR == 0) { print "0 0"; exit }
          i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
          printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }')
  awk -v pct="$pct" '
    /^finished in/ { rps = $4 }
    /^requests:/ { done = $6; err = $6 - $8 } # done but not succeeded: failures and non-2xx/3xx
    END { printf "%d %.2f %s %d\n", done, rps, pct, err }' "$out"
}

# run_once PROTO CONC ROUND TARGET: one run; prints its line for $results.
run_once() {
  local proto=$1 conc=$2 round=$3 target=$4 out="$work/run.out" parsed
  local -a procs
  mapfile -t procs < <(proxy_pids "$target")
  local t0 o0 c0 x0 t1 o1 c1 x1 start end TIMEFORMAT='%3U %3S'
  t0=$(ticks "${procs[@]}") o0=$(ticks "$origin_pid") c0=$(core_jiffies) x0=$(others_ticks)
  start=$(date +%s.%N)
  # `time` reports the load generator's own CPU time (user, system) on fd 2.
  if [ "$proto" = h1 ]; then
    { time "${load_pin[@]}" wrk -t1 -c"$conc" -d"${duration}s" --latency "${h1_url[$target]}" >"$out"; } 2>"$work/loadgen.time"
    end=$(date +%s.%N)
    parsed=$(parse_wrk <"$out")
  else
    { time "${load_pin[@]}" h2load -c"$conc" -m10 -D "$duration" --log-file="$work/h2.log" \
      "${h2_url[$target]}" >"$out"; } 2>"$work/loadgen.time"
    end=$(date +%s.%N)
    parsed=$(parse_h2load "$out" "$work/h2.log")
  fi
  t1=$(ticks "${procs[@]}") o1=$(ticks "$origin_pid") c1=$(core_jiffies) x1=$(others_ticks)
  local req rps p50 p99 err
  read -r req rps p50 p99 err <<<"$parsed"
  [ "$req" -gt 0 ] || {
    cat "$out" >&2
    die "$target: no request completed"
  }
  awk -v OFS='\t' -v proto="$proto" -v conc="$conc" -v round="$round" -v target="$target" \
    -v req="$req" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v err="$err" \
    -v t0="$t0" -v t1="$t1" -v o0="$o0" -v o1="$o1" -v x0="$x0" -v x1="$x1" -v hz="$clk_tck" \
    -v lg="$(tail -n1 "$work/loadgen.time")" \
    -v start="$start" -v end="$end" -v c0="$c0" -v c1="$c1" 'BEGIN {
      wall = end - start; split(c0, a, " "); split(c1, b, " "); split(lg, l, " ")
      split(t0, pa, " "); split(t1, pb, " "); split(o0, oa, " "); split(o1, ob, " ")
      usr = (pb[1] - pa[1]) / hz; sys = (pb[2] - pa[2]) / hz; proxy = usr + sys
      origin = (ob[1] + ob[2] - oa[1] - oa[2]) / hz; loadgen = l[1] + l[2]
      other = (x1 - x0) / hz; if (other < 0) other = 0
      core0 = (b[3] > a[3]) ? 100 * (b[1] - a[1]) / (b[3] - a[3]) : 0
      core1 = (b[6] > a[6]) ? 100 * (b[4] - a[4]) / (b[6] - a[6]) : 0
      softirq = ((b[2] - a[2]) + (b[5] - a[5])) / hz
      pct = 100 / wall
      print proto, conc, round, target, rps, p50, p99, sprintf("%.1f", proxy * 1e6 / req),
            sprintf("%.0f", proxy * pct), sprintf("%.0f", origin * pct), sprintf("%.0f", loadgen * pct),
            sprintf("%.0f", core0), sprintf("%.0f", core1), sprintf("%.0f", softirq * pct),
            sprintf("%.0f", other * pct), err, sprintf("%.1f", usr * 1e6 / req),
            sprintf("%.1f", sys * 1e6 / req) }'
}

show_run() {
  awk -F'\t' -v note="$1" '{ printf "  %s c=%-3s r%s %-12s %6.0f req/s  p50 %7.3f ms  p99 %8.3f ms  %5.1f CPU us/req (usr %4.1f + sys %4.1f)  proxy %3s%%  origin %3s%%  loadgen %3s%%  core0 %3s%%  core1 %3s%%  softirq %3s%%  other %3s%%  errors %s%s\n",
                   $1, $2, $3, $4, $5, $6, $7, $8, $17, $18, $9, $10, $11, $12, $13, $14, $15, $16, note }'
}

# measure PROTO CONC ROUND TARGET: one recorded run, repeated (at most twice, and at most
# $retries_left times over the whole script, which keeps it bounded in time) while other
# programs took more than MAX_OTHER % of a core during it.
measure() {
  local attempt line other
  for attempt in 1 2 3; do
    line=$(run_once "$@")
    other=$(cut -f15 <<<"$line")
    if [ "$other" -le "$MAX_OTHER" ] || [ "$attempt" -eq 3 ] || [ "$retries_left" -eq 0 ]; then
      break
    fi
    retries_left=$((retries_left - 1))
    show_run "  <- discarded: other programs took ${other}% of a core; again" <<<"$line"
  done
  printf '%s\n' "$line" >>"$results"
  if [ "$other" -gt "$MAX_OTHER" ]; then
    show_run "  <- kept: other programs were busy (no retry left)" <<<"$line"
  else
    show_run "" <<<"$line"
  fi
}

warm() {
  local target=$1
  "${load_pin[@]}" wrk -t1 -c32 -d"${warmup}s" "${h1_url[$target]}" >/dev/null
}

median() {
  sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2];
                                      else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# column PROTO CONC TARGET FIELD: the values of FIELD (1-based, see $results) over the rounds.
column() {
  awk -F'\t' -v p="$1" -v c="$2" -v t="$3" -v k="$4" '$1 == p && $2 == c && $4 == t { print $k }' "$results"
}

table() {
  local proto=$1 conc=$2 t nginx_rps what="HTTP/1.1 (wrk -t1)"
  [ "$proto" = h1 ] || what="HTTP/2 h2c (h2load -m10)"
  nginx_rps=$(column "$proto" "$conc" nginx 5 | median)
  printf '\n%s, %s connections: medians of %s round(s) of %s s\n' "$what" "$conc" "$rounds" "$duration"
  printf '%-12s %7s %13s %7s %8s %8s %8s %6s %9s %7s %6s %6s %8s\n' target 'req/s' 'req/s range' \
    'p50 ms' 'p99 ms' 'CPU us/r' '=usr+sys' 'proxy%' 'core0/1%' 'softirq' 'other%' errors 'vs nginx'
  for t in "${TARGETS[@]}"; do
    [ -n "$(column "$proto" "$conc" "$t" 5)" ] || continue
    local rps lo hi errs ratio=-
    rps=$(column "$proto" "$conc" "$t" 5 | median)
    lo=$(column "$proto" "$conc" "$t" 5 | sort -g | head -n1)
    hi=$(column "$proto" "$conc" "$t" 5 | sort -g | tail -n1)
    errs=$(column "$proto" "$conc" "$t" 16 | awk '{ s += $1 } END { print s + 0 }')
    if [ "$nginx_rps" != - ]; then
      ratio=$(awk -v a="$rps" -v b="$nginx_rps" 'BEGIN { printf "%.2f", a / b }')
    fi
    printf '%-12s %7.0f %13s %7.3f %8.3f %8.1f %8s %6.0f %9s %7.0f %6.0f %6s %8s\n' "$t" "$rps" \
      "$(printf '%.0f-%.0f' "$lo" "$hi")" "$(column "$proto" "$conc" "$t" 6 | median)" \
      "$(column "$proto" "$conc" "$t" 7 | median)" "$(column "$proto" "$conc" "$t" 8 | median)" \
      "$(printf '%.1f+%.1f' "$(column "$proto" "$conc" "$t" 17 | median)" "$(column "$proto" "$conc" "$t" 18 | median)")" \
      "$(column "$proto" "$conc" "$t" 9 | median)" \
      "$(printf '%.0f/%.0f' "$(column "$proto" "$conc" "$t" 12 | median)" "$(column "$proto" "$conc" "$t" 13 | median)")" \
      "$(column "$proto" "$conc" "$t" 14 | median)" "$(column "$proto" "$conc" "$t" 15 | median)" \
      "$errs" "$ratio"
  done
  local noisy
  noisy=$(awk -F'\t' -v p="$proto" -v c="$conc" -v max="$MAX_OTHER" \
    '$1 == p && $2 == c && $15 > max { printf "%s%s round %s (other %s%%)", sep, $4, $3, $15; sep = ", " }' "$results")
  [ -z "$noisy" ] || printf 'runs kept although other programs were busy: %s\n' "$noisy"
}

# What each proxy adds to the median latency of a call made one at a time.
added_latency() {
  local direct t
  direct=$(column h1 1 direct 6 | median)
  [ "$direct" != - ] || return 0
  printf 'added to the p50 of one call at a time, over direct (%.3f ms):' "$direct"
  for t in "${TARGETS[@]}"; do
    [ "$t" != direct ] || continue
    awk -v t="$t" -v p="$(column h1 1 "$t" 6 | median)" -v d="$direct" \
      'BEGIN { if (p != "-") printf "  %s %+.0f us", t, (p - d) * 1000 }'
  done
  printf '\n'
}

# The issue's HTTP/1.1 targets, for each callmeter variant against nginx.
verdicts() {
  local conc t
  printf '\nissue #5 targets, HTTP/1.1 with metering on (medians; "met" / "NOT met"):\n'
  for conc in 32 256; do
    local n_rps n_p99 n_cpu
    n_rps=$(column h1 "$conc" nginx 5 | median)
    n_p99=$(column h1 "$conc" nginx 7 | median)
    n_cpu=$(column h1 "$conc" nginx 8 | median)
    for t in callmeter callmeter-1w; do
      awk -v t="$t" -v c="$conc" -v nr="$n_rps" -v np="$n_p99" -v nc="$n_cpu" \
        -v r="$(column h1 "$conc" "$t" 5 | median)" -v p="$(column h1 "$conc" "$t" 7 | median)" \
        -v u="$(column h1 "$conc" "$t" 8 | median)" 'BEGIN {
          v1 = (r >= 1.2 * nr) ? "met" : "NOT met"; v2 = (p <= np) ? "met" : "NOT met"
          v3 = (u <= nc) ? "met" : "NOT met"
          printf "  c=%-3s %-13s req/s %.2f x nginx (>= 1.20: %s)  p99 %.3f vs %.3f ms (%s)  CPU %.1f vs %.1f us/req (%s)\n",
                 c, t, r / nr, v1, p, np, v2, u, nc, v3 }'
    done
  done
}

# ---------------------------------------------------------------------------------------------
# Memory and /metrics with 10,000 integrations

# scrape_metrics LABEL ADMIN_PORT: five scrapes of /metrics in a row; prints the first one's
# size and the time of each.
scrape_metrics() {
  local label=$1 admin=$2 times=() n line
  for n in 1 2 3 4 5; do
    line=$(curl -s -o "$work/metrics.txt" -w '%{http_code} %{time_total} %{size_download}' \
      "http://127.0.0.1:$admin/metrics")
    times+=("$(awk '{ printf "%.1f", $2 * 1000 }' <<<"$line")")
    [ "$n" -gt 1 ] || printf '  %s: HTTP %s, %s bytes, %s lines\n' "$label" "${line%% *}" \
      "${line##* }" "$(wc -l <"$work/metrics.txt")"
  done
  printf '  /metrics time_total, 5 scrapes in a row: %s ms (first %s ms; median of the other 4: %s ms)\n' \
    "${times[*]}" "${times[0]}" "$(printf '%s\n' "${times[@]:1}" | median)"
}

rss_section() {
  local port admin pid
  port=$(free_port) admin=$(free_port)
  callmeter_config "$work/callmeter-10k.toml" "$port" "$admin" 10000
  start callmeter-10k "$callmeter_bin" serve --config "$work/callmeter-10k.toml"
  pid=$started
  wait_up "http://127.0.0.1:$admin/readyz" "$work/callmeter-10k.log"
  sleep 2
  mem_status() { awk '/^(VmRSS|VmHWM)/ { printf "%s %.1f MiB  ", $1, $2 / 1024 }' "/proc/$pid/status"; }
  printf '\n10,000 integrations (path prefixes /i00000 ... /i09999, plus the three above)\n'
  printf '  idle, 2 s after ready:                 %s\n' "$(mem_status)"

  # One call to each of 1,000 of them (every tenth), over kept-alive connections.
  local i curlcfg=$work/calls.curl codes
  for ((i = 0; i < 10000; i += 10)); do
    printf 'url = "http://127.0.0.1:%s/i%05d/services/data/v62.0/query?q=SELECT+Id+FROM+Account"\noutput = "/dev/null"\n' "$port" "$i"
  done >"$curlcfg"
  codes=$(curl -s -K "$curlcfg" -w '%{http_code}\n' | sort | uniq -c | tr -s ' ' | tr '\n' ',')
  printf '  1,000 calls (one each to i00000, i00010, ...): status counts %s\n' "${codes%,}"
  printf '  after the calls:                       %s\n' "$(mem_status)"

  scrape_metrics "/metrics" "$admin"
  printf '  after the scrapes:                     %s\n' "$(mem_status)"

  # The worst case: every integration has request counters and a latency histogram.
  for ((i = 0; i < 10000; i++)); do
    ((i % 10 == 0)) && continue
    printf 'url = "http://127.0.0.1:%s/i%05d/services/data/v62.0/query?q=SELECT+Id+FROM+Account"\noutput = "/dev/null"\n' "$port" "$i"
  done >"$curlcfg"
  codes=$(curl -s -K "$curlcfg" -w '%{http_code}\n' | sort | uniq -c | tr -s ' ' | tr '\n' ',')
  printf '  9,000 more calls (one each to all the others): status counts %s\n' "${codes%,}"
  scrape_metrics "/metrics with all 10,000 active" "$admin"
  printf '  after those scrapes:                   %s\n' "$(mem_status)"
}

# ---------------------------------------------------------------------------------------------
# Main

printf 'callmeter load benchmark, %s\n' "$(date -u '+%F %T UTC')"
printf 'commit %s%s\n' "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
  "$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
printf 'callmeter binary: %s\n' "${CALLMETER_BIN:-the release build (cargo build --release)}"
printf 'machine: %s cores (%s), %s, kernel %s\n' "$cores" \
  "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
  "$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)"
printf 'tools: %s; %s; %s; %s\n' "$(nginx -v 2>&1)" "$(haproxy -v | head -n1 | cut -d' ' -f1-3)" \
  "$(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2)" "$(h2load --version | head -n1)"
printf 'pinning: %s\n' "$([ "$cores" -ge 2 ] && echo "proxy under test on core 0 (callmeter: not pinned); origin and load generator on core 1" || echo none)"
printf 'nginx: upstream keepalive %s (NGINX_KEEPALIVE), keepalive_requests 1000000\n' "$nginx_keepalive"
printf 'runs: %s s each, %s round(s), targets alternate %s\n' "$duration" "$rounds" "${TARGETS[*]}"
busy_before=$(
  c0=$(core_jiffies)
  sleep 1
  awk -v a="$c0" -v b="$(core_jiffies)" 'BEGIN { split(a, x, " "); split(b, y, " ")
    printf "%.0f", 100 * ((y[1] - x[1]) + (y[4] - x[4])) / ((y[3] - x[3]) + (y[6] - x[6])) }'
)
printf 'machine busy before the runs (other programs): %s%% of all cores over 1 s\n' "$busy_before"

if [ "$run_load" = 1 ]; then
  start_proxies
  printf '\nruns (h1 = HTTP/1.1 with wrk -t1; h2 = h2c with h2load -m10). CPU us/req: utime + stime of\n'
  printf 'the proxy process(es) per completed request; kernel softirq work (loopback TCP) is charged\n'
  printf 'to no process and is not in it. CPU %%: of one core over the run (100 = a whole core).\n'
  log "warming up each target for ${warmup} s..."
  for t in "${TARGETS[@]}"; do warm "$t"; done
  for conc in 1 32 256; do
    for ((round = 1; round <= rounds; round++)); do
      for t in "${TARGETS[@]}"; do measure h1 "$conc" "$round" "$t"; done
    done
  done
  for ((round = 1; round <= rounds; round++)); do
    for t in "${TARGETS[@]}"; do
      if [ -n "${h2_url[$t]:-}" ]; then measure h2 32 "$round" "$t"; fi
    done
  done

  table h1 1
  added_latency
  table h1 32
  table h1 256
  table h2 32
  [ -z "$h2_skip_note" ] || printf '%s\n' "$h2_skip_note"
  verdicts

  printf '\npeak RSS (VmHWM) after the runs: '
  for t in "${TARGETS[@]}"; do
    [ "$t" != direct ] || continue
    mapfile -t procs < <(proxy_pids "$t")
    printf '%s %s  ' "$t" "$(for p in "${procs[@]}"; do awk '/^VmHWM/ { print $2 }' "/proc/$p/status"; done |
      awk '{ s += $1 } END { printf "%.1f MiB", s / 1024 }')"
  done
  printf '\n'
  errors=$(awk -F'\t' '{ s += $16 } END { print s + 0 }' "$results")
  [ "$errors" -eq 0 ] || printf 'WARNING: %s requests failed or got a non-2xx answer over all runs: see the errors column\n' "$errors"
fi

if [ "$run_rss" = 1 ]; then
  if [ -z "${origin_pid:-}" ]; then die "no origin"; fi
  rss_section
fi
