#!/usr/bin/env python3
"""Generate numerical parity fixtures for the fluxlora Flux transformer.

What it makes
-------------
One folder per fixture under the output root (default ``tests/fixtures/parity``),
in the format described in ``shared/spec/parity-fixtures.md``:

    config.json              Flux config (BFL field names)
    model.safetensors        random tiny weights, Black Forest Labs single-file key layout
    inputs.safetensors       img, img_ids, txt, txt_ids, y, timesteps[, guidance]
    output.safetensors       out                      (reference prediction, no adapter)
    lora.safetensors         kohya-format LoRA (lora_unet_*.lora_down/.lora_up/.alpha)
    output_lora.safetensors  out_1.0, out_0.5         (prediction with the LoRA at 1.0 / 0.5)
    sampling.json            steps, guidance, shift, base_shift, max_shift, grid
    sampling.safetensors     noise, final             (S Euler steps over the Flux schedule)
    README.md                how this folder was made, with the sanity numbers

All tensors are stored as little-endian float32.

Besides, one folder ``samplers`` (not a model fixture: it has no config.json) holds
the references of the samplers and schedules, in float64:

    cases.json               the velocity field, and per case: sampler, scheduler,
                             steps, shift (base/max or null), image_seq_len
    samplers.safetensors     W, b (the field v(x, t) = tanh(x W^T + t b)), x1 (the
                             initial x at t = 1), and per case <case>.times,
                             <case>.final and, for euler_ancestral, <case>.noise
                             (one standard normal draw per step that adds noise)
    README.md                the update rules used, and the sanity numbers

Where the reference numbers come from (nothing here uses the fluxlora Rust code)
-------------------------------------------------------------------------------
* Weights are drawn at random (seeded torch generator) directly in the BFL key
  layout. The key list mirrors black-forest-labs/flux ``src/flux/model.py`` and
  ``src/flux/modules/layers.py``.
* They are converted to a diffusers state dict with diffusers' own converter
  ``convert_flux_transformer_checkpoint_to_diffusers`` and loaded (strict) into
  ``diffusers.FluxTransformer2DModel``, which is run in float64. That is the
  reference for ``out``. diffusers evaluates the timestep/guidance sinusoid and
  RoPE in float32 even in a float64 model (worth ~2e-5 relative on the output);
  while computing the references those three helpers are swapped for float64
  versions of the same formulas (``exact_float64``), so the stored numbers are the
  exact float64 result. The stock-diffusers numbers are printed alongside.
* ``out_1.0`` / ``out_0.5``: the kohya file is converted by diffusers' own kohya
  loader (``FluxPipeline.lora_state_dict`` -> ``_convert_kohya_flux_lora_to_diffusers``)
  and attached with ``transformer.load_lora_adapter`` (peft); adapter weight 1.0 / 0.5.
  A second reference merges W' = W + s * alpha/rank * up @ down in BFL space,
  converts and runs that; the two must agree.
* ``final``: a plain PyTorch Euler loop following BFL ``sampling.py``
  (``get_schedule`` / ``denoise``) with the diffusers model as the velocity.
* ``samplers``: the samplers euler, euler_ancestral (rectified-flow Euler a, eta 1),
  heun and dpmpp_2m (DPM-Solver++(2M) in sigma form) and the schedules simple and
  beta, written here in plain PyTorch float64 from their published update rules
  (``rf_sample``), on a cheap deterministic velocity field. The beta quantiles come
  from mpmath's regularized incomplete beta (40 digits; torch has no incomplete
  beta), inverted by bisection. The ancestral noise is drawn here and stored, so a
  replay uses the very same draws.
* Extra sanity checks, printed and asserted: stock diffusers in float32 against
  float64 (self-consistency); an independent plain-PyTorch float64 implementation
  of the BFL forward (``bfl_forward``, written here from the BFL sources) against
  the reference, without and with the merged LoRA.

Workarounds for diffusers' converters (each checked, and described in the READMEs):
* both converters split ``single_blocks.N.linear1`` with the FLUX.1 sizes (3 x 3072
  + 12288): see ``_pad_linear1_rows`` / ``_crop_linear1_rows``;
* the kohya converter emits the non-block modules (img_in, txt_in, time_in, ...,
  final_layer) without the ``transformer.`` prefix, so the stock loader silently
  drops them: ``diffusers_lora_state_dict`` adds it;
* the kohya converter ignores ``.alpha`` for the two ``final_layer`` modules:
  ``make_lora`` gives those two alpha == rank (a diagnostic shows the mismatch).

How to run
----------
    bash scripts/parity/setup.sh                      # once: venv at .venv-parity
    .venv-parity/bin/python scripts/parity/make_fixtures.py            # all fixtures
    .venv-parity/bin/python scripts/parity/make_fixtures.py --only dev_b2_grid3x5
    .venv-parity/bin/python scripts/parity/make_fixtures.py --out /tmp/parity --list
    .venv-parity/bin/python scripts/parity/make_fixtures.py --only-samplers

Runs on CPU in well under a minute.  The output is deterministic for a given
set of package versions (see requirements.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import sys
import warnings
from pathlib import Path

# quieten transformers' import-time notices (FluxPipeline imports it); errors still show
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

import diffusers
import peft
import safetensors
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

F64 = torch.float64
F32 = torch.float32

# diffusers' converters split single_blocks.N.linear1 with these FLUX.1-sized constants
# (single_file_utils.convert_flux_transformer_checkpoint_to_diffusers: inner_dim = 3072,
# mlp_ratio = 4.0; lora_conversion_utils._convert_kohya_flux_lora_to_diffusers:
# dims=[3072, 3072, 3072, 12288]).
CONVERTER_INNER = 3072
CONVERTER_MLP = 12288

# --------------------------------------------------------------------------------------
# Fixture definitions
# --------------------------------------------------------------------------------------

FIXTURES = {
    "dev_b2_grid3x5": {
        "description": "guidance-distilled (dev-like) model, batch 2, non-square 3x5 token grid",
        "seed": 1234,
        "config": {
            "in_channels": 16,
            "vec_in_dim": 24,
            "context_in_dim": 32,
            "hidden_size": 48,
            "mlp_ratio": 4.0,
            "num_heads": 3,
            "depth": 2,
            "depth_single_blocks": 2,
            "axes_dim": [4, 6, 6],
            "theta": 10000,
            "qkv_bias": True,
            "guidance_embed": True,
        },
        "batch": 2,
        "grid": [3, 5],
        "n_txt": 7,
        "timesteps": [0.3, 0.85],
        "guidance": [3.5, 4.0],
        "lora": {"rank": 4, "alpha": 2.0},
        "sampling": {"steps": 4, "guidance": 3.5, "shift": True},
    },
    "schnell_b1_grid4x4": {
        "description": "non-guidance (schnell-like) model, batch 1, square 4x4 token grid",
        "seed": 98765,
        "config": {
            "in_channels": 16,
            "vec_in_dim": 20,
            "context_in_dim": 24,
            "hidden_size": 64,
            "mlp_ratio": 4.0,
            "num_heads": 4,
            "depth": 1,
            "depth_single_blocks": 3,
            "axes_dim": [8, 4, 4],
            "theta": 10000,
            "qkv_bias": True,
            "guidance_embed": False,
        },
        "batch": 1,
        "grid": [4, 4],
        "n_txt": 5,
        "timesteps": [0.55],
        "guidance": None,
        "lora": {"rank": 4, "alpha": 2.0},
        # guidance is ignored by a model without guidance_in (as in BFL's denoise for schnell)
        "sampling": {"steps": 4, "guidance": 3.5, "shift": False},
    },
}

# Tolerances of the spec (ours vs reference); the reference's own sanity checks must be far tighter.
SPEC_TOL_OUT = 1e-4
SPEC_TOL_FINAL = 1e-3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    a = a.to(F64)
    b = b.to(F64)
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# --------------------------------------------------------------------------------------
# BFL weight layout (from black-forest-labs/flux src/flux/model.py, modules/layers.py)
# --------------------------------------------------------------------------------------


def bfl_param_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of BFL ``Flux(FluxParams)`` with its shape, in module order.

    Flux.__init__: img_in, time_in (MLPEmbedder 256->h), vector_in (MLPEmbedder),
    guidance_in (MLPEmbedder 256->h, only if guidance_embed), txt_in, double_blocks
    (DoubleStreamBlock), single_blocks (SingleStreamBlock), final_layer (LastLayer with
    patch_size 1, out_channels = in_channels). LayerNorms have no affine params.
    """
    h = cfg["hidden_size"]
    mlp = int(h * cfg["mlp_ratio"])
    hd = h // cfg["num_heads"]
    assert sum(cfg["axes_dim"]) == hd, "axes_dim must sum to the head dim"
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            shapes[f"{name}.bias"] = (fan_out,)

    def mlp_embedder(name: str, fan_in: int) -> None:
        linear(f"{name}.in_layer", fan_in, h)
        linear(f"{name}.out_layer", h, h)

    def qk_norm(prefix: str) -> None:
        shapes[f"{prefix}.query_norm.scale"] = (hd,)
        shapes[f"{prefix}.key_norm.scale"] = (hd,)

    linear("img_in", cfg["in_channels"], h)
    mlp_embedder("time_in", 256)
    mlp_embedder("vector_in", cfg["vec_in_dim"])
    if cfg["guidance_embed"]:
        mlp_embedder("guidance_in", 256)
    linear("txt_in", cfg["context_in_dim"], h)
    for i in range(cfg["depth"]):
        p = f"double_blocks.{i}"
        for s in ("img", "txt"):
            linear(f"{p}.{s}_mod.lin", h, 6 * h)
            linear(f"{p}.{s}_attn.qkv", h, 3 * h, bias=cfg["qkv_bias"])
            qk_norm(f"{p}.{s}_attn.norm")
            linear(f"{p}.{s}_attn.proj", h, h)
            linear(f"{p}.{s}_mlp.0", h, mlp)
            linear(f"{p}.{s}_mlp.2", mlp, h)
    for i in range(cfg["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", h, 3 * h + mlp)
        linear(f"{p}.linear2", h + mlp, h)
        qk_norm(f"{p}.norm")
        linear(f"{p}.modulation.lin", h, 3 * h)
    linear("final_layer.linear", h, cfg["in_channels"])
    linear("final_layer.adaLN_modulation.1", h, 2 * h)
    return shapes


def bfl_linear_modules(cfg: dict) -> list[str]:
    """Module paths (BFL names) of every nn.Linear in the model, in module order."""
    return [k[: -len(".weight")] for k in bfl_param_shapes(cfg) if k.endswith(".weight")]


def make_weights(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 weights: W ~ N(0, 1/fan_in) (std 0.06..0.15 here), biases ~ N(0, 0.05^2),
    RMSNorm scales ~ 1 + N(0, 0.1^2)."""
    out = {}
    for name, shape in bfl_param_shapes(cfg).items():
        if name.endswith(".scale"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=F32)
        elif name.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=gen, dtype=F32)
        else:
            fan_in = shape[1]
            t = torch.randn(shape, generator=gen, dtype=F32) / math.sqrt(fan_in)
        out[name] = t.contiguous()
    return out


# --------------------------------------------------------------------------------------
# BFL -> diffusers (diffusers' own converter, with the linear1 padding workaround)
# --------------------------------------------------------------------------------------


def _linear1_parts(cfg: dict) -> list[int]:
    h = cfg["hidden_size"]
    return [h, h, h, int(h * cfg["mlp_ratio"])]


def _pad_linear1_rows(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Place the q, k, v, mlp row blocks of a tiny linear1 tensor at the offsets the
    diffusers converters use for FLUX.1 (3072, 3072, 3072, 12288), zeros elsewhere."""
    full = [CONVERTER_INNER, CONVERTER_INNER, CONVERTER_INNER, CONVERTER_MLP]
    parts = torch.split(t, _linear1_parts(cfg), dim=0)
    padded = torch.zeros((sum(full),) + tuple(t.shape[1:]), dtype=t.dtype)
    off = 0
    for part, size in zip(parts, full):
        padded[off : off + part.shape[0]] = part
        off += size
    return padded


def _crop_linear1_rows(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Undo _pad_linear1_rows on one converted piece; the cut-off rows must be the padding."""
    assert t.shape[0] in (CONVERTER_INNER, CONVERTER_MLP), (what, t.shape)
    assert torch.count_nonzero(t[n:]) == 0, f"{what}: converter split boundaries moved"
    return t[:n].contiguous()


def bfl_to_diffusers(bfl: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in bfl.items()}
    for i in range(cfg["depth_single_blocks"]):
        for kind in ("weight", "bias"):
            key = f"single_blocks.{i}.linear1.{kind}"
            sd[key] = _pad_linear1_rows(sd[key], cfg)
    out = convert_flux_transformer_checkpoint_to_diffusers(sd)
    assert not sd, f"converter left BFL keys unconsumed: {sorted(sd)}"
    h = cfg["hidden_size"]
    mlp = int(h * cfg["mlp_ratio"])
    for i in range(cfg["depth_single_blocks"]):
        p = f"single_transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            for name, n in (("attn.to_q", h), ("attn.to_k", h), ("attn.to_v", h), ("proj_mlp", mlp)):
                key = f"{p}.{name}.{kind}"
                out[key] = _crop_linear1_rows(out[key], n, key)
    return out


def make_diffusers_model(bfl: dict[str, torch.Tensor], cfg: dict, dtype=F64) -> FluxTransformer2DModel:
    assert cfg["theta"] == 10000, "FluxTransformer2DModel hardcodes theta 10000"
    assert cfg["mlp_ratio"] == 4.0, "FluxTransformer2DModel hardcodes mlp_ratio 4"
    assert cfg["qkv_bias"], "FluxTransformer2DModel always has q/k/v biases"
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg["in_channels"],
        num_layers=cfg["depth"],
        num_single_layers=cfg["depth_single_blocks"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        num_attention_heads=cfg["num_heads"],
        joint_attention_dim=cfg["context_in_dim"],
        pooled_projection_dim=cfg["vec_in_dim"],
        guidance_embeds=cfg["guidance_embed"],
        axes_dims_rope=tuple(cfg["axes_dim"]),
    ).to(dtype)  # before loading: load_state_dict copies into the params' dtype
    sd = bfl_to_diffusers({k: v.to(dtype) for k, v in bfl.items()}, cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# diffusers computes three small pieces in float32 even when the model is float64:
# the sinusoidal timestep/guidance embedding (models/embeddings.py get_timestep_embedding:
# float32 arange and `timesteps.float()`), the RoPE cos/sin tables (get_1d_rotary_pos_embed
# returns `.float()`), and the RoPE rotation itself (apply_rotary_emb: `x.float()`). The
# timestep one matters: arguments reach 1000 * t and 1000 * guidance (e.g. 4000), where a
# float32 ulp is ~2.4e-4, which moves the output by ~2e-5 relative. For the stored reference
# these three are replaced, only while `exact_float64()` is active, by the same formulas
# evaluated in float64. The plain float64 BFL implementation below then agrees with
# diffusers to ~1e-15, and the stock numbers are printed for comparison.
import diffusers.models.embeddings as _emb  # noqa: E402
import diffusers.models.transformers.transformer_flux as _tflux  # noqa: E402

_STOCK = {
    "get_timestep_embedding": _emb.get_timestep_embedding,
    "get_1d_rotary_pos_embed": _tflux.get_1d_rotary_pos_embed,
    "apply_rotary_emb": _tflux.apply_rotary_emb,
}


def _timestep_embedding_f64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                            max_period=10000):
    """diffusers' get_timestep_embedding formula in float64 (used by Timesteps: flip_sin_to_cos=True,
    downscale_freq_shift=0 for Flux, i.e. [cos(t*f), sin(t*f)] with f = max_period^(-i/half))."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=F64) / (half - downscale_freq_shift)
    emb = scale * timesteps.to(F64)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def _rotary_tables_f64(dim, pos, theta=10000.0, use_real=False, linear_factor=1.0, ntk_factor=1.0,
                       repeat_interleave_real=True, freqs_dtype=torch.float32):
    """get_1d_rotary_pos_embed for Flux's case (use_real, repeat_interleave_real) without the
    final float32 cast."""
    assert use_real and repeat_interleave_real and linear_factor == 1.0 and ntk_factor == 1.0
    freqs = 1.0 / ((theta * ntk_factor) ** (torch.arange(0, dim, 2, dtype=F64) / dim))
    freqs = torch.outer(pos.to(F64), freqs)
    return freqs.cos().repeat_interleave(2, dim=1), freqs.sin().repeat_interleave(2, dim=1)


def _apply_rotary_f64(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """apply_rotary_emb for Flux's case (use_real, unbind -1) computed in x's dtype."""
    assert use_real and use_real_unbind_dim == -1
    cos, sin = freqs_cis
    if sequence_dim == 2:
        cos, sin = cos[None, None], sin[None, None]
    else:
        cos, sin = cos[None, :, None], sin[None, :, None]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x * cos.to(x.dtype) + x_rot * sin.to(x.dtype)).to(x.dtype)


class exact_float64:
    """Context manager: lift diffusers' float32 islands to float64 (see above)."""

    def __enter__(self):
        _emb.get_timestep_embedding = _timestep_embedding_f64
        _tflux.get_1d_rotary_pos_embed = _rotary_tables_f64
        _tflux.apply_rotary_emb = _apply_rotary_f64

    def __exit__(self, *exc):
        _emb.get_timestep_embedding = _STOCK["get_timestep_embedding"]
        _tflux.get_1d_rotary_pos_embed = _STOCK["get_1d_rotary_pos_embed"]
        _tflux.apply_rotary_emb = _STOCK["apply_rotary_emb"]
        return False


def run_diffusers(model: FluxTransformer2DModel, inp: dict[str, torch.Tensor], dtype=F64,
                  img=None, timesteps=None, guidance=None, exact: bool = True) -> torch.Tensor:
    """One forward pass. ``inp`` holds the fixture's tensors (ids as [B, N, 3]); diffusers
    wants 2-D ids shared by the batch, so we pass the first element's (all elements are
    identical by construction, which is asserted). ``exact`` (float64 only) lifts diffusers'
    float32 islands; ``exact=False`` runs stock diffusers."""
    img_ids, txt_ids = inp["img_ids"], inp["txt_ids"]
    assert torch.equal(img_ids, img_ids[:1].expand_as(img_ids))
    assert torch.equal(txt_ids, txt_ids[:1].expand_as(txt_ids))
    img = inp["img"] if img is None else img
    timesteps = inp["timesteps"] if timesteps is None else timesteps
    if guidance is None:
        guidance = inp.get("guidance")
    lift = exact and dtype == F64
    with torch.no_grad(), (exact_float64() if lift else contextlib.nullcontext()):
        out = model(
            hidden_states=img.to(dtype),
            encoder_hidden_states=inp["txt"].to(dtype),
            pooled_projections=inp["y"].to(dtype),
            timestep=timesteps.to(dtype),  # in [0, 1]; diffusers multiplies by 1000 itself
            img_ids=img_ids[0].to(dtype),
            txt_ids=txt_ids[0].to(dtype),
            guidance=None if guidance is None else guidance.to(dtype),  # also x1000 inside
            return_dict=False,
        )[0]
    return out


# --------------------------------------------------------------------------------------
# Independent plain-PyTorch float64 BFL forward (sanity check of the diffusers path)
# --------------------------------------------------------------------------------------


def bfl_forward(W: dict[str, torch.Tensor], cfg: dict, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    """The BFL Flux forward pass, everything in float64 (BFL itself computes the timestep
    embedding and RoPE tables in float32; here they are float64 for an exact reference)."""
    W = {k: v.to(F64) for k, v in W.items()}
    h = cfg["hidden_size"]
    nh = cfg["num_heads"]
    hd = h // nh
    mlp_hidden = int(h * cfg["mlp_ratio"])

    def lin(x, name):
        return F.linear(x, W[f"{name}.weight"], W.get(f"{name}.bias"))

    def t_embed(t, dim=256, max_period=10000.0, time_factor=1000.0):
        t = t.to(F64) * time_factor
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=F64) / half)
        args = t[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def mlp_embed(x, name):
        return lin(F.silu(lin(x, f"{name}.in_layer")), f"{name}.out_layer")

    def layer_norm(x):
        return F.layer_norm(x, (h,), eps=1e-6)

    def rms_norm(x, scale):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

    def heads(x):  # [B, L, h] -> [B, H, L, D]
        b, l, _ = x.shape
        return x.view(b, l, nh, hd).transpose(1, 2)

    # RoPE: per axis i, angle pos_i * theta^(-2j/d_i) for j < d_i/2; concatenated over axes.
    ids = torch.cat([inp["txt_ids"], inp["img_ids"]], dim=1).to(F64)  # [B, L, 3]
    angles = []
    for i, d in enumerate(cfg["axes_dim"]):
        omega = 1.0 / (cfg["theta"] ** (torch.arange(0, d, 2, dtype=F64) / d))
        angles.append(ids[..., i : i + 1] * omega)
    ang = torch.cat(angles, dim=-1)[:, None]  # [B, 1, L, D/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # rotate adjacent pairs (x0, x1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)

    def attention(q, k, v):
        q, k = rope(q), rope(k)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = w @ v
        b, _, l, _ = x.shape
        return x.transpose(1, 2).reshape(b, l, h)

    def qkv_split(x, prefix_norm):
        q, k, v = x.chunk(3, dim=-1)
        q = rms_norm(heads(q), W[f"{prefix_norm}.query_norm.scale"])
        k = rms_norm(heads(k), W[f"{prefix_norm}.key_norm.scale"])
        return q, k, heads(v)

    img = lin(inp["img"].to(F64), "img_in")
    vec = mlp_embed(t_embed(inp["timesteps"]), "time_in")
    if cfg["guidance_embed"]:
        vec = vec + mlp_embed(t_embed(inp["guidance"]), "guidance_in")
    vec = vec + mlp_embed(inp["y"].to(F64), "vector_in")
    txt = lin(inp["txt"].to(F64), "txt_in")
    n_txt = txt.shape[1]
    svec = F.silu(vec)

    for i in range(cfg["depth"]):
        p = f"double_blocks.{i}"
        im = lin(svec, f"{p}.img_mod.lin")[:, None].chunk(6, dim=-1)  # shift, scale, gate x2
        tm = lin(svec, f"{p}.txt_mod.lin")[:, None].chunk(6, dim=-1)
        iq, ik, iv = qkv_split(lin((1 + im[1]) * layer_norm(img) + im[0], f"{p}.img_attn.qkv"), f"{p}.img_attn.norm")
        tq, tk, tv = qkv_split(lin((1 + tm[1]) * layer_norm(txt) + tm[0], f"{p}.txt_attn.qkv"), f"{p}.txt_attn.norm")
        a = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2))
        ta, ia = a[:, :n_txt], a[:, n_txt:]
        img = img + im[2] * lin(ia, f"{p}.img_attn.proj")
        x = (1 + im[4]) * layer_norm(img) + im[3]
        img = img + im[5] * lin(F.gelu(lin(x, f"{p}.img_mlp.0"), approximate="tanh"), f"{p}.img_mlp.2")
        txt = txt + tm[2] * lin(ta, f"{p}.txt_attn.proj")
        x = (1 + tm[4]) * layer_norm(txt) + tm[3]
        txt = txt + tm[5] * lin(F.gelu(lin(x, f"{p}.txt_mlp.0"), approximate="tanh"), f"{p}.txt_mlp.2")

    x = torch.cat([txt, img], dim=1)
    for i in range(cfg["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        shift, scale, gate = lin(svec, f"{p}.modulation.lin")[:, None].chunk(3, dim=-1)
        y1 = lin((1 + scale) * layer_norm(x) + shift, f"{p}.linear1")
        qkv, m = torch.split(y1, [3 * h, mlp_hidden], dim=-1)
        q, k, v = qkv_split(qkv, f"{p}.norm")
        a = attention(q, k, v)
        x = x + gate * lin(torch.cat([a, F.gelu(m, approximate="tanh")], dim=-1), f"{p}.linear2")
    x = x[:, n_txt:]
    shift, scale = lin(svec, "final_layer.adaLN_modulation.1").chunk(2, dim=-1)  # BFL order: shift, scale
    x = (1 + scale[:, None]) * layer_norm(x) + shift[:, None]
    return lin(x, "final_layer.linear")


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def make_lora(cfg: dict, lcfg: dict, modules: list[str], gen: torch.Generator,
              final_layer_alpha_equals_rank: bool = True) -> dict[str, torch.Tensor]:
    """Kohya LoRA: down [r, in] and up [out, r] both random and non-zero, alpha a 0-d tensor.

    diffusers' kohya converter ignores ``.alpha`` for the two final_layer modules (it
    assigns their up/down unscaled: "TODO: alphas" in _convert_kohya_flux_lora_to_diffusers),
    i.e. it applies them with scale 1. kohya alpha is per module, so those two modules get
    alpha == rank (scale 1, where both conventions agree); every other module uses
    lcfg["alpha"] != rank so the alpha/rank scale is exercised."""
    shapes = bfl_param_shapes(cfg)
    r = lcfg["rank"]
    sd = {}
    for m in modules:
        fan_out, fan_in = shapes[f"{m}.weight"]
        # scale so that up @ down has entries of the size of W's (~1/sqrt(fan_in))
        down = torch.randn((r, fan_in), generator=gen, dtype=F32) / math.sqrt(fan_in)
        up = torch.randn((fan_out, r), generator=gen, dtype=F32) * 0.5
        alpha = lcfg["alpha"]
        if final_layer_alpha_equals_rank and m.startswith("final_layer."):
            alpha = float(r)
        k = kohya_name(m)
        sd[f"{k}.lora_down.weight"] = down.contiguous()
        sd[f"{k}.lora_up.weight"] = up.contiguous()
        sd[f"{k}.alpha"] = torch.tensor(alpha, dtype=F32)
    return sd


def merge_lora_bfl(bfl: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], modules: list[str],
                   strength: float) -> dict[str, torch.Tensor]:
    """Plain PyTorch merge in BFL space: W' = W + strength * alpha/rank * up @ down (float64)."""
    out = {k: v.to(F64).clone() for k, v in bfl.items()}
    for m in modules:
        k = kohya_name(m)
        down = lora[f"{k}.lora_down.weight"].to(F64)
        up = lora[f"{k}.lora_up.weight"].to(F64)
        alpha = lora[f"{k}.alpha"].to(F64).item()
        out[f"{m}.weight"] += strength * (alpha / down.shape[0]) * (up @ down)
    return out


def diffusers_lora_state_dict(lora: dict[str, torch.Tensor], cfg: dict) -> tuple[dict, list[str]]:
    """kohya -> diffusers/peft through diffusers' own loader, plus the two shape/prefix fixes.

    Returns the state dict for ``transformer.load_lora_adapter(prefix="transformer")`` and
    a list of notes about what had to be adjusted."""
    notes = []
    sd = {k: v.to(F64).clone() for k, v in lora.items()}
    for i in range(cfg["depth_single_blocks"]):
        key = f"lora_unet_single_blocks_{i}_linear1.lora_up.weight"
        if key in sd:
            sd[key] = _pad_linear1_rows(sd[key], cfg)
    conv = FluxPipeline.lora_state_dict(sd)
    if isinstance(conv, tuple):
        conv = conv[0]
    conv = dict(conv)
    h = cfg["hidden_size"]
    mlp = int(h * cfg["mlp_ratio"])
    for i in range(cfg["depth_single_blocks"]):
        for name, n in (("attn.to_q", h), ("attn.to_k", h), ("attn.to_v", h), ("proj_mlp", mlp)):
            key = f"transformer.single_transformer_blocks.{i}.{name}.lora_B.weight"
            if key in conv:
                conv[key] = _crop_linear1_rows(conv[key], n, key)
    unprefixed = sorted({k.rsplit(".lora_", 1)[0] for k in conv if not k.startswith("transformer.")})
    if unprefixed:
        notes.append(
            "diffusers' kohya converter emits these modules without the 'transformer.' prefix, so "
            "FluxPipeline.load_lora_weights / load_lora_adapter(prefix='transformer') would silently "
            "drop them; the generator adds the prefix: " + ", ".join(unprefixed)
        )
        conv = {(k if k.startswith("transformer.") else f"transformer.{k}"): v for k, v in conv.items()}
    return conv, notes


def lora_targets_loaded(model: FluxTransformer2DModel) -> set[str]:
    return {n for n, mod in model.named_modules() if hasattr(mod, "lora_A") and len(mod.lora_A) > 0}


def diffusers_with_lora(bfl, cfg, conv_sd) -> FluxTransformer2DModel:
    model = make_diffusers_model(bfl, cfg, F64)
    model.load_lora_adapter(copy.deepcopy(conv_sd), prefix="transformer", adapter_name="fixture")
    model = model.to(F64).eval()
    expected = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in conv_sd}
    loaded = lora_targets_loaded(model)
    assert loaded == expected, f"peft did not attach exactly the converted modules: " \
                               f"missing {sorted(expected - loaded)}, extra {sorted(loaded - expected)}"
    return model


