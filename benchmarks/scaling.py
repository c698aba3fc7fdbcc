"""Data-parallel scaling: samples/s with 2 Ray Train workers vs 1, each worker on 1 torch thread.

    python benchmarks/scaling.py [--steps 15] [--warmup 3]

Trains the benchmark DiT (1024 image tokens, batch 1 per worker, LoRA rank 16, DDP over gloo for 2
workers) with `launch_training_task` in one local Ray, first with 1 worker and then with 2; the
module factory calls torch.set_num_threads(1) in each worker. Throughput is global samples per
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

import common  # noqa: E402


def throughput(cfg, raw: dict, runs: str, out: str, warmup: int) -> dict:
    from raydiff.launch.trainer import launch_training_task

    with common.ProcessSampler() as sampler:
        launch_training_task(cfg, module_factory=common.InstrumentedFactory(raw, out, threads=1))
    history = common.latest_trainer_state(runs, cfg.ray.name)["log_history"]
    workers = cfg.ray.num_workers
    steps = common.step_seconds_from_history(history, batch_size=cfg.train.batch_size, world=workers)[warmup:]
    threads, cpu, waits, window = [], [], [], None
    total = cfg.train.max_steps
    for rank in range(workers):
        header, records = common.read_instrumented(out, rank)
        threads.append(header["torch_threads"])
        steady = records[warmup:total]
        span = steady[-1]["t"] - steady[0]["t"]
        # CPU seconds of the worker process per step: what the step costs when it is not kept waiting.
        cpu.append(round((steady[-1]["cpu"] - steady[0]["cpu"]) / (len(steady) - 1), 4))
        waits.append(round(sum(r["wait_s"] for r in steady[1:]) / span, 4))
        window = window or (steady[0]["t"], steady[-1]["t"])
    samples = cfg.train.batch_size * workers
    return {"workers": workers, "torch_threads_per_worker": threads, "cpu_s_per_step_per_worker": cpu,
            "data_wait_fraction_per_worker": waits, "steps_timed": len(steps),
            "samples_per_s": round(samples * len(steps) / sum(steps), 4),
            "samples_per_s_median_step": round(samples / statistics.median(steps), 4),
            "median_step_s": round(statistics.median(steps), 4),
            "steady_state_cpu_s": sampler.cpu_between(*window)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per run (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from raydiff.config import parse_config
    from raydiff.console import quiet_libraries

    quiet_libraries()
    common.reserve_stdout()
    common.ship_with_ray()
    work = common.workdir("scaling", args.workdir)
    model = common.write_bench_flux(os.path.join(work, "model"))
    data = os.path.join(work, "data")
    total = args.steps + args.warmup
    common.write_images(data, n=32, side=common.image_side(1024))
    runs = os.path.join(work, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    load_before = common.loadavg()

    results = {}
    for workers in (1, 2):
        raw = common.bench_config(model, data, runs, f"scaling-{workers}", tokens=1024, steps=total, workers=workers,
                                  repeat=-(-total * workers // 32))
        results[workers] = throughput(parse_config(raw), raw, runs, os.path.join(work, f"steps-{workers}"),
                                      args.warmup)
    result = {
        "benchmark": "scaling",
        "model": "FLUX architecture, 2 double + 4 single blocks, 4 heads x 64, 1024 image tokens, LoRA r16 attn",
        "batch_size_per_worker": 1, "one_worker": results[1], "two_workers": results[2],
        "speedup": round(results[2]["samples_per_s"] / results[1]["samples_per_s"], 4),
        "speedup_median_step": round(results[2]["samples_per_s_median_step"] / results[1]["samples_per_s_median_step"], 4),
        "goal_speedup": 1.8,
        "loadavg_before": load_before, "loadavg_after": common.loadavg(),
        "machine": common.machine(),
    }
    common.emit(result)


if __name__ == "__main__":
    main()
