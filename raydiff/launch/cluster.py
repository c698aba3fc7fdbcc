"""The driver's Ray: start or join it, keep its own chatter out of a default run, tell whether it can
grow, stop it on Ctrl-C, and draw rank 0's progress in the driver's terminal.

A default run shows raydiff's lines and real errors only: worker output is not forwarded
(`log_to_driver=False`; rank 0's lines come through a `ConsoleRelay` actor instead) and Ray's own
driver-side loggers are kept to errors. `logging.verbose: true` (`--verbose`) restores both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import uuid
import warnings

import ray

from raydiff.config import RaydiffConfig
from raydiff.launch.interrupts import Terminated
from raydiff.training.reporting import ConsoleView, RelayChannel, relay_actor

# Ray Train's PreemptionWatcher, an actor polling for nodes being drained (spot instances), is for clusters: a
# local Ray that raydiff starts is one node that is never drained, so its runs go without one (one process and
# its imports fewer before the first step). Ray Train passes RAY_TRAIN_* variables on to its controller.
# The raylet prestarts one idle Python worker per logical CPU when the driver connects; Ray Train's and Ray
# Data's actors start their own processes anyway, so on a small machine those idle starts only compete with
# the run's (about 1 CPU-s each; the first step came 0.8 s sooner without them, docs/performance.md).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_prestart_worker_first_driver": "0"}


def init_ray(cfg: RaydiffConfig, dashboard: bool = False) -> bool:
    """Join `ray.address` / RAY_ADDRESS (as under `ray job submit`), else start a local Ray. Returns True
    when raydiff started it (a fixed-size cluster it may shut down), False when it joined or found one.

    A local Ray gets at least 4 logical CPUs: on a 2-core box, 2 training workers at 1 CPU each
    would otherwise leave nothing for the Ray Data decode stage and the run would hang. Its dashboard
    starts with `ray.dashboard` or `dashboard` (Tune frees a stopped trial's workers through it); without
    it a run reaches its first step sooner and no dashboard process polls the workers.
    """
    if ray.is_initialized():
        return False
    _auto_connect(True)
    verbose = cfg.logging.verbose
    if not verbose:
        quiet_ray_driver()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if verbose else logging.ERROR
    if address:
        source = check_ray_address(cfg)
        try:
            with _sigterm_handler_kept():
                ray.init(address=address, log_to_driver=verbose, logging_level=level)
        except ConnectionError as err:  # something answers there, but not a Ray head
            raise _no_ray(source, address, str(err).splitlines()[0]) from None
        return False
    # A new local Ray puts its own address in every worker's RAY_ADDRESS: Ray Train's placement-group
    # cleaner (which frees the workers of a trial ASHA stopped) otherwise looks for "the" local Ray and,
    # with a second Ray on the machine, fails, leaving that trial's CPUs taken (docs/ray_notes.md).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the GCS
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    try:
        with _sigterm_handler_kept():
            ray.init(num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1), log_to_driver=verbose,
                     logging_level=level, include_dashboard=dashboard or cfg.ray.dashboard,
                     runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}})
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]
    return True


def check_ray_address(cfg: RaydiffConfig, timeout_s: float = 5.0) -> str:
    """Refuse, in seconds, a Ray address (`ray.address`, else RAY_ADDRESS) `host:port` or `ray://host:port`
    where nothing answers: `ray.init` would retry it for minutes, printing Ray's connection warnings. `auto`
    and other forms are left to Ray. Returns where the address came from."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or ""
    source = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return source
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err)).lower()
        raise _no_ray(source, address, reason) from None
    return source


def _no_ray(source: str, address: str, reason: str) -> Exception:
    from raydiff.config import UserError

    return UserError(f"{source} {address}: no Ray there ({reason}); start its head with `ray start --head` or "
                     "leave ray.address unset to start a local Ray")


@contextlib.contextmanager
def _sigterm_handler_kept():
    """`ray.init` replaces the main thread's SIGTERM handler with one that exits with code 15 and no word.
    Keep a handler that was set before it (the CLI's: a stop while a run is starting ends as Ctrl-C does,
    with a message and exit 143), also for a SIGTERM that arrives while Ray starts; a process that set none
    gets Ray's."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    except SystemExit as exit_:  # Ray's handler, while ray.init ran
        if callable(previous) and exit_.code == signal.SIGTERM:
            raise Terminated from None
        raise
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def local_ray_resources(cfg: RaydiffConfig) -> dict:
    """The CPUs (and, where Ray would see them, GPUs) of the local Ray `init_ray` would start."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = len([d for d in visible.split(",") if d.strip()]) if visible is not None else _nvidia_gpus()
    return {"CPU": float(cfg.ray.num_cpus or max(4, os.cpu_count() or 1)), "GPU": float(gpus)}


