#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the tested versions, then
# activate it. Sourced by tools/demo.sh and tools/test.sh, so each of them works on a fresh machine by
# itself; `source tools/setup_env.sh` in a shell activates it there (the shell's options are left as
# they were, and a failure returns 1 instead of closing the shell).
_LM_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_LM_VENV="${LARGEMIM_VENV:-$_LM_REPO/.venv}"

# The install runs in a subshell: its `set -euo pipefail` and `exit` stay there.
_lm_install() (
  set -euo pipefail
  REPO=$_LM_REPO VENV=$_LM_VENV
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "[setup] largemim needs Python 3.10 or newer as python3; found: $(python3 --version 2>&1)"
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    existed=$([ -e "$VENV" ] && echo 1 || true)
    if ! python3 -m venv "$VENV"; then
      [ -z "$existed" ] && rm -rf "$VENV"  # leave no half-made environment behind to trip the next run
      echo "[setup] could not create a virtual environment with python3 -m venv (on Debian/Ubuntu:" \
           "apt install python3-venv), then run this again"
      exit 1
    fi
  fi
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "[setup] $VENV is a broken virtual environment (its python has no pip, e.g. an interrupted" \
         "python3 -m venv): delete it and run this again"
    exit 1
  fi
  stamp="$VENV/.largemim-installed"
  if [ -f "$stamp" ] && [ ! "$REPO/requirements.txt" -nt "$stamp" ] && [ ! "$REPO/pyproject.toml" -nt "$stamp" ]; then
    exit 0
  fi
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
  py="$VENV/bin/python"
  log="$VENV/install.log"
  echo "[setup] installing requirements into $VENV (torch is the big one: about 2 minutes from a local wheel" \
       "cache, longer to download); pip's log: $log"
  # a line every 30 s with pip's latest, so a long download does not look like a hang
  # (its sleep is killed with it: a sleep left behind would hold the output open for up to 30 s)
  (trap 'kill $nap 2>/dev/null; exit 0' TERM
   while :; do
     sleep 30 & nap=$!
     wait $nap
     echo "[setup] still installing: $(tail -n 1 "$log" 2>/dev/null | cut -c 1-100)"
   done) &
  heartbeat=$!
  if ! { "$py" -m pip install -q --upgrade pip &&
         "$py" -m pip install --progress-bar off --no-cache-dir -r "$REPO/requirements.txt" &&
         "$py" -m pip install -q --no-deps -e "$REPO"; } >"$log" 2>&1; then
    kill "$heartbeat" 2>/dev/null || true
    tail -n 30 "$log"
    echo "[setup] install failed; the whole log is in $log"
    exit 1
  fi
  kill "$heartbeat" 2>/dev/null || true
  "$py" -c "import torch, deepspeed, timm, webdataset, submitit, omegaconf" || { echo "[setup] install failed"; exit 1; }
  touch "$stamp"
)

# Called on its own, not in an `if`: bash ignores `set -e` inside a command whose status is tested.
# (A caller under `set -e`, such as tools/demo.sh, stops here if the install failed.)
_lm_install
_lm_status=$?
if [ "$_lm_status" = 0 ]; then
  # shellcheck disable=SC1091
  source "$_LM_VENV/bin/activate"
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
fi
unset -f _lm_install
unset _LM_REPO _LM_VENV
# `return` when sourced, `exit` when run as a script.
(return 0 2>/dev/null) && return "$_lm_status"
exit "$_lm_status"
