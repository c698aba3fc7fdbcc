"""Data-parallel scaling: samples/s with 2 Ray Train workers vs 1, each worker on 1 torch thread.

    python benchmarks/scaling.py [--steps 15] [--warmup 3]

Trains the benchmark DiT (1024 image tokens, batch 1 per worker, LoRA rank 16, DDP over gloo for 2
workers) with `launch_training_task` in one local Ray, first with 1 worker and then with 2; each worker
asks for 1 CPU (`ray.cpus_per_worker`), so Ray gives it 1 torch thread (checked in trainer_state.json).
Throughput is global samples per
second over the steady-state steps of rank 0's log history.

Prints one JSON object with both throughputs and the speed-up (goal >= 1.8).
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


def throughput(cfg, runs: str, warmup: int) -> dict:
    from raydiff.launch.trainer import launch_training_task

    with measure.ProcessSampler() as sampler:
        launch_training_task(cfg)
    state = measure.latest_trainer_state(runs, cfg.ray.name)
    history, workers = state["log_history"], cfg.ray.num_workers
    steps = measure.step_seconds_from_history(history, batch_size=cfg.train.batch_size, world=workers)[warmup:]
    total = cfg.train.max_steps
    # Log line k is written at the end of step k: (history[warmup], history[total - 1]) spans timed steps.
    start, end = history[warmup]["time"], history[total - 1]["time"]
    profile = sampler.cpu_between(start, end)
    waits = sum(h["data_wait_s"] for h in history[warmup + 1:total])
    samples = cfg.train.batch_size * workers
    return {"workers": workers, "torch_threads_per_worker": [w["torch_threads"] for w in state["workers"]],
            "cpu_s_per_step_per_worker": measure.worker_cpu_per_step(profile, total - 1 - warmup, workers),
            "data_wait_fraction_rank0": round(waits / (end - start), 4), "steps_timed": len(steps),
            "samples_per_s": round(samples * len(steps) / sum(steps), 4),
            "samples_per_s_median_step": round(samples / statistics.median(steps), 4),
            "median_step_s": round(statistics.median(steps), 4), "steady_state_cpu_s": profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per run (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from raydiff.config import parse_config

    total = args.steps + args.warmup
    work, model, data, runs = fixtures.workspace("scaling", args.workdir, images=32)
    shutil.rmtree(runs, ignore_errors=True)
    load_before = measure.loadavg()

    results = {}
    for workers in (1, 2):
        raw = fixtures.bench_config(model, data, runs, f"scaling-{workers}", tokens=1024, steps=total,
                                    workers=workers, repeat=-(-total * workers // 32))
        results[workers] = throughput(parse_config(raw), runs, args.warmup)
    result = {
        "benchmark": "scaling",
        "model": "FLUX architecture, 2 double + 4 single blocks, 4 heads x 64, 1024 image tokens, LoRA r16 attn",
        "batch_size_per_worker": 1, "one_worker": results[1], "two_workers": results[2],
        "speedup": round(results[2]["samples_per_s"] / results[1]["samples_per_s"], 4),
        "speedup_median_step": round(
            results[2]["samples_per_s_median_step"] / results[1]["samples_per_s_median_step"], 4),
        "goal_speedup": 1.8,
        "loadavg_before": load_before, "loadavg_after": measure.loadavg(),
        "machine": measure.machine(),
    }
    measure.emit(result)


if __name__ == "__main__":
    main()
