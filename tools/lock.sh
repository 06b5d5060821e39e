#!/usr/bin/env bash
# Re-resolves the dependency set into requirements.lock (run after changing pyproject.toml).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3.11 -m venv "$tmp/venv"
PIP_CONSTRAINT="$root/constraints.txt" "$tmp/venv/bin/pip" install -q "torch==2.13.0+cpu" "$root[dali,test]"
{
  echo "# Resolved, tested versions of every dependency on the CPU machines (Python 3.11)."
  echo "# Regenerate with tools/lock.sh after changing pyproject.toml; always install with -c constraints.txt."
  "$tmp/venv/bin/pip" freeze --exclude vitpipe
} > "$root/requirements.lock"
