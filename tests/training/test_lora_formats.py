"""LoRA formats: every export loads into a fresh diffusers pipeline and predicts exactly what the trained
LoRA does; every format imports back to the trained state dict (scale folded in); FLUX's fused layers match
diffusers' own kohya/ComfyUI conversion at real FLUX widths; ComfyUI's and DiffSynth-Studio's loaders
(transcribed in foreign_loaders.py) compute the trained delta W from the files meant for them."""

from __future__ import annotations

import logging
import os
import shutil
import warnings

import diffusers
import foreign_loaders
import pytest
import torch
from foreign_loaders import assert_comfyui_applies, delta_weights
from safetensors import safe_open
from safetensors.torch import load_file

from raydiff.pipelines.base import run_units
from raydiff.pipelines.flux import FluxImagePipeline
from raydiff.pipelines.flux2 import Flux2KleinImagePipeline
from raydiff.pipelines.qwen_image import QwenImagePipeline
from raydiff.pipelines.z_image import ZImagePipeline
from raydiff.registry import LORA_FORMATS, get_pipeline_class
from raydiff.training.lora import LORA_FILE, lora_state_dict, save_lora
from raydiff.training.lora_formats import detect_format, export_lora, from_format, import_lora, to_format
from raydiff.training.module import switch_pipe_to_training_mode

RANK, ALPHA = 4, 6  # scale 1.5: a missing or doubled alpha shows
PIPELINES = {"flux": FluxImagePipeline, "qwen_image": QwenImagePipeline, "z_image": ZImagePipeline,
             "flux2_klein": Flux2KleinImagePipeline}
TARGETS = {
    # Double block: full image qkv, only add_k_proj of the text qkv (the others are exported as zeros),
    # MLPs and modulation. Single block: linear2 and modulation only, because diffusers' kohya converter
    # splits linear1 with FLUX.1's real widths (3072, 12288) and so cannot load it into a tiny model;
    # test_flux_fused_layers_match_diffusers_conversion covers linear1 at real widths instead.
    "flux": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.0.proj",
             "transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1.linear",
             "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.norm.linear"],
    "qwen_image": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1"],
    # Every block kind (main, both refiners) and the top-level layers ComfyUI maps.
    "z_image": ["layers.0.attention.to_q", "layers.1.attention.to_v", "layers.0.attention.to_out.0",
                "layers.1.feed_forward.w2", "layers.0.adaLN_modulation.0", "noise_refiner.0.feed_forward.w1",
                "context_refiner.0.attention.to_k", "context_refiner.0.feed_forward.w3", "all_final_layer.2-1.linear",
                "all_x_embedder.2-1", "cap_embedder.1", "t_embedder.mlp.2"],
    # Part of the image qkv and of the text qkv (the others are exported as zeros), projections, SwiGLU MLPs and
    # both single-block layers. Not the shared modulations: diffusers' kohya FLUX.2 converter skips them
    # (test_flux2.py checks their ComfyUI names).
    "flux2_klein": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                    "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0",
                    "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.linear_in",
                    "transformer_blocks.0.ff_context.linear_out", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                    "single_transformer_blocks.0.attn.to_out"],
}
# Edit families and their base family, whose LoRA targets and export names they use. Their sources are resized to
# the target's 32² here (the pipelines' ~1 MP would take minutes on CPU).
EDIT_BASES = {"qwen_image_edit": "qwen_image", "flux_kontext": "flux"}
EDIT_OPTIONS = {"edit_image_pixels": 32 * 32}
# FLUX.2 DiffSynth files use diffusers' module names without the `transformer.` prefix, which diffusers' FLUX.2
# loader does not read (its Qwen-Image and Z-Image loaders do); FLUX's diffsynth export is the kohya layout.
LOADABLE = [(f, fmt) for f in PIPELINES for fmt in LORA_FORMATS if (f, fmt) != ("flux2_klein", "diffsynth")]


# Every module of both block types that FLUX's original names cover (complete q/k/v groups, which DiffSynth's
# diffusers path needs to fuse); Qwen-Image's default targets plus the MLPs and modulation.
WHOLE_BLOCKS = {
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
             "norm1_context.linear", "proj_mlp", "single_transformer_blocks.*.proj_out", "norm.linear"],
    "qwen_image": TARGETS["qwen_image"],
}


