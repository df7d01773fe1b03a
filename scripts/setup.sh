#!/usr/bin/env bash
# Set up prunekit in ./.venv on a fresh machine (idempotent; a second run only checks).
#
# torch: a CPU machine gets torch 2.13.0 (CPU build). A torch that is already importable in the
# chosen Python is kept (a GPU user keeps their own build: pyproject only declares a range).
# Everything else is pinned by requirements/constraints.txt, the versions the tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.prunekit-setup"
want="$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import prunekit, torch" 2>/dev/null; then
  exit 0
fi

echo "prunekit: setting up $VENV (first time: a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "torch==2.13.0"                      # the CUDA build, on a GPU machine
  elif wheels="$(mktemp -d)" && "$VENV/bin/python" -m pip download --no-deps -q -d "$wheels" \
        "torch==2.13.0+cpu" >/dev/null 2>&1; then
    "${pip[@]}" install "$wheels"/torch-2.13.0+cpu-*.whl      # a CPU wheel from the configured indexes
    rm -rf "$wheels"
  else
    "${pip[@]}" install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" install -c requirements/constraints.txt -e ".[dev]"
"$VENV/bin/python" -c "import prunekit, torch; print(f'prunekit ready: torch {torch.__version__}', flush=True)" >&2
echo "$want" > "$STAMP"
