#!/usr/bin/env bash
# Installs the system packages the test suite needs, when they are missing:
# redis-server (the shared-state tests start their own on a free port) and
# chromium (the dashboard's browser tests drive it with Playwright, whose own
# browser download needs more than the package registries).
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing ${missing[*]} with apt-get" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The package may start a system-wide server; the tests never use it.
$sudo service redis-server stop >/dev/null 2>&1 || true
