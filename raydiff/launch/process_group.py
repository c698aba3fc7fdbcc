"""The trainers raydiff fits, and the torch process group they set up, importable without torch.

Ray Train's controller is a new process for every run, and it sits on the critical path before the workers
start. It imports the module of each object it unpickles: `TorchConfig`'s module imports torch, 1.6 CPU-s
and about 1.6 s of every run's start on a 2-core box (docs/performance.md section 1). `ProcessGroupConfig`
does for raydiff's runs what `TorchConfig` does: gloo on CPUs, NCCL on GPUs, `env://` rendezvous. Its
backend runs Ray's own worker-side functions, imported inside the workers, which import torch anyway.
`TorchTrainer` itself is imported only when a trainer is built: `ray.train.torch` imports torch too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig


@dataclass
class ProcessGroupConfig(BackendConfig):
    """TorchConfig's fields but `init_method` (always `env://` here), for TorchTrainer's `torch_config`
    (which fills in `backend`)."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return CudaDevice

    @property
    def framework(self):  # Ray Train's run state records the framework's version
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class CudaDevice:
    """TorchConfig's train-function context (each worker's default CUDA device), entered in the worker."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        TorchConfigContextManager().__enter__()

    def __exit__(self, *exc):
        return False


class ProcessGroupBackend(Backend):
    """Ray's `_TorchBackend` for the `env://` rendezvous (the only one raydiff uses)."""

    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: ProcessGroupConfig):
        from ray.train._internal.utils import get_address_and_port

        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(set_rendezvous, address=address, port=port)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, init_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=n, timeout_s=backend_config.timeout_s)
                 for i in range(n)])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig):
        from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S as DEFAULT
        from ray.train.constants import TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S as VARIABLE

        futures = worker_group.execute_async(shutdown_torch, destroy_process_group=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=float(os.environ.get(VARIABLE, DEFAULT)))
        except ray.exceptions.GetTimeoutError:
            pass  # as Ray does: the workers are stopped next anyway


# In the workers:


def set_rendezvous(address: str, port: int) -> None:
    """MASTER_ADDR/PORT, and RANK, LOCAL_RANK, WORLD_SIZE... as torchrun sets them."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    _set_torch_distributed_env_vars()


def init_process_group(**kwargs) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(init_method="env://", **kwargs)


def shutdown_torch(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group)


def torch_trainer(trial: bool):
    """TorchTrainer for a Tune trial; for a run, TorchTrainer without Ray Train's placement-group cleaner.
    The cleaner is a detached actor (a new process: 1.2 CPU-s and about 1.2 s of every run on 2 cores,
    docs/performance.md section 1) that polls the State API each second to remove the run's placement group
    should its controller die while the driver lives on. Ray itself removes a job's placement groups when
    its driver exits or disconnects, which covers `raydiff train` and a Ctrl-C'd run (raydiff shuts Ray
    down). Tune's stopped trials are the case the cleaner exists for, so `raydiff tune` keeps it."""
    from ray.train.torch import TorchTrainer

    if trial:
        return TorchTrainer

    class RunTrainer(TorchTrainer):
        def _create_default_callbacks(self):  # Ray's private hook: the only place the callbacks are chosen
            from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return RunTrainer
