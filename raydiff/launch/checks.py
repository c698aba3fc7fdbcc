"""What the driver checks before training starts, so that everyday mistakes end in seconds with one clear
line (`raydiff: error: ...`, exit 2) instead of a worker's traceback minutes later.

    check_model(cfg)            model.path exists (or, offline, is cached), holds the configured family and,
                                for two experts, model.expert names one
    check_lora_file(cfg)        lora.init_from exists and is a safetensors file (at once, before Ray starts)
    check_lora(cfg)             lora.target_modules match as meant and lora.init_from loads into the adapter
    check_batch_sizes(cfg, rows) batch_size > 1 needs samples of one size
    check_validation_images(cfg) validation.images exist (edit families' sources for the validation grid)
    check_resources(cfg)        the cluster can hold the workers and a decode task (needs a running Ray)
    check_devices(cfg)          model.quantize fp8/nf4 and train.optimizer find their libraries and a CUDA GPU
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from raydiff.config import GPU_ONLY_QUANTIZE, ConfigError, RaydiffConfig
from raydiff.config.libraries import libraries_used
from raydiff.console import quiet_imports, quiet_libraries, say
from raydiff.registry import family_for_pipeline, holds_family, pipeline_class_names

_MAX_SIZE_CHECKS = 4096  # image headers read to check batch sizes; larger datasets are sampled


def check_model(cfg: RaydiffConfig) -> None:
    """`model.path` is a diffusers-format directory holding the configured family's pipeline, or a hub id
    (which, with HF_HUB_OFFLINE set, must be in the local Hugging Face cache)."""
    path, family = cfg.model.path, cfg.model.family
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise ConfigError(f"model.path {path} is not a diffusers pipeline directory (no model_index.json)")
        try:
            with open(index) as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.path {path}: cannot read model_index.json: {err}") from None
        found = meta.get("_class_name", "?")
        if not holds_family(family, meta):
            other = family_for_pipeline(found)
            hint = f"; set model.family: {other}" if other and other != family else ""
            names = " or ".join(n.replace("+", " with ") for n in pipeline_class_names(family))
            raise ConfigError(f"model.family is {family!r} (a {names}), but {path} holds a {found}{hint}")
        check_expert(cfg.model.expert, meta.get("boundary_ratio"), path)
        return
    if _looks_local(path):
        raise ConfigError(f"model.path {path}: no such directory{_close_names(path)}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "model_index.json", revision=cfg.model.revision)
        if not isinstance(cached, str):
            raise ConfigError(f"model.path {path} is neither a local directory nor, with HF_HUB_OFFLINE=1, in the "
                              f"Hugging Face cache; download it first or point model.path at a local copy")


def check_expert(expert: str | None, boundary_ratio: float | None, path: str) -> None:
    """`model.expert` is set exactly when the pipeline has two experts (a `boundary_ratio` in its
    model_index.json, as diffusers writes it for Wan 2.2 A14B)."""
    if expert is not None and boundary_ratio is None:
        raise ConfigError(f"model.expert {expert}: {path} has one denoiser (no boundary_ratio); unset model.expert")
    if expert is None and boundary_ratio is not None:
        raise ConfigError(f"{path} has two experts (boundary_ratio {boundary_ratio}); set model.expert: high or "
                          f"low, one run per expert")


def check_lora_file(cfg: RaydiffConfig) -> None:
    """`lora.init_from` names a readable safetensors file (or a checkpoint directory holding one). Only its
    header is read, so a wrong path ends in a second, before Ray starts; `check_lora` then loads it."""
    path = cfg.lora.init_from if cfg.lora is not None else None
    if not path:
        return
    if not os.path.exists(path):
        raise ConfigError(f"lora.init_from {path}: no such file or checkpoint directory")
    from safetensors import SafetensorError, safe_open

    from raydiff.training.lora_formats import lora_file

    try:
        with safe_open(lora_file(path), "np"):
            pass
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"lora.init_from: {lora_file(path)} is not a safetensors file ({err})") from None


def check_lora(cfg: RaydiffConfig) -> None:
    """What a worker does with the `lora:` section, done on the base model's skeleton (built from its config on
    the meta device, no weights read): resolve `lora.target_modules` (README: target matching), inject the
    adapter, load `lora.init_from` into it. Only when one of those two keys is set: it imports diffusers and
    peft, which a driver otherwise never does."""
    lora = cfg.lora
    if lora is None or not (lora.init_from or lora.target_modules):
        return
    check_lora_file(cfg)
    from raydiff.registry import get_pipeline_class

    with quiet_imports():
        from raydiff.training import lora as lora_lib

        model = lora_lib.empty_component(cfg.model.path, lora.base_model, revision=cfg.model.revision)
    quiet_libraries()
    if model is None:  # not a diffusers model (a text encoder): peft reports its own mismatches in the worker
        return
    try:
        config = lora_lib.inject_lora(
            model, target_modules=lora.target_modules or get_pipeline_class(cfg.model.family).default_lora_targets,
            rank=lora.rank, alpha=lora.alpha, adapter_type=lora.type, lokr_factor=lora.lokr_factor,
            defaults=not lora.target_modules)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if lora.init_from:
        try:
            with warnings.catch_warnings():  # loading into meta parameters is a no-op: it checks names and shapes
                warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter")
                lora_lib.load_lora_into(model, lora.init_from, lora_lib.key_prefix(lora.base_model),
                                        family=cfg.model.family, config=config)
        except (ValueError, OSError) as err:
            raise ConfigError(f"lora.init_from: {err}") from None


def check_validation_images(cfg: RaydiffConfig) -> None:
    """Every `validation.images` path exists (rank 0 reads them at its first checkpoint, too late to learn it)."""
    for i, images in enumerate(cfg.validation.images):
        for path in [images] if isinstance(images, str) else images:
            if not os.path.isfile(path):
                raise ConfigError(f"validation.images[{i}]: {path}: no such file")


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, dotted, nested, or under a
    directory that exists here."""
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1 or path.endswith("/"):
        return True
    return os.path.isdir(path.split("/")[0])


