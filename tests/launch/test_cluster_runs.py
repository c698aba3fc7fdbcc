"""Real Ray clusters started with `ray start` in subprocesses: `ray job submit` end to end with
token auth, and a two-node cluster on this one machine whose cross-node DDP run must train exactly
what the same run trains on a single node (bit for bit, here).

These clusters are separate from the suite's in-process `ray_session`: own ports, own `--temp-dir`,
own auth token, and RAY_ADDRESS set in their environment (so Ray components that auto-detect a
cluster, like Ray Train's PlacementGroupCleaner, never pick the other Ray on this machine). No
`ray.init` happens in the test process. They are torn down by process id (each `ray start --block`
process and its descendants), never with `ray stop`, which kills every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalRay:
    """Ray nodes on this machine, each a `ray start --block` subprocess, in token auth mode."""

    def __init__(self):
        # Short path: Ray's unix sockets live under it and must stay below ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rdr-", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        # The same auth mode and token on every node and every client (docs/cluster.md).
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.address,
                    "HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM tears a node down at once
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.nodes: list[tuple[subprocess.Popen, Path]] = []

    def _start(self, args: list[str], timeout: float = 120) -> None:
        log = Path(self.temp_dir, f"node{len(self.nodes)}.log")
        agent_port, client_port = free_ports(2)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [tool("ray"), "start", *args, "--temp-dir", self.temp_dir, "--disable-usage-stats", "--block",
                 "--dashboard-agent-listen-port", str(agent_port), "--ray-client-server-port", str(client_port)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append((proc, log))
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start {' '.join(args)}` did not come up:\n{log.read_text()[-5000:]}")
            time.sleep(0.2)

    def start_head(self, num_cpus: int) -> LocalRay:
        self._start(["--head", f"--port={self.gcs_port}", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port), "--num-cpus", str(num_cpus)])
        return self

    def add_node(self, num_cpus: int) -> None:
        self._start(["--address", self.address, "--num-cpus", str(num_cpus)])

    def run(self, *args: str, cwd=None, timeout: float = 240) -> subprocess.CompletedProcess:
        """A client command (`ray job ...`, `raydiff train`) with this cluster's address and token;
        past `timeout` it is killed and returns returncode "timeout" with the output it had written."""
        try:
            return subprocess.run(list(args), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:  # partial output comes back as bytes
            out, errout = (b.decode(errors="replace") if isinstance(b, bytes) else b or ""
                           for b in (err.stdout, err.stderr))
            return subprocess.CompletedProcess(err.cmd, "timeout", out, errout)

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it kills the processes it started), then SIGKILL whatever
        of its process tree (raylet workers, job drivers, dashboard modules) is still alive."""
        tree = []
        for proc, _ in reversed(self.nodes):  # worker nodes first, the head last
            try:
                tree += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for proc, _ in self.nodes:
            proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """One head for both tests (a head costs ~10 s to start here); the multi-node test adds a node."""
    ray = LocalRay()
    try:
        yield ray.start_head(num_cpus=4)
    finally:
        ray.stop()


