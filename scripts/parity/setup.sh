#!/usr/bin/env bash
# Create the Python environment for scripts/parity/make_fixtures.py.
#
#   bash scripts/parity/setup.sh            # venv at <repo>/.venv-parity (git-ignored)
#   VENV=/some/dir bash scripts/parity/setup.sh
#   PYTHON=python3.11 bash scripts/parity/setup.sh
#
# Needs Python >= 3.10 and PyPI. Then:
#   .venv-parity/bin/python scripts/parity/make_fixtures.py
#
# torch: first tries the light route (`pip install --no-deps torch` plus its small pure-Python
# deps) and keeps it only if `import torch` works on CPU. With the pinned torch 2.15.0 wheel it
# does not (the wheel links libcudart/libcublasLt from the nvidia-* packages), so the script
# falls back to the normal install, which pulls the CUDA wheels (about 5-6 GB in the venv).
# Set PARITY_TORCH_LIGHT=0 to skip the light attempt.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv-parity}"
PYTHON="${PYTHON:-python3}"
REQ="$HERE/requirements.txt"
TORCH_PIN="$(grep -E '^torch==' "$REQ")"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating venv at $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

LIGHT_OK=0
torch_ok() { "$PY" -c 'import torch; torch.zeros(2, dtype=torch.float64).sum().item()' >/dev/null 2>&1; }

torch_pinned() {
    "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_PIN#torch==}')" >/dev/null 2>&1
}

if torch_ok && torch_pinned; then
    echo "torch already installed and importable"
elif [ "${PARITY_TORCH_LIGHT:-1}" = "1" ]; then
    echo "trying torch without its CUDA dependencies ($TORCH_PIN --no-deps)"
    "$PY" -m pip install --quiet --no-deps "$TORCH_PIN"
    "$PY" -m pip install --quiet filelock typing-extensions sympy networkx jinja2 fsspec mpmath markupsafe \
        "setuptools>=77"
    if torch_ok; then
        echo "light torch imports on CPU; installing the rest without pulling torch's CUDA deps"
        grep -vE '^(#|torch==|$)' "$REQ" > "$VENV/requirements-no-torch.txt"
        "$PY" -m pip install --quiet -r "$VENV/requirements-no-torch.txt"
        LIGHT_OK=1
    else
        echo "light torch does not import on CPU; doing the normal install (CUDA wheels, several GB)"
    fi
fi

# Installs whatever is still missing (the full torch with its dependencies if the light
# route failed or was skipped); a no-op when everything is in place.
if [ "$LIGHT_OK" = "0" ]; then
    "$PY" -m pip install --quiet -r "$REQ"
fi

"$PY" - <<'PY'
import torch, diffusers, peft, safetensors, numpy, transformers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__,
      "safetensors", safetensors.__version__, "numpy", numpy.__version__,
      "transformers", transformers.__version__)
assert torch.zeros(2, dtype=torch.float64).sum().item() == 0.0
PY
echo "ok: $VENV"