def _close_names(path: str) -> str:
    import difflib

    parent = os.path.dirname(path.rstrip("/")) or "."
    try:
        siblings = sorted(e.name for e in os.scandir(parent) if e.is_dir())
    except OSError:
        return ""
    close = difflib.get_close_matches(os.path.basename(path.rstrip("/")), siblings, n=1)
    return f" (did you mean {os.path.join(parent, close[0])}?)" if close else ""


def warn_job_local_storage(cfg: RaydiffConfig, cwd: str | None = None) -> str | None:
    """Under `ray job submit --working-dir`, the job runs in Ray's temporary copy of the working directory,
    deleted with the cluster's session: checkpoints stored there are lost. Says so (and returns the
    line) when `ray.storage_path` lies inside such a copy."""
    cwd = os.path.realpath(cwd or os.getcwd())
    storage = cfg.ray.storage_path
    if "runtime_resources" not in cwd or "://" in storage:
        return None
    if os.path.commonpath([cwd, os.path.realpath(storage)]) != cwd:
        return None
    line = (f"[raydiff] warning: ray.storage_path {storage} is inside the Ray job's copy of its working "
            f"directory, which Ray deletes with the cluster session; use an absolute shared path or s3://")
    say(line)
    return line


def check_batch_sizes(cfg: RaydiffConfig, rows: list[dict]) -> None:
    """With `train.batch_size` > 1, every sample of a batch must have one size. Without buckets or a fixed
    size that holds only if all images resize alike: read their headers (a sample of them for large
    datasets) and refuse mixed sizes, naming the fixes."""
    d, t = cfg.data, cfg.train
    if t.batch_size == 1 or d.height is not None or d.buckets:
        return
    from raydiff.data.buckets import media_size
    from raydiff.data.metadata import is_url
    from raydiff.data.operators import DecodeError, target_size

    key = d.data_file_keys[0]
    paths = sorted({r[key] for r in rows if not is_url(r[key])})
    step = max(1, math.ceil(len(paths) / _MAX_SIZE_CHECKS))

    def size(path):
        try:
            h, w = media_size(path)
        except DecodeError:
            return None  # the decode stage reports the file with its row
        return target_size(h, w, fixed=None, max_pixels=d.max_pixels, division_factor=d.division_factor)

    with ThreadPoolExecutor(max_workers=16) as pool:
        sizes = Counter(s for s in pool.map(size, paths[::step]) if s is not None)
    if len(sizes) > 1:
        common = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sizes.most_common(3))
        raise ConfigError(f"train.batch_size {t.batch_size} needs samples of one size, but the {key}s resize to "
                          f"{len(sizes)} sizes ({common}{', ...' if len(sizes) > 3 else ''}); set data.buckets: "
                          f"true (each batch from one aspect-ratio bucket) or a fixed data.height and data.width")


