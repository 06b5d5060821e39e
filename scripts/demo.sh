#!/usr/bin/env bash
# One command: install everything into .venv (once) and run the demo on the embedded digits data set.
# Extra arguments go to `vitpipe demo` (e.g. --nproc-per-node 2).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup_env.sh"
cd "$root"
exec "${VITPIPE_VENV:-$root/.venv}/bin/vitpipe" demo "$@"
