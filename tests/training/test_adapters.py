"""Adapter types (`lora.type`: lora, dora, lokr, loha) on the tiny FLUX and Qwen-Image models: each starts as the
base model and trains fp32 parameters on a bf16 base, resumes bitwise, continues from files of another alpha or
format, loads in diffusers where diffusers loads it, and its ComfyUI export (LyCORIS naming) rebuilds the trained
delta W in the `lycoris-lora` package and in ComfyUI's weight adapters (transcribed in foreign_loaders.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from foreign_loaders import assert_comfyui_applies, delta_weights
from PIL import Image
from safetensors import safe_open

from raydiff.launch.sample import sample
from raydiff.pipelines.base import run_units
from raydiff.pipelines.flux import FluxImagePipeline
from raydiff.pipelines.qwen_image import QwenImagePipeline
from raydiff.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from raydiff.training.lora import LORA_FILE, load_lora_into, lora_state_dict, resolve_targets, save_lora
from raydiff.training.lora_formats import export_lora, import_lora, read_metadata
from raydiff.training.module import PipelineTrainingModule, switch_pipe_to_training_mode
from raydiff.training.step import build_optimizer

TYPES = ["lora", "dora", "lokr", "loha"]
RANK = 2
# FLUX: the fused q/k/v of both block types and linear1's MLP part; a LoKr factor of 4 keeps some LoKr factors
# full and decomposes others at the tiny widths (32, 128), as at real ones.
TARGETS = {"flux": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"],
           "qwen_image": ["to_q", "add_k_proj", "to_out.0", "img_mlp.net.2"]}
PIPELINES = {"flux": FluxImagePipeline, "qwen_image": QwenImagePipeline}
EXPORTS = {"lora": "kohya", "dora": "diffusers", "lokr": "comfyui", "loha": "comfyui"}


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Train-like adapter weights: every adapter tensor moved off its initial value (B, w1, w2_b leave zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a red circle"]}


class Probe:
    """A fixed input for a family's model_fn, and the prediction of a pipeline on it."""

    def __init__(self, pipe):
        with torch.no_grad():
            out = run_units(pipe, {"prompt": ["a red circle"], "image": torch.zeros(1, 3, 32, 32)})
        self.latents = torch.randn(out["latents"].shape, generator=torch.Generator().manual_seed(1))
        self.cond = {k: v for k, v in out.items() if k not in ("latents", "image", "prompt")}

    def __call__(self, pipe) -> torch.Tensor:
        with torch.no_grad():
            return pipe.model_fn(self.latents, torch.tensor([0.7]), **self.cond)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """trained(family, kind, rank) -> (pipe with a perturbed adapter at alpha = 1.5 x rank, its checkpoint dir,
    its probe)."""
    cache = {}

    def make(family: str, kind: str, rank: int = RANK):
        if (family, kind, rank) not in cache:
            pipe = PIPELINES[family].from_pretrained(tiny_model(family))
            torch.manual_seed(0)  # peft's initialisation: the same adapter whichever tests ran before
            switch_pipe_to_training_mode(pipe, lora_base_model="transformer", lora_target_modules=TARGETS[family],
                                         lora_rank=rank, lora_alpha=1.5 * rank, lora_type=kind, lokr_factor=4,
                                         gradient_checkpointing=False)
            perturb(pipe.pipe.transformer)
            directory = str(tmp_path_factory.mktemp(f"{family}-{kind}-{rank}"))
            save_lora(directory, lora_state_dict(pipe.pipe.transformer, "transformer"),
                      pipe.pipe.transformer.peft_config["default"])
            cache[family, kind, rank] = pipe, directory, Probe(pipe)
        return cache[family, kind, rank]

    return make


