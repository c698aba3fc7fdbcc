"""Overhead of raydiff over a bare PyTorch loop, start-up latency, and the demo's wall time.

    python benchmarks/overhead.py [--steps 15] [--warmup 3] [--skip-demo]

1. Bare loop: raydiff's training module (FLUX architecture, 2 double + 4 single blocks, 4 heads x 64,
   1024 image tokens, LoRA rank 16 on attention, AdamW, clipping) over pre-decoded, pre-collated
   batches in this process, with the thread count a 1-CPU Ray Train worker gets (1).
2. `raydiff train` (1 worker, 2 steps) as a user runs it: seconds from the command's start to its
   first optimizer step's log line; then the same in local mode (`--set ray.num_workers=0`), where the
   loop runs in the command's own process.
3. raydiff (1 worker) on the same images through `launch_training_task`, logged every step; the log's
   wall-clock `time` of each step bounds the window in which a sampler measures the worker's CPU.
4. The bare loop again, so both sides see the box in a similar state.
5. `raydiff demo` in a fresh directory, timed end to end.

Prints one JSON object: steady-state steps/s of both sides (total time / steps, and from the median
step, which ignores spikes from other work on the machine), their ratio (goal >= 0.97), the ratio of
CPU seconds per step (robust when other processes share the cores), seconds to the first optimizer
step (goal <= 15 s on 2 cores) with the phases it went through, the demo's wall time, and where the
machine's CPU went (per process of the local Ray, per worker thread) during start-up and during the
timed steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import measure  # noqa: E402

THREADS = 1  # Ray sets OMP_NUM_THREADS to a worker's CPUs; ray.cpus_per_worker defaults to 1
# Start-up phases, by the first output line of each (seconds since the command started).
STARTUP_MARKS = {"ray_started": "Started a local Ray instance",  # driver imports + ray.init
                 "data_started": "Starting execution of Dataset",  # worker up, module built, first iter_batches
                 "first_step": "[raydiff] step 1/"}


def bare(cfg, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds of each timed step of the bare loop."""
    import torch

    torch.set_num_threads(THREADS)
    batches = fixtures.predecoded_batches(cfg, min(steps + warmup, 16))
    wall, cpu = fixtures.bare_loop(cfg, batches, steps + warmup)
    return wall[warmup:], cpu[warmup:]


def summary(timed: list[float]) -> dict:
    """Steady-state numbers of the timed (post-warm-up) step times."""
    return {"steps_timed": len(timed), "steps_per_s": round(measure.steady_steps_per_second(timed, 0), 4),
            "median_step_s": round(statistics.median(timed), 4), "min_step_s": round(min(timed), 4),
            "max_step_s": round(max(timed), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per side (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from the steady state")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from raydiff.config import parse_config

    total = args.steps + args.warmup
    work, model, data, runs = fixtures.workspace("overhead", args.workdir, images=total)
    shutil.rmtree(runs, ignore_errors=True)
    cfg = parse_config(fixtures.bench_config(model, data, runs, "overhead", tokens=1024, steps=total))
    load_before = measure.loadavg()

    bare_first = bare(cfg, args.steps, args.warmup)

    startup_raw = fixtures.bench_config(model, data, runs, "overhead-startup", tokens=1024, steps=2)
    config_path = fixtures.write_yaml(startup_raw, os.path.join(work, "overhead-startup.yaml"))
    with measure.ProcessSampler(interval=0.25) as sampler:
        run = measure.run_command([*measure.raydiff_cli(), "train", config_path], STARTUP_MARKS, timeout=600)
    assert run["returncode"] == 0, "\n".join(run["tail"])
    startup_cpu = sampler.cpu_between(run["started_at"], run["started_at"] + run["marks"]["first_step"])
    with measure.ProcessSampler(interval=0.25) as sampler:
        local = measure.run_command([*measure.raydiff_cli(), "train", config_path, "--set", "ray.num_workers=0",
                                     "--set", "ray.name=overhead-startup-local"], STARTUP_MARKS, timeout=600)
    assert local["returncode"] == 0, "\n".join(local["tail"])
    local_cpu = sampler.cpu_between(local["started_at"], local["started_at"] + local["marks"]["first_step"])

    ray_wall, ray_cpu, profile = measure.timed_raydiff_run(cfg, args.warmup, THREADS)
    bare_second = bare(cfg, args.steps, args.warmup)

    raydiff_s = summary(ray_wall)
    raydiff_s["cpu_s_per_step"] = ray_cpu
    bare_s = summary(bare_first[0] + bare_second[0])
    bare_s["steps_per_s_each_run"] = [summary(bare_first[0])["steps_per_s"], summary(bare_second[0])["steps_per_s"]]
    bare_s["cpu_s_per_step"] = round(statistics.mean(bare_first[1] + bare_second[1]), 4)
    result = {
        "benchmark": "overhead",
        "model": "FLUX architecture, 2 double + 4 single blocks, 4 heads x 64, 1024 image tokens, LoRA r16 attn",
        "batch_size": 1, "torch_threads": THREADS, "warmup_steps": args.warmup,
        "raydiff": raydiff_s, "bare": bare_s,
        "ratio_mean": round(raydiff_s["steps_per_s"] / bare_s["steps_per_s"], 4),
        "ratio_median": round(bare_s["median_step_s"] / raydiff_s["median_step_s"], 4),
        "ratio_cpu": round(bare_s["cpu_s_per_step"] / raydiff_s["cpu_s_per_step"], 4),
        "goal_ratio": 0.97,
        "first_step_s": run["marks"].get("first_step"), "goal_first_step_s": 15,
        "steady_state_cpu_s": profile,
        "startup_marks_s": run["marks"], "startup_cpu_s": startup_cpu, "two_step_train_wall_s": run["wall_s"],
        "local_mode": {"first_step_s": local["marks"].get("first_step"), "startup_marks_s": local["marks"],
                       "startup_cpu_s": local_cpu, "two_step_train_wall_s": local["wall_s"]},
    }
    if not args.skip_demo:
        demo_dir = os.path.join(work, f"demo-{time.strftime('%H%M%S')}")
        demo = measure.run_command([*measure.raydiff_cli(), "demo", "--dir", demo_dir], STARTUP_MARKS, timeout=600)
        assert demo["returncode"] == 0, "\n".join(demo["tail"])
        result["demo"] = {"wall_s": demo["wall_s"], "marks_s": demo["marks"],
                          "steps": 8, "workers": 2}
        shutil.rmtree(demo_dir, ignore_errors=True)
    result["loadavg_before"], result["loadavg_after"] = load_before, measure.loadavg()
    result["machine"] = measure.machine()
    measure.emit(result)


if __name__ == "__main__":
    main()