# --------------------------------------------------------------------------------------
# Sampling (BFL sampling.py: get_schedule / denoise)
# --------------------------------------------------------------------------------------


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float, max_shift: float,
                 shift: bool) -> list[float]:
    t = torch.linspace(1, 0, num_steps + 1, dtype=F64)
    if shift:
        m = (max_shift - base_shift) / (4096 - 256)
        mu = m * image_seq_len + (base_shift - m * 256)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)  # 1/0 = inf -> t stays 0 at the end
    return t.tolist()


def euler_sample(model, inp, noise, sched, guidance: float | None, dtype=F64) -> torch.Tensor:
    """BFL denoise(): x <- x + (t_next - t_curr) * v(x, t_curr), guidance G for every element."""
    x = noise.to(dtype)
    b = x.shape[0]
    g = None if guidance is None else torch.full((b,), guidance, dtype=dtype)
    for t_curr, t_next in zip(sched[:-1], sched[1:]):
        v = run_diffusers(model, inp, dtype, img=x, timesteps=torch.full((b,), t_curr, dtype=dtype), guidance=g)
        x = x + (t_next - t_curr) * v
    return x


# --------------------------------------------------------------------------------------
# Samplers and schedules (rectified flow: x_t = (1 - t) x0 + t noise, v = d x_t / d t,
# denoised D = x - t v), each from its published update rule
# --------------------------------------------------------------------------------------

