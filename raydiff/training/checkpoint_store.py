"""Where a run's checkpoints are stored, and which of them are whole.

A run resumes from the newest checkpoint in `<storage>/<name>/` that carries `.raydiff-complete`,
whatever Ray's own list of checkpoints says: Ray registers a checkpoint only after uploading it, so a
run stopped between the two would otherwise resume from an older one and write over the newer ones.
The marker is written into the stored copy right after the upload, on local disk and on S3 alike.

In local mode (`ray.num_workers: 0`) Ray Train keeps no storage: the driver hands the loop the run
directory (`LoopArgs.storage`) and `store_checkpoint` does Ray's part, the upload and `num_to_keep`.

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


def run_storage(local: tuple[pafs.FileSystem, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, run directory) of the Ray Train run this worker belongs to: `local` in local mode, else
    Ray's `get_storage()`, a DeveloperAPI but the only way a worker learns where its checkpoints are."""
    if local is not None:
        return local
    import ray.train

    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.experiment_fs_path


def has_checkpoint(local: tuple[pafs.FileSystem, str] | None = None) -> bool:
    """Whether this worker's run resumes (a complete checkpoint on storage, or one Ray registered)."""
    import ray.train

    fs, run_dir = run_storage(local)
    return newest_complete_checkpoint(fs, run_dir) is not None or ray.train.get_checkpoint() is not None


def upload_and_mark_complete(checkpoint, dir_name: str):
    """`ray.train.report(checkpoint_upload_fn=...)`: Ray's own upload, then the completeness marker."""
    import ray.train

    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
    mark_complete(persisted.filesystem, persisted.path, int(_CHECKPOINT.search(dir_name).group(1)))
    return persisted


def store_checkpoint(directory: str, storage: tuple[pafs.FileSystem, str], step: int, keep: int | None) -> str:
    """Local mode: copy the checkpoint written in `directory` to the run directory, mark it complete, then
    delete the oldest before it beyond `keep` (ray.num_to_keep), as Ray Train does for its workers'
    checkpoints: never this one, and never a newer leftover (overwritten when the run gets there).
    Returns the stored path."""
    fs, run_dir = storage
    stored = f"{run_dir.rstrip('/')}/{checkpoint_name(step)}"
    fs.create_dir(stored, recursive=True)
    pafs.copy_files(directory, stored, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    mark_complete(fs, stored, step)
    if keep is not None:
        older = [path for s, path, _ in stored_checkpoints(fs, run_dir) if s < step]
        for path in older[:max(0, len(older) - (keep - 1))]:
            fs.delete_dir(path)
    return stored
