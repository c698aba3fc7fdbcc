"""Wan 2.2 in the `wan` family: the A14B experts (each against the diffusers pipeline's calls to it, trained on
its share of the timesteps, its LoRA loadable with `load_into_transformer_2`), TI2V-5B text-to-video
(per-token timesteps) and stills as one-frame videos."""

import math
import os
import re

import diffusers
import numpy as np
import pytest
import torch
from wan_common import (
    MAX_LEN,
    PROMPTS,
    capture_calls,
    conditions_of,
    inline_and_ahead_losses,
    rand_video,
    randomize_lora,
    uint8_clips,
    wan_config,
)

from raydiff.config import ConfigError, parse_config
from raydiff.launch.checks import check_model
from raydiff.pipelines.base import run_units
from raydiff.pipelines.wan import WanVideoPipeline
from raydiff.registry import get_pipeline_class
from raydiff.training.checkpoint import save_checkpoint
from raydiff.training.evaluation import eval_sigmas
from raydiff.training.module import PipelineTrainingModule


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan22-a14b")
    WanVideoPipeline.write_tiny(str(path), variant="wan22_a14b")
    return str(path)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan22-ti2v")
    WanVideoPipeline.write_tiny(str(path), variant="wan22_ti2v_5b")
    return str(path)


def test_each_expert_matches_the_calls_the_pipeline_routes_to_it(a14b):
    ref = diffusers.WanPipeline.from_pretrained(a14b)
    assert ref.config.boundary_ratio == 0.875
    calls = {"high": capture_calls(ref.transformer), "low": capture_calls(ref.transformer_2)}
    # Euler, shift 5, 4 steps: timesteps 1000, 910 | 717, 24 -> two calls per expert.
    ref(PROMPTS, height=16, width=16, num_frames=9, num_inference_steps=4, guidance_scale=1.0,
        max_sequence_length=MAX_LEN, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert [len(calls["high"]), len(calls["low"])] == [2, 2]
    for expert, other in (("high", "transformer_2"), ("low", "transformer")):
        ours = WanVideoPipeline.from_pretrained(a14b, max_sequence_length=MAX_LEN, expert=expert)
        assert getattr(ours.pipe, other) is None  # the other expert is never loaded
        lo, hi = ours.sigma_range
        worst = 0.0
        with torch.no_grad():
            inputs = run_units(ours, {"prompt": PROMPTS, "video": rand_video()})
            for kw, out in calls[expert]:
                sigma = kw["timestep"].float() / 1000
                assert ((sigma >= lo) & (sigma < hi)).all()  # the pipeline's routing is our range
                pred = ours.model_fn(kw["hidden_states"], sigma, **conditions_of(inputs))
                worst = max(worst, (pred - out).abs().max().item())
        print(f"wan 2.2 {expert} expert parity max abs diff: {worst:.3g}")
        assert worst < 1e-5
    assert (lo, hi) == (0.0, 0.875)


def test_an_expert_trains_and_evaluates_only_on_its_share(a14b):
    for expert, ok in (("high", lambda s: s >= 0.875), ("low", lambda s: s < 0.875)):
        for sampling in ("diffsynth", "logit_normal"):
            cfg = parse_config(wan_config(a14b, model={"expert": expert}, loss={"timestep_sampling": sampling}))
            module = PipelineTrainingModule(cfg)
            seen = record_sigmas(module.pipe)
            batch = {"prompt": PROMPTS, "video": rand_video()}
            with torch.no_grad():
                for i in range(8):
                    module(batch, generator=torch.Generator().manual_seed(i))
            sigmas = torch.cat(seen)
            assert len(sigmas) == 16 and ok(sigmas).all(), (expert, sigmas)
            quantiles = eval_sigmas(module.pipe, cfg.loss, 8, torch.zeros(1, 16, 3, 2, 2))
            assert ok(quantiles).all()


def test_low_expert_lora_loads_into_transformer_2_without_key_warnings(a14b, tmp_path, lora_key_warnings):
    cfg = parse_config(wan_config(a14b, model={"expert": "low"}))
    assert cfg.lora.base_model == "transformer_2"  # the expert's denoiser, when lora.base_model is left unset
    module = PipelineTrainingModule(cfg)
    assert module.pipe.pipe.transformer is None
    randomize_lora(module)
    state = module.trainable_state_dict()
    assert state and all(k.startswith("transformer.blocks.") for k in state)  # diffusers' key convention

    class _Sched:
        def state_dict(self):
            return {}

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])
    save_checkpoint(str(tmp_path), module, optimizer, _Sched(), _state(), "model: {}\n")

    pipe = diffusers.WanPipeline.from_pretrained(a14b)
    latents, sigma = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(2)), torch.tensor([0.5])
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS[:1], do_classifier_free_guidance=False, max_sequence_length=MAX_LEN)
        experts = (pipe.transformer, pipe.transformer_2)
        before = [m(latents, sigma * 1000, embeds, return_dict=False)[0] for m in experts]
    assert lora_key_warnings(lambda: pipe.load_lora_weights(str(tmp_path), load_into_transformer_2=True)) == []
    with torch.no_grad():
        after = [m(latents, sigma * 1000, embeds, return_dict=False)[0] for m in experts]
        ours = module.pipe.model_fn(latents, sigma, prompt_embeds=embeds)
    assert torch.equal(after[0], before[0])  # the high-noise expert is untouched
    assert (after[1] - before[1]).abs().max() > 1e-3
    torch.testing.assert_close(ours, after[1], atol=1e-5, rtol=0)