SAMPLER_FIXTURE = {
    "name": "samplers",
    "seed": 4242,
    "batch": 2,
    "tokens": 6,
    "channels": 4,
    "beta": {"alpha": 0.6, "beta": 0.6},
    # (case name, sampler, scheduler, steps, shifted, image_seq_len)
    "cases": [
        (f"{sampler}_{scheduler}", sampler, scheduler, 8, True, 1024)
        for sampler in ("euler", "euler_ancestral", "heun", "dpmpp_2m")
        for scheduler in ("simple", "beta")
    ] + [
        ("euler_ancestral_simple_unshifted_5", "euler_ancestral", "simple", 5, False, 1024),
        ("dpmpp_2m_beta_unshifted_5", "dpmpp_2m", "beta", 5, False, 1024),
        ("heun_beta_1", "heun", "beta", 1, True, 4096),
        ("dpmpp_2m_simple_2", "dpmpp_2m", "simple", 2, True, 256),
    ],
}
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def beta_ppf(p: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile: bisection on mpmath's regularized incomplete beta."""
    import mpmath
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    with mpmath.workdps(40):
        lo, hi = mpmath.mpf(0), mpmath.mpf(1)
        for _ in range(140):
            mid = (lo + hi) / 2
            if mpmath.betainc(a, b, 0, mid, regularized=True) < p:
                lo = mid
            else:
                hi = mid
        return float((lo + hi) / 2)


def flux_shift(t: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    m = (MAX_SHIFT - BASE_SHIFT) / (4096 - 256)
    mu = m * image_seq_len + (BASE_SHIFT - m * 256)
    out = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return torch.where(t <= 0, torch.zeros_like(t), torch.where(t >= 1, torch.ones_like(t), out))


def schedule_times(scheduler: str, steps: int, shifted: bool, image_seq_len: int) -> torch.Tensor:
    """simple: 1 - i/steps; beta: ppf(1 - i/steps; 0.6, 0.6) (ComfyUI's beta_scheduler
    on a continuous sigma curve), i = 0..steps-1, then 0; both shifted alike."""
    q = [1 - i / steps for i in range(steps)]
    if scheduler == "simple":
        t = q + [0.0]
    elif scheduler == "beta":
        ab = SAMPLER_FIXTURE["beta"]
        t = [beta_ppf(p, ab["alpha"], ab["beta"]) for p in q] + [0.0]
    else:
        raise ValueError(scheduler)
    t = torch.tensor(t, dtype=F64)
    return flux_shift(t, image_seq_len) if shifted else t


def rf_sample(sampler: str, velocity, x: torch.Tensor, times: torch.Tensor, draw) -> torch.Tensor:
    """Integrates from times[0] down to times[-1]; `draw()` gives the ancestral noise."""
    ts = [float(t) for t in times]
    denoised_prev, t_prev = None, None
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t)
        denoised = x - t * v
        if sampler == "euler":
            x = x + (t_next - t) * v
        elif sampler == "euler_ancestral":
            # Euler a for rectified flow, eta = 1: step the ODE down to
            # sigma_down = t_next * (t_next / t), rescale the signal part from
            # (1 - sigma_down) to (1 - t_next), and add fresh noise so the noise part
            # is t_next again: renoise^2 = t_next^2 - (sigma_down (1 - t_next) / (1 - sigma_down))^2.
            if t_next == 0:
                x = denoised
            else:
                sigma_down = t_next * t_next / t
                x = (sigma_down / t) * x + (1 - sigma_down / t) * denoised
                keep = (1 - t_next) / (1 - sigma_down)
                renoise = math.sqrt(max(t_next ** 2 - (sigma_down * keep) ** 2, 0.0))
                x = keep * x + renoise * draw()
        elif sampler == "heun":
            # Karras et al. 2022, Algorithm 1 (no churn): Euler predictor, trapezoid
            # corrector; the step to t = 0 is Euler only.
            x_pred = x + (t_next - t) * v
            if t_next == 0:
                x = x_pred
            else:
                x = x + (t_next - t) * (v + velocity(x_pred, t_next)) / 2
        elif sampler == "dpmpp_2m":
            # DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with lambda = -log(sigma),
            # sigma = t: x <- (t_next/t) x - expm1(-h) D', h = lambda_next - lambda.
            if t_next == 0:
                x = denoised  # lambda_next = inf: the data prediction itself
            else:
                lam, lam_next = -math.log(t), -math.log(t_next)
                h = lam_next - lam
                if denoised_prev is None:
                    d = denoised
                else:
                    r = (lam - (-math.log(t_prev))) / h
                    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
                x = (t_next / t) * x - math.expm1(-h) * d
            denoised_prev, t_prev = denoised, t
        else:
            raise ValueError(sampler)
    return x


def make_sampler_fixture(root: Path) -> dict:
    fx = SAMPLER_FIXTURE
    gen = torch.Generator().manual_seed(fx["seed"])
    b, n, c = fx["batch"], fx["tokens"], fx["channels"]
    W = torch.randn((c, c), generator=gen, dtype=F64) * (1.5 / math.sqrt(c))
    bias = torch.randn((c,), generator=gen, dtype=F64)
    x1 = torch.randn((b, n, c), generator=gen, dtype=F64)

    def velocity(x, t):
        return torch.tanh(x @ W.T + t * bias)

    tensors = {"W": W, "b": bias, "x1": x1}
    cases, checks = [], {}
    finals = {}
    for name, sampler, scheduler, steps, shifted, seq_len in fx["cases"]:
        times = schedule_times(scheduler, steps, shifted, seq_len)
        draws = []

        def draw():
            e = torch.randn((b, n, c), generator=gen, dtype=F64)
            draws.append(e)
            return e

        final = rf_sample(sampler, velocity, x1.clone(), times, draw)
        assert torch.isfinite(final).all(), name
        # The replayed draws give the same result; deterministic samplers draw none.
        replay = iter(draws)
        again = rf_sample(sampler, velocity, x1.clone(), times, lambda: next(replay))
        assert torch.equal(again, final), name
        assert (len(draws) > 0) == (sampler == "euler_ancestral"), name
        tensors[f"{name}.times"] = times
        tensors[f"{name}.final"] = final
        if draws:
            tensors[f"{name}.noise"] = torch.stack(draws)
        cases.append({
            "name": name, "sampler": sampler, "scheduler": scheduler, "steps": steps,
            "shift": {"base_shift": BASE_SHIFT, "max_shift": MAX_SHIFT} if shifted else None,
            "image_seq_len": seq_len,
        })
        finals[name] = final
        checks[f"{name}_final_vs_x1"] = rel(final, x1)
    # Different samplers and schedules really differ on this field.
    checks["euler_vs_heun_simple"] = rel(finals["euler_simple"], finals["heun_simple"])
    checks["euler_vs_dpmpp_2m_simple"] = rel(finals["euler_simple"], finals["dpmpp_2m_simple"])
    checks["simple_vs_beta_euler"] = rel(finals["euler_simple"], finals["euler_beta"])
    checks["euler_vs_euler_ancestral_simple"] = rel(finals["euler_simple"], finals["euler_ancestral_simple"])
    for k in ("euler_vs_heun_simple", "euler_vs_dpmpp_2m_simple", "simple_vs_beta_euler"):
        assert checks[k] > 1e-3, (k, checks[k])
    # A straight flow (v = x1 - x0 for x0 = 0 everywhere) is integrated exactly by
    # every deterministic sampler, whatever the schedule.
    for sampler in ("euler", "heun", "dpmpp_2m"):
        for scheduler in ("simple", "beta"):
            out = rf_sample(sampler, lambda x, t: x1, x1.clone(), schedule_times(scheduler, 5, True, 1024),
                            lambda: None)
            assert out.abs().max() < 1e-12, (sampler, scheduler)

    out_dir = root / fx["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    cases_json = {"field": "v(x, t) = tanh(x @ W^T + t * b), x [B, N, C]", "cases": cases}
    (out_dir / "cases.json").write_text(json.dumps(cases_json, indent=2) + "\n")
    st = {k: v.contiguous() for k, v in tensors.items()}
    save_file(st, str(out_dir / "samplers.safetensors"))
    back = load_file(str(out_dir / "samplers.safetensors"))
    assert all(back[k].dtype == F64 and torch.equal(back[k], v) for k, v in st.items())
    write_sampler_readme(out_dir, checks, tensors)
    return {"name": fx["name"], "checks": checks}


def write_sampler_readme(out_dir: Path, checks: dict, tensors: dict) -> None:
    fx = SAMPLER_FIXTURE
    lines = [
        "# Sampler parity fixture `samplers`",
        "",
        "References for fluxlora's samplers and schedules, generated by "
        "`scripts/parity/make_fixtures.py --only-samplers` (seed "
        f"{fx['seed']}). Not a model fixture (no `config.json`): the velocity is the cheap "
        "deterministic field v(x, t) = tanh(x W^T + t b), x [B, N, C] = "
        f"[{fx['batch']}, {fx['tokens']}, {fx['channels']}], so the numbers test the update rules "
        "alone. Everything is float64.",
        "",
        "## Contents",
        "",
        "- `cases.json`: per case its `name`, `sampler` (euler, euler_ancestral, heun, dpmpp_2m), "
        "`scheduler` (simple, beta), `steps`, `shift` ({base_shift, max_shift} for Flux's "
        "time shift with mu from `image_seq_len`, or null) and `image_seq_len`.",
        "- `samplers.safetensors`: `W` [C, C], `b` [C], `x1` [B, N, C] (the initial x at t = 1); "
        "per case `<name>.times` [steps + 1] (the schedule), `<name>.final` [B, N, C] (x at the "
        "last time) and, for euler_ancestral, `<name>.noise` [steps - 1, B, N, C]: the standard "
        "normal draws, in order, one per step that adds noise (every step but the last).",
        "",
        "## Rules (sigma = t; denoised D = x - t v)",
        "",
        "- euler: x <- x + (t_next - t) v.",
        "- euler_ancestral (rectified-flow Euler a, eta = 1, s_noise = 1): sigma_down = "
        "t_next^2 / t; x <- (sigma_down/t) x + (1 - sigma_down/t) D; then x <- k x + "
        "sqrt(t_next^2 - (k sigma_down)^2) eps with k = (1 - t_next)/(1 - sigma_down); "
        "the last step is x <- D.",
        "- heun: x' = x + (t_next - t) v; x <- x + (t_next - t)(v + v(x', t_next))/2; the "
        "last step is Euler.",
        "- dpmpp_2m: lambda = -ln t, h = lambda_next - lambda; x <- (t_next/t) x - expm1(-h) D', "
        "D' = D on the first step, else (1 + 1/2r) D - (1/2r) D_prev with r = h_prev/h; "
        "the last step (lambda_next = inf) is x <- D.",
        "- simple: t_i = 1 - i/steps; beta: t_i = ppf(1 - i/steps) of Beta(0.6, 0.6) for i < "
        "steps (mpmath, 40 digits), t_steps = 0; both then shifted with "
        "exp(mu)/(exp(mu) + 1/t - 1) when `shift` is set.",
        "",
        "## Sanity numbers at generation time (relative L2)",
        "",
    ]
    lines += [f"- {k}: {fmt(v)}" for k, v in checks.items()]
    lines += ["", "Tensors: " + ", ".join(f"`{k}` {list(v.shape)}" for k, v in tensors.items()), ""]
    (out_dir / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------------------
# Fixture generation
# --------------------------------------------------------------------------------------


def make_inputs(fx: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = fx["config"]
    b, (gh, gw), n_txt = fx["batch"], fx["grid"], fx["n_txt"]
    n_img = gh * gw
    ids = torch.zeros(gh, gw, 3, dtype=F32)
    ids[..., 1] = torch.arange(gh, dtype=F32)[:, None]  # row
    ids[..., 2] = torch.arange(gw, dtype=F32)[None, :]  # col
    inp = {
        "img": torch.randn((b, n_img, cfg["in_channels"]), generator=gen, dtype=F32),
        "img_ids": ids.reshape(1, n_img, 3).repeat(b, 1, 1).contiguous(),
        "txt": torch.randn((b, n_txt, cfg["context_in_dim"]), generator=gen, dtype=F32),
        "txt_ids": torch.zeros((b, n_txt, 3), dtype=F32),
        "y": torch.randn((b, cfg["vec_in_dim"]), generator=gen, dtype=F32),
        "timesteps": torch.tensor(fx["timesteps"], dtype=F32),
    }
    assert inp["timesteps"].shape == (b,)
    if cfg["guidance_embed"]:
        inp["guidance"] = torch.tensor(fx["guidance"], dtype=F32)
        assert inp["guidance"].shape == (b,)
    return inp


def save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().to(F32).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path))
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == F32 and torch.equal(back[k], v), k


def versions() -> dict[str, str]:
    import numpy
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }


def fmt(x: float) -> str:
    return f"{x:.3e}"


def make_fixture(name: str, fx: dict, root: Path) -> dict:
    cfg = fx["config"]
    out_dir = root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(fx["seed"])
    checks: dict[str, float] = {}
    notes: list[str] = []

    # --- weights and inputs (float32; every reference upcasts these exact values) ---
    bfl = make_weights(cfg, gen)
    inp = make_inputs(fx, gen)

    # --- reference forward: diffusers in float64 (float32 islands lifted) ---
    model64 = make_diffusers_model(bfl, cfg, F64)
    out64 = run_diffusers(model64, inp, F64)
    checks["out_std"] = out64.std().item()

    # sanity 1: stock diffusers, float32 vs float64 (self-consistency)
    model32 = make_diffusers_model(bfl, cfg, F32)
    out32 = run_diffusers(model32, inp, F32)
    out64_stock = run_diffusers(model64, inp, F64, exact=False)
    checks["diffusers_stock_f32_vs_stock_f64"] = rel(out32, out64_stock)
    # how far stock diffusers (float32 timestep embedding) is from the stored reference
    checks["diffusers_stock_f64_vs_ref"] = rel(out64_stock, out64)
    checks["diffusers_stock_f32_vs_ref"] = rel(out32, out64)
    # sanity 2: independent float64 BFL implementation vs the reference
    checks["bfl_plain_f64_vs_ref"] = rel(bfl_forward(bfl, cfg, inp), out64)
    # sanity 3: batch elements really differ
    if fx["batch"] > 1:
        checks["batch_elements_rel_diff"] = rel(out64[0], out64[1])
        assert checks["batch_elements_rel_diff"] > 1e-2

    # --- LoRA ---
    lcfg = fx["lora"]
    modules = bfl_linear_modules(cfg)
    lora = make_lora(cfg, lcfg, modules, gen)
    conv, lnotes = diffusers_lora_state_dict(lora, cfg)
    notes += lnotes
    peft_model = diffusers_with_lora(bfl, cfg, conv)
    lora_out = {}
    for s in (1.0, 0.5):
        peft_model.set_adapters(["fixture"], weights=[s])
        o_peft = run_diffusers(peft_model, inp, F64)
        merged = make_diffusers_model(merge_lora_bfl(bfl, lora, modules, s), cfg, F64)
        o_merge = run_diffusers(merged, inp, F64)
        checks[f"lora_{s}_peft_vs_merge"] = rel(o_peft, o_merge)
        checks[f"lora_{s}_vs_out"] = rel(o_peft, out64)
        lora_out[f"out_{s}"] = o_peft
    # sanity 4: the merge reference without diffusers (plain BFL forward on merged weights)
    checks["lora_1.0_bfl_plain_merge_vs_peft"] = rel(
        bfl_forward(merge_lora_bfl(bfl, lora, modules, 1.0), cfg, inp), lora_out["out_1.0"])

    # diagnostic: what diffusers does with alpha != rank on the final_layer modules
    fl_mods = [m for m in modules if m.startswith("final_layer.")]
    diag_lora = make_lora(cfg, lcfg, fl_mods, torch.Generator().manual_seed(fx["seed"] + 1),
                          final_layer_alpha_equals_rank=False)
    diag_conv, _ = diffusers_lora_state_dict(diag_lora, cfg)
    diag_model = diffusers_with_lora(bfl, cfg, diag_conv)
    o_diag = run_diffusers(diag_model, inp, F64)
    o_diag_merge = run_diffusers(make_diffusers_model(merge_lora_bfl(bfl, diag_lora, fl_mods, 1.0), cfg), inp)
    o_diag_merge_noalpha = run_diffusers(make_diffusers_model(merge_lora_bfl(
        bfl, {**diag_lora, **{f"{kohya_name(m)}.alpha": torch.tensor(float(lcfg["rank"])) for m in fl_mods}},
        fl_mods, 1.0), cfg), inp)
    checks["diag_final_layer_alpha!=rank_peft_vs_merge"] = rel(o_diag, o_diag_merge)
    checks["diag_final_layer_alpha!=rank_peft_vs_merge_ignoring_alpha"] = rel(o_diag, o_diag_merge_noalpha)

    # --- sampling ---
    scfg = fx["sampling"]
    n_img = fx["grid"][0] * fx["grid"][1]
    sched = get_schedule(scfg["steps"], n_img, 0.5, 1.15, scfg["shift"])
    noise = torch.randn(inp["img"].shape, generator=gen, dtype=F32)
    g = scfg["guidance"] if cfg["guidance_embed"] else None
    final = euler_sample(model64, inp, noise, sched, g)
    final32 = euler_sample(model32, inp, noise, sched, g, F32).to(F64)
    checks["sampling_stock_f32_vs_ref"] = rel(final32, final)
    checks["sampling_final_vs_noise"] = rel(final, noise)

    # --- assertions on the reference itself ---
    assert checks["diffusers_stock_f32_vs_stock_f64"] < 1e-5, checks
    assert checks["diffusers_stock_f64_vs_ref"] < 0.5 * SPEC_TOL_OUT, checks
    assert checks["diffusers_stock_f32_vs_ref"] < 0.5 * SPEC_TOL_OUT, checks
    assert checks["bfl_plain_f64_vs_ref"] < 1e-12, checks
    for s in (1.0, 0.5):
        assert checks[f"lora_{s}_peft_vs_merge"] < 1e-12, checks
        assert checks[f"lora_{s}_vs_out"] > 1e-2, checks
    assert checks["lora_1.0_bfl_plain_merge_vs_peft"] < 1e-12, checks
    assert checks["sampling_stock_f32_vs_ref"] < 0.5 * SPEC_TOL_FINAL, checks

    # --- write ---
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save(out_dir / "model.safetensors", bfl)
    save(out_dir / "inputs.safetensors", inp)
    save(out_dir / "output.safetensors", {"out": out64})
    save(out_dir / "lora.safetensors", lora)
    save(out_dir / "output_lora.safetensors", lora_out)
    sampling_json = {
        "steps": scfg["steps"],
        "guidance": scfg["guidance"],
        "shift": scfg["shift"],
        "base_shift": 0.5,
        "max_shift": 1.15,
        "grid": list(fx["grid"]),
    }
    (out_dir / "sampling.json").write_text(json.dumps(sampling_json, indent=2) + "\n")
    save(out_dir / "sampling.safetensors", {"noise": noise, "final": final})
    write_fixture_readme(out_dir, name, fx, modules, lora, sched, checks, notes)
    return {"name": name, "checks": checks, "notes": notes, "schedule": sched}


def write_fixture_readme(out_dir: Path, name: str, fx: dict, modules: list[str], lora: dict,
                         sched: list[float], checks: dict, notes: list[str]) -> None:
    cfg = fx["config"]
    b, (gh, gw) = fx["batch"], fx["grid"]
    lcfg = fx["lora"]
    lines = [
        f"# Parity fixture `{name}`",
        "",
        f"{fx['description']}. Generated by `scripts/parity/make_fixtures.py --only {name}` "
        f"(seed {fx['seed']}); random tiny weights, no real checkpoint. Format: "
        "`shared/spec/parity-fixtures.md`.",
        "",
        "## Contents",
        "",
        f"- config: hidden {cfg['hidden_size']}, heads {cfg['num_heads']} (head dim "
        f"{cfg['hidden_size'] // cfg['num_heads']}, axes_dim {cfg['axes_dim']}), depth {cfg['depth']}, "
        f"single blocks {cfg['depth_single_blocks']}, in_channels {cfg['in_channels']}, vec_in_dim "
        f"{cfg['vec_in_dim']}, context_in_dim {cfg['context_in_dim']}, guidance_embed {str(cfg['guidance_embed']).lower()}",
        f"- inputs: batch {b}, image token grid {gh}x{gw} ({gh * gw} tokens, img_ids = (0, row, col), "
        f"identical for every batch element), {fx['n_txt']} text tokens (txt_ids all zero), "
        f"timesteps {fx['timesteps']}" + (f", guidance {fx['guidance']}" if cfg["guidance_embed"] else "")
        + "; img/txt/y are different random values for every batch element",
        "- `out`: diffusers FluxTransformer2DModel (weights converted from `model.safetensors` by "
        "diffusers' BFL converter, strict load), run in float64 with diffusers' float32 helpers "
        "(timestep sinusoid, RoPE) lifted to float64 (see ../README.md), stored as float32; an "
        "independent plain float64 BFL forward agrees to ~1e-15",
        f"- LoRA: kohya format, rank {lcfg['rank']}, alpha {lcfg['alpha']} (scale {lcfg['alpha'] / lcfg['rank']}) "
        f"on every module except the two `final_layer` ones, which have alpha {float(lcfg['rank'])} "
        f"(scale 1, see below). Down and up are both random and non-zero. It covers every nn.Linear "
        f"of the model ({len(modules)} modules):",
        "",
    ]
    lines += [f"  - `{m}` -> `{kohya_name(m)}`" for m in modules]
    lines += [
        "",
        "- `out_1.0` / `out_0.5`: diffusers + peft with the kohya file loaded through diffusers' kohya "
        "converter (`FluxPipeline.lora_state_dict`) and `load_lora_adapter`, adapter weight 1.0 / 0.5; "
        "cross-checked against a plain merge W' = W + s * alpha/rank * up @ down in BFL space.",
        f"- sampling: {fx['sampling']['steps']} Euler steps, shift {str(fx['sampling']['shift']).lower()}, "
        f"guidance {fx['sampling']['guidance']}"
        + ("" if cfg["guidance_embed"] else " (ignored: this model has no guidance_in, as with schnell in BFL)")
        + f"; schedule (float64) = [{', '.join(f'{t:.9f}' for t in sched)}]; the velocity is the float64 "
        "diffusers model, `noise` is the initial x at t = 1.",
        "",
        "## Sanity numbers at generation time (relative L2)",
        "",
    ]
    lines += [f"- {k}: {fmt(v)}" for k, v in checks.items()]
    lines += [
        "",
        "`diag_*` are diagnostics on a separate LoRA that is not stored: with alpha != rank on the "
        "final_layer modules diffusers' kohya converter disagrees with the merge (it ignores alpha "
        "there) and agrees with a merge that ignores alpha. That is why the stored LoRA uses "
        "alpha == rank on those two modules.",
    ]
    if notes:
        lines += ["", "## Adjustments to the diffusers path", ""] + [f"- {n}" for n in notes]
    lines += [
        "- diffusers' converters split `single_blocks.N.linear1` with FLUX.1 sizes (3072 x 3 + 12288); "
        "the generator places the tiny q/k/v/mlp row blocks at those offsets before converting and cuts "
        "them out afterwards (checking the cut-off rows are the zero padding).",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def write_root_readme(root: Path, results: list[dict], argv: list[str]) -> None:
    v = versions()
    lines = [
        "# Flux parity fixtures",
        "",
        "Numerical reference outputs for the fluxlora Flux transformer, produced from independent "
        "reference code: Hugging Face diffusers' `FluxTransformer2DModel` (with diffusers' own "
        "BFL->diffusers weight converter), peft via diffusers' kohya LoRA loader, and a plain PyTorch "
        "Euler loop following Black Forest Labs' `sampling.py`. Weights are random and tiny; no model "
        "was downloaded. Format: `shared/spec/parity-fixtures.md`.",
        "",
        "## How they were made",
        "",
        "```",
        "bash scripts/parity/setup.sh",
        ".venv-parity/bin/python scripts/parity/make_fixtures.py" + ("" if not argv else " " + " ".join(argv)),
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + " (CPU).",
        "",
        "The references are computed in float64 and stored as float32. Every folder's README.md lists its "
        "contents and the sanity numbers printed at generation time.",
        "",
        "## Fixtures",
        "",
    ]
    for r in results:
        fx = FIXTURES[r["name"]]
        c = r["checks"]
        lines.append(
            f"- `{r['name']}`: {fx['description']}. Stock diffusers f32 vs f64 "
            f"{fmt(c['diffusers_stock_f32_vs_stock_f64'])}; stock diffusers f32 vs stored `out` "
            f"{fmt(c['diffusers_stock_f32_vs_ref'])}; plain BFL f64 vs `out` {fmt(c['bfl_plain_f64_vs_ref'])}; "
            f"LoRA peft vs merge {fmt(c['lora_1.0_peft_vs_merge'])}; `out` vs `out_1.0` {fmt(c['lora_1.0_vs_out'])}; "
            f"stock f32 sampling vs `final` {fmt(c['sampling_stock_f32_vs_ref'])}."
        )
    lines.append(
        "- `samplers`: not a model fixture (no `config.json`, so the model parity check skips it): "
        "the samplers euler, euler_ancestral, heun, dpmpp_2m and the schedules simple, beta, written "
        "in plain PyTorch float64 from their published update rules and run on a cheap tanh velocity "
        "field, the ancestral noise stored with them; see its README.md."
    )
    lines += [
        "",
        "## Conventions worth knowing (BFL vs diffusers)",
        "",
        "- diffusers takes `timestep` and `guidance` in [0, 1]-scale units and multiplies both by 1000 "
        "itself; BFL's `timestep_embedding` does the same with `time_factor=1000`. The fixtures store the "
        "unscaled values (timesteps in [0, 1], guidance like 3.5).",
        "- diffusers takes 2-D `img_ids`/`txt_ids` ([N, 3], shared by the batch; 3-D is deprecated and "
        "only element 0 is used). The fixtures store [B, N, 3] with identical rows for every element.",
        "- `final_layer.adaLN_modulation.1` is (shift, scale) in BFL and (scale, shift) in diffusers' "
        "`norm_out.linear`; the converters swap the halves (also for the LoRA up matrix).",
        "- diffusers computes the timestep/guidance sinusoid and RoPE in float32 even in a float64 "
        "model (so does BFL for the sinusoid: `timestep_embedding` is float32). With arguments up to "
        "1000 * guidance = 4000 that moves the output by ~2e-5 relative. The stored references are exact "
        "float64: the generator swaps those three helpers for float64 versions of the same formulas while "
        "computing them (`exact_float64`), and an independent plain float64 BFL forward then agrees to "
        "~1e-15 (`bfl_plain_f64_vs_ref`). An implementation that computes the sinusoid in float32, as "
        "BFL does, should expect ~2e-5 (`diffusers_stock_f32_vs_ref`), well inside the 1e-4 tolerance.",
        "- diffusers' kohya converter: covers img_in, txt_in, time_in, vector_in, guidance_in, "
        "double/single blocks and final_layer, but (a) emits the non-block modules without the "
        "`transformer.` prefix, so the stock loader drops them (the generator adds the prefix), and "
        "(b) ignores `.alpha` for `final_layer.linear` and `final_layer.adaLN_modulation.1` (scale 1), so "
        "the stored LoRAs use alpha == rank on those two modules only.",
        "",
    ]
    (root / "README.md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/parity",
                    help="output root (default: tests/fixtures/parity, relative to the cwd)")
    ap.add_argument("--only", nargs="*", choices=sorted(FIXTURES), help="fixtures to make (default: all)")
    ap.add_argument("--list", action="store_true", help="list the produced files and sizes afterwards")
    ap.add_argument("--only-samplers", action="store_true",
                    help="make only the sampler fixture (samplers/), no model fixture")
    ap.add_argument("--no-root-readme", action="store_true",
                    help="do not (re)write <out>/README.md (never written with --only)")
    args = ap.parse_args()

    torch.set_num_threads(1)  # tiny models; one thread keeps reductions in a fixed order
    diffusers.utils.logging.set_verbosity_warning()
    # peft warns that target "proj_out" also names single_transformer_blocks.N.proj_out when a LoRA
    # covers only the final proj_out; diffusers_with_lora asserts the exact set of adapted modules.
    warnings.filterwarnings("ignore", message="While injecting the PEFT adapters")
    # `model.to(float64)` logs this harmless notice every time; hide just that one
    for handler in logging.getLogger("diffusers").handlers:
        handler.addFilter(lambda rec: "should be kept in float32" not in rec.getMessage())
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    print("versions:", versions())
    if args.only_samplers or not args.only:
        print(f"== {SAMPLER_FIXTURE['name']}")
        r = make_sampler_fixture(root)
        for k, v in r["checks"].items():
            print(f"   {k:55s} {fmt(v)}")
    if args.only_samplers:
        print("all reference checks passed")
        return 0
    names = args.only or list(FIXTURES)
    results = []
    for name in names:
        print(f"== {name}")
        r = make_fixture(name, FIXTURES[name], root)
        for k, v in r["checks"].items():
            print(f"   {k:55s} {fmt(v)}")
        for n in r["notes"]:
            print("   note:", n)
        results.append(r)
    if args.only:
        print(f"(--only: {root / 'README.md'} left as it is; it describes a full run)")
    elif not args.no_root_readme:
        argv = [a for a in sys.argv[1:] if a not in ("--list",)]
        write_root_readme(root, results, argv)
    if args.list:
        for name in names:
            total = 0
            for f in sorted((root / name).iterdir()):
                total += f.stat().st_size
                print(f"   {f}  {f.stat().st_size} B")
            print(f"   {root / name}: {total} B total")
    print("all reference checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
