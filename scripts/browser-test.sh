#!/usr/bin/env bash
# Runs the browser test (tests/browser): ComfyUI's official front end served by
# a real daemon, driven in headless Chromium through chromedriver.
#
#   scripts/browser-test.sh
#
# Installs what it needs on a fresh Debian machine when run as root: chromium,
# chromium-driver, python3 and python3-venv (apt-get), a venv in .venv-browser
# with selenium, and the pinned front end (scripts/get-frontend.sh, cached in
# .cache/comfyui-frontend/). The daemon is FLUXLORA_BIN, else target/debug/fluxlora
# (built here with cargo when FLUXLORA_BIN is not set; a no-op after cargo test).
# Screenshots and the browser console go to FLUXLORA_BROWSER_ARTIFACTS
# (default target/browser-test). Exit status: that of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

frontend_version=1.58.1
selenium_version=4.51.0

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        echo "installing ${missing[*]} (the browser test needs them)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "the browser test needs ${missing[*]}; install them" >&2
        exit 1
    fi
fi

venv=.venv-browser
if [[ "$("$venv/bin/python" -c 'import selenium; print(selenium.__version__)' 2>/dev/null)" != "$selenium_version" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "selenium==$selenium_version"
fi

frontend=.cache/comfyui-frontend/$frontend_version
PYTHON="$PWD/$venv/bin/python" bash scripts/get-frontend.sh "$frontend"

if [[ -z "${FLUXLORA_BIN:-}" ]]; then
    cargo build --locked --bin fluxlora
fi

artifacts=${FLUXLORA_BROWSER_ARTIFACTS:-target/browser-test}
mkdir -p "$artifacts"
rm -f "$artifacts"/*.png "$artifacts/console.json"
export FLUXLORA_FRONTEND="$PWD/$frontend"
FLUXLORA_BROWSER_ARTIFACTS=$(cd "$artifacts" && pwd)
export FLUXLORA_BROWSER_ARTIFACTS
exec "$venv/bin/python" -m unittest discover -s tests/browser -v
