#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the tested versions.
# Sourced by tools/demo.sh and tools/test.sh, so each of them works on a fresh machine by itself.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LARGEMIM_VENV:-$REPO/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.largemim-installed"
if [ ! -f "$stamp" ] || [ "$REPO/requirements.txt" -nt "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
  # torch's CUDA build alone is 5.6 GB in the venv: say so up front rather than fail mid-install.
  # (less what an earlier, interrupted install already put there)
  have_kb=$(du -sk "$VENV" 2>/dev/null | awk '{print $1}' || true)
  need_kb=$((7 * 1024 * 1024 - ${have_kb:-0}))
  free_kb=$(df -Pk "$VENV" 2>/dev/null | awk 'NR==2 {print $4}' || true)
  if [ -n "$free_kb" ] && [ "$free_kb" -lt "$need_kb" ]; then
    echo "[setup] not enough disk for the environment: $VENV needs about $((need_kb / 1024)) MiB more," \
         "and its file system has $((free_kb / 1024)) MiB free. Free some space, or point LARGEMIM_VENV at a larger disk."
    exit 1
  fi
  echo "[setup] installing requirements (torch comes from this machine's disk: about 2 minutes the first time)"
  log="$VENV/install.log"
  if ! { python -m pip install -q --upgrade pip &&
         python -m pip install -q --no-cache-dir -r "$REPO/requirements.txt" &&
         python -m pip install -q --no-deps -e "$REPO"; } >"$log" 2>&1; then
    tail -n 30 "$log"
    echo "[setup] install failed; the whole log is in $log"
    exit 1
  fi
  python -c "import torch, deepspeed, timm, webdataset, submitit, omegaconf" || { echo "[setup] install failed"; exit 1; }
  touch "$stamp"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
