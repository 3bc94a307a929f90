#!/usr/bin/env python3
"""The PyTorch side of `fluxlora bench`: diffusers' FluxTransformer2DModel with peft
LoRAs on the same named configurations, thread count, FLOP convention and JSON
field names (docs/performance.md).

Developers run it on their own machine (not in CI):
    pip install torch diffusers peft safetensors
    python scripts/bench/pytorch_bench.py --config small --threads 2 --json

Architectures match fluxlora's (BFL FluxParams): the model is built with seeded
random weights. Our fused qkv and linear1 are separate to_q/to_k/to_v/proj_mlp
linears in diffusers, so its rank-16 LoRA has a few more rank-space products;
FLOPs count the base model only, as on our side.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

CONFIGS = {
    # The built-in tiny model's architecture (fluxlora's ModelBundle::tiny).
    "tiny": dict(
        in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=4,
        depth=1, depth_single_blocks=2, axes_dim=[4, 6, 6], guidance_embed=False,
        text_tokens=32, image_side=4,
    ),
    "small": dict(
        in_channels=64, vec_in_dim=256, context_in_dim=512, hidden_size=512, num_heads=8,
        depth=2, depth_single_blocks=4, axes_dim=[8, 28, 28], guidance_embed=True,
        text_tokens=64, image_side=16,
    ),
    "dev": dict(
        in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24,
        depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], guidance_embed=True,
        text_tokens=512, image_side=32,
    ),
    "schnell": dict(
        in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24,
        depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], guidance_embed=False,
        text_tokens=256, image_side=32,
    ),
}

# peft's usual Flux targets: every attention and MLP linear of every block.
LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
]

FLOP_CONVENTION = (
    "forward_gflop: base-model linears (2·in·out per token) + attention (4·L²·hidden per block), "
    "LoRA not counted; a training step counts 2 × forward (forward + input-gradient backward; "
    "the frozen base needs no weight gradients)"
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), action="append")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, 16 per token side")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def median_secs(warmup, runs, sync, f):
    for _ in range(warmup):
        f()
        sync()
    times = []
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def forward_flops(model, cfg, batch, n_img, n_txt):
    """The same analytic count as fluxlora's bench::forward_flops, on diffusers names."""
    import torch

    flops = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or "lora_" in name:
            continue
        if name.startswith("time_text_embed") or name.endswith("norm1.linear") \
                or name.endswith("norm1_context.linear") or name.endswith("norm.linear") \
                or name == "norm_out.linear":
            tokens = 1
        elif name.startswith("single_transformer_blocks"):
            tokens = n_img + n_txt
        elif name.startswith("transformer_blocks"):
            context = ("add_" in name or "to_add_out" in name or "ff_context" in name)
            tokens = n_txt if context else n_img
        elif name == "context_embedder":
            tokens = n_txt
        else:  # x_embedder, proj_out
            tokens = n_img
        flops += 2.0 * m.in_features * m.out_features * tokens
    seq = n_img + n_txt
    blocks = cfg["depth"] + cfg["depth_single_blocks"]
    flops += blocks * 4.0 * seq * seq * cfg["hidden_size"]
    return flops * batch


