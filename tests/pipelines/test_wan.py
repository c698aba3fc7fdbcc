"""Wan 2.1: raydiff's units and model_fn against diffusers' WanPipeline on a tiny random checkpoint."""

import logging
import warnings
from pathlib import Path

import diffusers
import pytest
import torch
import yaml

from raydiff.config import load_config, parse_config
from raydiff.pipelines.base import run_units
from raydiff.pipelines.wan import WanVideoPipeline
from raydiff.registry import get_pipeline_class
from raydiff.training.lora import save_lora
from raydiff.training.module import PipelineTrainingModule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "wan"
PROMPTS = ["a red fox jumps", "waves at night"]
MAX_LEN = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan")
    WanVideoPipeline.write_tiny(str(path))
    return str(path)


def rand_video(b=2, f=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, 16, 16, generator=g) * 2 - 1


def capture_transformer_calls(pipe):
    calls = []
    pipe.transformer.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out[0])), with_kwargs=True)
    return calls


def test_registered_family():
    assert get_pipeline_class("wan") is WanVideoPipeline


def test_parity_with_diffusers_pipeline(tiny_dir):
    ref = diffusers.WanPipeline.from_pretrained(tiny_dir)
    calls = capture_transformer_calls(ref)
    ref(PROMPTS, height=16, width=16, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
        max_sequence_length=MAX_LEN, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2  # no CFG: one call per step

    ours = WanVideoPipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", max_sequence_length=MAX_LEN)
    with torch.no_grad():
        inputs = run_units(ours, {"prompt": PROMPTS, "video": rand_video()})
        # (a) prompt embeddings equal what the pipeline handed its transformer
        torch.testing.assert_close(inputs["prompt_embeds"], calls[0][0]["encoder_hidden_states"], atol=1e-6, rtol=0)
        conditions = {k: v for k, v in inputs.items() if k not in {"latents", "video", "prompt"}}
        worst = 0.0
        for kw, out in calls:  # sigma 1.0, then a shifted mid-schedule sigma
            sigma = kw["timestep"].float() / 1000  # Euler: timestep = 1000 sigma
            pred = ours.model_fn(kw["hidden_states"], sigma, **conditions)
            assert pred.shape == kw["hidden_states"].shape == (2, 16, 3, 2, 2) and pred.dtype == torch.float32
            worst = max(worst, (pred - out).abs().max().item())
    print(f"wan parity max abs diff: {worst:.3g}")
    assert worst < 1e-5


def test_video_embedder_inverts_decode_normalisation(tiny_dir):
    ours = WanVideoPipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    vae = ours.pipe.vae
    for frames, latent_frames in [(9, 3), (1, 1)]:  # an image is a one-frame video
        video = rand_video(f=frames, seed=frames)
        with torch.no_grad():
            latents = run_units(ours, {"prompt": PROMPTS, "video": video})["latents"]
            raw = vae.encode(video).latent_dist.mode()
        assert latents.shape == (2, 16, latent_frames, 2, 2)
        # WanPipeline's decode-time formula, verbatim: latents / (1 / std) + mean must give back the VAE's latents.
        mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
        torch.testing.assert_close(latents / inv_std + mean, raw, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        run_units(ours, {"prompt": PROMPTS, "video": rand_video(f=8)})


def test_schedule_defaults():
    grid = WanVideoPipeline.schedule.grid()
    assert grid.shape == (1000,)
    assert grid[0].item() == 1.0
    # base grid linspace(1, 0, 1001)[:-1] ends at 0.001; shift 5: 5s / (1 + 4s)
    assert grid[-1].item() == pytest.approx(0.005 / 1.004, rel=1e-12)
    assert grid[500].item() == pytest.approx(2.5 / 3.0, rel=1e-12)  # base 0.5
    assert WanVideoPipeline.schedule.dynamic is None


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_lora_round_trips_through_diffusers(tiny_dir, tmp_path):
    cfg = parse_config({"model": {"family": "wan", "path": tiny_dir, "max_sequence_length": MAX_LEN},
                        "data": {"metadata_path": "unused.csv"},
                        "lora": {"rank": 4, "alpha": 8, "target_modules": WanVideoPipeline.default_lora_targets}})
    module = PipelineTrainingModule(cfg)
    g = torch.Generator().manual_seed(1)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    state = module.trainable_state_dict()
    assert any(".attn2.to_k." in k for k in state) and any(".ffn.net.2." in k for k in state)
    save_lora(str(tmp_path), state, module.lora_config)

    pipe = diffusers.WanPipeline.from_pretrained(tiny_dir)
    latents = torch.randn(1, 16, 3, 2, 2, generator=g)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS[:1], do_classifier_free_guidance=False, max_sequence_length=MAX_LEN)
        base = pipe.transformer(latents, sigma * 1000, embeds, return_dict=False)[0]

    records, logger = _Records(), logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(tmp_path))
    finally:
        logger.removeHandler(records)
    text = "\n".join(records.messages + [str(w.message) for w in caught]).lower()
    assert "missing" not in text and "unexpected" not in text, text

    with torch.no_grad():
        with_lora = pipe.transformer(latents, sigma * 1000, embeds, return_dict=False)[0]
        ours = module.pipe.model_fn(latents, sigma, prompt_embeds=embeds)
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, with_lora, atol=1e-4, rtol=0)


def test_example_configs_validate():
    for name in ("lora_wan21_t2v_1_3b.yaml", "tiny.yaml"):
        cfg = load_config(EXAMPLES / name)
        assert cfg.model.family == "wan" and cfg.data.data_file_keys == ["video"]
        assert cfg.data.num_frames % 4 == 1
        assert set(cfg.lora.target_modules) == set(WanVideoPipeline.default_lora_targets)


def test_tiny_example_training_step(tiny_dir):
    raw = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    raw["model"]["path"] = tiny_dir
    cfg = parse_config(raw)
    module = PipelineTrainingModule(cfg)
    d = cfg.data
    batch = {"video": rand_video(b=2, f=d.num_frames), "prompt": PROMPTS}
    loss = module(batch, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in module.named_parameters() if n not in trainable)
    # B starts at zero, so only B gets a gradient on the first step.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


def test_dit_only_load_skips_other_components(tiny_dir):
    ours = WanVideoPipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", components=["transformer"])
    assert ours.pipe.transformer is not None
    assert ours.pipe.vae is None and ours.pipe.text_encoder is None and ours.pipe.tokenizer is None
    latents = torch.zeros(1, 16, 3, 2, 2)
    assert ours.image_seq_len(latents) == 3
    with torch.no_grad():
        pred = ours.model_fn(latents, torch.tensor([0.5]), prompt_embeds=torch.zeros(1, MAX_LEN, 32))
    assert pred.shape == latents.shape
