"""ControlNets (model.controlnet) for flux, qwen_image and sd3: model_fn against the ControlNet and transformer
calls inside each family's diffusers ControlNet pipeline, a new ControlNet made as diffusers' from_transformer
makes it, the control image encoded ahead (stream/cache) as inline, a LoRA on the ControlNet."""

from functools import partial

import numpy as np
import pytest
import torch
from controlnet_common import (
    FAMILIES,
    MAX_LEN,
    PROMPTS,
    as_input,
    conditions,
    controlnet_config,
    decoded_batch,
    uint8_images,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from family_checks import train_losses
from PIL import Image

from raydiff.config import ControlNetConfig, parse_config
from raydiff.data.cache_io import columns_to_table, table_to_columns
from raydiff.data.collate import collate
from raydiff.data.components import training_components
from raydiff.data.encoder import Encoder
from raydiff.pipelines.base import run_units, unpack_latents
from raydiff.registry import get_pipeline_class
from raydiff.training.lora import LORA_FILE, save_lora
from raydiff.training.module import PipelineTrainingModule

# How each family's ControlNet pipeline calls its transformer: packed tokens, the timestep's scale (t / sigma),
# and the options that keep its call to one transformer pass per step with the family's guidance.
CALLS = {
    "flux": dict(packed=True, t_scale=1, call={"guidance_scale": 3.5}, family={"guidance": 3.5}),
    "qwen_image": dict(packed=True, t_scale=1, call={}, family={}),
    "sd3": dict(packed=False, t_scale=1000, call={"guidance_scale": 1.0}, family={}),
}


def capture(model) -> list:
    calls = []
    model.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out)), with_kwargs=True)
    return calls



def sd3_pooled_controlnet(tiny_controlnet, tmp_path) -> str:
    """The tiny SD3 ControlNet with `force_zeros_for_pooled_projection: false`: it sees the pooled projections and
    its control latents keep the VAE's shift (SD3ControlNetPipeline's other branch)."""
    from diffusers import SD3ControlNetModel

    model = SD3ControlNetModel.from_pretrained(f"{tiny_controlnet('sd3')}/controlnet")
    model.register_to_config(force_zeros_for_pooled_projection=False)
    model.save_pretrained(tmp_path / "pooled")
    return str(tmp_path / "pooled")


@pytest.mark.parametrize("case", [*FAMILIES, "sd3_pooled"])
def test_model_fn_matches_the_controlnet_pipeline(case, tiny_controlnet, monkeypatch, tmp_path):
    family = case.removesuffix("_pooled")
    cls, how, path = get_pipeline_class(family), CALLS[family], tiny_controlnet(family)
    cn_path = sd3_pooled_controlnet(tiny_controlnet, tmp_path) if case == "sd3_pooled" else f"{path}/controlnet"
    control = uint8_images(1, seed=3)
    # The pipeline samples the control image's latent distribution; training uses its mode (deterministic,
    # so cached and inline agree). With the mode on both sides the encodings can be compared exactly.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    ref = cls.controlnet_pipeline_class.from_pretrained(path, controlnet=cls.controlnet_class.from_pretrained(cn_path))
    dit_calls, controlnet_calls = capture(ref.transformer), capture(ref.controlnet)
    ref(PROMPTS, control_image=Image.fromarray(control[0]), height=32, width=32, num_inference_steps=2,
        max_sequence_length=MAX_LEN, output_type="latent", generator=torch.Generator().manual_seed(0), **how["call"])
    assert len(dit_calls) == len(controlnet_calls) == 2

    ours = cls.from_pretrained(path, max_sequence_length=MAX_LEN, controlnet=ControlNetConfig(path=cn_path),
                               **how["family"])
    plain = cls(ours.pipe, "cpu", max_sequence_length=MAX_LEN, **how["family"])  # the same DiT, no ControlNet
    with torch.no_grad():
        inputs = run_units(ours, {"prompt": PROMPTS, "image": torch.zeros(2, 3, 32, 32),
                                  "control_image": as_input(control).repeat(2, 1, 1, 1)})
        h, w = inputs["control_latents"].shape[-2:]
        to_ours = (lambda x: unpack_latents(x, h, w)) if how["packed"] else (lambda x: x)
        torch.testing.assert_close(to_ours(controlnet_calls[0][0]["controlnet_cond"]), inputs["control_latents"],
                                   atol=1e-5, rtol=1e-5)
        worst, effect = 0.0, 0.0
        for kw, out in dit_calls:
            latents, sigma = to_ours(kw["hidden_states"]), kw["timestep"] / how["t_scale"]
            pred = ours.model_fn(latents, sigma, **conditions(inputs))
            worst = max(worst, (pred - to_ours(out[0])).abs().max().item())
            effect = max(effect, (pred - plain.model_fn(latents, sigma, **conditions(inputs))).abs().max().item())
    print(f"{case} ControlNet parity: max abs diff {worst:.3g}; the ControlNet changes the output by {effect:.3g}")
    assert worst < 1e-5
    assert effect > 1e-2  # the comparison sees the ControlNet: dropping its residuals would fail it