def resource_needs(cfg: RaydiffConfig) -> dict[str, float]:
    """What a run occupies at once: its workers, one decode task, and in stream mode the encoder actors."""
    r, d = cfg.ray, cfg.data
    cpus = r.num_workers * r.cpus_per_worker + d.num_cpus
    gpus = r.num_workers * r.gpus_per_worker if r.use_gpu else 0.0
    if d.preprocess == "stream":
        cpus += d.encoder_actors * d.encoder_num_cpus
        gpus += d.encoder_actors * d.encoder_num_gpus
    return {"CPU": cpus, "GPU": gpus}


def shortfall(cfg: RaydiffConfig, nodes: list[dict]) -> str | None:
    """Why a cluster of `nodes` (each {"CPU": n, "GPU": n}, totals) cannot hold the run; None if it can.
    Each worker needs its CPUs and GPUs on one node."""
    r = cfg.ray
    need = resource_needs(cfg)
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    worker_gpus = r.gpus_per_worker if r.use_gpu else 0.0
    fit = sum(min(n.get("CPU", 0.0) // r.cpus_per_worker,
                  n.get("GPU", 0.0) // worker_gpus if worker_gpus else math.inf) for n in nodes)
    asks = f"ray.num_workers {r.num_workers} x (ray.cpus_per_worker {r.cpus_per_worker:g}"
    asks += f", ray.gpus_per_worker {r.gpus_per_worker:g})" if r.use_gpu else ")"
    cluster = f"the cluster has {have['CPU']:g} CPUs and {have['GPU']:g} GPUs on {len(nodes)} node(s)"
    if need["CPU"] > have["CPU"] + 1e-9 or need["GPU"] > have["GPU"] + 1e-9:
        extra = " plus data.num_cpus for decoding"
        extra += " and the encoder actors" if cfg.data.preprocess == "stream" else ""
        local = " (or raise ray.num_cpus for a local Ray)" if r.address is None else ""
        return (f"{asks}{extra} needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs, but {cluster}; lower "
                f"ray.num_workers or the per-worker resources{local}")
    if fit < r.num_workers:
        return f"{asks}: only {int(fit)} workers fit on single nodes, but {cluster}"
    return None


def cluster_nodes() -> list[dict]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: RaydiffConfig, *, autoscaling: bool, nodes: Callable[[], list[dict]] = cluster_nodes,
                    poll_s: float = 5.0) -> None:
    """Fail at once if the cluster (`nodes()`: each node's total resources) cannot hold the run; on an
    autoscaling cluster wait up to `ray.startup_timeout` for nodes to join, saying so once a minute."""
    problem = shortfall(cfg, nodes())
    if problem is None:
        return
    if not autoscaling:
        raise ConfigError(problem)
    deadline, last_line = time.monotonic() + cfg.ray.startup_timeout, -math.inf
    while (problem := shortfall(cfg, nodes())) is not None:
        now = time.monotonic()
        if now >= deadline:
            raise ConfigError(f"{problem}; gave up after ray.startup_timeout {cfg.ray.startup_timeout:g} s")
        if now - last_line >= 60:
            say(f"[raydiff] waiting for the autoscaler ({int(deadline - now)} s left): {problem}")
            last_line = now
        time.sleep(poll_s)


def check_devices(cfg: RaydiffConfig, cuda_available: Callable[[], bool] | None = None) -> None:
    """model.quantize fp8 and nf4 are for CUDA GPUs (torchao's float8 and bitsandbytes' 4-bit kernels):
    refused unless the workers get GPUs (`ray.use_gpu`, and for stream/cache encoders with quantized text
    encoders `data.encoder_num_gpus`) and, for a local Ray, this machine has one. The libraries that
    `model.quantize` and `train.optimizer` need must be importable here (the workers share this install)."""
    import importlib.util

    m, d = cfg.model, cfg.data
    for setting, value, module, package in libraries_used(cfg):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{setting} {value} needs the {package} package: pip install {package}")
    if m.quantize not in GPU_ONLY_QUANTIZE:
        return
    need = f"model.quantize {m.quantize} runs on CUDA GPUs only"
    if not cfg.ray.use_gpu:
        raise ConfigError(f"{need}: set ray.use_gpu: true, or use model.quantize: int8 on CPUs")
    if m.quantize_text_encoders and d.preprocess != "inline" and d.encoder_num_gpus == 0:
        raise ConfigError(f"{need}: with model.quantize_text_encoders the {d.preprocess} encoders need "
                          f"data.encoder_num_gpus > 0")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS") and not cuda_available():
        raise ConfigError(f"{need}, and this machine (where a local Ray runs the workers) has no CUDA GPU; "
                          f"use model.quantize: int8")
