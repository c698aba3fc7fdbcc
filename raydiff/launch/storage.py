"""Checkpoint storage: a local directory or an S3(-compatible) bucket (AWS, MinIO, moto, Ceph).

`storage_filesystem` turns `ray.storage_path` (+ `ray.storage_endpoint` / `ray.storage_region`) into
what `RunConfig(storage_path=..., storage_filesystem=...)` takes. The S3 filesystem carries the
driver's AWS credentials explicitly (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN),
so the pickled copy Ray ships to every worker works on nodes without those variables. Without them,
each process falls back to the AWS SDK chain (~/.aws, instance profile).
`check_storage` writes and deletes a probe object before training so a wrong endpoint, a missing
bucket or a read-only prefix fails in seconds, not after the first checkpoint.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs
import yaml

from raydiff.training.checkpoint_store import newest_complete_checkpoint, stored_checkpoints


class StorageError(RuntimeError):
    """Checkpoint storage that cannot be reached, does not exist or is not writable."""


def _s3(endpoint: str | None, region: str | None, timeout_s: float | None = None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
        local = url.hostname in ("127.0.0.1", "localhost", "::1")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or ("http" if local else "https"))
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    if timeout_s is not None:
        kwargs.update(connect_timeout=max(0.5, timeout_s / 3), request_timeout=max(0.5, timeout_s / 2),
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    return pafs.S3FileSystem(**kwargs)


def local_path(storage_path: str) -> str | None:
    """The directory a local storage path names (a plain path or a `file://` URI); None for remote storage."""
    if storage_path.startswith("file://"):
        return storage_path[len("file://"):]
    return None if "://" in storage_path else storage_path


def _resolve(storage_path: str, endpoint: str | None, region: str | None,
             timeout_s: float | None = None) -> tuple[pafs.FileSystem | None, str]:
    if storage_path.startswith("s3://"):
        path = storage_path[len("s3://"):].strip("/")
        if not path:
            raise StorageError(f"checkpoint storage {storage_path!r} names no bucket")
        return _s3(endpoint, region, timeout_s), path
    local = local_path(storage_path)
    return None, storage_path if local is None else local  # gs://, hdfs://, ...: Ray resolves these itself


def storage_filesystem(storage_path: str, endpoint: str | None = None,
                       region: str | None = None) -> tuple[pafs.FileSystem | None, str]:
    """`s3://bucket/prefix` -> (S3FileSystem, "bucket/prefix"); a local path -> (None, path).
    Other URIs (gs://, hdfs://) -> (None, uri), left to Ray. Pass both to RunConfig."""
    return _resolve(storage_path, endpoint, region)


def _where(storage_path: str, endpoint: str | None) -> str:
    return f"{storage_path} (endpoint {endpoint})" if endpoint else storage_path


def _probe(storage_path: str, endpoint: str | None, region: str | None, timeout_s: float) -> None:
    fs, path = _resolve(storage_path, endpoint, region, timeout_s)
    if fs is None and "://" not in path:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
        fs = pafs.LocalFileSystem()
    elif fs is None:
        fs, path = pafs.FileSystem.from_uri(path)
    probe = f"{path.rstrip('/')}/.raydiff-probe-{uuid.uuid4().hex}"
    with fs.open_output_stream(probe) as f:
        f.write(b"raydiff storage probe\n")
    fs.delete_file(probe)


def check_storage(storage_path: str, endpoint: str | None = None, region: str | None = None,
                  timeout_s: float = 10) -> None:
    """Write and delete a probe object under `storage_path` (creating a local directory first).
    Raises StorageError within ~timeout_s when the storage is unreachable, the bucket is missing or
    the prefix is not writable."""
    error: list[BaseException] = []

    def run():
        try:
            _probe(storage_path, endpoint, region, timeout_s)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            error.append(exc)

    # The SDK's own timeouts are not all honoured (pyarrow ignores request_timeout on Linux), so the
    # probe runs in a daemon thread and a server that accepts but never answers still fails in time.
    thread = threading.Thread(target=run, name="raydiff-storage-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        reason = f"no answer within {timeout_s:g} s"
    elif error:
        reason = " ".join(str(error[0]).split()) or type(error[0]).__name__
    else:
        return
    raise StorageError(f"cannot reach checkpoint storage {_where(storage_path, endpoint)}: {reason}")


def run_directory(storage_path: str, name: str, endpoint: str | None = None,
                  region: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of `<storage_path>/<name>`, local or remote (pyarrow resolves gs:// and the like)."""
    fs, path = _resolve(storage_path, endpoint, region)
    if fs is None:
        fs, path = (pafs.LocalFileSystem(), path) if "://" not in path else pafs.FileSystem.from_uri(path)
    return fs, f"{path.rstrip('/')}/{name}"


def display_path(storage_path: str, path: str) -> str:
    """A filesystem path in the form of `storage_path` (s3://... or local)."""
    return storage_path[: storage_path.index("://") + 3] + path if "://" in storage_path else path


def latest_checkpoint(storage_path: str, name: str, endpoint: str | None = None,
                      region: str | None = None) -> str | None:
    """The checkpoint a re-run of `<storage_path>/<name>` resumes from, in the form of `storage_path`
    (s3://... or local), or None: the newest marked complete (raydiff.training.checkpoint_store) or, in
    a run written before completeness markers, the newest holding trainer_state.json."""
    fs, run_dir = run_directory(storage_path, name, endpoint, region)
    found = newest_complete_checkpoint(fs, run_dir)
    if found is None:
        legacy = [(step, path) for step, path, _ in stored_checkpoints(fs, run_dir)
                  if fs.get_file_info(f"{path}/trainer_state.json").type == pafs.FileType.File]
        found = legacy[-1] if legacy else None
    return display_path(storage_path, found[1]) if found else None


@dataclass
class ResumePoint:
    """The newest complete checkpoint of a run, as the driver sees it before starting Ray."""

    path: str  # in the form of ray.storage_path
    step: int
    epoch: int
    config: dict  # the config it was trained with


def resume_point(storage_path: str, name: str, endpoint: str | None = None,
                 region: str | None = None) -> ResumePoint | None:
    path = latest_checkpoint(storage_path, name, endpoint, region)
    if path is None:
        return None
    fs, run_dir = run_directory(storage_path, name, endpoint, region)
    stored = f"{run_dir}/{path.rstrip('/').rsplit('/', 1)[-1]}"
    with fs.open_input_stream(f"{stored}/trainer_state.json") as f:
        state = json.loads(f.read().decode())
    try:
        with fs.open_input_stream(f"{stored}/config.yaml") as f:
            config = yaml.safe_load(f.read().decode()) or {}
    except (FileNotFoundError, OSError):
        config = {}
    return ResumePoint(path, int(state.get("global_step", 0)), int(state.get("epoch", 0)), config)


def config_changes(old: dict, new: dict, limit: int = 8) -> list[str]:
    """`section.key: old -> new` for each setting that differs between two config dicts."""
    changes = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
        elif a != b:
            changes.append(f"{section}: {'set' if b is not None else 'removed'}")
    return changes[:limit] + ([f"... {len(changes) - limit} more"] if len(changes) > limit else [])
