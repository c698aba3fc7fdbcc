"""raydiff against a bare PyTorch loop when the training worker owns every core (issue #19).

    python benchmarks/all_cores.py [--steps 15] [--warmup 3] [--modes inline cache]

The benchmark DiT (FLUX architecture, 1024 image tokens, LoRA r16 on attention, checkpointing, fp32,
batch 1) with `torch.set_num_threads(cores)` on both sides, run one after the other:

- inline: the bare loop runs every unit per step (text encoders, VAE, DiT forward/backward, AdamW) on
  pre-decoded images; raydiff trains with `data.preprocess: inline` and `ray.cpus_per_worker: cores`.
- cache: the bare loop trains the DiT alone on batches encoded once; raydiff trains with
  `data.preprocess: cache` (the run writes its cache before training starts) and `ray.cpus_per_worker:
  cores`.

For each mode: steady-state steps/s of both sides and their ratio (goal >= 0.97), the CPU seconds per
step of both, and where the machine's CPU went during raydiff's timed steps, per process of the local
Ray and per thread of the training worker (the attribution table of docs/performance.md). Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import measure  # noqa: E402

CORES = os.cpu_count() or 1


def bare(cfg, mode: str, steps: int, warmup: int) -> dict:
    import torch

    from raydiff.data.encode import training_components

    torch.set_num_threads(CORES)
    n = min(steps + warmup, 16)
    if mode == "cache":
        batches, components = fixtures.encoded_batches(cfg, n), training_components(cfg)
    else:
        batches, components = fixtures.predecoded_batches(cfg, n), None
    wall, cpu = fixtures.bare_loop(cfg, batches, steps + warmup, components=components)
    return {"wall": wall[warmup:], "cpu": cpu[warmup:]}


def summary(wall: list[float]) -> dict:
    return {"steps_per_s": round(measure.steady_steps_per_second(wall, 0), 4),
            "median_step_s": round(statistics.median(wall), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["inline", "cache"], choices=["inline", "cache"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from raydiff.config import parse_config

    total = args.steps + args.warmup
    work, model, data, runs = fixtures.workspace("all_cores", args.workdir, images=16)
    result = {"benchmark": "all_cores", "cores": CORES, "torch_threads": CORES, "warmup_steps": args.warmup,
              "loadavg_before": measure.loadavg()}
    for mode in args.modes:
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
        raw = fixtures.bench_config(model, data, runs, f"all-cores-{mode}", tokens=1024, steps=total, repeat=4)
        raw["data"].update({"preprocess": mode, "cache_dir": os.path.join(work, "cache")})
        raw["ray"]["cpus_per_worker"] = CORES
        cfg = parse_config(raw)
        first = bare(cfg, mode, args.steps, args.warmup)
        wall, cpu_per_step, profile = measure.timed_raydiff_run(cfg, args.warmup, CORES, interval=0.5)
        ray_side = {"wall": wall, "cpu_per_step": cpu_per_step, "profile": profile}
        second = bare(cfg, mode, args.steps, args.warmup)
        bare_wall = first["wall"] + second["wall"]
        bare_cpu = statistics.mean(first["cpu"] + second["cpu"])
        r, b = summary(ray_side["wall"]), summary(bare_wall)
        result[mode] = {
            "raydiff": {**r, "cpu_s_per_step": ray_side["cpu_per_step"]},
            "bare": {**b, "cpu_s_per_step": round(bare_cpu, 4),
                     "steps_per_s_each_run": [summary(first["wall"])["steps_per_s"],
                                              summary(second["wall"])["steps_per_s"]]},
            "ratio_mean": round(r["steps_per_s"] / b["steps_per_s"], 4),
            "ratio_median": round(b["median_step_s"] / r["median_step_s"], 4),
            "attribution_cpu_s": ray_side["profile"], "goal_ratio": 0.97}
    result["loadavg_after"], result["machine"] = measure.loadavg(), measure.machine()
    measure.emit(result)


if __name__ == "__main__":
    main()
