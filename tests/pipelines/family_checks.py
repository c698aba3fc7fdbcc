"""Checks every image family's test file runs the same way (Z-Image, FLUX.2 [klein]): a LoRA saved by
raydiff loads into the family's diffusers pipeline, one training step, the stream/cache encode path,
and `raydiff sample`. Each takes the family's class and a tiny model directory written by its `write_tiny`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from raydiff.config import RaydiffConfig, load_config
from raydiff.data.cache_io import columns_to_table, table_to_columns
from raydiff.data.collate import collate
from raydiff.data.components import training_components
from raydiff.data.encoder import Encoder
from raydiff.launch.sample import family_of_directory, sample
from raydiff.pipelines.base import run_units
from raydiff.training.lora import LORA_FILE, save_lora
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer

PROMPTS = ["a red circle", "two blue squares on green grass"]  # different lengths


def tiny_config(example, model_dir: str, *overrides: str) -> RaydiffConfig:
    """The family's examples/<family>/tiny.yaml pointed at `model_dir`, with `key=value` overrides."""
    return load_config(example, [f"model.path={model_dir}", *overrides])


def conditions(pipe, prompts=PROMPTS) -> dict:
    """The prompt units' outputs: what model_fn takes besides latents and sigma."""
    with torch.no_grad():
        out = run_units(pipe, {"prompt": list(prompts)}, [u for u in pipe.units if u.name == "prompt_embedder"])
    return {k: v for k, v in out.items() if k != "prompt"}


def trained_module(cfg: RaydiffConfig, scale: float = 0.3) -> PipelineTrainingModule:
    """The training module with random LoRA B weights (B = 0 at init would make the LoRA a no-op)."""
    module = PipelineTrainingModule(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def check_lora_loads_into_diffusers(cfg, family_cls, lora_dir: str, latents, lora_key_warnings) -> None:
    """save_lora -> the diffusers pipeline's load_lora_weights: no key warnings, the output changes, and the
    diffusers model with the LoRA predicts what the training module predicts (alpha != rank)."""
    module = trained_module(cfg)
    save_lora(lora_dir, module.trainable_state_dict(), module.lora_config)
    cond = conditions(module.pipe)
    sigma = torch.tensor([0.3, 0.8])
    fresh = family_cls(family_cls.diffusers_class.from_pretrained(cfg.model.path), "cpu")
    with torch.no_grad():
        base = fresh.model_fn(latents, sigma, **cond)
        assert lora_key_warnings(lambda: fresh.pipe.load_lora_weights(lora_dir)) == []
        with_lora = fresh.model_fn(latents, sigma, **cond)
        ours = module.pipe.model_fn(latents, sigma, **cond)
    assert (with_lora - base).abs().max() > 1e-2
    torch.testing.assert_close(with_lora, ours, atol=1e-5, rtol=1e-5)


def check_training_step_updates_only_lora(cfg, images: torch.Tensor) -> None:
    module = PipelineTrainingModule(cfg)  # gradient checkpointing on, as in the examples
    loss = module({"image": images, "prompt": PROMPTS[:len(images)]}, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in module.named_parameters() if n not in trainable)
    assert all(torch.isfinite(p.grad).all() for p in trainable.values() if p.grad is not None)
    # B starts at zero, so only B has a non-zero gradient on the first step.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


def decoded_batch(n: int, size: int) -> dict:
    """What Ray Data's decode stage hands the encoder: uint8 (B, H, W, 3) images, prompts, row ids."""
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "prompt": np.array(PROMPTS[:n]),
            "_row": np.arange(n)}


def check_encoded_batches_give_the_inline_loss(inline: RaydiffConfig, stream: RaydiffConfig, size: int,
                                               batch: dict | None = None, steps: int = 3) -> None:
    """Encoder (stream actors and `raydiff preprocess`) -> columns -> parquet -> collate -> a DiT-only module
    gives the inline module's loss on the same batch (default: `decoded_batch(2, size)`) and generator, at each
    of `steps` optimizer steps (so the trained adapters agree too), within 1e-4."""
    batch = decoded_batch(2, size) if batch is None else batch
    keys = inline.data.data_file_keys
    columns = Encoder(stream, device="cpu").encode(batch)
    columns = table_to_columns(columns_to_table(columns))  # the cache's round trip
    assert not set(keys) & set(columns) and "latents" in columns
    torch.manual_seed(0)
    dit_only = PipelineTrainingModule(stream, components=training_components(stream))
    assert dit_only.pipe.pipe.vae is None and dit_only.pipe.pipe.text_encoder is None
    encoded = collate(columns, "cpu", keys)
    # Only units that call the trained DiT itself are left (FLUX's guidance unit reads its config).
    assert [u.name for u in dit_only.units_to_run(encoded) if "transformer" not in u.onload_model_names] == []
    torch.manual_seed(0)
    full = PipelineTrainingModule(inline)
    got = train_losses(dit_only, stream, encoded, steps)
    want = train_losses(full, inline, collate(batch, "cpu", keys), steps)
    assert all(np.isfinite(want)) and want[0] != want[-1]  # the steps trained the adapter
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)


def train_losses(module: PipelineTrainingModule, cfg: RaydiffConfig, batch: dict, steps: int) -> list[float]:
    """The loss at each of `steps` optimizer steps on `batch` (generator seeded per step)."""
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=steps)
    losses = []
    for step in range(steps):
        loss = module(batch, generator=torch.Generator().manual_seed(5 + step))
        loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def check_sample(family: str, model_dir: str, lora_dir: str, out_dir) -> None:
    """`raydiff sample` with the family named by the model directory: the LoRA (a checkpoint dir or its file)
    changes the image, scale 0 gives the base model's."""
    assert family_of_directory(model_dir) == family
    kwargs = dict(family=family, steps=2, height=32, width=48, seed=3)
    base = sample(model_dir, None, "a red circle", str(out_dir / "base.png"), **kwargs)
    off = sample(model_dir, lora_dir, "a red circle", str(out_dir / "off.png"), lora_scale=0.0, **kwargs)
    on = sample(model_dir, f"{lora_dir}/{LORA_FILE}", "a red circle", str(out_dir / "on.png"), **kwargs)
    pixels = {k: np.asarray(Image.open(v)).astype(int) for k, v in (("base", base), ("off", off), ("on", on))}
    assert pixels["on"].shape == (32, 48, 3)
    assert (pixels["base"] == pixels["off"]).all()
    assert np.abs(pixels["base"] - pixels["on"]).mean() > 0.5
