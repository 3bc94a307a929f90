#!/usr/bin/env python3
"""Prints the side-by-side table of docs/performance.md from one sitting's JSON:
compare.py FLUXLORA.json PYTORCH.json (one object per line; the first config of each)."""

import json
import platform
import sys


def first(path):
    with open(path) as f:
        return json.loads(next(line for line in f if line.strip()))


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {platform.system()} {platform.release()}"


def main():
    ours, torch = first(sys.argv[1]), first(sys.argv[2])
    rows = [
        ("LoRA train step (fwd + bwd + AdamW), s", "train_step_s", "≤ 0.8×"),
        ("same with gradient checkpointing, s", "train_step_checkpointed_s", "≤ 0.8×"),
        ("sample step (one forward), s", "sample_step_s", "≤ 0.8×"),
        ("sample step, 1 unmerged LoRA, s", "sample_step_1lora_s", ""),
        ("sample step, 3 unmerged LoRAs, s", "sample_step_3lora_s", ""),
        ("LoRA hot swap, ms", "hot_swap_ms", "≤ 10 ms"),
        ("peak RSS, MB", "peak_rss_mb", "≤ 1×"),
        ("matmul peak (f32 2048³), GFLOP/s", "matmul_peak_gflops", ""),
        ("training, achieved GFLOP/s (2 × forward)", "achieved_gflops", ""),
        ("training, % of matmul peak", "pct_of_peak", "≥ 75 %"),
    ]
    print(f"machine: {machine()}; config {ours['config']}, {ours['threads']} threads "
          f"(PyTorch: {torch['threads']}), {ours['steps']} steps")
    print(f"fluxlora: {ours['implementation']}; other side: {torch['implementation']}")
    print()
    print("| figure | PyTorch | fluxlora | fluxlora / PyTorch | target |")
    print("| --- | --- | --- | --- | --- |")
    for label, key, target in rows:
        a, b = torch.get(key), ours.get(key)
        if a is None or b is None:
            print(f"| {label} | {a} | {b} | – | {target} |")
            continue
        print(f"| {label} | {a:.3f} | {b:.3f} | {b / a:.2f} | {target} |")
    for side, r in (("PyTorch", torch), ("fluxlora", ours)):
        print(f"| 3 LoRAs / no LoRA ({side}) | | | {r['sample_step_3lora_s'] / r['sample_step_s']:.2f}× | ≤ 1.10× (ours) |")


if __name__ == "__main__":
    main()
