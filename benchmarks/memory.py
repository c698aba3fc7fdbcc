"""Peak memory of a training step: gradient checkpointing on vs off at 1024 and 4096 image tokens, the
frozen base in bfloat16 vs float32, and the frozen DiT quantized to int8 (`model.quantize: int8`).

    python benchmarks/memory.py [--tokens 1024 4096]

Each configuration runs in a fresh process (no Ray: the worker's step is the training module's
forward, backward and AdamW step, which this runs exactly): build the module and optimizer, take one
warm-up step (it allocates the optimizer state), then reset the kernel's peak-RSS counter
(/proc/self/clear_refs) and take one more step. `peak_rss_mib` is the step's peak resident memory;
`activation_mib` is that peak minus the resident memory just before the step (weights, LoRA, AdamW
state), i.e. what the step itself needs. glibc is told to mmap every block over 64 KiB
(MALLOC_MMAP_THRESHOLD_) so freed activations return to the kernel and RSS follows live memory.

`dit_weights_mib` is the DiT's parameters as stored (a quantized weight counts its int8 data and its
scales; the LoRA's fp32 weights are included in every row).

Prints one JSON object (goals: checkpointing cuts activation memory by >= 40% at 4096 tokens; int8 cuts
the DiT's weight memory by >= 45% against the fp32 base).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import measure  # noqa: E402

MIB = 2**20


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def one(tokens: int, checkpointing: bool, dtype: str, quantize: str | None, work: str) -> dict:
    """Measure one configuration in this process."""
    import gc

    import torch

    from raydiff.config import parse_config
    from raydiff.console import quiet_libraries
    from raydiff.pipelines.quantize import weight_bytes
    from raydiff.training.module import PipelineTrainingModule
    from raydiff.training.step import Stepper, build_optimizer

    quiet_libraries()
    torch.set_num_threads(os.cpu_count() or 1)
    model = os.path.join(work, "model")
    data = os.path.join(work, f"data-{tokens}")
    raw = fixtures.bench_config(model, data, os.path.join(work, "runs"), "memory", tokens=tokens, steps=2,
                              gradient_checkpointing=checkpointing, dtype=dtype)
    raw["model"]["quantize"] = quantize
    cfg = parse_config(raw)
    batch = fixtures.predecoded_batches(cfg, 1)[0]
    torch.manual_seed(0)
    module = PipelineTrainingModule(cfg, device="cpu")
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), 2)
    stepper = Stepper(cfg, module, optimizer, scheduler, torch.device("cpu"))

    losses = []

    def step(i: int) -> float:
        start = time.perf_counter()
        losses.append(stepper.step([batch], i).loss)
        return time.perf_counter() - start

    step(0)
    gc.collect()
    before = measure.current_rss_bytes()
    reset_peak()
    seconds = step(1)
    peak = vm_hwm_bytes()
    dit = module.pipe.pipe.transformer
    return {"tokens": tokens, "gradient_checkpointing": checkpointing, "base_dtype": dtype, "quantize": quantize,
            "peak_rss_mib": round(peak / MIB, 1), "before_step_rss_mib": round(before / MIB, 1),
            "activation_mib": round((peak - before) / MIB, 1), "dit_weights_mib": round(weight_bytes(dit) / MIB, 2),
            "step_s": round(seconds, 3), "first_step_loss": round(losses[0], 6)}


CONFIGS = [  # (checkpointing, base dtype, model.quantize) at each token count
    (True, "float32", None), (False, "float32", None), (True, "bfloat16", None), (False, "bfloat16", None),
    (True, "float32", "int8"), (True, "bfloat16", "int8"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--one", nargs=4, metavar=("TOKENS", "CHECKPOINTING", "DTYPE", "QUANTIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = fixtures.workdir("memory", args.workdir)
    if args.one:
        tokens, ckpt, dtype, quantize = args.one
        print(json.dumps(one(int(tokens), ckpt == "on", dtype, None if quantize == "none" else quantize, work)),
              flush=True)
        return

    measure.reserve_stdout()
    fixtures.write_bench_flux(os.path.join(work, "model"))
    for tokens in args.tokens:
        fixtures.write_images(os.path.join(work, f"data-{tokens}"), n=2, side=fixtures.image_side(tokens))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    rows = []
    for tokens in args.tokens:
        for ckpt, dtype, quantize in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, "--workdir", work, "--one", str(tokens),
                                   "on" if ckpt else "off", dtype, quantize or "none"], env=env, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def find(tokens, ckpt, dtype, quantize=None):
        key = (tokens, ckpt, dtype, quantize)
        return next(r for r in rows
                    if (r["tokens"], r["gradient_checkpointing"], r["base_dtype"], r["quantize"]) == key)

    cuts = {}
    for tokens in args.tokens:
        for dtype in ("float32", "bfloat16"):
            on, off = find(tokens, True, dtype), find(tokens, False, dtype)
            cuts[f"{tokens}_{dtype}"] = {
                "activation_cut": round(1 - on["activation_mib"] / off["activation_mib"], 4),
                "peak_rss_cut": round(1 - on["peak_rss_mib"] / off["peak_rss_mib"], 4),
                "step_time_cost": round(on["step_s"] / off["step_s"] - 1, 4)}
    int8 = {}
    for tokens in args.tokens:
        fp32 = find(tokens, True, "float32")
        for dtype in ("float32", "bfloat16"):
            q = find(tokens, True, dtype, "int8")
            int8[f"{tokens}_{dtype}"] = {
                "dit_weight_cut_vs_fp32": round(1 - q["dit_weights_mib"] / fp32["dit_weights_mib"], 4),
                "peak_rss_cut_vs_fp32": round(1 - q["peak_rss_mib"] / fp32["peak_rss_mib"], 4),
                "first_loss_rel_diff_vs_unquantized": round(
                    abs(q["first_step_loss"] / find(tokens, True, dtype)["first_step_loss"] - 1), 6),
                "step_time_cost": round(q["step_s"] / find(tokens, True, dtype)["step_s"] - 1, 4)}
    result = {
        "benchmark": "memory",
        "model": "FLUX architecture, 2 double + 4 single blocks, 4 heads x 64, LoRA r16 attn, batch 1",
        "torch_threads": os.cpu_count(), "runs": rows, "checkpointing": cuts, "int8": int8,
        "goal_activation_cut_4096": 0.4, "goal_int8_dit_weight_cut": 0.45,
        "machine": measure.machine(),
    }
    measure.emit(result)


if __name__ == "__main__":
    main()
