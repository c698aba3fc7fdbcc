"""Shared pieces of the benchmarks: a FLUX-architecture DiT big enough to time, a dataset whose images
give it a chosen token count, configs, pre-decoded batches, a bare PyTorch loop and timing helpers.

The benchmark model is the tiny FLUX pipeline (`FluxImagePipeline.write_tiny`: 2x VAE, 32-wide text
encoders) with its transformer replaced by a bigger one: 2 double + 4 single blocks, 4 heads x 64.
FLUX packs 2x2 latent patches and the tiny VAE halves each side, so an S x S image is (S/4)^2 tokens:
128 x 128 -> 1024 tokens, 256 x 256 -> 4096.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_side(tokens: int) -> int:
    """Side of a square image that the benchmark DiT sees as `tokens` tokens."""
    side = int(round(tokens ** 0.5)) * 4
    assert (side // 4) ** 2 == tokens, f"{tokens} is not a square token count"
    return side


def write_bench_flux(path: str, *, num_layers: int = 2, num_single_layers: int = 4, heads: int = 4,
                     head_dim: int = 64, seed: int = 0) -> str:
    """A diffusers-format FLUX pipeline: the tiny one's VAE, text encoders and scheduler, and a
    FLUX-architecture transformer of the given size (random weights). Written once per path."""
    import torch
    from diffusers import FluxTransformer2DModel

    from raydiff.pipelines.flux import FluxImagePipeline

    marker = os.path.join(path, "transformer", "config.json")
    if os.path.exists(marker):
        with open(marker) as f:
            c = json.load(f)
        if (c["num_layers"], c["num_single_layers"], c["num_attention_heads"], c["attention_head_dim"]) == (
                num_layers, num_single_layers, heads, head_dim):
            return path
    FluxImagePipeline.write_tiny(path, seed=seed)
    torch.manual_seed(seed)
    rope = head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[rope, (head_dim - rope) // 2, (head_dim - rope) // 2], guidance_embeds=True)
    transformer.save_pretrained(os.path.join(path, "transformer"))
    return path


def write_images(directory: str, n: int, side: int, seed: int = 0) -> str:
    """`n` side x side shapes PNGs with captions; returns the metadata path. Written once per directory."""
    from raydiff.data.shapes import write_shapes_dataset

    metadata = os.path.join(directory, "metadata.csv")
    rows = 0
    if os.path.exists(metadata):
        with open(metadata) as f:
            rows = sum(1 for _ in f) - 1
    if rows < n:
        write_shapes_dataset(directory, n=n, size=(side, side), seed=seed)
    return metadata


def bench_config(model: str, data_dir: str, runs: str, name: str, *, tokens: int = 1024, steps: int = 20,
                 workers: int = 1, batch_size: int = 1, repeat: int = 1, gradient_checkpointing: bool = True,
                 dtype: str = "float32", log_steps: int = 1) -> dict:
    """The raw config every benchmark trains with; only `save_steps` differs from a user's run (no
    checkpoint mid-run, which would land inside a timed step)."""
    side = image_side(tokens)
    return {
        "model": {"family": "flux", "path": model, "dtype": dtype, "max_sequence_length": 32},
        "data": {"base_path": data_dir, "metadata_path": os.path.join(data_dir, "metadata.csv"),
                 "height": side, "width": side, "repeat": repeat},
        "lora": {"rank": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "train": {"learning_rate": 1e-4, "max_steps": steps, "batch_size": batch_size, "save_steps": 10**6,
                  "log_steps": log_steps, "gradient_checkpointing": gradient_checkpointing},
        "ray": {"num_workers": workers, "storage_path": runs, "name": name},
    }


def write_yaml(raw: dict, path: str) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def predecoded_batches(cfg, n: int, device="cpu") -> list[dict]:
    """The first `n` batches of `cfg`'s data, decoded and resized by raydiff's own Ray Data stage
    function and collated exactly as the worker does, held in memory (no Ray involved)."""
    import numpy as np

    from raydiff.data.collate import collate
    from raydiff.data.dataset import read_rows
    from raydiff.data.decode import DecodeSample

    rows, _ = read_rows(cfg.data)
    decode = DecodeSample(cfg.data)
    bs, batches = cfg.train.batch_size, []
    for i in range(n):
        samples = [decode(rows[(i * bs + j) % len(rows)])[0] for j in range(bs)]
        batch = {"prompt": np.array([s["prompt"] for s in samples], dtype=object)}
        for key in cfg.data.data_file_keys:
            batch[key] = np.stack([s[key] for s in samples])
        batches.append(collate(batch, device, cfg.data.data_file_keys))
    return batches


def bare_loop(cfg, batches: list[dict], steps: int) -> tuple[list[float], list[float]]:
    """raydiff's step without Ray: the same training module, AdamW, LR schedule, gradient clipping and
    per-step generator seeds, over pre-collated batches in this process. Returns each step's wall
    seconds and this process's CPU seconds."""
    import math

    import torch

    from raydiff.training.loop import build_optimizer, step_seed
    from raydiff.training.module import PipelineTrainingModule

    torch.manual_seed(cfg.train.seed)
    module = PipelineTrainingModule(cfg, device="cpu")
    params = module.trainable_parameters()
    optimizer, scheduler = build_optimizer(cfg, params, steps)
    times, cpu = [], []
    for step in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 0, 0, 1))
        loss = module(batches[step % len(batches)], generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loop logs loss.item() every step
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu


def steady_steps_per_second(step_seconds: list[float], warmup: int) -> float:
    """Steps per second over the steps after `warmup` (total time / steps, not a mean of rates)."""
    timed = step_seconds[warmup:]
    assert timed, f"need more than {warmup} steps"
    return len(timed) / sum(timed)


def step_seconds_from_history(log_history: list[dict], batch_size: int, world: int) -> list[float]:
    """Per-step wall time from a run logged every step: each entry's window is one optimizer step,
    from the previous log line to this one (data wait, collate, forward, backward, step, log)."""
    return [batch_size * world / h["samples_per_second"] for h in log_history if "samples_per_second" in h]


def latest_trainer_state(storage: str, name: str) -> dict:
    run = os.path.join(storage, name)
    checkpoints = sorted(d for d in os.listdir(run) if d.startswith("checkpoint-"))
    with open(os.path.join(run, checkpoints[-1], "trainer_state.json")) as f:
        return json.load(f)


def run_command(argv: list[str], marks: dict[str, str], timeout: float, env: dict | None = None) -> dict:
    """Run a command, timestamping (seconds since start) the first output line containing each of
    `marks`' values. Returns {"wall_s", "returncode", "marks": {name: seconds}, "started_at"
    (perf_counter), "tail"}.

    A worker's line reaches the driver's stdout through Ray's log monitor, so a mark is an upper bound
    (it adds the forwarding delay, well under a second locally)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    seen, lines = {}, []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            now = time.perf_counter() - start
            lines.append(line.rstrip("\n"))
            for key, text in marks.items():
                if key not in seen and text in line:
                    seen[key] = round(now, 2)
        proc.wait()
    finally:
        timer.cancel()
    return {"wall_s": round(time.perf_counter() - start, 2), "returncode": proc.returncode, "marks": seen,
            "started_at": start, "tail": lines[-15:]}


def raydiff_cli() -> list[str]:
    return [sys.executable, "-m", "raydiff.launch.cli"]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> dict:
    """What ran the benchmark: cores, CPU model, RAM, library versions."""
    import diffusers
    import ray
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "ram_gib": round(ram / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "diffusers": diffusers.__version__}


_JSON_OUT = None


def reserve_stdout() -> None:
    """Send everything else written to stdout (Ray forwards its workers' logs there) to stderr, so the
    benchmark's stdout holds its one JSON object only."""
    global _JSON_OUT
    sys.stdout.flush()
    _JSON_OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def emit(result: dict) -> None:
    """The benchmark's one JSON object on stdout."""
    out = _JSON_OUT or sys.stdout
    out.write(json.dumps(result, indent=None, sort_keys=False) + "\n")
    out.flush()


def workdir(name: str, override: str | None = None) -> str:
    """Where a benchmark keeps its model, data and runs (outside the repository; models and images are
    reused between runs, delete the directory to start afresh)."""
    import tempfile

    path = os.path.abspath(override or os.path.join(tempfile.gettempdir(), "raydiff-bench", name))
    os.makedirs(path, exist_ok=True)
    return path


class InstrumentedFactory:
    """A `module_factory` for `launch_training_task` that builds the same module `raydiff train` builds
    (`PipelineTrainingModule(cfg, device, training_components(cfg))`) and, inside the worker, times
    every wait for a batch (the worker's feed: Ray Data's iterator, read ahead from the first batch on).

    Each rank appends one JSON line per batch to `{out}.rank{r}.jsonl`: `wait_s` (blocked in the
    iterator's `next()`), `t` (perf_counter when the batch arrived), `cpu` (the worker process's CPU
    seconds so far, every thread: Ray's included), so consecutive records bound whole steps, and
    `maxrss` (the worker's peak resident memory so far, bytes). The header line holds the resident
    memory once the module is built (`model_rss`) and which pipeline components it loaded.
    Optionally pins torch to `threads` intra-op threads first.
    """

    def __init__(self, raw_config: dict, out: str, threads: int | None = None):
        self.raw_config, self.out, self.threads = raw_config, out, threads

    def __call__(self, device):
        import ray.train
        import torch

        from raydiff.config import parse_config
        from raydiff.training.module import PipelineTrainingModule

        if self.threads:
            torch.set_num_threads(self.threads)
        import resource

        from raydiff.data.encode import training_components

        cfg = parse_config(self.raw_config)
        module = PipelineTrainingModule(cfg, device, training_components(cfg))
        rank = ray.train.get_context().get_world_rank()
        path = f"{self.out}.rank{rank}.jsonl"
        with open(path, "w") as f:
            f.write(json.dumps({"torch_threads": torch.get_num_threads(),
                                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                "model_rss": current_rss_bytes(), "loaded": sorted(module.models.keys())}) + "\n")
        from raydiff.training.feed import EpochFeed

        original = EpochFeed.epoch  # what the loop iterates (the feed was built before this factory ran)

        def timed_epoch(self_, *args, **kwargs):
            it = iter(original(self_, *args, **kwargs))
            with open(path, "a") as f:
                while True:
                    start = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    now = time.perf_counter()
                    f.write(json.dumps({"t": now, "cpu": time.process_time(), "wait_s": now - start,
                                        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}) + "\n")
                    f.flush()
                    yield batch

        EpochFeed.epoch = timed_epoch
        return module


def read_instrumented(out: str, rank: int = 0) -> tuple[dict, list[dict]]:
    """(header, per-batch records) written by `InstrumentedFactory` for one rank."""
    with open(f"{out}.rank{rank}.jsonl") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[0], lines[1:]


def ship_with_ray() -> None:
    """Let Ray pickle this module's classes by value: workers do not have benchmarks/ on their path."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def loadavg() -> list[float]:
    """1/5/15-minute load averages: other work on the box inflates every timing."""
    return [round(x, 2) for x in os.getloadavg()]


def _machine_busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat, not idle or iowait)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _process_name(cmd: str) -> str:
    """'ray::RayTrainWorker', 'raylet', 'python dashboard.py', ... from a command line."""
    parts = cmd.split()
    if parts[0].startswith("ray::"):
        return parts[0]
    name = os.path.basename(parts[0])
    if name.startswith("python") and len(parts) > 1:
        name += " " + os.path.basename(parts[2] if parts[1] in ("-u", "-m") and len(parts) > 2 else parts[1])
    return name[:60]


class ProcessSampler:
    """Samples, in a background thread, the CPU seconds of this process and every descendant (the local
    Ray: GCS, raylet, dashboard, train workers, Ray Data tasks) and of each thread of the processes whose
    command line contains `thread_detail`. `cpu_between(t0, t1)` then says where the CPU went between
    two perf_counter times (CLOCK_MONOTONIC, so times from other processes on this machine compare)."""

    def __init__(self, interval: float = 1.0, thread_detail: str = "RayTrainWorker"):
        self.interval, self.thread_detail = interval, thread_detail
        self.samples: list[tuple[float, dict, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            procs, threads = {}, {}
            for p in [me, *me.children(recursive=True)]:
                try:
                    with p.oneshot():
                        cmd = " ".join(p.cmdline()) or p.name()
                        t = p.cpu_times()
                        procs[p.pid] = ("driver" if p.pid == me.pid else _process_name(cmd), t.user + t.system)
                        if self.thread_detail in cmd:
                            for th in p.threads():
                                try:
                                    with open(f"/proc/{p.pid}/task/{th.id}/comm") as f:
                                        tname = f.read().strip()
                                except OSError:
                                    tname = "?"
                                threads[(p.pid, th.id)] = (tname, th.user_time + th.system_time)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            procs[-1] = ("(whole machine)", _machine_busy_cpu_s())
            self.samples.append((time.perf_counter(), procs, threads))
            self._stop.wait(self.interval)

    def cpu_between(self, t0: float, t1: float) -> dict:
        """CPU seconds over [t0, t1], between the first and last samples inside it: "machine_cpu_s" (every
        process on the box), "other_processes_cpu_s" (not this process tree: other tenants, and our
        processes that exited inside the window), "by_process" and "worker_threads" ({name: CPU s},
        entries under 0.05 s left out)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {"window_s": round(t1 - t0, 2), "note": f"shorter than two samples ({self.interval} s apart)"}
        (ta, pa, tha), (tb, pb, thb) = inside[0], inside[-1]

        def grouped(before: dict, after: dict) -> dict[str, float]:
            out: dict[str, float] = {}
            for key, (name, cpu) in after.items():  # a process born inside the window counts from birth
                out[name] = out.get(name, 0.0) + cpu - before.get(key, (name, 0.0))[1]
            return out

        def shown(cpu: dict[str, float]) -> dict[str, float]:
            return {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.05}

        by_process = grouped(pa, pb)
        machine = by_process.pop("(whole machine)")
        # Another session's processes on the same box slow every timing: say how much CPU they took.
        return {"window_s": round(tb - ta, 2), "machine_cpu_s": round(machine, 2),
                "other_processes_cpu_s": round(max(machine - sum(by_process.values()), 0.0), 2),
                "by_process": shown(by_process), "worker_threads": shown(grouped(tha, thb))}
