"""Checkpoint storage on a real S3 server (moto's, on 127.0.0.1): the pre-flight check, and a Ray
training run that checkpoints to a bucket and resumes from it."""

from __future__ import annotations

import json
import socket
import time

import pytest

from raydiff.launch.storage import StorageError, check_storage, latest_checkpoint, storage_filesystem
from raydiff.launch.trainer import launch_training_task

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "raydiff-ckpt"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    for key, value in CREDS.items():
        monkeypatch.setenv(key, value)


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def keys(endpoint: str, prefix: str) -> list[str]:
    pages = client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_storage_filesystem_maps_s3_uris_and_leaves_local_paths(aws_env, tmp_path):
    fs, path = storage_filesystem(f"s3://{BUCKET}/runs/", "http://127.0.0.1:9000")
    assert path == f"{BUCKET}/runs"
    options = fs.__reduce__()[1][0]  # what the pickled copy sent to Ray workers carries
    assert (options["endpoint_override"], options["scheme"]) == ("127.0.0.1:9000", "http")
    assert options["region"] == "us-east-1"
    assert (options["access_key"], options["secret_key"]) == ("testing", "testing")
    fs, _ = storage_filesystem(f"s3://{BUCKET}", "minio.example:9000")  # no scheme, not local: https
    assert fs.__reduce__()[1][0]["scheme"] == "https"
    assert storage_filesystem(str(tmp_path)) == (None, str(tmp_path))


def test_check_storage_passes_for_a_writable_bucket_and_leaves_no_probe(s3_endpoint, aws_env):
    check_storage(f"s3://{BUCKET}/probe-ok", s3_endpoint)
    assert not [k for k in keys(s3_endpoint, "probe-ok") if ".raydiff-probe" in k]


@pytest.mark.parametrize("case", ["missing bucket", "nothing listening", "never answers"])
def test_check_storage_fails_fast_naming_the_storage(s3_endpoint, aws_env, case):
    storage, endpoint, silent = f"s3://{BUCKET}/runs", s3_endpoint, None
    if case == "missing bucket":
        storage = "s3://no-such-bucket/runs"
    elif case == "nothing listening":
        endpoint = f"http://127.0.0.1:{free_port()}"
    else:  # accepts the TCP connection (kernel backlog) and never replies
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    start = time.monotonic()
    try:
        with pytest.raises(StorageError) as err:
            check_storage(storage, endpoint, timeout_s=4)
    finally:
        if silent is not None:
            silent.close()
    assert time.monotonic() - start < 4.5
    assert f"cannot reach checkpoint storage {storage} (endpoint {endpoint}): " in str(err.value)
    if case == "missing bucket":
        assert "NO_SUCH_BUCKET" in str(err.value) or "does not exist" in str(err.value)