@pytest.mark.parametrize("kind", TYPES)
def test_each_type_starts_as_the_base_model_and_trains_fp32_weights_on_a_bf16_base(make_config, kind):
    cfg = make_config(model={"dtype": "bfloat16"}, lora={"type": kind, "rank": RANK, "lokr_factor": 4})
    module = PipelineTrainingModule(cfg)
    dit = module.pipe.pipe.transformer
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    markers = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
               "lokr": ("lokr_",), "loha": ("hada_",)}[kind]
    assert trainable and all(any(m in n for m in markers) for n in trainable)
    assert all(any(m in n for n in trainable) for m in markers)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert next(p for n, p in module.named_parameters() if not p.requires_grad).dtype == torch.bfloat16
    probe = Probe(module.pipe)
    adapted = probe(module.pipe)
    dit.disable_adapters()
    base = probe(module.pipe)
    dit.enable_adapters()
    torch.testing.assert_close(adapted, base, atol=1e-2, rtol=0)  # delta W = 0 at init (DoRA: m = ||W||, bf16)
    loss = module(batch(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


@pytest.mark.parametrize("kind", TYPES)
def test_a_checkpoint_of_each_type_resumes_bitwise(make_config, tmp_path, kind):
    cfg = make_config(lora={"type": kind, "rank": RANK, "alpha": 3, "lokr_factor": 4})
    module = PipelineTrainingModule(cfg)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=10)
    for step in range(2):
        module(batch(), generator=torch.Generator().manual_seed(step)).backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    save_checkpoint(str(tmp_path), module, optimizer, scheduler, TrainerState(global_step=2), "model: {}\n")
    expected = {"type": kind, "r": RANK, "lora_alpha": 3, **({"lokr_factor": 4} if kind == "lokr" else {})}
    assert read_metadata(str(tmp_path / LORA_FILE)) == expected

    resumed = PipelineTrainingModule(cfg)
    optimizer2, scheduler2 = build_optimizer(cfg, resumed.trainable_parameters(), total_steps=10)
    load_checkpoint(str(tmp_path), resumed, optimizer2, scheduler2)
    theirs = dict(resumed.named_parameters())
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, theirs[name]), name
    state = optimizer.state_dict()["state"]
    assert all(torch.equal(s["exp_avg"], optimizer2.state_dict()["state"][i]["exp_avg"]) for i, s in state.items())


@pytest.mark.parametrize("kind", TYPES)
def test_init_from_continues_an_adapter_of_another_alpha_from_its_checkpoint_or_export(trained, tiny_model,
                                                                                      tmp_path, kind):
    pipe, directory, probe = trained("flux", kind)
    exported = export_lora(directory, EXPORTS[kind], str(tmp_path / "export.safetensors"), family="flux")
    for source in (directory, exported):
        fresh = FluxImagePipeline.from_pretrained(tiny_model("flux"))
        switch_pipe_to_training_mode(fresh, lora_base_model="transformer", lora_target_modules=TARGETS["flux"],
                                     lora_rank=RANK, lora_alpha=2 * RANK, lora_type=kind, lokr_factor=4,
                                     lora_checkpoint=source, gradient_checkpointing=False)
        torch.testing.assert_close(probe(fresh), probe(pipe), atol=1e-5, rtol=1e-5)


