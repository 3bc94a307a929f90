#!/usr/bin/env bash
# Runs the front-end extension's unit tests (js/tests, node's built-in runner).
#
#   scripts/js-test.sh
#
# Needs node (18 or newer); installs Debian's nodejs with apt-get when there is
# none and this runs as root. Exit status: that of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing nodejs (the js/ tests need node)" >&2
        apt-get update -qq && apt-get install -y -qq nodejs >/dev/null
    else
        echo "the js/ tests need node (18 or newer); install nodejs" >&2
        exit 1
    fi
fi
# The files by name: `node --test js/tests/` searches the folder on node 18 and
# 20 only (from 21 on, arguments are glob patterns and a folder is not one).
mapfile -t tests < <(find js/tests -name '*.test.mjs' | sort)
if [ "${#tests[@]}" = 0 ]; then
    echo "no tests under js/tests" >&2
    exit 1
fi
exec node --test "${tests[@]}"
