"""raydiff against a bare PyTorch loop when the training worker owns every core (issue #19).

    python benchmarks/all_cores.py [--steps 15] [--warmup 3] [--modes inline cache] [--workers 1]

The benchmark DiT (FLUX architecture, 1024 image tokens, LoRA r16 on attention, checkpointing, fp32,
batch 1) with `torch.set_num_threads(cores)` on both sides, run one after the other:

- inline: the bare loop runs every unit per step (text encoders, VAE, DiT forward/backward, AdamW) on
  pre-decoded images; raydiff trains with `data.preprocess: inline` and `ray.cpus_per_worker: cores`.
- cache: the bare loop trains the DiT alone on batches encoded once; raydiff trains with
  `data.preprocess: cache` (the run writes its cache before training starts) and `ray.cpus_per_worker:
  cores`.

`--workers 0` runs raydiff in local mode (`ray.num_workers: 0`): the loop in the benchmark's own process,
which then is the one that owns every core, with Ray Data and the rest of the local Ray around it.

For each mode: steady-state steps/s of both sides and their ratio (goal >= 0.97), the CPU seconds per
step of both, and where the machine's CPU went during raydiff's timed steps, per process of the local
Ray and per thread of the training worker (the attribution table of docs/performance.md). Prints one
JSON object.

With `--diffusers-script PATH` (`train_dreambooth_lora_flux.py` from the `examples/dreambooth/` folder of a
diffusers checkout), cache mode also runs that script before and after raydiff, in a fresh process each
time, on the same model, images, LoRA and settings with `--cache_latents` and one instance prompt, timed
per optimizer step, and prints raydiff's ratio to it (goal >= 1.0). The script imports torchvision, so
run this in an environment that has it (docs/performance.md, section 7, says how).
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

    from raydiff.data.components import training_components

    torch.set_num_threads(CORES)
    n = min(steps + warmup, 16)
    if mode == "cache":
        batches, components = fixtures.encoded_batches(cfg, n), training_components(cfg)
    else:
        batches, components = fixtures.predecoded_batches(cfg, n), None
    wall, cpu = fixtures.bare_loop(cfg, batches, steps + warmup, components=components)
    return {"wall": wall[warmup:], "cpu": cpu[warmup:]}


# Runs a training script as its own `__main__`, recording when each optimizer step ends (wall, process CPU):
# python -c HARNESS MARKS_JSON SCRIPT ARGS...
HARNESS = """
import json, runpy, sys, time, torch
marks, step = [], torch.optim.AdamW.step
def timed(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    marks.append([time.perf_counter(), time.process_time()])
    return out
torch.optim.AdamW.step = timed
out, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    json.dump(marks, open(out, "w"))
"""


def diffusers_script(script: str, cfg, work: str, steps: int, warmup: int) -> dict:
    """diffusers' own FLUX LoRA script on `cfg`'s model, images, LoRA targets and rank, resolution and
    learning rate: wall and process-CPU seconds of each optimizer step after the first `warmup`."""
    import json
    import subprocess

    images = os.path.join(work, "instance_images")  # the script reads every file of its folder as an image
    os.makedirs(images, exist_ok=True)
    for name in os.listdir(cfg.data.base_path):
        if name.endswith(".png") and not os.path.exists(os.path.join(images, name)):
            os.symlink(os.path.join(cfg.data.base_path, name), os.path.join(images, name))
    marks_path, out = os.path.join(work, "diffusers_marks.json"), os.path.join(work, "diffusers_out")
    shutil.rmtree(out, ignore_errors=True)
    args = ["--pretrained_model_name_or_path", cfg.model.path, "--instance_data_dir", images,
            "--instance_prompt", "a red circle", "--output_dir", out, "--resolution", str(cfg.data.height),
            "--train_batch_size", "1", "--max_train_steps", str(warmup + steps + 1),
            "--learning_rate", str(cfg.train.learning_rate), "--lr_scheduler", "constant", "--rank",
            str(cfg.lora.rank), "--lora_layers", ",".join(f"attn.{t}" for t in cfg.lora.target_modules),
            "--max_sequence_length", str(cfg.model.max_sequence_length), "--mixed_precision", "no",
            "--cache_latents", "--checkpointing_steps", str(10**6), "--seed", "0", "--dataloader_num_workers", "0"]
    if cfg.train.gradient_checkpointing:
        args.append("--gradient_checkpointing")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HARNESS, marks_path, script, *args], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    with open(marks_path) as f:
        marks = json.load(f)
    wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])][warmup:]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])][warmup:]
    assert len(wall) == steps, f"expected {steps} timed steps, got {len(wall)}"
    return {"wall": wall, "cpu": cpu}


def versus(runs: list[dict], ours: dict, goal: float) -> dict:
    """Another trainer's timed runs (each {"wall", "cpu"}) against raydiff's summary `ours`."""
    theirs = summary([w for run in runs for w in run["wall"]])
    return {**theirs, "cpu_s_per_step": round(statistics.mean(c for run in runs for c in run["cpu"]), 4),
            "steps_per_s_each_run": [summary(run["wall"])["steps_per_s"] for run in runs],
            "ratio_mean": round(ours["steps_per_s"] / theirs["steps_per_s"], 4),
            "ratio_median": round(theirs["median_step_s"] / ours["median_step_s"], 4), "goal_ratio": goal}


def in_own_thread(fn, *args):
    """fn(*args) on a thread that ends with it. In local mode raydiff's loop runs on a thread of this process;
    had the main thread run torch's parallel work first, a second OpenMP thread team would slow that loop
    (section 7 of docs/performance.md), which no user's `raydiff train` does."""
    import threading

    out = {}
    thread = threading.Thread(target=lambda: out.update(result=fn(*args)))
    thread.start()
    thread.join()
    return out["result"]


def summary(wall: list[float]) -> dict:
    return {"steps_per_s": round(measure.steady_steps_per_second(wall, 0), 4),
            "median_step_s": round(statistics.median(wall), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["inline", "cache"], choices=["inline", "cache"])
    parser.add_argument("--workers", type=int, default=1, choices=[0, 1], help="0: local mode")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--diffusers-script", default=None,
                        help="diffusers' train_dreambooth_lora_flux.py (examples/dreambooth/), compared in cache mode")
    args = parser.parse_args()

    from raydiff.config import parse_config

    total = args.steps + args.warmup
    work, model, data, runs = fixtures.workspace("all_cores", args.workdir, images=16)
    result = {"benchmark": "all_cores", "cores": CORES, "torch_threads": CORES, "workers": args.workers,
              "warmup_steps": args.warmup, "loadavg_before": measure.loadavg()}
    for mode in args.modes:
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
        raw = fixtures.bench_config(model, data, runs, f"all-cores-{mode}", tokens=1024, steps=total, repeat=4)
        raw["data"].update({"preprocess": mode, "cache_dir": os.path.join(work, "cache")})
        raw["ray"].update({"cpus_per_worker": CORES, "num_workers": args.workers})
        cfg = parse_config(raw)
        with_script = mode == "cache" and args.diffusers_script is not None
        scripts = [diffusers_script(args.diffusers_script, cfg, work, args.steps, args.warmup)] if with_script else []
        first = in_own_thread(bare, cfg, mode, args.steps, args.warmup)
        wall, cpu_per_step, profile = measure.timed_raydiff_run(cfg, args.warmup, CORES, interval=0.5)
        second = in_own_thread(bare, cfg, mode, args.steps, args.warmup)
        r = summary(wall)
        vs_bare = versus([first, second], r, goal=0.97)
        result[mode] = {
            "raydiff": {**r, "cpu_s_per_step": cpu_per_step},
            "bare": {k: vs_bare[k] for k in ("steps_per_s", "median_step_s", "cpu_s_per_step", "steps_per_s_each_run")},
            "ratio_mean": vs_bare["ratio_mean"], "ratio_median": vs_bare["ratio_median"],
            "attribution_cpu_s": profile, "goal_ratio": 0.97}
        if with_script:
            scripts.append(diffusers_script(args.diffusers_script, cfg, work, args.steps, args.warmup))
            result[mode]["diffusers_script"] = versus(scripts, r, goal=1.0)
    result["loadavg_after"], result["machine"] = measure.loadavg(), measure.machine()
    measure.emit(result)


if __name__ == "__main__":
    main()
