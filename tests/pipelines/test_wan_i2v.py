"""wan_i2v: raydiff's units and model_fn against diffusers' WanImageToVideoPipeline for Wan 2.1 I2V (CLIP image
features), Wan 2.2 I2V-A14B (per expert) and TI2V-5B image-to-video (first frame clean, at t = 0, left out of
the loss); its LoRA in diffusers; the encode-ahead path; the image column."""

import math
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from wan_common import (
    MAX_LEN,
    capture_calls,
    conditions_of,
    inline_and_ahead_losses,
    rand_video,
    randomize_lora,
    uint8_clips,
    wan_config,
)

from raydiff.config import ConfigError, parse_config
from raydiff.diffusion.loss import flow_matching_loss
from raydiff.launch.checks import check_model
from raydiff.pipelines.base import run_units
from raydiff.pipelines.wan_i2v import WanImageToVideoFamily
from raydiff.registry import get_pipeline_class
from raydiff.training.lora import save_lora
from raydiff.training.module import PipelineTrainingModule

SIZES = {"wan21": 16, "wan22_a14b": 16, "wan22_ti2v_5b": 32}
PROMPT = ["a red fox jumps"]


def first_frame_clip(size, seed=0):
    """A (1, 3, 9, H, W) clip in [-1, 1] whose first frame is exactly a uint8 image, and that image (PIL)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    video = rand_video(b=1, size=size, seed=seed)
    video[:, :, 0] = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    return video, Image.fromarray(pixels)


def reference_calls(path, image, size):
    ref = diffusers.WanImageToVideoPipeline.from_pretrained(path)
    calls = {"transformer": capture_calls(ref.transformer)}
    if ref.transformer_2 is not None:
        calls["transformer_2"] = capture_calls(ref.transformer_2)
    ref(image=image, prompt=PROMPT, height=size, width=size, num_frames=9, num_inference_steps=4, guidance_scale=1.0,
        max_sequence_length=MAX_LEN, output_type="latent", generator=torch.Generator().manual_seed(0))
    return ref, calls


@pytest.mark.parametrize("variant", list(SIZES))
def test_parity_with_the_image_to_video_pipeline(tiny_model, variant):
    path, size = tiny_model("wan_i2v", variant), SIZES[variant]
    video, image = first_frame_clip(size)
    ref, calls = reference_calls(path, image, size)
    experts = {"transformer": "high", "transformer_2": "low"} if ref.config.boundary_ratio else {"transformer": None}
    expand = bool(ref.config.expand_timesteps)
    for name, expert in experts.items():
        ours = WanImageToVideoFamily.from_pretrained(path, max_sequence_length=MAX_LEN, expert=expert)
        worst = 0.0
        with torch.no_grad():
            inputs = run_units(ours, {"prompt": PROMPT, "video": video})
            # Euler, 4 steps: 1000, 910 | 717, 24 (A14B's boundary 0.9 splits them between the experts)
            assert len(calls[name]) == (2 if expert else 4)
            for kw, out in calls[name]:
                hidden = kw["hidden_states"]
                if expand:  # the first latent frame is the condition, its tokens at t = 0
                    torch.testing.assert_close(inputs["condition"], hidden[:, :, :1], atol=1e-5, rtol=0)
                    assert kw["timestep"][0, 0] == 0
                    sigma, latents = kw["timestep"][:, -1].float() / 1000, hidden
                else:  # mask and first-frame latents, concatenated as channels
                    torch.testing.assert_close(inputs["condition"], hidden[:, 16:], atol=1e-5, rtol=0)
                    sigma, latents = kw["timestep"].float() / 1000, hidden[:, :16]
                image_embeds = kw.get("encoder_hidden_states_image")
                assert (image_embeds is None) == (inputs["image_embeds"] is None) == (variant != "wan21")
                if image_embeds is not None:
                    torch.testing.assert_close(inputs["image_embeds"], image_embeds, atol=1e-6, rtol=0)
                pred = ours.model_fn(latents, sigma, **conditions_of(inputs))
                worst = max(worst, (pred - out).abs().max().item())
        print(f"wan_i2v {variant} {name} parity max abs diff: {worst:.3g}")
        assert worst < 1e-5


def test_an_image_column_is_the_condition_instead_of_the_first_frame(tiny_model):
    path = tiny_model("wan_i2v")
    ours = WanImageToVideoFamily.from_pretrained(path, max_sequence_length=MAX_LEN)
    video, _ = first_frame_clip(16)
    other, image = first_frame_clip(16, seed=5)
    _, calls = reference_calls(path, image, 16)
    with torch.no_grad():
        from_column = run_units(ours, {"prompt": PROMPT, "video": video, "image": other[:, :, 0]})
        from_video = run_units(ours, {"prompt": PROMPT, "video": video})
    hidden = calls["transformer"][0][0]["hidden_states"]
    torch.testing.assert_close(from_column["condition"], hidden[:, 16:], atol=1e-5, rtol=0)
    assert (from_column["condition"] - from_video["condition"]).abs().max() > 1e-2
    torch.testing.assert_close(from_column["latents"], from_video["latents"])  # the target is still the video
    with pytest.raises(ValueError, match="the condition image is"):
        run_units(ours, {"prompt": PROMPT, "video": video, "image": rand_video(b=1, size=32)[:, :, 0]})


def test_ti2v_image_to_video_leaves_the_clean_first_frame_out_of_the_loss(tiny_model):
    ours = WanImageToVideoFamily.from_pretrained(tiny_model("wan_i2v", "wan22_ti2v_5b"), max_sequence_length=MAX_LEN)
    with torch.no_grad():
        inputs = run_units(ours, {"prompt": PROMPT * 2, "video": rand_video(size=32)})
    assert inputs["loss_mask"].shape == (2, 1, 3, 1, 1) and inputs["loss_mask"][:, :, 0].sum() == 0
    sigma, noise = torch.tensor([0.5, 0.8]), torch.randn(inputs["latents"].shape)
    model_fn = ours.model_fn
    base = flow_matching_loss(ours, inputs, sigma, noise)

    def off_on_the_first_frame(latents, s, **kw):
        pred = model_fn(latents, s, **kw)
        pred[:, :, 0] += 100.0
        return pred

    ours.model_fn = off_on_the_first_frame
    assert flow_matching_loss(ours, inputs, sigma, noise).item() == pytest.approx(base.item(), rel=1e-6)
    del inputs["loss_mask"]  # without the mask the first frame's error would count
    assert flow_matching_loss(ours, inputs, sigma, noise).item() > 100 * base.item()


def test_lora_round_trips_through_diffusers(tiny_model, tmp_path, lora_key_warnings):
    path = tiny_model("wan_i2v")
    module = PipelineTrainingModule(parse_config(wan_config(path, family="wan_i2v")))
    randomize_lora(module)
    save_lora(str(tmp_path), module.trainable_state_dict(), module.lora_config)
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(path)
    video, _ = first_frame_clip(16)
    with torch.no_grad():
        inputs = run_units(module.pipe, {"prompt": PROMPT, "video": video})
        latents, sigma = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(3)), torch.ones(1)
        hidden = torch.cat([latents, inputs["condition"]], dim=1)
        kw = dict(encoder_hidden_states=inputs["prompt_embeds"], encoder_hidden_states_image=inputs["image_embeds"])
        before = pipe.transformer(hidden, sigma * 1000, **kw, return_dict=False)[0]
    assert any(".attn2.add_k_proj." in k for k in module.trainable_state_dict())  # Wan 2.1's image attention
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lora_key_warnings(lambda: pipe.load_lora_weights(str(tmp_path))) == []
    assert not [str(w.message) for w in caught if "state_dict" in str(w.message)]  # peft's key mismatch warning
    with torch.no_grad():
        after = pipe.transformer(hidden, sigma * 1000, **kw, return_dict=False)[0]
        ours = module.pipe.model_fn(latents, sigma, **conditions_of(inputs))
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(ours, after, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["wan21", "wan22_ti2v_5b"])
def test_encode_ahead_gives_the_inline_loss(tiny_model, variant):
    size = SIZES[variant]
    raw = wan_config(tiny_model("wan_i2v", variant), family="wan_i2v")
    batch = {"prompt": np.array(["a", "b"], dtype=object), "_row": np.array([0, 1]),
             "video": uint8_clips(size=size)}
    inline, ahead = inline_and_ahead_losses(raw, batch)
    assert math.isfinite(inline) and inline == pytest.approx(ahead, rel=1e-5)


def test_checkpoints_and_keys_are_checked_before_ray_starts(tiny_model):
    assert get_pipeline_class("wan_i2v") is WanImageToVideoFamily
    check_model(parse_config(wan_config(tiny_model("wan_i2v", "wan22_ti2v_5b"), family="wan_i2v")))  # a WanPipeline
    with pytest.raises(ConfigError, match="WanPipeline with expand_timesteps.*holds a WanPipeline"):
        check_model(parse_config(wan_config(tiny_model("wan"), family="wan_i2v")))  # Wan 2.1 text-to-video
    with pytest.raises(ConfigError, match=r"wan_i2v trains on exactly one of \['video'\]"):
        parse_config(wan_config("m", family="wan_i2v", data_file_keys=["image"]))
    with pytest.raises(ConfigError, match="wan_i2v samples need image"):
        parse_config(wan_config("m", family="wan_i2v", validation={"prompts": ["a"]}))
    assert parse_config(wan_config("m", family="wan_i2v", data_file_keys=["video", "image"]))


def test_sample_command_takes_the_image(tiny_model, tmp_path, monkeypatch, capsys):
    import raydiff.training.validation as validation
    from raydiff.launch.cli import main

    calls, sample_images = [], validation.sample_images
    monkeypatch.setattr(validation, "sample_images", lambda *a, **kw: (calls.append(kw), sample_images(*a, **kw))[1])
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "first.png")
    argv = ["sample", "--model", tiny_model("wan_i2v"), "--family", "wan_i2v", "--prompt", "a fox", "--steps", "2",
            "--height", "16", "--width", "16", "--num-frames", "5", "--out", str(tmp_path / "out.png")]
    main([*argv, "--image", str(tmp_path / "first.png")])
    assert (tmp_path / "out.png").stat().st_size > 0
    image = calls[0]["call_kwargs"]["image"]
    assert image.size == (16, 16) and np.asarray(image)[0, 0].tolist() == [200, 200, 200]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "wan_i2v samples from an image (--image)" in capsys.readouterr().err
