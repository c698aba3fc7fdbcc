"""Where a run's checkpoints are stored, and which of them are whole.

A run resumes from the newest checkpoint in `<storage>/<name>/` that carries `.raydiff-complete`,
whatever Ray's own list of checkpoints says: Ray registers a checkpoint only after uploading it, so a
run stopped between the two would otherwise resume from an older one and write over the newer ones.
The marker is written into the stored copy right after the upload, on local disk and on S3 alike.

Light on imports (pyarrow only): the worker's data feed and the driver use it before the model stack
loads.
"""

from __future__ import annotations

import json
import re
import time

import pyarrow.fs as pafs

COMPLETE_FILE = ".raydiff-complete"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def mark_complete(fs: pafs.FileSystem, path: str, step: int) -> None:
    """Record that the checkpoint stored at `path` (on `fs`) is whole: call once its upload finished."""
    with fs.open_output_stream(f"{path.rstrip('/')}/{COMPLETE_FILE}") as f:
        f.write(json.dumps({"step": step, "time": time.time()}).encode())


def stored_checkpoints(fs: pafs.FileSystem, run_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of every `checkpoint-NNNNNN` directory under `run_dir`, oldest first."""
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(run_dir.rstrip("/"), allow_not_found=True)):
        if entry.type == pafs.FileType.Directory and (m := _CHECKPOINT.search(entry.base_name)):
            complete = fs.get_file_info(f"{entry.path}/{COMPLETE_FILE}").type == pafs.FileType.File
            found.append((int(m.group(1)), entry.path, complete))
    return sorted(found)


def newest_complete_checkpoint(fs: pafs.FileSystem, run_dir: str) -> tuple[int, str] | None:
    """(step, path) of the newest checkpoint marked complete under `run_dir`, or None."""
    complete = [(step, path) for step, path, done in stored_checkpoints(fs, run_dir) if done]
    return complete[-1] if complete else None


def run_storage() -> tuple[pafs.FileSystem, str]:
    """(filesystem, run directory) of the Ray Train run this worker belongs to. Ray's `get_storage()` is a
    DeveloperAPI, but the only way a worker learns where its checkpoints are stored."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.experiment_fs_path


def has_checkpoint() -> bool:
    """Whether this worker's run resumes (a complete checkpoint on storage, or one Ray registered)."""
    import ray.train

    fs, run_dir = run_storage()
    return newest_complete_checkpoint(fs, run_dir) is not None or ray.train.get_checkpoint() is not None


def upload_and_mark_complete(checkpoint, dir_name: str):
    """`ray.train.report(checkpoint_upload_fn=...)`: Ray's own upload, then the completeness marker."""
    import ray.train

    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
    mark_complete(persisted.filesystem, persisted.path, int(_CHECKPOINT.search(dir_name).group(1)))
    return persisted
