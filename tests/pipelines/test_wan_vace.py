"""wan_vace: raydiff's VACE conditions and model_fn against diffusers' WanVACEPipeline (control video, mask,
reference images, or none of them); references lead the clean latents; LoRA on the DiT and VACE blocks or on
the VACE blocks alone loads into diffusers; the encode-ahead path."""

import math

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from wan_common import MAX_LEN, capture_calls, conditions_of, inline_and_ahead_losses, randomize_lora, wan_config

from raydiff.config import ConfigError, parse_config
from raydiff.pipelines.base import run_units
from raydiff.pipelines.wan import encode_video
from raydiff.pipelines.wan_vace import WanVACEFamily
from raydiff.training.lora import save_lora
from raydiff.training.module import PipelineTrainingModule

PROMPT = ["a red fox jumps"]


def clip(seed, frames=9, mask=False) -> np.ndarray:
    """(F, 16, 16, 3) uint8; a mask is black or white per pixel."""
    rng = np.random.default_rng(seed)
    if mask:
        return (rng.random((frames, 16, 16, 1)) > 0.5).repeat(3, axis=3).astype(np.uint8) * 255
    return rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8)


def as_input(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (1, 3, F, H, W) in [-1, 1], as collate makes it."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def pil(frames: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(f) for f in frames]


CASES = {
    "control, mask and a reference": dict(control_video=clip(1), mask_video=clip(2, mask=True),
                                          reference_images=clip(3, frames=1)),
    "control video only": dict(control_video=clip(1)),
    "two references, no control": dict(reference_images=clip(4, frames=2)),
    "nothing (text-to-video)": {},
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_the_vace_pipeline(tiny_model, case):
    path, conditions = tiny_model("wan_vace"), CASES[case]
    ref = diffusers.WanVACEPipeline.from_pretrained(path)
    calls = capture_calls(ref.transformer)
    kwargs = {name: pil(conditions[key]) for key, name in (("control_video", "video"), ("mask_video", "mask"),
                                                           ("reference_images", "reference_images"))
              if key in conditions}
    ref(prompt=PROMPT[0], **kwargs, height=16, width=16, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
        max_sequence_length=MAX_LEN, output_type="latent", generator=torch.Generator().manual_seed(0))
    ours = WanVACEFamily.from_pretrained(path, max_sequence_length=MAX_LEN)
    target = clip(0)
    inputs = {"prompt": PROMPT, "video": as_input(target), **{k: as_input(v) for k, v in conditions.items()}}
    worst = 0.0
    with torch.no_grad():
        out = run_units(ours, inputs)
        refs = len(conditions.get("reference_images", []))
        assert out["latents"].shape == (1, 16, 3 + refs, 2, 2)
        torch.testing.assert_close(out["latents"][:, :, refs:], encode_video(ours, as_input(target)))
        for kw, pred_ref in calls:
            torch.testing.assert_close(out["control_hidden_states"], kw["control_hidden_states"], atol=1e-5, rtol=0)
            pred = ours.model_fn(kw["hidden_states"], kw["timestep"].float() / 1000, **conditions_of(out))
            worst = max(worst, (pred - pred_ref).abs().max().item())
    print(f"wan_vace parity ({case}) max abs diff: {worst:.3g}")
    assert worst < 1e-5
    if refs:  # each reference's latents lead the clean latents: the inactive half of the control's frame
        torch.testing.assert_close(out["latents"][:, :, :refs], out["control_hidden_states"][:, :16, :refs])


def test_a_control_video_of_another_length_is_refused(tiny_model):
    ours = WanVACEFamily.from_pretrained(tiny_model("wan_vace"), max_sequence_length=MAX_LEN)
    with pytest.raises(ValueError, match="control_video is .* the video .* must match"):
        run_units(ours, {"prompt": PROMPT, "video": as_input(clip(0)), "control_video": as_input(clip(1, frames=5))})


@pytest.mark.parametrize("targets, trained", [(None, {"blocks", "vace_blocks"}),
                                              (["vace_blocks.*.to_q", "vace_blocks.*.to_v"], {"vace_blocks"})])
def test_lora_on_the_dit_or_the_vace_blocks_loads_into_diffusers(tiny_model, tmp_path, lora_key_warnings, targets,
                                                                 trained):
    path = tiny_model("wan_vace")
    module = PipelineTrainingModule(parse_config(wan_config(path, family="wan_vace", lora={"target_modules": targets})))
    randomize_lora(module)
    state = module.trainable_state_dict()
    assert {k.split(".")[1] for k in state} == trained
    save_lora(str(tmp_path), state, module.lora_config)
    pipe = diffusers.WanVACEPipeline.from_pretrained(path)
    inputs = {"prompt": PROMPT, "video": as_input(clip(0)), "control_video": as_input(clip(1))}
    with torch.no_grad():
        out = run_units(module.pipe, inputs)
        latents, sigma = torch.randn(out["latents"].shape, generator=torch.Generator().manual_seed(3)), torch.ones(1)
        kw = dict(encoder_hidden_states=out["prompt_embeds"], control_hidden_states=out["control_hidden_states"])
        before = pipe.transformer(latents, sigma * 1000, **kw, return_dict=False)[0]
    assert lora_key_warnings(lambda: pipe.load_lora_weights(str(tmp_path))) == []
    with torch.no_grad():
        after = pipe.transformer(latents, sigma * 1000, **kw, return_dict=False)[0]
        ours = module.pipe.model_fn(latents, sigma, **conditions_of(out))
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(ours, after, atol=1e-5, rtol=0)


def test_encode_ahead_gives_the_inline_loss(tiny_model):
    raw = wan_config(tiny_model("wan_vace"), family="wan_vace",
                     data_file_keys=["video", "control_video", "mask_video", "reference_images"])
    batch = {"prompt": np.array(["a", "b"], dtype=object), "_row": np.array([0, 1]),
             "video": np.stack([clip(0), clip(5)]), "control_video": np.stack([clip(1), clip(6)]),
             "mask_video": np.stack([clip(2, mask=True), clip(7, mask=True)]),
             "reference_images": np.stack([clip(3, frames=1), clip(8, frames=1)])}
    inline, ahead = inline_and_ahead_losses(raw, batch)
    assert math.isfinite(inline) and inline == pytest.approx(ahead, rel=1e-5)


def test_condition_keys_are_checked_by_the_config():
    with pytest.raises(ConfigError, match="'mask_video' needs 'control_video'"):
        parse_config(wan_config("m", family="wan_vace", data_file_keys=["video", "mask_video"]))
    ok = parse_config(wan_config("m", family="wan_vace", data_file_keys=["image", "reference_images"]))
    assert ok.data.data_file_keys == ["image", "reference_images"]
    assert parse_config(wan_config("m", family="wan_vace", validation={"prompts": ["a"]}))  # samples from a prompt


def test_sample_command_takes_the_control_inputs(tiny_model, tmp_path, monkeypatch, capsys):
    import raydiff.training.validation as validation
    from raydiff.data.shapes import write_clips_dataset
    from raydiff.launch.cli import main

    calls, sample_images = [], validation.sample_images
    monkeypatch.setattr(validation, "sample_images", lambda *a, **kw: (calls.append(kw), sample_images(*a, **kw))[1])
    write_clips_dataset(str(tmp_path), n=2, frames=11)
    Image.fromarray(clip(3, frames=1)[0]).save(tmp_path / "ref.png")
    argv = ["sample", "--model", tiny_model("wan_vace"), "--family", "wan_vace", "--prompt", "a fox", "--steps", "2",
            "--height", "16", "--width", "16", "--out", str(tmp_path / "out.png")]
    main([*argv, "--control-video", str(tmp_path / "clip0.mp4"), "--mask-video", str(tmp_path / "clip1.mp4"),
          "--reference-image", str(tmp_path / "ref.png")])
    assert (tmp_path / "out.png").stat().st_size > 0
    kwargs = calls[0]["call_kwargs"]
    assert sorted(kwargs) == ["mask", "reference_images", "video"]
    assert len(kwargs["video"]) == len(kwargs["mask"]) == 9 and len(kwargs["reference_images"]) == 1  # 11 -> 4k + 1
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--mask-video", str(tmp_path / "clip1.mp4")])
    assert exit_.value.code == 2 and "a mask video needs a control video" in capsys.readouterr().err


def test_fsdp_and_compile_see_the_vace_blocks_as_repeated_blocks(tiny_model):
    from raydiff.pipelines.base import repeated_blocks

    dit = WanVACEFamily.from_pretrained(tiny_model("wan_vace"), components=["transformer"]).pipe.transformer
    kinds = {type(b).__name__ for b in repeated_blocks(dit)}
    assert kinds == {"WanTransformerBlock", "WanVACETransformerBlock"}  # wrapped (and compiled) one by one
    assert len(repeated_blocks(dit)) == len(dit.blocks) + len(dit.vace_blocks)
