"""How long a training worker waits on the Ray Data iterator while the data stage decodes and resizes.

    python benchmarks/input.py [--steps 30] [--warmup 3] [--source-side 1024]

Trains the benchmark DiT (1024 image tokens, 1 worker) with `launch_training_task` on photo-like JPEGs of
`--source-side` pixels (32 images repeated to `--rows` rows, so the data stage is still decoding and
resizing them to 128 x 128 all through the timed steps; no cache). The worker's feed times every wait
for a batch and logs it per step (`data_wait_s` in the log history); a sampler records the CPU the
decode tasks and the rest of Ray used meanwhile.

Prints one JSON object: the fraction of steady-state step time spent blocked in the iterator
(goal <= 0.02), per-step wait statistics and the decode cost of one source image.
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


def write_photos(directory: str, n: int, side: int, seed: int = 0) -> str:
    """`n` side x side JPEGs with smooth colour gradients and noise (so they compress and decode like
    photos, unlike flat shapes) and captions; returns the metadata path."""
    import csv

    import numpy as np
    from PIL import Image

    metadata = os.path.join(directory, "metadata.csv")
    if os.path.exists(metadata):
        return metadata
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    rows = []
    for i in range(n):
        a, b, c = rng.uniform(0.5, 4, 3)
        base = np.stack([np.sin(a * xx * 6 + c), np.cos(b * yy * 6), np.sin((xx + yy) * c * 3)], -1)
        pixels = (base * 90 + 128 + rng.normal(0, 18, (side, side, 3))).clip(0, 255).astype(np.uint8)
        name = f"{i:04d}.jpg"
        Image.fromarray(pixels).save(os.path.join(directory, name), quality=90)
        rows.append({"image": name, "prompt": f"photo {i}"})
    with open(metadata, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
        writer.writeheader()
        writer.writerows(rows)
    return metadata


def rows_of(cfg) -> list[dict]:
    from raydiff.data.metadata import read_rows

    return read_rows(cfg.data)[0]


def decode_seconds(cfg, repeats: int = 10) -> float:
    """Median seconds for the data stage's function to decode and resize one source image."""
    from raydiff.data.decode import DecodeSample
    from raydiff.data.metadata import read_rows

    rows, _ = read_rows(cfg.data)
    decode = DecodeSample(cfg.data)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        decode(rows[i % len(rows)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--source-side", type=int, default=1024, help="side of the source JPEGs")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rows", type=int, default=2048,
                        help="dataset rows (the 32 images repeated): enough that decoding runs all through "
                             "the timed steps")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from raydiff.config import parse_config
    from raydiff.console import quiet_libraries
    from raydiff.launch.trainer import launch_training_task

    quiet_libraries()
    measure.reserve_stdout()
    work = fixtures.workdir("input", args.workdir)
    model = fixtures.write_bench_flux(os.path.join(work, "model"))
    data = os.path.join(work, f"photos-{args.source_side}")
    total = args.steps + args.warmup
    write_photos(data, n=32, side=args.source_side)
    runs = os.path.join(work, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    repeat = -(-max(args.rows, total * args.batch_size) // 32)
    raw = fixtures.bench_config(model, data, runs, "input", tokens=1024, steps=total, batch_size=args.batch_size,
                              repeat=repeat)
    cfg = parse_config(raw)
    load_before = measure.loadavg()
    one_decode = decode_seconds(cfg)

    with measure.ProcessSampler() as sampler:
        launch_training_task(cfg)
    state = measure.latest_trainer_state(runs, cfg.ray.name)
    history = state["log_history"]
    assert len(history) >= total, f"expected {total} logged steps, got {len(history)}"

    # Log line k closes step k and carries the wait for its batch; (history[w], history[total - 1]) is
    # the steady state.
    w = args.warmup
    steady = history[w:total]
    waits = [h["data_wait_s"] for h in steady[1:]]
    span = steady[-1]["time"] - steady[0]["time"]
    cpu = sampler.cpu_between(steady[0]["time"], steady[-1]["time"])
    worker_cpu = measure.worker_cpu_per_step(cpu, len(waits))
    result = {
        "benchmark": "input",
        "model": "FLUX architecture, 2 double + 4 single blocks, 4 heads x 64, 1024 image tokens, LoRA r16 attn",
        "source_images": f"{args.source_side}x{args.source_side} JPEG -> 128x128", "batch_size": args.batch_size,
        "workers": 1, "worker_torch_threads": state["workers"][0]["torch_threads"], "data_num_cpus": cfg.data.num_cpus,
        "steps_timed": len(waits), "mean_step_s": round(span / len(waits), 4),
        "median_step_s": round(statistics.median(b["time"] - a["time"] for a, b in zip(steady, steady[1:])), 4),
        "wait_fraction": round(sum(waits) / span, 4), "goal_wait_fraction": 0.02,
        "wait_s": {"mean": round(statistics.mean(waits), 5), "median": round(statistics.median(waits), 5),
                   "max": round(max(waits), 4)},
        "worker_cpu_s_per_step": worker_cpu,
        "first_batch_wait_s": round(history[0]["data_wait_s"], 3), "dataset_rows": len(rows_of(cfg)),
        "steady_state_cpu_s": cpu,
        "decode_resize_s_per_image": round(one_decode, 4),
        "loadavg_before": load_before, "loadavg_after": measure.loadavg(),
        "machine": measure.machine(),
    }
    measure.emit(result)


if __name__ == "__main__":
    main()
