#!/usr/bin/env bash
# One sitting on a quiet machine: fluxlora's benchmark (release build) and the
# PyTorch side-by-side, one after the other with the same thread count, writing
# docs/bench-cpu.json and docs/bench-pytorch-cpu.json and printing the table for
# docs/performance.md. Needs Python with torch, diffusers and peft
# (PYTHON=/path/to/venv/bin/python); THREADS defaults to 2, CONFIG to small.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
CONFIG=${CONFIG:-small}

cargo build --release --locked
./target/release/fluxlora bench --config "$CONFIG" --threads "$THREADS" --json >docs/bench-cpu.json
"$PYTHON" scripts/bench/pytorch_bench.py --config "$CONFIG" --threads "$THREADS" --json >docs/bench-pytorch-cpu.json
"$PYTHON" scripts/bench/compare.py docs/bench-cpu.json docs/bench-pytorch-cpu.json
