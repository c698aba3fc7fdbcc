"""FLUX: raydiff's units and model_fn against diffusers' FluxPipeline on a tiny random checkpoint."""

import diffusers
import pytest
import torch

from raydiff.pipelines.base import pack_latents, run_units, split_units, unpack_latents
from raydiff.pipelines.flux import FluxImagePipeline
from raydiff.training.lora import save_lora
from raydiff.training.module import switch_pipe_to_training_mode

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def flux_dir(tiny_model):
    return tiny_model("flux")


def capture_transformer_calls(pipe):
    calls = []
    pipe.transformer.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out[0])), with_kwargs=True)
    return calls


def test_pack_unpack_roundtrip_and_layout():
    x = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).view(2, 4, 4, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 2 * 3, 16)
    # token 0 holds channel 0's top-left 2x2 patch first: (0,0), (0,1), (1,0), (1,1)
    assert tokens[0, 0, :4].tolist() == [x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]
    torch.testing.assert_close(unpack_latents(tokens, 4, 6), x)
    torch.testing.assert_close(tokens, diffusers.FluxPipeline._pack_latents(x, 2, 4, 4, 6))


def test_model_fn_matches_diffusers_pipeline(flux_dir):
    ref = diffusers.FluxPipeline.from_pretrained(flux_dir)
    calls = capture_transformer_calls(ref)
    ref(PROMPTS, height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16,
        output_type="latent", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2

    ours = FluxImagePipeline.from_pretrained(flux_dir, guidance=3.5, max_sequence_length=16)
    with torch.no_grad():
        inputs = run_units(ours, {"prompt": PROMPTS, "image": torch.zeros(2, 3, 32, 32)})
        kw0 = calls[0][0]
        # Prompt units reproduce exactly what the pipeline gave its transformer.
        torch.testing.assert_close(inputs["prompt_embeds"], kw0["encoder_hidden_states"], atol=0, rtol=0)
        torch.testing.assert_close(inputs["pooled_prompt_embeds"], kw0["pooled_projections"], atol=0, rtol=0)
        torch.testing.assert_close(inputs["guidance"], kw0["guidance"])
        conditions = {k: v for k, v in inputs.items() if k not in ("latents", "image", "prompt")}
        for kw, out in calls:
            latents = unpack_latents(kw["hidden_states"], 16, 16)
            pred = ours.model_fn(latents, kw["timestep"], **conditions)  # the pipeline passes sigma = t/1000
            torch.testing.assert_close(pred, unpack_latents(out, 16, 16), atol=1e-5, rtol=1e-5)


def test_image_latents_invert_the_decode_normalisation(flux_dir):
    ours = FluxImagePipeline.from_pretrained(flux_dir)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = run_units(ours, {"prompt": ["x"], "image": image})["latents"]
        vae = ours.pipe.vae
        raw = vae.encode(image).latent_dist.mode()
    assert latents.shape == (1, 4, 16, 16)
    # FluxPipeline decodes with latents / scaling_factor + shift_factor; training must invert exactly that.
    torch.testing.assert_close(latents / vae.config.scaling_factor + vae.config.shift_factor, raw)


def test_dit_only_load_skips_encoders(flux_dir):
    ours = FluxImagePipeline.from_pretrained(flux_dir, components=["transformer"])
    assert ours.pipe.vae is None and ours.pipe.text_encoder is None and ours.pipe.text_encoder_2 is None
    encode, step = split_units(ours, trainable=["transformer"])
    assert [u.name for u in encode] == ["shape_check", "prompt_embedder", "input_image_embedder"]
    assert [u.name for u in step] == ["guidance"]


def test_schedule_defaults():
    grid = FluxImagePipeline.schedule.grid()
    assert grid[0] == pytest.approx(1.0)
    s_min = 0.003 / 1.002
    assert grid[-1] == pytest.approx(3 * s_min / (1 + 2 * s_min))
    mu = FluxImagePipeline.schedule.dynamic.mu(4096)
    assert mu == pytest.approx(1.15)


def test_lora_loads_into_diffusers_without_key_warnings(flux_dir, tmp_path, lora_key_warnings):
    ours = FluxImagePipeline.from_pretrained(flux_dir)
    config = switch_pipe_to_training_mode(ours, lora_base_model="transformer",
                                          lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_rank=4,
                                          lora_alpha=8)
    torch.manual_seed(0)
    for name, p in ours.pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    from raydiff.training.lora import lora_state_dict

    sd = lora_state_dict(ours.pipe.transformer, "transformer")
    assert all(k.startswith("transformer.") and ".default." not in k for k in sd)
    save_lora(str(tmp_path), sd, config)

    pipe = diffusers.FluxPipeline.from_pretrained(flux_dir)
    latents, sigma = torch.randn(1, 4, 16, 16), torch.tensor([0.7])
    with torch.no_grad():
        cond = run_units(FluxImagePipeline(pipe, "cpu"),
                         {"prompt": ["a red circle"], "image": torch.zeros(1, 3, 32, 32)})
        cond = {k: v for k, v in cond.items() if k not in ("latents", "image", "prompt")}
        base = FluxImagePipeline(pipe, "cpu").model_fn(latents, sigma, **cond)
        assert lora_key_warnings(lambda: pipe.load_lora_weights(str(tmp_path))) == []
        with_lora = FluxImagePipeline(pipe, "cpu").model_fn(latents, sigma, **cond)
        ours_pred = ours.model_fn(latents, sigma, **cond)
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA changes the output...
    torch.testing.assert_close(with_lora, ours_pred, atol=1e-4, rtol=1e-4)  # ...exactly as in training (alpha 8 / r 4)

    # The warning check can fail: a key that matches no module is reported.
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    sd["transformer.transformer_blocks.0.attn.bogus.lora_A.weight"] = torch.zeros(4, 32)
    sd["transformer.transformer_blocks.0.attn.bogus.lora_B.weight"] = torch.zeros(32, 4)
    save_file(sd, str(tmp_path / "bogus.safetensors"))
    fresh = diffusers.FluxPipeline.from_pretrained(flux_dir)
    assert lora_key_warnings(lambda: fresh.load_lora_weights(str(tmp_path / "bogus.safetensors")))
