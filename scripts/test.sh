#!/usr/bin/env bash
# Runs every test of callmeter: unit, property and end-to-end tests, plus the checks that need
# real Prometheus tools, a real SMTP server (aiosmtpd) and a real browser (Chromium). Installs the
# Debian packages the tests use when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# sqlite3, as an SRE looks at the store beside a running proxy.
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
# A real SMTP server for the threshold-email tests (Debian's python3, not one earlier on PATH).
/usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || need+=(python3-aiosmtpd)
# A real browser for the status-page tests: headless Chromium, and ChromeDriver for the form.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cargo build --locked --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --all-targets 2>&1 | tee "$log"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
