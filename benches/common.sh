#!/usr/bin/env bash
# Shared by benches/load.sh, profile.sh and instructions.sh: tools, builds, the callmeter
# config they all measure and the nginx they compare it with.
#
# ensure_tools COMMAND:PACKAGE...: installs (apt-get) the Debian packages of the commands
# that are missing.
#
# build_bins: builds callmeter (release) and the fake origin (bench profile); sets
# $callmeter_bin (or takes $CALLMETER_BIN) and $origin_bin.
#
# cargo_exe NAME CARGO-ARGS...: builds with cargo and prints the executable of target NAME.
#
# free_port: a TCP port on 127.0.0.1 that was free a moment ago.
#
# wait_up URL LOGFILE [TENTHS]: waits until URL answers 2xx (default for 15 s, TENTHS tenths
# of a second); else prints the end of LOGFILE (the server's log) and exits.
#
# nginx_config DIR PORT H2PORT KEEPALIVE: writes DIR/nginx.conf, the nginx the benchmarks
# measure: one worker, `/salesloft/` proxied to the origin on $origin_port (prefix stripped)
# over HTTP/1.1 with KEEPALIVE idle upstream connections kept, h2c (prior knowledge) on H2PORT.
# Start it with `nginx -p DIR -c DIR/nginx.conf -e DIR/error.log -g 'daemon off;'`.
#
# callmeter_config FILE PORT ADMIN_PORT [N [THREADS]]: one org at the fake origin on
# $origin_port, three path-prefix integrations (the benchmark's one with a quota far from
# reached: 40 million of a 50 million daily limit, as one callmeter process of a full load.sh
# run counts several million calls; at 4 million, a faster build ran into it during the h2c
# rounds), plus N generated ones (i00000, i00001, ...) for the memory section; THREADS sets
# `[proxy] worker_threads` (default: one per core). The store sits next to FILE.
callmeter_config() {
  local file=$1 port=$2 admin=$3 extra=${4:-0} threads=${5:-} db
  db="${file%.toml}.db"
  cat >"$file" <<TOML
[admin]
listen = "127.0.0.1:$admin"
[store]
path = "$db"
[log]
level = "warn"
[proxy]
shutdown_grace = "1s"
${threads:+worker_threads = $threads}
[[listener]]
name = "main"
listen = "127.0.0.1:$port"
[[org]]
id = "acme"
instance_url = "http://127.0.0.1:$origin_port"
allow_plain_http = true
daily_limit = 50000000
[[integration]]
id = "salesloft"
org = "acme"
match = { path_prefix = "/salesloft" }
quota = 40000000
[[integration]]
id = "etl"
org = "acme"
match = { path_prefix = "/etl" }
[[integration]]
id = "middleware"
org = "acme"
match = { path_prefix = "/middleware" }
TOML
  local i
  for ((i = 0; i < extra; i++)); do
    printf '[[integration]]\nid = "i%05d"\norg = "acme"\nmatch = { path_prefix = "/i%05d" }\n' "$i" "$i"
  done >>"$file"
}

ensure_tools() {
  local pair need=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  [ ${#need[@]} -gt 0 ] || return 0
  echo "installing: ${need[*]}" >&2
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >&2
}

wait_up() {
  local url=$1 logfile=$2 tries=${3:-150}
  for _ in $(seq "$tries"); do
    curl -sf -o /dev/null "$url" && return 0
    sleep 0.1
  done
  echo "no answer from $url; the end of $logfile:" >&2
  tail -n 20 "$logfile" >&2 || true
  exit 1
}

# A scratch directory in $work and a `pids` list: when the script exits (Ctrl-C included) every
# process in `pids` is stopped by its PID and the directory removed.
start_work() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/callmeter-$1.XXXXXX")
  pids=()
  trap stop_work EXIT
  trap 'exit 130' INT TERM
}
stop_work() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

build_bins() {
  echo "building callmeter (release) and the origin (bench profile)..." >&2
  # CALLMETER_BIN measures a binary built otherwise (another commit, a PGO build).
  callmeter_bin=${CALLMETER_BIN:-$(cargo_exe callmeter build --release --quiet --bin callmeter)}
  origin_bin=$(cargo_exe origin bench --bench origin --no-run --quiet)
  if [ ! -x "$callmeter_bin" ] || [ ! -x "$origin_bin" ]; then
    echo "no callmeter or origin executable found after the build" >&2
    exit 1
  fi
}

cargo_exe() {
  local name=$1
  shift
  cargo "$@" --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == sys.argv[1] \
            and msg.get("executable"):
        print(msg["executable"])
' "$name"
}

nginx_config() {
  local dir=$1 port=$2 h2port=$3 keepalive=$4
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<NGINX
worker_processes 1;
worker_rlimit_nofile 16384;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    # nginx closes a client connection (HTTP/1.1 and HTTP/2) after 1000 requests by default,
    # and an upstream one too: the other proxies never do, so neither does nginx here.
    keepalive_requests 1000000;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    upstream origin {
        server 127.0.0.1:$origin_port;
        keepalive $keepalive;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port;
        listen 127.0.0.1:$h2port http2;
        location /salesloft/ {
            proxy_pass http://origin/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
}