def measure(name, args, torch, device):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    cfg = dict(CONFIGS[name])
    side = cfg["image_side"] if args.resolution is None else max(args.resolution // 16, 1)
    n_img, n_txt, batch = side * side, cfg["text_tokens"], max(args.batch, 1)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    warmup, steps = args.warmup, max(args.steps, 1)

    n = args.matmul_n
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    peak = 2.0 * n ** 3 / median_secs(1, 5, sync, lambda: a @ b) / 1e9
    del a, b
    print(f"{name}: matmul peak ({dtype} {n}³): {peak:.1f} GFLOP/s", file=sys.stderr)

    torch.manual_seed(7)
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg["in_channels"], num_layers=cfg["depth"],
        num_single_layers=cfg["depth_single_blocks"], attention_head_dim=head_dim,
        num_attention_heads=cfg["num_heads"], joint_attention_dim=cfg["context_in_dim"],
        pooled_projection_dim=cfg["vec_in_dim"], guidance_embeds=cfg["guidance_embed"],
        axes_dims_rope=tuple(cfg["axes_dim"]),
    ).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    flops = forward_flops(model, cfg, batch, n_img, n_txt)

    g = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    img_ids = torch.stack([torch.zeros(n_img), rows, cols], dim=1).to(device=device, dtype=dtype)
    txt_ids = torch.zeros(n_txt, 3, device=device, dtype=dtype)
    inputs = dict(
        hidden_states=rand(batch, n_img, cfg["in_channels"]),
        encoder_hidden_states=rand(batch, n_txt, cfg["context_in_dim"]),
        pooled_projections=rand(batch, cfg["vec_in_dim"]),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
    )
    if cfg["guidance_embed"]:
        inputs["guidance"] = torch.full((batch,), 1.0, device=device, dtype=dtype)
    target = rand(batch, n_img, cfg["in_channels"])

    def forward():
        with torch.no_grad():
            model(**inputs)

    # Sampling without any LoRA, before peft wraps a layer.
    sample_step_s = median_secs(warmup, steps, sync, forward)

    # Three frozen LoRAs with non-zero up (peft's init_lora_weights=False) and the trainable one.
    def lora_config(init):
        return LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=init)

    for i in range(3):
        model.add_adapter(lora_config(False), adapter_name=f"s{i}")
    model.add_adapter(lora_config(True), adapter_name="trained")
    model.set_adapters("s0")
    sample_step_1lora_s = median_secs(warmup, steps, sync, forward)
    model.set_adapters(["s0", "s1", "s2"], weights=[0.7, 0.7, 0.7])
    sample_step_3lora_s = median_secs(warmup, steps, sync, forward)
    print(f"{name}: sample step {sample_step_s:.3f} s, 1 LoRA {sample_step_1lora_s:.3f} s, "
          f"3 LoRAs {sample_step_3lora_s:.3f} s", file=sys.stderr)

    # Hot swap: a LoRA file read into the adapter in use (diffusers' hotswap=True).
    with tempfile.TemporaryDirectory() as tmp:
        model.save_lora_adapter(tmp, adapter_name="s1", weight_name="lora.safetensors")
        model.set_adapters("s0")

        def swap():
            model.load_lora_adapter(os.path.join(tmp, "lora.safetensors"),
                                    adapter_name="s0", hotswap=True, prefix=None)

        hot_swap_ms = median_secs(warmup, steps, sync, swap) * 1e3

    # Training the "trained" adapter with AdamW.
    model.set_adapters("trained")
    params = [p for n_, p in model.named_parameters() if ".trained." in n_]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def train_step():
        pred = model(**inputs)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    train_step_s = median_secs(warmup, steps, sync, train_step)
    print(f"{name}: train step {train_step_s:.3f} s", file=sys.stderr)
    model.enable_gradient_checkpointing()
    train_step_checkpointed_s = median_secs(warmup, steps, sync, train_step)
    model.disable_gradient_checkpointing()
    print(f"{name}: train step, checkpointed {train_step_checkpointed_s:.3f} s", file=sys.stderr)

    achieved = 2.0 * flops / train_step_s / 1e9
    import diffusers
    import peft
    return dict(
        config=name,
        implementation=f"PyTorch {torch.__version__} + diffusers {diffusers.__version__} + peft {peft.__version__}",
        device=str(device), dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(), batch=batch, image_tokens=n_img, text_tokens=n_txt,
        lora_rank=16, lora_targets="attention and MLP linears of every block",
        model=dict(cfg, mlp_ratio=4.0, theta=10000.0, qkv_bias=True),
        steps=steps,
        train_step_s=train_step_s, train_step_checkpointed_s=train_step_checkpointed_s,
        sample_step_s=sample_step_s, sample_step_1lora_s=sample_step_1lora_s,
        sample_step_3lora_s=sample_step_3lora_s, hot_swap_ms=hot_swap_ms,
        # ru_maxrss is in KiB on Linux.
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        forward_gflop=flops / 1e9, achieved_gflops=achieved,
        matmul_peak_gflops=peak, matmul_peak_n=n, pct_of_peak=100.0 * achieved / peak,
        flop_convention=FLOP_CONVENTION,
    )


def main():
    args = parse_args()
    if args.threads:
        # Before torch starts its pools.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    device = torch.device(args.device)
    for name in args.config or ["small"]:
        r = measure(name, args, torch, device)
        if args.json:
            print(json.dumps(r))
        else:
            for k, v in r.items():
                print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