@pytest.mark.parametrize("family", FAMILIES)
def test_a_new_controlnet_copies_the_transformer_and_starts_as_a_no_op(family, tiny_model):
    cls, path = get_pipeline_class(family), tiny_model(family)
    layers = {k: 1 for k in cls.controlnet_layers}
    ours = cls.from_pretrained(path, max_sequence_length=MAX_LEN, controlnet=ControlNetConfig(**layers))
    dit, controlnet = ours.dit, ours.controlnet
    assert type(controlnet) is cls.controlnet_class and type(ours.pipe) is cls.controlnet_pipeline_class
    assert controlnet.config.num_layers == 1 and len(controlnet.transformer_blocks) == 1
    fresh = cls.from_pretrained(path, components=["transformer"]).dit
    assert dict(dit.config) == dict(fresh.config)  # diffusers' SD3 from_transformer edits it; undone
    block = dict(dit.transformer_blocks[0].named_parameters())
    assert all(torch.equal(p, block[n]) for n, p in controlnet.transformer_blocks[0].named_parameters())
    plain = cls(ours.pipe, "cpu", max_sequence_length=MAX_LEN)
    with torch.no_grad():
        inputs = run_units(ours, {"prompt": PROMPTS, "image": as_input(uint8_images()),
                                  "control_image": as_input(uint8_images(seed=1))})
        latents, sigma = torch.randn(inputs["latents"].shape), torch.tensor([0.3, 0.8])
        torch.testing.assert_close(ours.model_fn(latents, sigma, **conditions(inputs)),
                                   plain.model_fn(latents, sigma, **conditions(inputs)), atol=0, rtol=0)




