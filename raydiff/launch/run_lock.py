"""One run at a time per run directory: a lock file in `<storage>/<name>/`, local disk or S3.

Two runs with the same `ray.name` and `ray.storage_path` would both resume from the same checkpoint
and write the same checkpoint directories. The first takes `<storage>/<name>/.raydiff-lock.json`
(host, pid, start time, a heartbeat refreshed every `HEARTBEAT_S`); a second is refused in seconds,
naming the first. A lock whose owner is gone — its pid dead on this host, or its heartbeat older than
`STALE_S` on another host — is taken over with a message.

On local disk the lock is created with O_EXCL; on S3, where a conditional create is not available
through pyarrow, the writer reads the lock back after a short pause and gives way if another run's
token is there.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from raydiff.console import say

LOCK_FILE = ".raydiff-lock.json"
HEARTBEAT_S, STALE_S = 15.0, 60.0


class RunLockedError(RuntimeError):
    """Another live run holds the run directory."""


@dataclass
class RunLock:
    fs: pafs.FileSystem
    path: str  # the lock file, on `fs`
    display: str  # the run directory as the user wrote it (for messages)

    def __post_init__(self):
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the lock record --------------------------------------------------------------------

    def _record(self, started: float) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "heartbeat": time.time(),
                "token": self.token}

    def _read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _write(self, record: dict, exclusive: bool = False) -> bool:
        """Write the record; with `exclusive`, only if no lock file exists (atomically on local disk)."""
        data = json.dumps(record).encode()
        if exclusive and isinstance(self.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if exclusive and self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        tmp = f"{self.path}.{self.token}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path)
        return True

    # --- acquire, hold, release --------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError naming its holder. Starts the heartbeat."""
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        record = self._record(time.time())
        if not self._write(record, exclusive=True):
            holder = self._settled_holder()
            if holder is None:  # being written by another run (or unreadable): never taken over
                raise RunLockedError(f"{self.display} is locked by another run whose lock file {self.path} "
                                     f"cannot be read; delete that file if no run uses the directory")
            if is_alive(holder):
                raise RunLockedError(describe_holder(holder, self.display))
            say(f"[raydiff] taking over the lock of {self.display}: {describe_holder(holder)} is not running")
            self._write(record)
        if not isinstance(self.fs, pafs.LocalFileSystem):
            time.sleep(0.5)  # another writer racing us on S3 would have overwritten the lock by now
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                raise RunLockedError(describe_holder(holder or {}, self.display))
        self._thread = threading.Thread(target=self._beat, args=(record["started"],), daemon=True,
                                        name="raydiff-run-lock")
        self._thread.start()

    def refuse_if_held(self) -> None:
        """Raise RunLockedError if a live run holds the lock now: a quick look before the slow start-up,
        so a second run ends in seconds. `acquire` still decides."""
        holder = self._read()
        if holder is not None and is_alive(holder):
            raise RunLockedError(describe_holder(holder, self.display))

    def _settled_holder(self, tries: int = 10) -> dict | None:
        """The lock's record; a file another run has created but not yet written reads as None for a moment."""
        for _ in range(tries):
            if (holder := self._read()) is not None:
                return holder
            time.sleep(0.1)
        return None

    def _beat(self, started: float) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write(self._record(started))
            except OSError:
                pass  # storage hiccup: the next beat retries; a stale lock is only taken over after STALE_S

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            try:
                self.fs.delete_file(self.path)
            except OSError:
                pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def is_alive(holder: dict) -> bool:
    """Whether the lock's owner still runs: its pid on this host, its heartbeat elsewhere."""
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError):
            return True
        return True
    return time.time() - float(holder.get("heartbeat", 0)) < STALE_S


def describe_holder(holder: dict, run: str | None = None) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {started}"
    if run is None:
        return who
    return (f"{run} is in use by another run ({who}); wait for it to finish, stop it, or choose another "
            f"ray.name")
