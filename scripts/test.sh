#!/usr/bin/env bash
# One command: install everything into .venv (once) and run the whole test suite.
# Extra arguments go to pytest (e.g. -k config, -x).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup_env.sh"
cd "$root"
exec "${VITPIPE_VENV:-$root/.venv}/bin/python" -m pytest "$@"
