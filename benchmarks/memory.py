"""Peak memory of a training step: gradient checkpointing on vs off at 1024 and 4096 image tokens, and
the frozen base in bfloat16 vs float32.

    python benchmarks/memory.py [--tokens 1024 4096]

Each configuration runs in a fresh process (no Ray: the worker's step is the training module's
forward, backward and AdamW step, which this runs exactly): build the module and optimizer, take one
warm-up step (it allocates the optimizer state), then reset the kernel's peak-RSS counter
(/proc/self/clear_refs) and take one more step. `peak_rss_mib` is the step's peak resident memory;
`activation_mib` is that peak minus the resident memory just before the step (weights, LoRA, AdamW
state), i.e. what the step itself needs. glibc is told to mmap every block over 64 KiB
(MALLOC_MMAP_THRESHOLD_) so freed activations return to the kernel and RSS follows live memory.

Prints one JSON object (goal: checkpointing cuts activation memory by >= 40% at 4096 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

MIB = 2**20


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def one(tokens: int, checkpointing: bool, dtype: str, work: str) -> dict:
    """Measure one configuration in this process."""
    import gc
    import math

    import torch

    from raydiff.config import parse_config
    from raydiff.console import quiet_libraries
    from raydiff.training.loop import build_optimizer, step_seed
    from raydiff.training.module import PipelineTrainingModule

    quiet_libraries()
    torch.set_num_threads(os.cpu_count() or 1)
    model = os.path.join(work, "model")
    data = os.path.join(work, f"data-{tokens}")
    raw = common.bench_config(model, data, os.path.join(work, "runs"), "memory", tokens=tokens, steps=2,
                              gradient_checkpointing=checkpointing, dtype=dtype)
    cfg = parse_config(raw)
    batch = common.predecoded_batches(cfg, 1)[0]
    torch.manual_seed(0)
    module = PipelineTrainingModule(cfg, device="cpu")
    params = module.trainable_parameters()
    optimizer, scheduler = build_optimizer(cfg, params, 2)

    def step(i: int) -> float:
        start = time.perf_counter()
        loss = module(batch, generator=torch.Generator().manual_seed(step_seed(0, i, 0, 0, 1)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(0)
    gc.collect()
    before = common.current_rss_bytes()
    reset_peak()
    seconds = step(1)
    peak = vm_hwm_bytes()
    dit = module.pipe.pipe.transformer
    return {"tokens": tokens, "gradient_checkpointing": checkpointing, "base_dtype": dtype,
            "peak_rss_mib": round(peak / MIB, 1), "before_step_rss_mib": round(before / MIB, 1),
            "activation_mib": round((peak - before) / MIB, 1),
            "dit_weights_mib": round(sum(p.numel() * p.element_size() for p in dit.parameters()) / MIB, 1),
            "step_s": round(seconds, 3)}


CONFIGS = [  # (checkpointing, base dtype) at each token count
    (True, "float32"), (False, "float32"), (True, "bfloat16"), (False, "bfloat16"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--one", nargs=3, metavar=("TOKENS", "CHECKPOINTING", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = common.workdir("memory", args.workdir)
    if args.one:
        tokens, ckpt, dtype = args.one
        print(json.dumps(one(int(tokens), ckpt == "on", dtype, work)), flush=True)
        return

    common.reserve_stdout()
    common.write_bench_flux(os.path.join(work, "model"))
    for tokens in args.tokens:
        common.write_images(os.path.join(work, f"data-{tokens}"), n=2, side=common.image_side(tokens))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    rows = []
    for tokens in args.tokens:
        for ckpt, dtype in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, "--workdir", work, "--one", str(tokens),
                                   "on" if ckpt else "off", dtype], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def find(tokens, ckpt, dtype):
        return next(r for r in rows if (r["tokens"], r["gradient_checkpointing"], r["base_dtype"]) == (tokens, ckpt, dtype))

    cuts = {}
    for tokens in args.tokens:
        for dtype in ("float32", "bfloat16"):
            on, off = find(tokens, True, dtype), find(tokens, False, dtype)
            cuts[f"{tokens}_{dtype}"] = {
                "activation_cut": round(1 - on["activation_mib"] / off["activation_mib"], 4),
                "peak_rss_cut": round(1 - on["peak_rss_mib"] / off["peak_rss_mib"], 4),
                "step_time_cost": round(on["step_s"] / off["step_s"] - 1, 4)}
    result = {
        "benchmark": "memory",
        "model": "FLUX architecture, 2 double + 4 single blocks, 4 heads x 64, LoRA r16 attn, batch 1",
        "torch_threads": os.cpu_count(), "runs": rows, "checkpointing": cuts,
        "goal_activation_cut_4096": 0.4,
        "machine": common.machine(),
    }
    common.emit(result)


if __name__ == "__main__":
    main()