def _nvidia_gpus() -> int:
    try:
        return len([e for e in os.listdir("/proc/driver/nvidia/gpus")])
    except OSError:
        return 0


def quiet_ray_driver() -> None:
    """Ray's INFO/WARNING lines in this process (the token-auth notice, "Started a local Ray", Ray Data's
    and Tune's progress) and its deprecation warnings; errors still print."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # Ray Data reconfigures its loggers from this
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    warnings.filterwarnings("ignore", message=".*RayDeprecationWarning.*")
    with contextlib.suppress(ImportError):
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    _drop_raylet_warnings()


def _drop_raylet_warnings() -> None:
    """The raylet pushes its warnings to the driver (e.g. "8 PYTHON worker processes have been started",
    which Tune's many small actors trigger on a small machine), and Ray prints them through the private
    `print_to_stdstream` with no setting to turn them off. Drop those warnings; errors still print."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "raydiff_filtered", False):
        return

    def filtered(data, ignore_prefix):
        if data.get("pid") == "raylet" and all("WARNING" in line for line in data.get("lines", [])):
            return
        original(data, ignore_prefix)

    filtered.raydiff_filtered = True
    worker.print_to_stdstream = filtered


def is_autoscaling() -> bool:
    """Whether the joined cluster has an autoscaler that can add nodes. Ray's monitor publishes its status
    in the GCS; without an autoscaling config it mirrors the existing nodes as node types named
    `node_<id>` (its read-only provider), so any other node type means nodes can be launched."""
    from ray.experimental.internal_kv import _internal_kv_get

    if _internal_kv_get("__autoscaler_v2_enabled") in (b"1", b"true", b"True"):
        return True
    raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        return False
    return autoscaling_in_status(json.loads(raw))


def autoscaling_in_status(status: dict) -> bool:
    """The rule of `is_autoscaling`, on the monitor's status JSON."""
    report = status.get("autoscaler_report") or {}
    types = set((report.get("node_type_mapping") or {}).values()) | set(report.get("pending_launches") or {})
    return any(not t.startswith("node_") for t in types)


def _auto_connect(enabled: bool) -> None:
    """Ray starts a fresh local cluster when any Ray call runs without one; while raydiff stops a run,
    threads still unwinding (the trainer's, the console's) must not do that. Ray reads
    RAY_ENABLE_AUTO_CONNECT once at import, into this private flag."""
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = enabled


def stop_ray(timeout_s: float = 8.0) -> None:
    """`ray.shutdown()`, bounded: a Ray busy waiting for resources must not keep Ctrl-C from ending the run."""
    _auto_connect(False)
    done = threading.Event()

    def shutdown():
        with contextlib.suppress(Exception):
            ray.shutdown()
        done.set()

    threading.Thread(target=shutdown, daemon=True, name="raydiff-ray-shutdown").start()
    done.wait(timeout_s)


_RELAYS: dict[tuple[str, str], object] = {}


def _driver_relay():
    """This driver's `ConsoleRelay`, started with its first run in the connected Ray and shared by the
    runs after it (a Python session or a test suite runs many). Owned by the driver, it ends with it."""
    context = ray.get_runtime_context()
    key = (context.gcs_address, context.get_job_id())
    if key not in _RELAYS:
        _RELAYS[key] = relay_actor().remote()
    return _RELAYS[key]


class DriverConsole:
    """Draws rank 0's console events in the driver: a `ConsoleRelay` actor collects them, a thread here
    drains it a few times a second into a `ConsoleView` (log lines, or a bar redrawn in place)."""

    def __init__(self, progress_bar: str, is_tty: bool | None = None, poll_s: float = 0.25):
        self.progress_bar, self.is_tty, self.poll_s = progress_bar, is_tty, poll_s
        self.relay = RelayChannel(_driver_relay(), uuid.uuid4().hex)
        self.view: ConsoleView | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True, name="raydiff-console")
        self._thread.start()

    def _pump(self) -> None:
        while ray.is_initialized():
            stopping = self._stop.is_set()
            self.show(self._drain())
            if stopping:
                return
            self._stop.wait(self.poll_s)

    def _drain(self) -> list:
        try:
            return ray.get(self.relay.drain(), timeout=5)
        except Exception:  # noqa: BLE001 - a stopped Ray: nothing more will come
            return []

    def show(self, events: list) -> None:
        for kind, payload in events:
            if kind == "start":  # a fresh view per attempt: a restarted worker group starts over
                if self.view is not None:
                    self.view.close()
                self.view = ConsoleView(self.progress_bar, payload["total"], payload["start"], self.is_tty)
            elif self.view is not None and kind == "log":
                self.view.log(payload)
            elif self.view is not None:
                self.view.write(payload)

    def close(self) -> None:
        """Show what is still queued, then stop drawing."""
        self._stop.set()
        self._thread.join(timeout=15)
        if self.view is not None:
            self.view.close()
