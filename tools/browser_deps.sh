#!/usr/bin/env bash
# Installs the headless browser for the UI browser test (tests/integration/test_browser.py): Debian's
# `chromium` and `chromium-driver`, if they are missing. Called by that test's fixture (and usable by hand).
#
#   tools/browser_deps.sh          install if missing; print "BROWSER_READY chromium=<path> driver=<path>"
#
# Settings (environment): VITPIPE_BROWSER_SKIP_INSTALL=1 never runs apt-get.
# Exit status: 0 ready, 3 missing and not installable (not root, no apt-get, or apt-get failed).
set -euo pipefail

find_bin() { local b; for b in "$@"; do command -v "$b" 2>/dev/null && return 0; done; return 1; }
chromium_bin() { find_bin chromium chromium-browser; }
driver_bin() { find_bin chromedriver chromium-driver || { [[ -x /usr/bin/chromedriver ]] && echo /usr/bin/chromedriver; }; }

if ! chromium_bin >/dev/null || ! driver_bin >/dev/null; then
  if [[ ${VITPIPE_BROWSER_SKIP_INSTALL:-0} == 1 ]]; then
    echo "[browser-deps] chromium/chromium-driver missing and VITPIPE_BROWSER_SKIP_INSTALL=1" >&2; exit 3
  fi
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "[browser-deps] chromium/chromium-driver missing; installing them needs root and apt-get" >&2; exit 3
  fi
  echo "[browser-deps] installing chromium chromium-driver (once; about a minute)" >&2
  export DEBIAN_FRONTEND=noninteractive
  # An old or empty package list cannot find chromium: refresh it first (quietly).
  apt-get update -qq >&2 || { echo "[browser-deps] apt-get update failed" >&2; exit 3; }
  apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >&2 \
    || { echo "[browser-deps] apt-get install chromium chromium-driver failed" >&2; exit 3; }
fi
echo "BROWSER_READY chromium=$(chromium_bin) driver=$(driver_bin)"
