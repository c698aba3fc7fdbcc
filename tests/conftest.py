"""Shared fixtures: one Ray instance per test session, tiny models written once, small datasets."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # faster report/finish detection

import signal
import subprocess
import threading
import time

import pytest

from raydiff.config import parse_config
from raydiff.console import quiet_libraries
from raydiff.data.shapes import write_shapes_dataset
from raydiff.registry import get_pipeline_class

quiet_libraries()

# Ctrl-C as in a terminal, even when the suite was started in the background by a non-interactive shell, which
# makes SIGINT ignored: Python then keeps ignoring it, and so would every raydiff command a test starts.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def ray_session():
    """Ray with 4 logical CPUs (logical over-commit, as Ray's own tests do on small boxes), started as
    `raydiff train` starts a local Ray: no dashboard (its processes poll all the time, about 3% of this box;
    no test runs Tune trials here: the Tune search test runs `raydiff tune` on its own Ray, which has one).

    The GCS port is pinned so that every worker gets RAY_ADDRESS, as `raydiff train` does for its local Ray
    (raydiff.launch.cluster.init_ray): with another local Ray on the machine (a second test run, or a test's
    own), Ray's State API cannot tell which is its own."""
    import socket

    import ray

    from raydiff.launch.cluster import LOCAL_TRAIN_ENV

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ.update(LOCAL_TRAIN_ENV)  # as `raydiff train` sets for the local Ray it starts
    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": "1",
                                           "RAY_ADDRESS": f"127.0.0.1:{port}"}})
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("flux") or tiny_model("wan", "wan22_a14b") -> path of a tiny random pipeline, written once
    per session."""
    cache: dict[tuple, str] = {}

    def make(family: str = "flux", variant: str | None = None) -> str:
        if (family, variant) not in cache:
            path = str(tmp_path_factory.mktemp(f"tiny-{family}-{variant or 'default'}"))
            get_pipeline_class(family).write_tiny(path, **({"variant": variant} if variant else {}))
            cache[family, variant] = path
        return cache[family, variant]

    return make


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_model, tmp_path_factory):
    """tiny_controlnet("flux") -> a copy of the tiny pipeline with a tiny ControlNet in its `controlnet/` folder
    (what `raydiff tiny-model FAMILY DIR --controlnet` writes), once per session."""
    import shutil

    from raydiff.pipelines.controlnet import write_tiny_controlnet

    cache: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in cache:
            path = str(tmp_path_factory.mktemp(f"tiny-{family}-controlnet"))
            shutil.copytree(tiny_model(family), path, dirs_exist_ok=True)
            write_tiny_controlnet(get_pipeline_class(family), path)
            cache[family] = path
        return cache[family]

    return make


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> str:
    """16 shapes images, 32x32, with captions; returns the directory (metadata.csv inside)."""
    path = str(tmp_path_factory.mktemp("shapes"))
    write_shapes_dataset(path, n=16)
    return path


@pytest.fixture
def make_config(tiny_model, shapes, tmp_path):
    """make_config(name, train={"max_steps": 2}, ...) -> a small valid config over the shapes data;
    section dicts are merged into the defaults, None removes a section (e.g. lora=None)."""
    return lambda name="run", family="flux", **sections: tiny_config(
        tiny_model(family), shapes, str(tmp_path / "runs"), name, **sections)


@pytest.fixture(scope="session")
def one_worker_run(ray_session, tiny_model, shapes, tmp_path_factory):
    """(config, result, final trainer state, final LoRA) of a 4-step run named "newest" on one Ray Train worker,
    checkpoints at steps 2 and 4, trained once per session (a run on workers costs ~9 s here). Local mode must
    train the same (test_local_mode.py); test_hardening.py moves its resume point and trains on in its directory,
    so the state and the LoRA are read here, first."""
    from raydiff.launch.trainer import launch_training_task

    cfg = tiny_config(tiny_model("flux"), shapes, str(tmp_path_factory.mktemp("one-worker")), "newest",
                      train={"max_steps": 4, "save_steps": 2, "num_epochs": 2})
    result = launch_training_task(cfg)
    return (cfg, result, *final(result))


def final(result) -> tuple[dict, dict]:
    """(trainer state, LoRA tensors) of a run's final checkpoint, from `launch_training_task`'s result."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    checkpoint = Path(result.checkpoint.path)
    return (json.loads((checkpoint / "trainer_state.json").read_text()),
            load_file(str(checkpoint / "pytorch_lora_weights.safetensors")))


def tiny_config(model_path: str, data_dir: str, storage: str, name: str, **sections):
    raw = {
        "model": {"family": "flux", "path": model_path, "max_sequence_length": 16},
        "data": {"base_path": data_dir, "metadata_path": os.path.join(data_dir, "metadata.csv"),
                 "height": 32, "width": 32},
        "lora": {"rank": 4},
        "train": {"learning_rate": 1e-3, "log_steps": 1, "save_steps": 100, "batch_size": 1},
        "ray": {"num_workers": 1, "storage_path": storage, "name": name, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if values is not None else None
    return parse_config(raw)


class Started:
    """A command started now and read later with `result()`. A fresh Python process spends seconds importing on
    one core; tests that start their independent commands together keep the other core busy. `elapsed`: the
    seconds from its start to its exit."""

    def __init__(self, args: list[str], **kwargs):
        self.args, self.elapsed, self._output = args, None, None
        self._start = time.monotonic()
        self.proc = subprocess.Popen(args, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
                                              **kwargs})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        self._output = self.proc.communicate()
        self.elapsed = time.monotonic() - self._start

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        self._reader.join(timeout)
        if self._reader.is_alive():
            self.proc.kill()
            self._reader.join()
            pytest.fail(f"{' '.join(self.args)} ran past {timeout} s:\n{self._output}")
        return subprocess.CompletedProcess(self.args, self.proc.returncode, *self._output)

    def stop(self) -> None:
        """Ctrl-C for a command still running, so that a raydiff command shuts its Ray down."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self._reader.join(30)
            if self._reader.is_alive():
                self.proc.kill()
                self._reader.join()


@pytest.fixture(scope="module")
def start_command():
    """start_command(args, **popen_kwargs) -> Started. What no test of the module read (one test run alone, or a
    test that failed first) is stopped when the module ends."""
    started: list[Started] = []

    def start(args: list[str], **kwargs) -> Started:
        started.append(Started(args, **kwargs))
        return started[-1]

    yield start
    for command in started:
        command.stop()


@pytest.fixture
def lora_key_warnings(caplog):
    """lora_key_warnings(fn) -> diffusers' missing/unexpected-key messages logged while fn() runs.
    The session silences diffusers (quiet_libraries), so this turns its warnings back on for fn."""
    import logging

    import diffusers

    def run(fn):
        logger = diffusers.utils.logging.get_logger("diffusers")
        level = logger.level
        diffusers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.enable_propagation()
        try:
            with caplog.at_level(logging.WARNING, logger="diffusers"):
                caplog.clear()
                fn()
        finally:
            logger.setLevel(level)
        return [r.getMessage() for r in caplog.records
                if "unexpected keys" in r.getMessage().lower() or "missing keys" in r.getMessage().lower()]

    return run
