#!/usr/bin/env bash
# Runs the ComfyUI bridge's tests (bridge/comfyui/tests) against a real daemon.
#
#   scripts/bridge-test.sh
#
# Needs python3 (3.10+) and a built daemon: target/debug/fluxlora, or the binary
# named by FLUXLORA_BIN (cargo build --bin fluxlora). The first run makes a venv
# in .venv-bridge with numpy and pillow, the two packages ComfyUI provides that
# the bridge's image conversion uses; torch and ComfyUI itself are stood in for
# by the test. Exit status: that of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-bridge
if ! "$venv/bin/python" -c 'import numpy, PIL' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        numpy==2.2.6 pillow==11.3.0
fi
exec "$venv/bin/python" -m unittest discover -s bridge/comfyui/tests -v
