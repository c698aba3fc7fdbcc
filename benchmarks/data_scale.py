"""Sharded data at growing size: does anything in the driver or the first step grow with the rows?

    python benchmarks/data_scale.py [--rows 1000 100000 10000000] [--webdataset-rows 1000] [--steps 12]

For each size, a sharded parquet dataset of that many rows (shards of at most 100,000 rows, each row a
path into a pool of 64 real 128 x 128 PNGs and a caption), trained with `raydiff train` (the benchmark
DiT, 1024 image tokens, 1 worker) as a user runs it. A WebDataset variant (tar shards holding the images
themselves) runs at `--webdataset-rows`. Each run records:

- the driver's peak RSS (the `raydiff train` process, sampled every 0.1 s),
- seconds from the command's start to its first optimizer step's log line,
- steady-state steps/s after the first two steps,
- input wait: the fraction of that time the worker spent blocked on data (`data_wait_s`).

Goals on 2 cores: driver peak RSS and time to first step at the largest size <= 1.2x the smallest's;
input wait <= 2%. Prints one JSON object. Writing the 10^7-row manifest takes about a minute the first
time (reused after); the runs about a minute each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import measure  # noqa: E402

SHARD_ROWS = 100_000
POOL = 64
MARKS = {"first_step": "[raydiff] step 1/"}


def write_manifest(directory: str, rows: int, pool: list[str]) -> str:
    """`rows` rows of (image, prompt) in parquet shards of at most SHARD_ROWS rows, cycling through the
    pool's images (absolute paths). Written once per directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = os.path.join(directory, "_done")
    if os.path.exists(done):
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    images = pa.array(pool).dictionary_encode()  # paths repeat: dictionary-encoded, shards stay small
    for start in range(0, rows, SHARD_ROWS):
        n = min(SHARD_ROWS, rows - start)
        index = pa.array([(start + i) % len(pool) for i in range(n)], pa.int32())
        table = pa.table({"image": pa.DictionaryArray.from_arrays(index, images.dictionary),
                          "prompt": pa.array([f"shape {start + i}" for i in range(n)])})
        pq.write_table(table, os.path.join(directory, f"part-{start // SHARD_ROWS:05d}.parquet"))
    open(done, "w").close()
    return directory


def write_tars(directory: str, rows: int, pool: list[str]) -> str:
    """A WebDataset of `rows` samples (each image's bytes and a .txt caption) in 4 tar shards."""
    import tarfile

    done = os.path.join(directory, "_done")
    if os.path.exists(done):
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    shards = 4
    for s in range(shards):
        with tarfile.open(os.path.join(directory, f"shard-{s:04d}.tar"), "w") as tar:
            for i in range(s, rows, shards):
                tar.add(pool[i % len(pool)], arcname=f"{i:09d}.png")
                caption = os.path.join(directory, "caption.txt")
                with open(caption, "w") as f:
                    f.write(f"shape {i}")
                tar.add(caption, arcname=f"{i:09d}.txt")
    os.remove(os.path.join(directory, "caption.txt"))
    open(done, "w").close()
    return directory


def train(work: str, model: str, data: str, name: str, steps: int, fmt: str = "auto") -> dict:
    raw = fixtures.bench_config(model, data, os.path.join(work, "runs"), name, steps=steps)
    # The manifests hold absolute paths into the image pool, which raydiff refuses unless allowed.
    raw["data"].update({"metadata_path": data + "/", "base_path": "/", "allow_outside_base": True, "format": fmt,
                        "shuffle_buffer": 64})
    config = fixtures.write_yaml(raw, os.path.join(work, f"{name}.yaml"))
    shutil.rmtree(os.path.join(work, "runs", name), ignore_errors=True)
    peak = PeakRss()
    result = measure.run_command([*measure.raydiff_cli(), "train", config], MARKS, timeout=900, on_start=peak.watch)
    if result["returncode"] != 0:
        raise RuntimeError(f"{name} failed:\n" + "\n".join(result["tail"]))
    history = measure.latest_trainer_state(os.path.join(work, "runs"), name)["log_history"]
    timed = [h for h in history if "samples_per_second" in h][2:]
    seconds = [1 / h["samples_per_second"] for h in timed]
    return {"driver_peak_rss_mib": round(peak.peak / 2**20, 1), "first_step_s": result["marks"].get("first_step"),
            "steps_per_s": round(len(seconds) / sum(seconds), 3),
            "input_wait": round(sum(h["data_wait_s"] for h in timed) / sum(seconds), 4), "wall_s": result["wall_s"]}


class PeakRss:
    """The highest RSS of a process, sampled every 0.1 s from a thread until it exits."""

    def __init__(self):
        self.peak = 0

    def watch(self, proc) -> None:
        def sample():
            while proc.poll() is None:
                try:
                    with open(f"/proc/{proc.pid}/statm") as f:
                        self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
                except OSError:
                    return
                time.sleep(0.1)

        threading.Thread(target=sample, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 100_000, 10_000_000])
    parser.add_argument("--webdataset-rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    measure.reserve_stdout()
    work = fixtures.workdir("data_scale", args.workdir)
    model = fixtures.write_bench_flux(os.path.join(work, "model"))
    side = fixtures.image_side(1024)
    fixtures.write_images(os.path.join(work, "pool"), POOL, side)
    pool = sorted(os.path.join(work, "pool", f) for f in os.listdir(os.path.join(work, "pool")) if f.endswith(".png"))
    runs = {}
    for rows in args.rows:
        data = write_manifest(os.path.join(work, f"parquet-{rows}"), rows, pool)
        runs[f"parquet_{rows}"] = train(work, model, data, f"parquet-{rows}", args.steps)
        print(runs, file=sys.stderr)
    if args.webdataset_rows:
        data = write_tars(os.path.join(work, f"tar-{args.webdataset_rows}"), args.webdataset_rows, pool)
        runs[f"webdataset_{args.webdataset_rows}"] = train(work, model, data, "tar", args.steps, fmt="webdataset")
    small, large = runs[f"parquet_{min(args.rows)}"], runs[f"parquet_{max(args.rows)}"]
    rss = large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"]
    measure.emit({"benchmark": "data_scale", "machine": measure.machine(), "runs": runs,
                  "rss_ratio_largest_to_smallest": round(rss, 3),
                  "first_step_ratio_largest_to_smallest": round(large["first_step_s"] / small["first_step_s"], 3),
                  "max_input_wait": max(r["input_wait"] for r in runs.values()), "loadavg": measure.loadavg()})


if __name__ == "__main__":
    main()
