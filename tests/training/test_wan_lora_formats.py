"""Wan LoRAs in ComfyUI's naming (wan, wan_i2v, wan_vace), checked key by key against ComfyUI's own code, and
loaded back by diffusers' converter of such files.

ComfyUI's mapping, as read in Comfy-Org/ComfyUI (commit 17358c8f, comfy/lora.py, `model_lora_keys_unet`): Wan has
no branch of its own; every `diffusion_model.<name>.weight` of the loaded model is reachable as the LoRA name
`diffusion_model.<name>` ("generic lora format without any weird key names") or `lora_unet_<name with _>`, and
comfy/weight_adapter/lora.py (`LoRAAdapter.load`) reads `<name>.lora_B.weight` / `<name>.lora_A.weight`
("diffusers2") with `<name>.alpha` scaled by the rank. The names are those of ComfyUI's WanModel
(comfy/ldm/wan/model.py, commit 0c9a69ae): WanSelfAttention q/k/v/o, WanI2VCrossAttention k_img/v_img,
WanAttentionBlock self_attn/cross_attn/ffn.0/ffn.2, VaceWanAttentionBlock before_proj/after_proj, Head.head,
WanModel text_embedding/time_embedding/time_projection and MLPProj img_emb.proj. Transcribed below.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from raydiff.pipelines.base import run_units
from raydiff.registry import get_pipeline_class
from raydiff.training.lora import lora_state_dict, save_lora
from raydiff.training.lora_formats import export_lora, import_lora
from raydiff.training.module import switch_pipe_to_training_mode

RANK, ALPHA = 4, 6
# diffusers module -> ComfyUI WanModel module, per block and at the top.
COMFY_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
COMFY_VACE_BLOCK = {**COMFY_BLOCK, "proj_in": "before_proj", "proj_out": "after_proj"}
COMFY_TOP = {
    "proj_out": "head.head", "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
}


def comfy_name(module: str) -> str:
    """ComfyUI's name for a diffusers Wan (or VACE) module, from the transcribed tables."""
    parts = module.split(".")
    if parts[0] in ("blocks", "vace_blocks"):
        table = COMFY_VACE_BLOCK if parts[0] == "vace_blocks" else COMFY_BLOCK
        return ".".join([*parts[:2], table[".".join(parts[2:])]])
    return COMFY_TOP[module]


def every_linear(transformer) -> list[str]:
    return [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and (n.split(".")[0] in ("blocks", "vace_blocks") or n in COMFY_TOP)]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """trained(family): a LoRA on every linear layer ComfyUI names (blocks, VACE blocks, embedders, head), random
    B, saved; once per family."""
    cache = {}

    def make(family):
        if family not in cache:
            cache[family] = train(family, tiny_model(family), str(tmp_path_factory.mktemp(f"lora-{family}")))
        return cache[family]

    return make


def train(family, model_dir, lora_dir):
    pipe = get_pipeline_class(family).from_pretrained(model_dir, max_sequence_length=16)
    # A top-level name that is also a block layer's last part (VACE's proj_out) is a glob, as raydiff requires.
    linear = every_linear(pipe.pipe.transformer)
    entries = [f"*{n}" if "." not in n else n for n in linear]
    switch_pipe_to_training_mode(pipe, lora_base_model="transformer", lora_target_modules=entries, lora_rank=RANK,
                                 lora_alpha=ALPHA, gradient_checkpointing=False)
    targets = [n for n, m in pipe.pipe.transformer.named_modules() if hasattr(m, "lora_A")]
    assert sorted(targets) == sorted(linear)
    torch.manual_seed(0)
    for name, p in pipe.pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    state = lora_state_dict(pipe.pipe.transformer, "transformer")
    save_lora(lora_dir, state, pipe.pipe.transformer.peft_config["default"])
    return family, model_dir, lora_dir, state, targets


@pytest.mark.parametrize("family", ["wan", "wan_i2v", "wan_vace"])
def test_comfyui_export_uses_comfyuis_module_names_key_by_key(trained, tmp_path, family):
    _, _, lora_dir, state, targets = trained(family)
    exported = load_file(export_lora(lora_dir, "comfyui", str(tmp_path / "comfy.safetensors"), family=family))
    expected = {}
    for module in targets:
        name = "diffusion_model." + comfy_name(module)
        a, b = state[f"transformer.{module}.lora_A.weight"], state[f"transformer.{module}.lora_B.weight"]
        # Exports fold alpha / r into B and write alpha = r, so every loader applies the update at scale 1.
        expected |= {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b * (ALPHA / RANK),
                     f"{name}.alpha": torch.tensor(float(RANK))}
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)
    if family == "wan_vace":
        assert "diffusion_model.vace_blocks.0.before_proj.lora_A.weight" in exported
    back, info = import_lora(str(tmp_path / "comfy.safetensors"), family=family)
    assert info == {"type": "lora", "r": RANK, "lora_alpha": RANK} and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k] * (ALPHA / RANK) if ".lora_B." in k else state[k]) for k in state)


@pytest.mark.parametrize("family", ["wan", "wan_i2v"])  # diffusers' converter knows no VACE block names
def test_diffusers_loads_the_comfyui_export_and_predicts_as_trained(trained, tmp_path, family):
    """diffusers' own converter of original-named Wan LoRAs (`_convert_non_diffusers_wan_lora_to_diffusers`) is a
    second, independent reading of the same names. It converts the blocks' layers with their alphas (outside the
    blocks it leaves alpha keys unconverted and fails), so the blocks are what this checks."""
    _, model_dir, _, state, _ = trained(family)
    cls = get_pipeline_class(family)
    blocks_only = {k: v for k, v in state.items() if k.startswith("transformer.blocks.")}
    save_lora(str(tmp_path / "ours"), blocks_only, _config(blocks_only))
    out = export_lora(str(tmp_path / "ours"), "comfyui", str(tmp_path / "comfy.safetensors"), family=family)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    preds = []
    for path in (str(tmp_path / "ours"), out):
        pipe = cls.from_pretrained(model_dir, max_sequence_length=16)
        pipe.pipe.load_lora_weights(path)
        with torch.no_grad():
            inputs = run_units(pipe, {"prompt": ["a fox"], "video": video})
            latents = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(1))
            conditions = {k: v for k, v in inputs.items() if k not in ("latents", "video", "prompt", "loss_mask")}
            preds.append(pipe.model_fn(latents, torch.tensor([0.6]), **conditions))
    plain = cls.from_pretrained(model_dir, max_sequence_length=16)
    with torch.no_grad():
        base = plain.model_fn(latents, torch.tensor([0.6]), **conditions)
    assert (preds[0] - base).abs().max() > 1e-2
    torch.testing.assert_close(preds[1], preds[0], atol=1e-5, rtol=1e-5)


def _config(state: dict):
    from peft import LoraConfig

    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in state})
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules)
