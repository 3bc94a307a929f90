#!/usr/bin/env bash
# The project's test command (README "Run the tests"; CI's .ci/run calls it):
# the Rust tests, the front-end extension's unit tests (node), the ComfyUI
# bridge's Python tests against the daemon the Rust build just made, and the
# browser test (ComfyUI's official front end served by the daemon, in headless
# Chromium). The scripts install what is missing on a Debian machine (Python,
# node, Chromium and its driver, the pinned front end).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --locked
bash scripts/js-test.sh

need_python() {
    if command -v apt-get >/dev/null; then
        echo "installing python3 and python3-venv (the bridge tests need them)" >&2
        apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
    else
        echo "the bridge tests need python3 with venv; install them" >&2
        exit 1
    fi
}
command -v python3 >/dev/null || need_python
python3 -c 'import venv, ensurepip' 2>/dev/null || need_python
bash scripts/bridge-test.sh
# The daemon cargo test just built (a plain cargo build would compile it again:
# dev-dependency features differ).
FLUXLORA_BIN="$PWD/target/debug/fluxlora" bash scripts/browser-test.sh
