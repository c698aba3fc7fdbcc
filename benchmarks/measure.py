"""How the benchmarks measure and report: step times from the log history, a command's output marks,
where the machine's CPU went (`ProcessSampler`), the machine itself, and the one JSON object each
benchmark prints on stdout."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steady_steps_per_second(step_seconds: list[float], warmup: int) -> float:
    """Steps per second over the steps after `warmup` (total time / steps, not a mean of rates)."""
    timed = step_seconds[warmup:]
    assert timed, f"need more than {warmup} steps"
    return len(timed) / sum(timed)


def step_seconds_from_history(log_history: list[dict], batch_size: int, world: int) -> list[float]:
    """Per-step wall time from a run logged every step: each entry's window is one optimizer step,
    from the previous log line to this one (data wait, collate, forward, backward, step, log)."""
    return [batch_size * world / h["samples_per_second"] for h in log_history if "samples_per_second" in h]


def worker_cpu_per_step(profile: dict, steps: int, workers: int = 1, process: str = "ray::RayTrainWorker") -> float:
    """CPU seconds one training worker process spent per step, from a `ProcessSampler.cpu_between` window
    over `steps` steps (every thread of the worker: the step, the feed and Ray's own). In local mode the
    worker is the driver (`process="driver"`)."""
    return round(profile["by_process"].get(process, 0.0) / steps / workers, 4)


def latest_trainer_state(storage: str, name: str) -> dict:
    run = os.path.join(storage, name)
    checkpoints = sorted(d for d in os.listdir(run) if d.startswith("checkpoint-"))
    with open(os.path.join(run, checkpoints[-1], "trainer_state.json")) as f:
        return json.load(f)


def run_command(argv: list[str], marks: dict[str, str], timeout: float, env: dict | None = None,
                on_start=None) -> dict:
    """Run a command, timestamping (seconds since start) the first output line containing each of
    `marks`' values. Returns {"wall_s", "returncode", "marks": {name: seconds}, "started_at"
    (time.time()), "tail"}. `on_start(proc)` is called once the process runs (e.g. to sample its memory).

    A worker's line reaches the driver's stdout through Ray's log monitor, so a mark is an upper bound
    (it adds the forwarding delay, well under a second locally)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    start, started_at = time.perf_counter(), time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    if on_start is not None:
        on_start(proc)
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
            "started_at": started_at, "tail": lines[-15:]}


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


def timed_raydiff_run(cfg, warmup: int, threads: int, interval: float = 1.0) -> tuple[list[float], float, dict]:
    """Run `cfg` (1 worker, or local mode) through `launch_training_task`: the wall seconds of each timed
    step, the worker's CPU seconds per step, and where the machine's CPU went during those steps (per
    process of the local Ray, per thread of the worker). Checks every step was logged and the worker ran
    `threads` torch threads."""
    import ray

    from raydiff.launch.trainer import launch_training_task

    worker = "driver" if cfg.ray.local else "ray::RayTrainWorker"
    with ProcessSampler(interval=interval, thread_detail=None if cfg.ray.local else "RayTrainWorker") as sampler:
        launch_training_task(cfg)
    ray.shutdown()
    state = latest_trainer_state(cfg.ray.storage_path, cfg.ray.name)
    history = state["log_history"]
    wall = step_seconds_from_history(history, batch_size=1, world=1)
    total = cfg.train.max_steps
    assert len(wall) == total, f"expected {total} logged steps, got {len(wall)}"
    assert state["workers"][0]["torch_threads"] == threads, state["workers"]
    # Log line k is written at the end of step k, so (history[warmup], history[total - 1]) spans the
    # timed steps but the first.
    profile = sampler.cpu_between(history[warmup]["time"], history[total - 1]["time"])
    return wall[warmup:], worker_cpu_per_step(profile, total - 1 - warmup, process=worker), profile


class ProcessSampler:
    """Samples, in a background thread, the CPU seconds of this process and every descendant (the local
    Ray: GCS, raylet, dashboard, train workers, Ray Data tasks) and of each thread of the processes whose
    command line contains `thread_detail` (None: of this process). `cpu_between(t0, t1)` then says where the
    CPU went between two wall-clock times (`time.time()`, as the training log's `time` field records them)."""

    def __init__(self, interval: float = 1.0, thread_detail: str | None = "RayTrainWorker"):
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
                        if (p.pid == me.pid) if self.thread_detail is None else (self.thread_detail in cmd):
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
            self.samples.append((time.time(), procs, threads))
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