def test_init_from_refuses_a_file_of_another_type_or_rank(trained, tiny_model):
    _, directory, _ = trained("flux", "lora")
    for kind, rank, message in (("lokr", RANK, "holds a lora adapter, but lora.type is lokr"),
                                ("lora", 4, f"adapter rank {RANK} does not match lora.rank 4")):
        fresh = FluxImagePipeline.from_pretrained(tiny_model("flux"))
        with pytest.raises(ValueError, match=message):
            switch_pipe_to_training_mode(fresh, lora_base_model="transformer", lora_target_modules=TARGETS["flux"],
                                         lora_rank=rank, lora_type=kind, lora_checkpoint=directory,
                                         gradient_checkpointing=False)


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_diffusers_loads_dora_and_lokr_checkpoints_and_exports_as_trained(trained, tiny_model, tmp_path, kind):
    """DoRA with `load_lora_weights`, LoKr with the transformer's `load_lora_adapter` (diffusers' pipelines take
    LoKr only on FLUX.2 and Z-Image); the checkpoint holds alpha in its metadata, the export has it folded in."""
    pipe, directory, probe = trained("flux", kind)
    exported = export_lora(directory, "diffusers", str(tmp_path / "diffusers.safetensors"), family="flux")
    for location, weight_name in ((directory, LORA_FILE), (str(tmp_path), "diffusers.safetensors")):
        fresh = FluxImagePipeline(FluxImagePipeline.diffusers_class.from_pretrained(tiny_model("flux")), "cpu")
        base = probe(fresh)
        if kind == "dora":
            fresh.pipe.load_lora_weights(location, weight_name=weight_name)
        else:
            fresh.pipe.transformer.load_lora_adapter(location, weight_name=weight_name, prefix="transformer")
        assert (probe(fresh) - base).abs().max() > 1e-3
        torch.testing.assert_close(probe(fresh), probe(pipe), atol=1e-5, rtol=1e-5)
    with safe_open(exported, "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())


@pytest.mark.parametrize("family", PIPELINES)
@pytest.mark.parametrize("kind, rank", [("lokr", RANK), ("lokr", 24), ("loha", RANK)])
def test_comfyui_export_rebuilds_the_trained_delta_in_lycoris_and_comfyui(trained, tiny_model, tmp_path, family,
                                                                          kind, rank):
    """The `lycoris-lora` package's own loader (create_lycoris_from_weights: LyCORIS module names, algorithm
    from the keys, its own scale rule) rebuilds every trained module's delta W; so does ComfyUI's key map and
    LoKr/LoHa adapters, FLUX's q/k/v landing in their slices of BFL's fused qkv and linear1. Rank 24 makes every
    LoKr factor a full matrix, which LyCORIS and ComfyUI apply at scale 1 whatever the alpha, unlike peft."""
    from lycoris import create_lycoris_from_weights

    pipe, directory, _ = trained(family, kind, rank)
    ours = delta_weights(pipe.pipe.transformer)
    with safe_open(f"{directory}/{LORA_FILE}", "pt") as f:
        decomposed = any(k.endswith(("_a", "_b")) for k in f.keys())
    assert decomposed == (kind == "loha" or rank == RANK)
    out = export_lora(directory, "comfyui", str(tmp_path / "comfyui.safetensors"), family=family)
    with safe_open(out, "pt") as f:
        assert all(k.startswith("lycoris_") for k in f.keys())
    dit = PIPELINES[family].from_pretrained(tiny_model(family), components=["transformer"]).pipe.transformer
    network, _ = create_lycoris_from_weights(1.0, out, dit)
    names = {"lycoris_" + n.replace(".", "_"): n for n, _ in dit.named_modules()}
    rebuilt = {names[m.lora_name]: m.get_diff_weight()[0] for m in network.loras}
    assert set(rebuilt) == set(ours)
    for module, delta in ours.items():
        torch.testing.assert_close(rebuilt[module].reshape(delta.shape), delta, atol=1e-6, rtol=1e-5)
    assert_comfyui_applies(family, dit, out, ours)


@pytest.mark.parametrize("kind, fmt, message", [
    ("dora", "comfyui", "ComfyUI PR #15458"), ("dora", "diffsynth", "DiffSynth and kohya loaders have no DoRA"),
    ("lokr", "kohya", "cannot be split back into"), ("loha", "diffusers", "diffusers loads no LoHa"),
])
def test_exports_an_adapter_type_cannot_be_read_in_are_refused_with_the_reason(trained, tmp_path, kind, fmt,
                                                                               message):
    _, directory, _ = trained("flux", kind)
    with pytest.raises(ValueError, match=message):
        export_lora(directory, fmt, str(tmp_path / "x.safetensors"), family="flux")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("kind", [*TYPES, "lokr-lycoris"])
def test_raydiff_sample_renders_each_type_with_its_scale(trained, tiny_model, tmp_path, kind):
    """Each type from its checkpoint; a LoKr also from its LyCORIS-named ComfyUI export, whose factor size
    (no metadata there) is inferred from the shapes."""
    _, directory, _ = trained("flux", kind.split("-")[0])
    if kind == "lokr-lycoris":
        directory = export_lora(directory, "comfyui", str(tmp_path / "lokr_comfyui.safetensors"), family="flux")
    kwargs = dict(steps=2, height=32, width=32, seed=3)

    def pixels(path):
        return np.asarray(Image.open(path)).astype(int)

    base = sample(tiny_model("flux"), None, "a red circle", str(tmp_path / "base.png"), **kwargs)
    off = sample(tiny_model("flux"), directory, "a red circle", str(tmp_path / "off.png"), lora_scale=0.0, **kwargs)
    on = sample(tiny_model("flux"), directory, "a red circle", str(tmp_path / "on.png"), **kwargs)
    assert np.abs(pixels(base) - pixels(on)).mean() > 0.1  # measured: 0.23 (LoHa) to 1.4 (LoRA) at 2 steps
    if kind == "dora":  # the scale multiplies B A only: the trained magnitudes stay at scale 0
        assert np.abs(pixels(off) - pixels(on)).mean() > 0.1
    else:
        assert (pixels(base) == pixels(off)).all()


def test_target_entries_match_path_suffixes_or_globs_and_never_reach_outside_the_blocks_unasked(tiny_model):
    from raydiff.registry import get_pipeline_class
    from raydiff.training.lora import empty_component

    flux = empty_component(tiny_model("flux"), "transformer")
    assert resolve_targets(flux, ["to_q", "single_transformer_blocks.*.proj_out"]) == [
        "to_q", "single_transformer_blocks.0.proj_out"]
    assert resolve_targets(flux, ["*proj_out"]) == ["proj_out", "single_transformer_blocks.0.proj_out"]
    assert resolve_targets(flux, ["x_embedder"]) == ["x_embedder"]  # outside the blocks only: meant
    with pytest.raises(ValueError, match=r"'proj_out' matches 1 layers in the transformer blocks and also proj_out "
                                         r"outside them; write 'single_transformer_blocks.\*.proj_out' for the "
                                         r"blocks only, or '\*proj_out' for all of them"):
        resolve_targets(flux, ["proj_out"])
    with pytest.raises(ValueError, match="'to_qq' matches no layer of FluxTransformer2DModel"):
        resolve_targets(flux, ["to_q", "to_qq"])
    for family in ("flux", "qwen_image", "sd3", "wan"):  # every family's default targets stay in the blocks
        model = empty_component(tiny_model(family), "transformer")
        defaults = get_pipeline_class(family).default_lora_targets
        assert resolve_targets(model, defaults) == defaults


def test_a_dora_checkpoint_of_a_trained_run_loads_strictly(trained, tiny_model):
    """load_lora_into refuses keys the injected adapter does not have (a DoRA file into a plain LoRA would
    otherwise drop its magnitudes), naming them."""
    _, directory, _ = trained("flux", "dora")
    sd, info = import_lora(directory, family="flux")
    assert info["type"] == "dora" and any("lora_magnitude_vector" in k for k in sd)
    fresh = FluxImagePipeline.from_pretrained(tiny_model("flux"))
    switch_pipe_to_training_mode(fresh, lora_base_model="transformer", lora_target_modules=TARGETS["flux"][:2],
                                 lora_rank=RANK, lora_type="dora", gradient_checkpointing=False)
    with pytest.raises(ValueError, match="keys match no adapted module"):
        load_lora_into(fresh.pipe.transformer, directory, "transformer", config=fresh.pipe.transformer.peft_config[
            "default"])
