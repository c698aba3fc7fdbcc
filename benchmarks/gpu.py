"""LoRA training step time, peak GPU memory and MFU for FLUX.1-dev-sized (12B) and Qwen-Image-sized (20B)
transformers, built from their real configs with random bfloat16 weights.

    python benchmarks/gpu.py [--models flux qwen_image] [--steps 5] [--warmup 2] [--compile flux] [--fsdp]

Per model: build the transformer on the `meta` device, cast to bfloat16 there, `to_empty` on the GPU and
initialise it (no checkpoint download, no host-memory copy of 24-40 GB); freeze it, inject raydiff's
LoRA (rank 16 on the family's default attention projections, fp32 adapters), enable gradient
checkpointing, and time raydiff's own step (`Stepper`): `model_fn` (packing, position ids, timestep
scaling) inside `FlowMatchSFTLoss`, backward, clipping, AdamW. One 1024 x 1024 image (128 x 128 x 16 latents ->
4096 tokens), batch 1, prompt embeddings of `--text-tokens` (512 for FLUX, which always pads T5 to
512; 128 for Qwen-Image, whose prompts are not padded).

MFU: model FLOPs of a step (forward + backward, without the checkpointing recompute; counted with
torch.utils.flop_counter on one step) / step time / the GPU's dense bf16 peak. HFU adds the recompute.
Anchor: SimpleTuner, Qwen-Image LoRA on one H100, 1.202 s/step and 41.0 GiB.

Where no CUDA device is present it prints {"skipped": "no CUDA device"} and exits 0. `--smoke` runs the
same code on the CPU with toy-sized configs (float32), to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from types import SimpleNamespace

MODELS = {
    # diffusers' defaults for these classes are the released configs; spelled out so they are visible.
    "flux": dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                 pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "qwen_image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                       axes_dims_rope=(16, 56, 56)),
}
SMOKE_MODELS = {
    "flux": dict(MODELS["flux"], num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
    "qwen_image": dict(MODELS["qwen_image"], num_layers=2, attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
}
TEXT_TOKENS = {"flux": 512, "qwen_image": 128}
LATENT_CHANNELS = 16  # both families' VAEs; 2x2 packing gives in_channels 64
ANCHOR = {"source": "SimpleTuner, Qwen-Image LoRA, 1x H100", "step_s": 1.202, "peak_gib": 41.0}

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12)]


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def build_transformer(family: str, config: dict, device, dtype):
    """The family's transformer with random weights, allocated once, directly on `device` in `dtype`."""
    import torch
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    cls = {"flux": FluxTransformer2DModel, "qwen_image": QwenImageTransformer2DModel}[family]
    with torch.device("meta"):
        dit = cls(**config)
    dit = dit.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    if family == "qwen_image":
        # QwenEmbedRope keeps its RoPE tables as plain tensors (not buffers): rebuild them off `meta`.
        dit.pos_embed = type(dit.pos_embed)(theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True)
    leftovers = [f"{n}.{k}" for n, m in dit.named_modules() for k, v in vars(m).items()
                 if isinstance(v, torch.Tensor) and v.is_meta]
    leftovers += [n for n, t in [*dit.named_parameters(), *dit.named_buffers()] if t.is_meta]
    assert not leftovers, f"tensors left on meta: {leftovers[:5]}"
    return dit


def training_module(family: str, dit, device):
    """raydiff's training module around a bare transformer. The inputs of `make_inputs` carry every unit's
    outputs, so its forward is the family's `model_fn` inside `FlowMatchSFTLoss`, as a worker's in
    stream or cache mode."""
    from raydiff.registry import get_pipeline_class
    from raydiff.training.module import DiffusionTrainingModule

    pipe = get_pipeline_class(family)(SimpleNamespace(transformer=dit, components={"transformer": dit}), device)
    module = DiffusionTrainingModule()
    module.register_pipe(pipe)
    return module


def stepper_for(module, lr: float, device, sharded=()):
    """raydiff's `Stepper` (clipping at 1.0, AdamW, no LR schedule change) for `module`."""

    from raydiff.config import parse_config
    from raydiff.training.step import Stepper, build_optimizer

    cfg = parse_config({"model": {"path": "unused"}, "data": {"metadata_path": "unused.csv"},
                        "train": {"learning_rate": lr, "max_grad_norm": 1.0}})
    optimizer, scheduler = build_optimizer(cfg, [p for p in module.parameters() if p.requires_grad], 10**9)
    return Stepper(cfg, module, optimizer, scheduler, device, sharded=sharded)