class Trained:
    """A tiny pipeline with a LoRA of random B (train-like: A random, B no longer zero), saved as a checkpoint
    would be, and its prediction on a fixed input."""

    def __init__(self, family: str, model_dir: str, lora_dir: str, targets=None, alpha: float = ALPHA):
        self.family, self.model_dir, self.lora_dir = family, model_dir, lora_dir
        self.options = EDIT_OPTIONS if family in EDIT_BASES else {}
        self.pipe = get_pipeline_class(family).from_pretrained(model_dir, **self.options)
        switch_pipe_to_training_mode(self.pipe, lora_base_model="transformer",
                                     lora_target_modules=targets or TARGETS[EDIT_BASES.get(family, family)],
                                     lora_rank=RANK, lora_alpha=alpha, gradient_checkpointing=False)
        config = self.pipe.pipe.transformer.peft_config["default"]
        torch.manual_seed(0)
        for name, p in self.pipe.pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.2)
        self.state_dict = lora_state_dict(self.pipe.pipe.transformer, "transformer")
        save_lora(lora_dir, self.state_dict, config)
        with torch.no_grad():
            inputs = {"prompt": ["a red circle"], "image": torch.zeros(1, 3, 32, 32)}
            if family in EDIT_BASES:  # a source image, (B, 3, H, W) in [-1, 1]
                inputs["edit_image"] = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
            out = run_units(self.pipe, inputs)
            self.latents = torch.randn(out["latents"].shape, generator=torch.Generator().manual_seed(1))
            self.sigma = torch.tensor([0.7])
            self.cond = {k: v for k, v in out.items() if k not in ("latents", "image", "prompt", "edit_image")}
            self.pred = self.pipe.model_fn(self.latents, self.sigma, **self.cond)

    def fresh(self):
        """The family's pipeline over a freshly loaded diffusers pipeline, without the LoRA."""
        cls = get_pipeline_class(self.family)
        return cls(cls.load_diffusers(self.model_dir), "cpu", **self.options)

    def deltas(self) -> dict[str, torch.Tensor]:
        """{diffusers module: delta W} of the trained adapter, from peft's own layers."""
        return delta_weights(self.pipe.pipe.transformer)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    cache = {}

    def make(family: str, alpha: float = ALPHA, whole_blocks: bool = False) -> Trained:
        key = (family, alpha, whole_blocks)
        if key not in cache:
            cache[key] = Trained(family, tiny_model(family), str(tmp_path_factory.mktemp(f"lora-{family}")),
                                 WHOLE_BLOCKS[family] if whole_blocks else None, alpha)
        return cache[key]

    return make


