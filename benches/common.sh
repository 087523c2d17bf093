#!/usr/bin/env bash
# Shared by benches/load.sh and benches/profile.sh: the callmeter config both measure.
#
# cargo_exe NAME CARGO-ARGS...: builds with cargo and prints the executable of target NAME.
#
# callmeter_config FILE PORT ADMIN_PORT [N [THREADS]]: one org at the fake origin on
# $origin_port, three path-prefix integrations (the benchmark's one with a quota far from
# reached), plus N generated ones (i00000, i00001, ...) for the memory section; THREADS sets
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
daily_limit = 5000000
[[integration]]
id = "salesloft"
org = "acme"
match = { path_prefix = "/salesloft" }
quota = 4000000
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
