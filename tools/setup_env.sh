#!/usr/bin/env bash
# Creates (or refreshes) the project-local environment .venv with the locked, tested dependency set.
#
# Idempotent: a stamp records the hash of the lock, constraints and install tooling; when nothing
# changed the script returns at once. Every pip call takes constraints.txt so that no install can
# replace the CPU torch with a CUDA build. Set VITPIPE_VENV to use another location.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VITPIPE_VENV:-$root/.venv}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

stamp_src=$(cat "$root/requirements.lock" "$root/constraints.txt" "$root/pyproject.toml" \
  "$root/tools/tvfix/"* "$0" | sha256sum | cut -c1-16)
if [[ -f "$venv/.vitpipe-stamp" && "$(cat "$venv/.vitpipe-stamp")" == "$stamp_src" ]]; then
  exit 0
fi

echo "[setup] creating $venv (first run takes about 2-3 minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
export PIP_CONSTRAINT="$root/constraints.txt"
"${pip[@]}" install -r "$root/requirements.lock" 2> >(grep -v "^WARNING: Location .file://" >&2)

# torchvision workaround (install tooling, never model code): a .pth hook in site-packages.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$root/tools/tvfix/vitpipe_tvfix.py" "$root/tools/tvfix/vitpipe_tvfix.pth" "$site/"

"${pip[@]}" install --no-deps --no-build-isolation -e "$root"
"${pip[@]}" check >&2
echo "$stamp_src" > "$venv/.vitpipe-stamp"
echo "[setup] ready: $venv" >&2