def record_sigmas(pipe) -> list:
    """Wrap `pipe.model_fn` to record every sigma it is called with."""
    seen, model_fn = [], pipe.model_fn

    def recording(latents, sigma, **conditions):
        seen.append(sigma)
        return model_fn(latents, sigma, **conditions)

    pipe.model_fn = recording
    return seen


def _state():
    from raydiff.training.checkpoint import TrainerState

    return TrainerState()


def test_ti2v_text_to_video_matches_the_pipeline_with_per_token_timesteps(ti2v):
    ref = diffusers.WanPipeline.from_pretrained(ti2v)
    assert ref.config.expand_timesteps and ref.vae_scale_factor_spatial == 16
    calls = capture_calls(ref.transformer)
    ref(PROMPTS, height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
        max_sequence_length=MAX_LEN, output_type="latent", generator=torch.Generator().manual_seed(0))
    ours = WanVideoPipeline.from_pretrained(ti2v, max_sequence_length=MAX_LEN)
    worst = 0.0
    with torch.no_grad():
        inputs = run_units(ours, {"prompt": PROMPTS, "video": rand_video(size=32)})
        assert inputs["latents"].shape == (2, 8, 3, 2, 2)
        for kw, out in calls:
            assert kw["timestep"].shape == (2, 3)  # (B, tokens): 3 latent frames of one 2x2 patch
            sigma = kw["timestep"][:, 0].float() / 1000
            pred = ours.model_fn(kw["hidden_states"], sigma, **conditions_of(inputs))
            worst = max(worst, (pred - out).abs().max().item())
    print(f"wan 2.2 ti2v text-to-video parity max abs diff: {worst:.3g}")
    assert worst < 1e-5


