"""What the benchmarks train: a FLUX-architecture DiT big enough to time, images that give it a chosen token
count, the raw config every benchmark starts from, and pre-decoded batches for loops without Ray.

The benchmark model is the tiny FLUX pipeline (`FluxImagePipeline.write_tiny`: 2x VAE, 32-wide text
encoders) with its transformer replaced by a bigger one: 2 double + 4 single blocks, 4 heads x 64.
FLUX packs 2x2 latent patches and the tiny VAE halves each side, so an S x S image is (S/4)^2 tokens:
128 x 128 -> 1024 tokens, 256 x 256 -> 4096.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def image_side(tokens: int) -> int:
    """Side of a square image that the benchmark DiT sees as `tokens` tokens."""
    side = int(round(tokens ** 0.5)) * 4
    assert (side // 4) ** 2 == tokens, f"{tokens} is not a square token count"
    return side


def write_bench_flux(path: str, *, num_layers: int = 2, num_single_layers: int = 4, heads: int = 4,
                     head_dim: int = 64, seed: int = 0) -> str:
    """A diffusers-format FLUX pipeline: the tiny one's VAE, text encoders and scheduler, and a
    FLUX-architecture transformer of the given size (random weights). Written once per path."""
    import torch
    from diffusers import FluxTransformer2DModel

    from raydiff.pipelines.flux import FluxImagePipeline

    marker = os.path.join(path, "transformer", "config.json")
    if os.path.exists(marker):
        with open(marker) as f:
            c = json.load(f)
        if (c["num_layers"], c["num_single_layers"], c["num_attention_heads"], c["attention_head_dim"]) == (
                num_layers, num_single_layers, heads, head_dim):
            return path
    FluxImagePipeline.write_tiny(path, seed=seed)
    torch.manual_seed(seed)
    rope = head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[rope, (head_dim - rope) // 2, (head_dim - rope) // 2], guidance_embeds=True)
    transformer.save_pretrained(os.path.join(path, "transformer"))
    return path


def write_images(directory: str, n: int, side: int, seed: int = 0) -> str:
    """`n` side x side shapes PNGs with captions; returns the metadata path. Written once per directory."""
    from raydiff.data.shapes import write_shapes_dataset

    metadata = os.path.join(directory, "metadata.csv")
    rows = 0
    if os.path.exists(metadata):
        with open(metadata) as f:
            rows = sum(1 for _ in f) - 1
    if rows < n:
        write_shapes_dataset(directory, n=n, size=(side, side), seed=seed)
    return metadata


def bench_config(model: str, data_dir: str, runs: str, name: str, *, tokens: int = 1024, steps: int = 20,
                 workers: int = 1, batch_size: int = 1, repeat: int = 1, gradient_checkpointing: bool = True,
                 dtype: str = "float32", log_steps: int = 1) -> dict:
    """The raw config every benchmark trains with; only `save_steps` differs from a user's run (no
    checkpoint mid-run, which would land inside a timed step)."""
    side = image_side(tokens)
    return {
        "model": {"family": "flux", "path": model, "dtype": dtype, "max_sequence_length": 32},
        "data": {"base_path": data_dir, "metadata_path": os.path.join(data_dir, "metadata.csv"),
                 "height": side, "width": side, "repeat": repeat},
        "lora": {"rank": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "train": {"learning_rate": 1e-4, "max_steps": steps, "batch_size": batch_size, "save_steps": 10**6,
                  "log_steps": log_steps, "gradient_checkpointing": gradient_checkpointing},
        "ray": {"num_workers": workers, "storage_path": runs, "name": name},
    }


def write_yaml(raw: dict, path: str) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def decoded_batches(cfg, n: int) -> list[dict]:
    """The first `n` numpy batches of `cfg`'s data, decoded and resized by raydiff's own Ray Data stage
    function, as a worker's iterator gives them (no Ray involved)."""
    import numpy as np

    from raydiff.data.decode import DecodeSample
    from raydiff.data.metadata import read_rows

    rows, _ = read_rows(cfg.data)
    decode = DecodeSample(cfg.data)
    bs, batches = cfg.train.batch_size, []
    for i in range(n):
        samples = [decode(rows[(i * bs + j) % len(rows)])[0] for j in range(bs)]
        batch = {"prompt": np.array([s["prompt"] for s in samples], dtype=object),
                 "_row": np.array([s["_row"] for s in samples])}
        for key in cfg.data.data_file_keys:
            batch[key] = np.stack([s[key] for s in samples])
        batches.append(batch)
    return batches


def predecoded_batches(cfg, n: int, device="cpu") -> list[dict]:
    """`decoded_batches` collated exactly as the worker does, held in memory."""
    from raydiff.data.collate import collate

    return [collate(b, device, cfg.data.data_file_keys) for b in decoded_batches(cfg, n)]


def encoded_batches(cfg, n: int, device="cpu") -> list[dict]:
    """`decoded_batches` run through the frozen encoders once (raydiff's `Encoder`, as stream and cache
    mode do) and collated: what a cache-mode worker trains on."""
    from raydiff.data.collate import collate
    from raydiff.data.encoder import Encoder

    encoder = Encoder(cfg)
    return [collate(encoder.encode(b), device, cfg.data.data_file_keys) for b in decoded_batches(cfg, n)]


def workspace(name: str, override: str | None, images: int) -> tuple[str, str, str, str]:
    """A CPU benchmark's (work dir, benchmark model, folder of `images` 128 px images, runs dir), quiet and
    with stdout kept for its JSON: the start every Ray benchmark shares."""
    import measure  # the sibling module: benchmarks put this folder on sys.path

    from raydiff.console import quiet_libraries

    quiet_libraries()
    measure.reserve_stdout()
    work = workdir(name, override)
    model = write_bench_flux(os.path.join(work, "model"))
    data = os.path.join(work, "data")
    write_images(data, n=images, side=image_side(1024))
    return work, model, data, os.path.join(work, "runs")


def workdir(name: str, override: str | None = None) -> str:
    """Where a benchmark keeps its model, data and runs (outside the repository; models and images are
    reused between runs, delete the directory to start afresh)."""
    import tempfile

    path = os.path.abspath(override or os.path.join(tempfile.gettempdir(), "raydiff-bench", name))
    os.makedirs(path, exist_ok=True)
    return path


def bare_loop(cfg, batches: list[dict], steps: int, components=None) -> tuple[list[float], list[float]]:
    """raydiff's step without Ray: the same training module and the same `Stepper` (AdamW, LR schedule,
    clipping, per-step generator seeds) over pre-collated batches in this process. Returns each step's
    wall seconds and this process's CPU seconds."""
    import time

    import torch

    from raydiff.training.module import PipelineTrainingModule
    from raydiff.training.step import Stepper, build_optimizer

    torch.manual_seed(cfg.train.seed)
    module = PipelineTrainingModule(cfg, device="cpu", components=components)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), steps)
    stepper = Stepper(cfg, module, optimizer, scheduler, torch.device("cpu"))
    times, cpu = [], []
    for step in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        stepper.step([batches[step % len(batches)]], step)  # .item() inside, as the loop logs every step
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu
