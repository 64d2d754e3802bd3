#!/usr/bin/env bash
# The browser the web-page tests drive: Debian's chromium (playwright's own browser download
# cannot work on these machines). Idempotent; needs root (CI and the dev machines are root).
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is missing and this is not root: run 'apt-get install -y chromium' as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