def test_a_still_trains_as_a_one_frame_video(tiny_model):
    ours = WanVideoPipeline.from_pretrained(tiny_model("wan"), max_sequence_length=MAX_LEN)
    still = rand_video(f=1)
    with torch.no_grad():
        from_image = run_units(ours, {"prompt": PROMPTS, "image": still[:, :, 0]})
        from_video = run_units(ours, {"prompt": PROMPTS, "video": still})
    assert from_image["latents"].shape == (2, 16, 1, 2, 2) and from_image["num_frames"] == 1
    assert torch.equal(from_image["latents"], from_video["latents"])
    raw = wan_config(tiny_model("wan"), data_file_keys=["image"])
    module = PipelineTrainingModule(parse_config(raw))
    loss = module({"prompt": PROMPTS, "image": still[:, :, 0]}, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("keys, problem", [
    (["video", "image"], "trains on exactly one of ['video', 'image']"),
    (["clip"], "wan does not read 'clip'"),
    (["control_video"], "wan does not read 'control_video'"),
])
def test_data_keys_a_family_cannot_read_are_refused_by_the_config(keys, problem):
    with pytest.raises(ConfigError, match=r"data.data_file_keys.*" + re.escape(problem)):
        parse_config(wan_config("m", data_file_keys=keys))
    with pytest.raises(ConfigError, match="flux does not read 'video'"):
        parse_config(wan_config("m", family="flux", data_file_keys=["video"]))
    assert parse_config(wan_config("m", data_file_keys=["image"])).data.data_file_keys == ["image"]
    assert parse_config({"model": {"family": "wan", "path": "m"}, "data": {"metadata_path": "x.csv"}})


def test_expert_settings_are_checked_before_ray_starts(a14b, tiny_model):
    with pytest.raises(ConfigError, match="model.expert low trains transformer_2, but lora.base_model names "
                                          "transformer"):
        parse_config(wan_config(a14b, model={"expert": "low"}, lora={"base_model": "transformer"}))
    with pytest.raises(ConfigError, match="validation.prompts needs both experts"):
        parse_config(wan_config(a14b, model={"expert": "high"}, validation={"prompts": ["a"]}))
    assert parse_config(wan_config(a14b, model={"expert": "high"})).lora.base_model == "transformer"
    with pytest.raises(ConfigError, match=r"two experts \(boundary_ratio 0.875\); set model.expert"):
        check_model(parse_config(wan_config(a14b)))
    with pytest.raises(ConfigError, match="model.expert high: .* has one denoiser"):
        check_model(parse_config(wan_config(tiny_model("wan"), model={"expert": "high"})))
    check_model(parse_config(wan_config(a14b, model={"expert": "low"})))


@pytest.mark.parametrize("variant, expert, size", [("wan22_a14b", "low", 16), ("wan22_ti2v_5b", None, 32)])
def test_encode_ahead_gives_the_inline_loss(tiny_model, variant, expert, size):
    raw = wan_config(tiny_model("wan", variant), model={"expert": expert})
    batch = {"prompt": np.array(PROMPTS, dtype=object), "_row": np.array([0, 1]), "video": uint8_clips(size=size)}
    inline, ahead = inline_and_ahead_losses(raw, batch)
    assert math.isfinite(inline) and inline == pytest.approx(ahead, rel=1e-5)


def test_sample_loads_a_low_expert_lora_into_transformer_2(a14b, tmp_path, monkeypatch):
    import raydiff.training.validation as validation
    from raydiff.launch.sample import sample

    module = PipelineTrainingModule(parse_config(wan_config(a14b, model={"expert": "low"})))
    randomize_lora(module, seed=4)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])
    ckpt = tmp_path / "ckpt"
    save_checkpoint(str(ckpt), module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                    _state(), "model: {family: wan, expert: low}\n")
    pipes, sample_images = [], validation.sample_images
    monkeypatch.setattr(validation, "sample_images", lambda family, pipe, *a, **kw: (
        pipes.append(pipe), sample_images(family, pipe, *a, **kw))[1])
    out = sample(a14b, str(ckpt), "a fox", str(tmp_path / "on.png"), family="wan", steps=4, height=16, width=16,
                 num_frames=9, guidance=1.0, expert="low")
    assert os.path.getsize(out) > 0
    # The tiny VAE hardly reacts to its latents (pixels move ~1e-5), so the LoRA is checked where it acts.
    pipe = pipes[0]
    assert pipe.get_list_adapters() == {"transformer_2": ["raydiff"]}
    latents, embeds = torch.randn(1, 16, 3, 2, 2), torch.randn(1, MAX_LEN, 32)
    with torch.no_grad():
        on = pipe.transformer_2(latents, torch.tensor([500.0]), embeds, return_dict=False)[0]
        pipe.transformer_2.disable_adapters()
        off = pipe.transformer_2(latents, torch.tensor([500.0]), embeds, return_dict=False)[0]
    assert (on - off).abs().max() > 1e-3


def test_real_size_example_configs_validate(tiny_model):
    from pathlib import Path

    from raydiff.config import load_config
    from raydiff.training.lora import resolve_targets

    root = Path(__file__).resolve().parents[2] / "examples"
    high, low = (load_config(root / "wan22" / f"lora_wan22_a14b_{e}.yaml") for e in ("high", "low"))
    assert (high.model.expert, high.lora.base_model) == ("high", "transformer")
    assert (low.model.expert, low.lora.base_model) == ("low", "transformer_2")
    assert high.data.cache_dir != low.data.cache_dir
    ti2v = load_config(root / "wan22" / "lora_wan22_ti2v_5b.yaml")
    assert ti2v.data.height % 32 == ti2v.data.width % 32 == 0 and ti2v.data.num_frames % 4 == 1
    assert load_config(root / "wan22" / "lora_wan22_ti2v_5b.yaml", ["model.family=wan_i2v"]).model.family == "wan_i2v"
    i2v = load_config(root / "wan" / "lora_wan21_i2v_14b.yaml")
    assert i2v.model.family == "wan_i2v" and set(i2v.lora.target_modules) >= {"add_k_proj", "add_v_proj"}
    vace = load_config(root / "wan" / "lora_wan_vace_1_3b.yaml")
    dit = get_pipeline_class("wan_vace").from_pretrained(tiny_model("wan_vace"), components=["transformer"]).dit
    assert all(t.startswith("vace_blocks.") for t in resolve_targets(dit, vace.lora.target_modules))
    for cfg in (high, low, ti2v, i2v, vace):
        assert cfg.data.num_frames % 4 == 1 and cfg.data.preprocess == "cache"


def test_raydiff_train_refuses_keys_wan_cannot_read_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray
    import yaml

    from raydiff.launch.cli import main

    # Another test may have started this process's Ray already; what matters is that this refusal never reaches it.
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("raydiff train started Ray before refusing the keys"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(wan_config(str(tmp_path), data_file_keys=["video", "image"])))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "data.data_file_keys ['video', 'image']: wan trains on exactly one of" in err