def lora_modules(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


def load_logged(pipe, path: str) -> list[str]:
    """load_lora_weights(path), returning diffusers' log records and warnings at INFO and above."""
    records, logger = [], logging.getLogger("diffusers")

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, level = Capture(logging.INFO), diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_info()  # conftest quiets diffusers to errors
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(path)
    finally:
        logger.removeHandler(handler)
        diffusers.utils.logging.set_verbosity(level)
    return records + [str(w.message) for w in caught]


@pytest.mark.parametrize("family,fmt", LOADABLE)
def test_export_loads_into_diffusers_and_predicts_as_trained(trained, tmp_path, family, fmt):
    t = trained(family)
    out = export_lora(t.lora_dir, fmt, str(tmp_path / f"{fmt}.safetensors"), family=family)
    fresh = PIPELINES[family](t.pipe.diffusers_class.from_pretrained(t.model_dir), "cpu")
    with torch.no_grad():
        base = fresh.model_fn(t.latents, t.sigma, **t.cond)
        messages = load_logged(fresh.pipe, out)
        pred = fresh.model_fn(t.latents, t.sigma, **t.cond)
    bad = ("missing", "unexpected", "unsupported", "incompatible", "no lora keys", "not loaded")
    # The LoRA holds only transformer weights, so the text encoder's "no LoRA keys" notice is expected.
    messages = [m for m in messages if "prefix='text_encoder'" not in m]
    assert not [m for m in messages if any(b in m.lower() for b in bad)], messages
    assert lora_modules(t.pipe.pipe.transformer) <= lora_modules(fresh.pipe.transformer)
    assert (pred - base).abs().max() > 1e-2  # the LoRA matters...
    torch.testing.assert_close(pred, t.pred, atol=1e-4, rtol=1e-4)  # ...exactly as trained (alpha 6 / r 4)


@pytest.mark.parametrize("family", EDIT_BASES)
@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_an_edit_family_exports_as_its_base_family_and_loads_into_its_pipeline(trained, tmp_path, family, fmt):
    """`raydiff export` of an edit family's checkpoint (its config.yaml names the family) writes what the base
    family's export of the same LoRA writes, tensor for tensor; the file loads into the edit family's diffusers
    pipeline and predicts (with the source) what the trained LoRA does."""
    from raydiff.launch.cli import main

    t = trained(family)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    shutil.copy(os.path.join(t.lora_dir, LORA_FILE), checkpoint / LORA_FILE)
    (checkpoint / "config.yaml").write_text(f"model:\n  family: {family}\n")
    out = str(tmp_path / f"{fmt}.safetensors")
    main(["export", str(checkpoint), "--format", fmt, "--out", out])
    base = load_file(export_lora(t.lora_dir, fmt, str(tmp_path / "base.safetensors"), family=EDIT_BASES[family]))
    exported = load_file(out)
    assert exported.keys() == base.keys() and all(torch.equal(exported[k], base[k]) for k in base)
    fresh = t.fresh()
    with torch.no_grad():
        before = fresh.model_fn(t.latents, t.sigma, **t.cond)
        messages = [m for m in load_logged(fresh.pipe, out) if "prefix='text_encoder'" not in m]
        pred = fresh.model_fn(t.latents, t.sigma, **t.cond)
    bad = ("missing", "unexpected", "unsupported", "incompatible", "no lora keys", "not loaded")
    assert not [m for m in messages if any(b in m.lower() for b in bad)], messages
    assert (pred - before).abs().max() > 1e-2
    torch.testing.assert_close(pred, t.pred, atol=1e-4, rtol=1e-4)


def test_a_kohya_file_exports_back_to_a_loadable_diffusers_file(trained, tmp_path):
    t = trained("flux")
    kohya = export_lora(t.lora_dir, "kohya", str(tmp_path / "kohya.safetensors"), family="flux")
    out = export_lora(kohya, "diffusers", str(tmp_path / "diffusers.safetensors"), family="flux")
    fresh = PIPELINES["flux"](t.pipe.diffusers_class.from_pretrained(t.model_dir), "cpu")
    fresh.pipe.load_lora_weights(out)  # rank, alpha and target modules from the metadata written
    with torch.no_grad():
        torch.testing.assert_close(fresh.model_fn(t.latents, t.sigma, **t.cond), t.pred, atol=1e-4, rtol=1e-4)
    assert lora_modules(fresh.pipe.transformer) == lora_modules(t.pipe.pipe.transformer)


@pytest.mark.parametrize("family", PIPELINES)
@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_import_round_trips_to_the_trained_state_dict_with_the_scale_folded_in(trained, tmp_path, family, fmt):
    t = trained(family)
    out = export_lora(t.lora_dir, fmt, str(tmp_path / f"{fmt}.safetensors"), family=family)
    state_dict, info = import_lora(out, family=family)
    assert set(state_dict) == set(t.state_dict)
    assert info == {"type": "lora", "r": RANK, "lora_alpha": RANK}  # every export is at scale 1: alpha = rank
    # The fused qkv's parts come back as slices of one tensor: exact too.
    for k, v in t.state_dict.items():
        assert torch.equal(state_dict[k], v * (ALPHA / RANK) if ".lora_B." in k else v), k


def test_a_checkpoint_imports_as_trained(trained):
    t = trained("flux")
    state_dict, info = import_lora(t.lora_dir, family="flux")
    assert info == {"type": "lora", "r": RANK, "lora_alpha": ALPHA}
    assert all(torch.equal(state_dict[k], v) for k, v in t.state_dict.items()) and set(state_dict) == set(t.state_dict)


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_detect_format(trained, tmp_path, fmt):
    t = trained("qwen_image")
    out = export_lora(t.lora_dir, fmt, str(tmp_path / "x.safetensors"), family="qwen_image")
    with safe_open(out, "pt") as f:
        assert detect_format(f.keys()) == fmt
    with pytest.raises(ValueError, match="not a LoRA"):
        detect_format(["text_model.encoder.layers.0.q_proj.weight"])


def test_export_reads_the_family_from_the_checkpoint_config(trained, tmp_path):
    t = trained("flux")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    shutil.copy(os.path.join(t.lora_dir, LORA_FILE), checkpoint / LORA_FILE)
    with pytest.raises(ValueError, match="pass family"):
        export_lora(str(checkpoint), "kohya", str(tmp_path / "k.safetensors"))
    (checkpoint / "config.yaml").write_text("model:\n  family: flux\n")
    out = export_lora(str(checkpoint), "kohya", str(tmp_path / "k.safetensors"))
    assert import_lora(out, family="flux")[1] == {"type": "lora", "r": RANK, "lora_alpha": RANK}


def test_flux_fused_layers_match_diffusers_conversion():
    """FLUX.1-width LoRA tensors (no model): linear1 fuses q, k, v and the 4x MLP. diffusers' converter
    splits our fused kohya / ComfyUI layers into the original modules (plus zero ones for untrained
    parts), with the alpha folded in."""
    d, g = 3072, torch.Generator().manual_seed(0)
    shapes = {"single_transformer_blocks.0.attn.to_q": d, "single_transformer_blocks.0.attn.to_k": d,
              "single_transformer_blocks.0.attn.to_v": d,  # proj_mlp untrained: zeros
              "single_transformer_blocks.1.attn.to_q": d, "single_transformer_blocks.1.attn.to_k": d,
              "single_transformer_blocks.1.attn.to_v": d, "single_transformer_blocks.1.proj_mlp": 4 * d,
              "transformer_blocks.0.attn.to_q": d, "transformer_blocks.0.attn.to_v": d}  # to_k untrained
    sd = {}
    for m, out_features in shapes.items():
        sd[f"transformer.{m}.lora_A.weight"] = torch.randn(RANK, d, generator=g)
        sd[f"transformer.{m}.lora_B.weight"] = torch.randn(out_features, RANK, generator=g)
    for fmt in ("kohya", "comfyui"):
        exported = to_format(sd, fmt, family="flux", alpha=ALPHA)
        assert len([k for k in exported if k.endswith(".alpha")]) == 3  # three fused layers
        converted = diffusers.FluxPipeline.lora_state_dict(dict(exported))
        probe = torch.randn(d, 8, generator=g) / d**0.5  # B @ A on unit probes: the full products are large
        for m in shapes:  # diffusers loads these with scale 1
            a, b = converted[f"transformer.{m}.lora_A.weight"], converted[f"transformer.{m}.lora_B.weight"]
            ours = ALPHA / RANK * sd[f"transformer.{m}.lora_B.weight"] @ (sd[f"transformer.{m}.lora_A.weight"] @ probe)
            torch.testing.assert_close(b @ (a @ probe), ours, atol=1e-4, rtol=1e-5)
        extra = {k.rsplit(".lora_", 1)[0] for k in set(converted) - set(sd)}
        assert extra == {"transformer.single_transformer_blocks.0.proj_mlp",
                         "transformer.transformer_blocks.0.attn.to_k"}
        assert all(not converted[f"{m}.lora_B.weight"].any() for m in extra)
        back, info = from_format(exported, family="flux")
        assert info == {"type": "lora", "r": RANK, "lora_alpha": RANK} and set(back) == set(sd)
        assert all(torch.equal(back[k], v * (ALPHA / RANK) if ".lora_B." in k else v) for k, v in sd.items())


def test_non_block_diagonal_fused_layers_share_their_down_weight():
    """A qkv LoRA trained on the fused layer (other tools) splits as diffusers does: shared A, rows of B."""
    down, up = torch.randn(4, 8), torch.randn(24, 4)
    parts, info = from_format({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
                               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}, family="flux")
    assert info == {"type": "lora", "r": 4, "lora_alpha": 2}
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        assert torch.equal(parts[f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight"], down)
        assert torch.equal(parts[f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight"], up[8 * j:8 * (j + 1)])


def test_unknown_names_and_families_are_refused(trained, tmp_path):
    t = trained("flux")
    with pytest.raises(ValueError, match="unknown LoRA format"):
        export_lora(t.lora_dir, "civitai", str(tmp_path / "x.safetensors"), family="flux")
    with pytest.raises(ValueError, match="known for families"):
        export_lora(t.lora_dir, "kohya", str(tmp_path / "x.safetensors"), family="sd3")  # SD3: no names known
    with pytest.raises(ValueError, match="no known original name"):
        to_format({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 8),
                   "transformer.x_embedder.lora_B.weight": torch.zeros(8, 4)}, "kohya", family="flux", alpha=4)


def test_modules_with_different_alphas_get_their_scale_baked_into_b():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    sd = {}
    for name, alpha in (("attn_to_q", 8.0), ("attn_to_k", 2.0)):
        key = f"lora_unet_transformer_blocks_0_{name}"
        sd |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)}
    out, info = from_format(sd, family="qwen_image")
    assert info == {"type": "lora", "r": 4, "lora_alpha": 4}
    torch.testing.assert_close(out["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"], b * 2)
    torch.testing.assert_close(out["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"], b * 0.5)


# --- the same delta W in diffusers, ComfyUI and DiffSynth-Studio (foreign_loaders.py) ------------------------

@pytest.mark.parametrize("family", ["flux", "qwen_image"])  # the families foreign_loaders.py transcribes
def test_alpha_twice_the_rank_means_the_same_in_diffusers_comfyui_and_diffsynth(trained, tmp_path, family):
    """Train-like weights at alpha = 2 x rank: each loader computes the trained delta W from the files meant for
    it, and diffusers and ComfyUI agree on the diffusers-format file (the scale is folded in, so loaders that
    ignore the metadata alpha read it right)."""
    t = trained(family, alpha=2 * RANK, whole_blocks=True)
    ours = t.deltas()
    files = {fmt: export_lora(t.lora_dir, fmt, str(tmp_path / f"{fmt}.safetensors"), family=family)
             for fmt in LORA_FORMATS}
    fresh = t.pipe.diffusers_class.from_pretrained(t.model_dir)
    fresh.load_lora_weights(files["diffusers"])
    loaded = delta_weights(fresh.transformer)
    assert set(loaded) == set(ours)
    for module, delta in ours.items():
        torch.testing.assert_close(loaded[module], delta, atol=1e-6, rtol=1e-5)
    for fmt in ("diffusers", "comfyui", "kohya"):
        assert_comfyui_applies(family, t.pipe.pipe.transformer, files[fmt], ours)
    if family == "flux":  # DiffSynth's FLUX loader: the kohya layout, and diffusers names it fuses itself
        reference = foreign_loaders.diffsynth_flux_deltas(
            {f"transformer.{m}.lora_{ab}.weight": w for m, d in ours.items()
             for ab, w in (("A", torch.eye(d.shape[1])), ("B", d))})
        for fmt in ("diffsynth", "diffusers"):
            applied = foreign_loaders.diffsynth_flux_deltas(load_file(files[fmt]))
            assert set(applied) == set(reference), fmt
            for module, delta in reference.items():
                torch.testing.assert_close(applied[module], delta, atol=1e-6, rtol=1e-5)
    else:  # DiffSynth's general loader, on its own names and on ComfyUI's `diffusion_model.` ones
        for fmt in ("diffsynth", "comfyui"):
            applied = foreign_loaders.diffsynth_general_deltas(load_file(files[fmt]))
            assert set(applied) == set(ours), fmt
            for module, delta in ours.items():
                torch.testing.assert_close(applied[module], delta, atol=1e-6, rtol=1e-5)


def test_flux_diffsynth_export_is_the_layout_diffsynths_flux_loader_maps(trained, tmp_path):
    """Every key DiffSynth's FLUX loader must map (all but `.alpha`) has a DiffSynth module name, and the
    module names are those of DiffSynth's FLUX DiT (diffsynth/models/flux_dit.py)."""
    t = trained("flux", whole_blocks=True)
    lora = load_file(export_lora(t.lora_dir, "diffsynth", str(tmp_path / "d.safetensors"), family="flux"))
    names = {k: foreign_loaders._diffsynth_flux_name(k) for k in lora if not k.endswith(".alpha")}
    assert all(names.values()), [k for k, v in names.items() if v is None]
    modules = {n.rsplit(".lora_", 1)[0] for n in names.values()}
    assert modules == {"blocks.0.norm1_a.linear", "blocks.0.norm1_b.linear", "blocks.0.attn.a_to_qkv",
                       "blocks.0.attn.b_to_qkv", "blocks.0.attn.a_to_out", "blocks.0.attn.b_to_out", "blocks.0.ff_a.0",
                       "blocks.0.ff_a.2", "blocks.0.ff_b.0", "blocks.0.ff_b.2", "single_blocks.0.norm.linear",
                       "single_blocks.0.to_qkv_mlp", "single_blocks.0.proj_out"}
    # The 0.0.x raw DiffSynth training output (`blocks.0.attn.a_to_qkv.lora_A.default.weight`, alpha = rank)
    # imports too: DiffSynth's own FluxLoRAConverter.align_to_diffsynth_format renames the kohya layout to it.
    raw = {names[k].replace(".weight", ".default.weight"): v for k, v in lora.items() if k in names}
    state_dict, info = from_format(raw, family="flux")
    assert info == {"type": "lora", "r": RANK, "lora_alpha": RANK} and set(state_dict) == set(t.state_dict)
    for k, v in t.state_dict.items():
        torch.testing.assert_close(state_dict[k], v * (ALPHA / RANK) if ".lora_B." in k else v, atol=0, rtol=0)