@pytest.mark.parametrize("family", FAMILIES)
def test_the_control_image_encoded_ahead_gives_the_inline_loss(family, tiny_controlnet):
    path = tiny_controlnet(family)
    inline = parse_config(controlnet_config(family, path))
    ahead = parse_config(controlnet_config(family, path, data={"preprocess": "stream"}))
    encoder = Encoder(ahead, device="cpu")
    assert encoder.pipe.controlnet is None and encoder.pipe.dit is None  # encoders load neither
    columns = table_to_columns(columns_to_table(encoder.encode(decoded_batch())))  # the cache's round trip
    assert "control_latents" in columns and "control_image" not in columns
    worker = PipelineTrainingModule(ahead, components=training_components(ahead))
    assert worker.pipe.pipe.vae is None and worker.pipe.controlnet is not None
    encoded = collate(columns, "cpu", ahead.data.data_file_keys)
    # Only a unit of the frozen DiT is left to the step (FLUX's guidance): the encoders never load a DiT.
    assert [u.name for u in worker.units_to_run(encoded)] == (["guidance"] if family == "flux" else [])
    full = PipelineTrainingModule(inline)
    with torch.no_grad():  # the test can fail: other control images give another loss (same seed as step 0)
        other = full(collate(decoded_batch(control_seed=9), "cpu",
                             inline.data.data_file_keys), generator=torch.Generator().manual_seed(5)).item()
    # Per optimizer step, so the trained ControlNets agree too.
    got = train_losses(worker, ahead, encoded, steps=3)
    want = train_losses(full, inline, collate(decoded_batch(), "cpu", inline.data.data_file_keys), steps=3)
    assert np.isfinite(want).all() and abs(other - want[0]) > 1e-4 and want[0] != want[-1]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_step_trains_only_the_controlnet(family, tiny_controlnet):
    module = PipelineTrainingModule(parse_config(controlnet_config(family, tiny_controlnet(family))))
    batch = collate(decoded_batch(), "cpu", ["image", "control_image"])
    module(batch, generator=torch.Generator().manual_seed(0)).backward()
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained == {f"models.controlnet.{n}" for n, _ in module.pipe.controlnet.named_parameters()}
    assert all(module.get_parameter(n).dtype == torch.float32 for n in trained)
    # The last block's text-stream output feeds nothing (FLUX's single blocks take it; Qwen-Image and SD3 have none):
    # its weights get no gradient, which is why DDP runs with find_unused_parameters beside a ControlNet.
    last = f"models.controlnet.transformer_blocks.{len(module.pipe.controlnet.transformer_blocks) - 1}."
    no_grad = {n for n in trained if module.get_parameter(n).grad is None}
    text_out = ("attn.to_add_out", "txt_mlp", "ff_context", "norm2_context")
    assert all(n.startswith(last) and any(t in n for t in text_out) for n in no_grad)
    assert bool(no_grad) == (family != "flux")
    assert all(p.grad is None for n, p in module.named_parameters() if n not in trained)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_on_the_controlnet_loads_with_diffusers_and_changes_the_output(family, tiny_controlnet, tmp_path,
                                                                              lora_key_warnings):
    cls, path = get_pipeline_class(family), tiny_controlnet(family)
    cfg = parse_config(controlnet_config(family, path, lora={"rank": 4, "alpha": 8}, train={"trainable_models": []}))
    assert cfg.lora.base_model == "controlnet"
    module = PipelineTrainingModule(cfg)
    g = torch.Generator().manual_seed(1)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    state = module.trainable_state_dict()
    assert state and all(k.startswith("controlnet.") and ".default." not in k for k in state)
    save_lora(str(tmp_path), state, module.lora_config, prefix="controlnet")

    fresh = cls.from_pretrained(path, max_sequence_length=MAX_LEN, controlnet=cfg.model.controlnet)
    with torch.no_grad():
        inputs = run_units(fresh, {"prompt": PROMPTS, "image": as_input(uint8_images()),
                                   "control_image": as_input(uint8_images(seed=1))})
        latents, sigma = torch.randn(inputs["latents"].shape), torch.tensor([0.3, 0.8])
        before = fresh.model_fn(latents, sigma, **conditions(inputs))
        # The folder and weight_name, as a user loads it: diffusers reads the metadata (alpha) only then.
        load = partial(fresh.controlnet.load_lora_adapter, str(tmp_path), weight_name=LORA_FILE, prefix="controlnet")
        assert lora_key_warnings(load) == []
        after = fresh.model_fn(latents, sigma, **conditions(inputs))
        trained = module.pipe.model_fn(latents, sigma, **conditions(inputs))
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-5)  # alpha 8 / rank 4 read from the metadata


def test_the_torch_free_controlnet_table_agrees_with_the_family_classes():
    from raydiff.registry import BUILTIN_CONTROLNETS, BUILTIN_FAMILIES

    for family in BUILTIN_FAMILIES:
        cls = get_pipeline_class(family)
        own = None if cls.controlnet_class is None else (cls.controlnet_class.__name__, cls.controlnet_layers)
        assert BUILTIN_CONTROLNETS.get(family) == own, family  # what the config checks before Ray starts
    assert set(BUILTIN_CONTROLNETS) == set(FAMILIES)