def tiny_yaml(model: str, data: str, storage: str, name: str, **ray) -> str:
    raw = {"model": {"family": "flux", "path": model, "max_sequence_length": 16},
           "data": {"base_path": data, "metadata_path": os.path.join(data, "metadata.csv"), "height": 32, "width": 32},
           "lora": {"rank": 4},
           "train": {"learning_rate": 1e-3, "max_steps": 2, "log_steps": 1, "save_steps": 100, "batch_size": 1,
                     "seed": 7},
           "ray": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": storage, "name": name, **ray}}
    return yaml.safe_dump(raw, sort_keys=False)


def http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def train(ray: LocalRay, workdir: Path, name: str, *overrides: str) -> dict:
    """`raydiff train` joining `ray` through RAY_ADDRESS; returns the final checkpoint's state and LoRA."""
    proc = ray.run(tool("raydiff"), "train", "config.yaml", "--set", f"ray.name={name}",
                   *[a for o in overrides for a in ("--set", o)], cwd=workdir, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    return stored_run(workdir / "runs", name)


def stored_run(storage: Path, name: str) -> dict:
    """The state and LoRA of run `name`'s checkpoint at step 2."""
    checkpoint = storage / name / "checkpoint-000002"
    return {"state": json.loads((checkpoint / "trainer_state.json").read_text()),
            "lora": load_file(str(checkpoint / "pytorch_lora_weights.safetensors"))}


def submit(ray: LocalRay, job_dir: Path) -> None:
    """`ray job submit --working-dir job_dir -- raydiff train config.yaml`, which must succeed."""
    job_id = f"raydiff-test-{uuid.uuid4().hex[:8]}"
    proc = ray.run(tool("ray"), "job", "submit", "--address", ray.dashboard, "--submission-id", job_id,
                   "--working-dir", str(job_dir), "--", "raydiff", "train", "config.yaml", timeout=240)
    if proc.returncode != 0 or f"Job '{job_id}' succeeded" not in proc.stdout + proc.stderr:
        logs = ray.run(tool("ray"), "job", "logs", "--address", ray.dashboard, job_id, timeout=60)
        pytest.fail(f"ray job submit: rc={proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}\n"
                    f"--- ray job logs ---\n{(logs.stdout + logs.stderr)[-8000:]}")


def test_a_submitted_job_trains_and_the_same_run_across_two_nodes_matches_it(cluster, tiny_model, shapes,
                                                                             tmp_path):
    """`ray job submit` of a 2-worker run onto a one-node cluster (token auth on), then the same run by
    `raydiff train` joining the cluster after a second node joined, one rank on each node."""
    ray = cluster
    assert len(ray.nodes) == 1
    # Token mode is really on: the Jobs API refuses a request without the token.
    assert http_status(f"{ray.dashboard}/api/jobs/") == 401
    assert http_status(f"{ray.dashboard}/api/jobs/", {"Authorization": f"Bearer {ray.token}"}) == 200

    # Both "nodes" run on this machine, so a local storage_path is reachable from both; on a
    # real cluster it must be shared storage (S3, NFS): docs/cluster.md.
    storage = tmp_path / "runs"
    job_dir = tmp_path / "job"  # what --working-dir uploads: only the config; the job runs in it
    job_dir.mkdir()
    (job_dir / "config.yaml").write_text(
        tiny_yaml(tiny_model("flux"), shapes, str(storage), "one-node", num_workers=2, placement_strategy="PACK"))
    submit(ray, job_dir)
    assert sorted(p.name for p in (storage / "one-node").glob("checkpoint-*")) == ["checkpoint-000002"]
    single = stored_run(storage, "one-node")
    assert single["state"]["global_step"] == 2

    # Add a second node; STRICT_SPREAD puts one rank on each, DDP (gloo) goes across them.
    ray.add_node(num_cpus=2)
    (tmp_path / "config.yaml").write_text((job_dir / "config.yaml").read_text())
    spread = train(ray, tmp_path, "two-nodes", "ray.placement_strategy=STRICT_SPREAD")

    ranks = {w["rank"]: w["node_id"] for w in single["state"]["workers"]}
    assert sorted(ranks) == [0, 1] and ranks[0] == ranks[1]
    ranks = {w["rank"]: w["node_id"] for w in spread["state"]["workers"]}
    assert sorted(ranks) == [0, 1] and ranks[0] != ranks[1], spread["state"]["workers"]

    # Same seed -> the same training, which needs (a) the same LoRA init (loop.py seeds torch with
    # train.seed) and (b) the same samples on the same ranks in the same order: trainer.py sets Ray Data's
    # preserve_order, without which streaming_split(equal=True) hands blocks out by decode-task completion
    # order and (across nodes) by block locality. Step 1's loss depends only on the data and the per-rank
    # noise (lora_B starts at zero), so equal losses mean each rank got the same samples.
    losses = [[h["loss"] for h in run["state"]["log_history"]] for run in (single, spread)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6), losses
    assert single["lora"].keys() == spread["lora"].keys()
    assert any(v.abs().max() > 0 for k, v in single["lora"].items() if "lora_B" in k)  # it trained
    # Bitwise equal on this machine (gloo sums two ranks in the same order); the tolerance leaves room
    # for a different reduction order, not for different data.
    for key in single["lora"]:
        torch.testing.assert_close(single["lora"][key], spread["lora"][key], rtol=1e-5, atol=1e-7, msg=key)


def placement_groups(ray: LocalRay) -> list[str]:
    """The states of every placement group the cluster has had, from the State API."""
    request = urllib.request.Request(f"{ray.dashboard}/api/v0/placement_groups?limit=1000",
                                     headers={"Authorization": f"Bearer {ray.token}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return [pg["state"] for pg in json.load(r)["data"]["result"]["result"]]


def test_a_killed_driver_leaves_no_placement_group_behind(cluster, tiny_model, shapes, tmp_path):
    """raydiff runs without Ray Train's placement-group cleaner (RunTrainer in raydiff/launch/process_group.py):
    Ray frees a job's placement groups when its driver dies, even by SIGKILL in the middle of a run."""
    (tmp_path / "config.yaml").write_text(tiny_yaml(tiny_model("flux"), shapes, str(tmp_path / "runs"), "killed"))
    driver = subprocess.Popen([tool("raydiff"), "train", "config.yaml", "--set", "train.max_steps=10000",
                               "--set", "train.num_epochs=1000"], cwd=tmp_path, env=cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in driver.stdout:  # until the run trains
            seen.append(line)
            if "step 2/" in line:
                break
        assert "CREATED" in placement_groups(cluster), "".join(seen)[-4000:]
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 60
    while "CREATED" in (states := placement_groups(cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "CREATED" not in states, states
