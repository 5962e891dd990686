#!/usr/bin/env bash
# One-command setup: installs celltune and its pinned dependencies into the current Python.
#
#   bash scripts/setup.sh          # celltune + the dev (pytest, ruff) and docs (mkdocs) extras
#   bash scripts/setup.sh --all    # ... + the scVI integration baseline (extra "scvi": large)
#
# A torch that is already installed (CPU or CUDA) is kept; only where none is importable is
# the CPU build torch==2.13.0 installed (on the team machines it comes from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
EXTRAS="dev,docs"
for arg in "$@"; do
    case "$arg" in
        --all) EXTRAS="dev,docs,scvi" ;;
        -h|--help) sed -n 2,8p "$0"; exit 0 ;;
        *) echo "unknown option: $arg (use --all or --help)" >&2; exit 2 ;;
    esac
done
# numpy first: importing torch without numpy prints a warning.
"$PY" -m pip install --quiet "numpy>=1.26,<3"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==${TORCH_VERSION}" > "${TMPDIR:-/tmp}/celltune-torch-constraint.txt"
# The constraint keeps pip from replacing the installed torch with a (CUDA) upgrade.
"$PY" -m pip install --quiet -c "${TMPDIR:-/tmp}/celltune-torch-constraint.txt" -e ".[${EXTRAS}]"
echo "celltune installed (torch ${TORCH_VERSION}, extras: ${EXTRAS})"