def test_check_storage_local_paths(tmp_path):
    check_storage(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot reach checkpoint storage .*file/runs: "):
        check_storage(str(tmp_path / "file" / "runs"))


def test_latest_checkpoint_skips_incomplete_ones(s3_endpoint, aws_env, tmp_path):
    fs, path = storage_filesystem(f"s3://{BUCKET}/latest", s3_endpoint)
    for key in ["checkpoint-000002/trainer_state.json", "checkpoint-000010/trainer_state.json",
                "checkpoint-000012/pytorch_lora_weights.safetensors", "other/trainer_state.json"]:
        with fs.open_output_stream(f"{path}/run/{key}") as f:
            f.write(b"{}")
    assert latest_checkpoint(f"s3://{BUCKET}/latest", "run", s3_endpoint) == \
        f"s3://{BUCKET}/latest/run/checkpoint-000010"
    assert latest_checkpoint(f"s3://{BUCKET}/latest", "none", s3_endpoint) is None
    (tmp_path / "run" / "checkpoint-000003").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-000003" / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "checkpoint-000004").mkdir()
    assert latest_checkpoint(str(tmp_path), "run") == str(tmp_path / "run" / "checkpoint-000003")


@pytest.mark.slow
def test_local_and_worker_runs_checkpoint_to_s3_and_resume_each_other(ray_session, make_config, s3_endpoint, aws_env):
    from raydiff.launch.trainer import build_trainer

    storage = f"s3://{BUCKET}/runs"
    check_storage(storage, s3_endpoint)
    # Local mode stores its checkpoints on S3 as Ray does, the newest ray.num_to_keep (3) kept, each marked
    # complete.
    local = make_config("s3run", train={"max_steps": 4, "save_steps": 1},
                        ray={"num_workers": 0, "storage_path": storage, "storage_endpoint": s3_endpoint})
    launch_training_task(local)
    first = read_state(s3_endpoint, "runs/s3run/checkpoint-000004")
    assert [h["step"] for h in first["log_history"]] == [1, 2, 3, 4]
    stored = set(keys(s3_endpoint, "runs/s3run/"))
    assert {k.split("/")[2] for k in stored if "/checkpoint-" in k} == {f"checkpoint-00000{s}" for s in (2, 3, 4)}
    assert {f"runs/s3run/checkpoint-00000{s}/.raydiff-complete" for s in (2, 3, 4)} <= stored

    # Ray Train's workers resume from that S3 checkpoint and store theirs there through Ray. Ray's processes
    # started before aws_env set the variables: the filesystem object carries the endpoint and credentials
    # itself when Ray pickles it to the workers.
    fs, path = storage_filesystem(storage, s3_endpoint)
    cfg = make_config("s3run", train={"max_steps": 6, "save_steps": 1})
    cfg.ray.storage_path = path
    resumed = build_trainer(cfg, storage_filesystem=fs).fit()
    assert resumed.error is None
    assert resumed.checkpoint.path == f"{BUCKET}/runs/s3run/checkpoint-000006"
    stored = set(keys(s3_endpoint, "runs/s3run/"))
    for step in (5, 6):
        for name in ("pytorch_lora_weights.safetensors", "trainer_state.json", "training_state.pt",
                     ".raydiff-complete"):
            assert f"runs/s3run/checkpoint-{step:06d}/{name}" in stored, sorted(stored)
    assert latest_checkpoint(storage, "s3run", s3_endpoint) == f"{storage}/s3run/checkpoint-000006"
    state = read_state(s3_endpoint, "runs/s3run/checkpoint-000006")
    assert [h["step"] for h in state["log_history"]] == list(range(1, 7))  # no repeat, no gap
    # Steps 1-4 came from the S3 checkpoint, not from retraining: a fresh run would log other timings.
    assert state["log_history"][:4] == first["log_history"]

    # And local mode continues the workers' run, pruning to the newest 3 again.
    local.train.max_steps = 8
    launch_training_task(local)
    last = read_state(s3_endpoint, "runs/s3run/checkpoint-000008")
    assert [h["step"] for h in last["log_history"]] == list(range(1, 9))
    assert last["log_history"][:6] == state["log_history"]
    stored = set(keys(s3_endpoint, "runs/s3run/"))
    assert {k.split("/")[2] for k in stored if "/checkpoint-" in k} == {f"checkpoint-00000{s}" for s in (6, 7, 8)}


def read_state(endpoint: str, checkpoint_key: str) -> dict:
    body = client(endpoint).get_object(Bucket=BUCKET, Key=f"{checkpoint_key}/trainer_state.json")["Body"]
    return json.loads(body.read())


def test_preprocess_cache_layout_on_s3(s3_endpoint, aws_env, monkeypatch):
    """data.cache_dir: s3://... goes through pyarrow's S3 filesystem, which takes an S3-compatible
    server from AWS_ENDPOINT_URL: manifests and shards are written whole, read back, cleared."""
    import pyarrow as pa

    from raydiff.data.cache_io import CacheLayout

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    layout = CacheLayout(f"s3://{BUCKET}/cache/run")
    assert layout.read_manifest() is None
    layout.write_manifest({"complete": False})
    layout.write_table(layout.shard(0), pa.table({"_row": [0, 1]}))
    assert layout.read_manifest() == {"complete": False} and layout.exists(layout.shard(0))
    files = lambda: sorted(k for k in keys(s3_endpoint, "cache/") if not k.endswith("/"))  # noqa: E731 (not dir markers)
    assert files() == ["cache/run/manifest.json", "cache/run/shards/shard-000000.parquet"]
    layout.clear()
    assert files() == []


def test_completeness_markers_decide_the_resume_point_on_s3(s3_endpoint, aws_env):
    from raydiff.training.checkpoint_store import mark_complete, newest_complete_checkpoint

    storage = f"s3://{BUCKET}/marked"
    fs, path = storage_filesystem(storage, s3_endpoint)
    for step in (2, 4, 6):  # 6 has every file but was never marked: its upload did not finish
        with fs.open_output_stream(f"{path}/run/checkpoint-{step:06d}/trainer_state.json") as f:
            f.write(b"{}")
    for step in (2, 4):
        mark_complete(fs, f"{path}/run/checkpoint-{step:06d}", step)
    assert newest_complete_checkpoint(fs, f"{path}/run") == (4, f"{path}/run/checkpoint-000004")
    assert latest_checkpoint(storage, "run", s3_endpoint) == f"{storage}/run/checkpoint-000004"


def test_the_run_lock_works_on_s3(s3_endpoint, aws_env):
    import os

    import pyarrow.fs as pafs

    from raydiff.launch.run_lock import LOCK_FILE, RunLock, RunLockedError
    from raydiff.launch.storage import run_directory

    fs, run = run_directory(f"s3://{BUCKET}/locks", "run", s3_endpoint)
    first = RunLock(fs, f"{run}/{LOCK_FILE}", f"s3://{BUCKET}/locks/run")
    first.acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(fs, f"{run}/{LOCK_FILE}", f"s3://{BUCKET}/locks/run").acquire()
    first.release()
    assert fs.get_file_info(f"{run}/{LOCK_FILE}").type == pafs.FileType.NotFound