def make_inputs(family: str, config: dict, text_tokens: int, device, latent_side: int) -> dict:
    """One sample's latents (1, 16, h, w) and the family's prompt conditions, random."""
    import torch

    g = torch.Generator(device=device).manual_seed(1)
    inputs = {"latents": torch.randn(1, LATENT_CHANNELS, latent_side, latent_side, device=device, generator=g)}
    embeds = torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, generator=g)
    if family == "flux":
        inputs.update(prompt_embeds=embeds, text_ids=torch.zeros(text_tokens, 3, device=device),
                      height=latent_side * 8, width=latent_side * 8,
                      pooled_prompt_embeds=torch.randn(1, config["pooled_projection_dim"], device=device, generator=g),
                      guidance=torch.ones(1, device=device))
    else:
        inputs.update(prompt_embeds=embeds,
                      prompt_embeds_mask=torch.ones(1, text_tokens, dtype=torch.long, device=device))
    return inputs


def time_steps(step, args, cuda: bool, reset_peak: bool) -> tuple[float, list[float], list[float]]:
    """(warm-up seconds, each timed step's seconds, losses): `args.warmup` untimed steps, then
    `args.steps` timed ones, each ended by a device sync."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - start
    if cuda and reset_peak:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step(args.warmup + i))
        sync()
        times.append(time.perf_counter() - t0)
    return warmup_s, times, losses


def bench_model(family: str, args, device, dtype, compile_backend: str | None = None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raydiff.registry import get_pipeline_class
    from raydiff.training import lora as lora_lib

    cuda = device.type == "cuda"
    config = (SMOKE_MODELS if args.smoke else MODELS)[family]
    text_tokens = args.text_tokens or TEXT_TOKENS[family]
    latent_side = 16 if args.smoke else 128  # 1024 px / 8 (VAE)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    dit = build_transformer(family, config, device, dtype)
    base_params = sum(p.numel() for p in dit.parameters())
    dit.requires_grad_(False)
    targets = get_pipeline_class(family).default_lora_targets
    lora_lib.inject_lora(dit, target_modules=targets, rank=args.rank, alpha=None)
    dit.enable_gradient_checkpointing()
    dit.train()
    # raydiff's attention choice (SDPA) and, with compile, train.compile: each block compiled in place
    from raydiff.training.module import speed_up

    speed_up(dit, None, compile_backend)
    params = [p for p in dit.parameters() if p.requires_grad]
    module = training_module(family, dit, device)
    stepper = stepper_for(module, 1e-4, device)
    inputs = make_inputs(family, config, text_tokens, device, latent_side)
    build_s = time.perf_counter() - start

    def step(i: int, stepper=stepper, inputs=inputs) -> float:
        return stepper.step([inputs], i).loss  # .item() inside: a host sync, as the loop logs every step

    warmup_s, times, losses = time_steps(step, args, cuda, reset_peak=True)  # warm-up: with compile, compiling
    peak_alloc = torch.cuda.max_memory_allocated() if cuda else 0
    peak_reserved = torch.cuda.max_memory_reserved() if cuda else 0

    if compile_backend:  # FLOPs are the eager run's; compiled graphs hide their ops from the counter
        result = {"family": family, "compile": compile_backend, "warmup_s": round(warmup_s, 1),
                  "step_s_median": round(statistics.median(times), 4), "step_s_all": [round(t, 4) for t in times],
                  "peak_allocated_gib": round(peak_alloc / 2**30, 2), "losses_finite": all(map(math.isfinite, losses))}
        del dit, stepper, params, module, inputs, step
        return result
    # FLOPs: one forward alone (no grad), then one whole step, which also counts the recompute.
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(inputs, generator=torch.Generator().manual_seed(0))
    forward_flops = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        step(10**6)
    step_flops = counter.get_total_flops()
    model_flops = step_flops - forward_flops  # drop the checkpointing recompute
    step_s = statistics.median(times)
    peak = peak_flops(torch.cuda.get_device_name(device)) if cuda else None
    result = {
        "family": family, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "base_params_b": round(base_params / 1e9, 3), "lora_params_m": round(sum(p.numel() for p in params) / 1e6, 3),
        "lora_targets": targets, "lora_rank": args.rank, "image_tokens": (latent_side // 2) ** 2,
        "text_tokens": text_tokens, "batch_size": 1, "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": True, "build_s": round(build_s, 2), "warmup_s": round(warmup_s, 1),
        "step_s_median": round(step_s, 4), "step_s_all": [round(t, 4) for t in times],
        "peak_allocated_gib": round(peak_alloc / 2**30, 2), "peak_reserved_gib": round(peak_reserved / 2**30, 2),
        "forward_tflops": round(forward_flops / 1e12, 2), "step_model_tflops": round(model_flops / 1e12, 2),
        "step_hardware_tflops": round(step_flops / 1e12, 2),
        "mfu": round(model_flops / step_s / peak, 4) if peak else None,
        "hfu": round(step_flops / step_s / peak, 4) if peak else None,
        "losses_finite": all(math.isfinite(x) for x in losses),
    }
    del dit, stepper, params, module, inputs, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


FSDP_BLOCKS = {"num_layers": 4, "num_single_layers": 8}  # FLUX width, a third of its depth: 2.56B params


def bench_fsdp(args, device, compile_backend: str | None = None) -> dict:
    """Full fine-tuning through raydiff's FSDP2 path (`ray.strategy: fsdp`) on one process: fp32 master
    weights sharded block by block (world 1 here; the same code shards across GPUs), bf16 compute,
    gradient checkpointing, AdamW; then the consolidated checkpoint gather. A FLUX-width model of
    FSDP_BLOCKS depth: the whole 12B would need ~190 GB for fp32 weights, gradients and Adam state."""
    import os
    import socket

    import torch
    import torch.distributed as dist

    from raydiff.training import fsdp

    cuda = device.type == "cuda"
    config = dict((SMOKE_MODELS if args.smoke else MODELS)["flux"], **({} if args.smoke else FSDP_BLOCKS))
    latent_side = 16 if args.smoke else 128
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    dit = build_transformer("flux", config, device, torch.float32)
    dit.enable_gradient_checkpointing()
    dit.train()
    from raydiff.training.module import speed_up

    speed_up(dit, None, compile_backend)  # as PipelineTrainingModule does: compile blocks, then shard them
    dit.requires_grad_(True)
    module = training_module("flux", dit, device)
    fsdp.shard_module(module, ["transformer"], "bf16")
    stepper = stepper_for(module, 1e-5, device, sharded=["transformer"])  # after sharding: DTensor params
    inputs = make_inputs("flux", config, args.text_tokens or TEXT_TOKENS["flux"], device, latent_side)
    build_s = time.perf_counter() - start

    def step(i: int, stepper=stepper, inputs=inputs) -> float:
        return stepper.step([inputs], i).loss

    _, times, losses = time_steps(step, args, cuda, reset_peak=False)  # the peak includes Adam's first allocation
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    full = fsdp.full_state_dict(module, ["transformer"])
    gather_s = time.perf_counter() - t0
    result = {"family": "flux", "mode": "full fine-tuning, ray.strategy fsdp (FSDP2, world 1)",
              "compile": compile_backend,
              "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
              "params_b": round(sum(p.numel() for p in full.values()) / 1e9, 3),
              "master_dtype": "float32", "compute_dtype": "bfloat16",
              "image_tokens": (latent_side // 2) ** 2, "batch_size": 1, "build_s": round(build_s, 2),
              "step_s_median": round(statistics.median(times), 4), "step_s_all": [round(t, 4) for t in times],
              "peak_allocated_gib": round(peak / 2**30, 2), "consolidate_s": round(gather_s, 2),
              "consolidated_on_cpu": all(v.device.type == "cpu" for v in full.values()),
              "losses_finite": all(math.isfinite(x) for x in losses)}
    del full, dit, module, stepper, inputs, step
    dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=["flux", "qwen_image"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default: per family)")
    parser.add_argument("--compile", nargs="*", choices=sorted(MODELS), default=[],
                        help="also time these LoRA runs with train.compile (regional torch.compile, inductor)")
    parser.add_argument("--fsdp", action="store_true", help="also time full fine-tuning through ray.strategy fsdp")
    parser.add_argument("--fsdp-compile", action="store_true", help="the same with train.compile")
    parser.add_argument("--smoke", action="store_true", help="toy configs on the CPU, to test this script")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print(json.dumps({"skipped": "no CUDA device"}), flush=True)
        return
    from raydiff.console import quiet_libraries

    quiet_libraries()
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if args.smoke else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)"
    peak = peak_flops(name)
    result = {"benchmark": "gpu", "device": name, "peak_bf16_tflops": peak / 1e12 if peak else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke, "anchor": ANCHOR,
              "models": {}}
    start = time.perf_counter()
    cases = [(family, lambda f=family: bench_model(f, args, device, dtype)) for family in args.models]
    if args.fsdp:
        cases.append(("flux_fsdp_full", lambda: bench_fsdp(args, device)))
    if args.fsdp_compile:
        cases.append(("flux_fsdp_full_compiled", lambda: bench_fsdp(args, device, "inductor")))
    cases += [(f"{family}_compiled", lambda f=family: bench_model(f, args, device, dtype, "inductor"))
              for family in args.compile]
    for name, run in cases:
        try:
            result["models"][name] = run()
        except Exception as err:  # noqa: BLE001 - report (out of memory, a kernel failure) and go on
            result["models"][name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
        # Outside the except block, so the traceback no longer holds the failed model's tensors.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[gpu] {name}: {json.dumps(result['models'][name])}", file=sys.stderr, flush=True)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
