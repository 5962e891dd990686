#!/usr/bin/env bash
# One-command setup: installs celltune and its pinned dependencies into the current Python.
# A torch that is already installed (CPU or CUDA) is kept; only where none is importable is
# the CPU build torch==2.13.0 installed (on the team machines it comes from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==${TORCH_VERSION}" > "${TMPDIR:-/tmp}/celltune-torch-constraint.txt"
# The constraint keeps pip from replacing the installed torch with a (CUDA) upgrade.
"$PY" -m pip install --quiet -c "${TMPDIR:-/tmp}/celltune-torch-constraint.txt" -e ".[dev,scvi]"
echo "celltune installed (torch ${TORCH_VERSION})"
