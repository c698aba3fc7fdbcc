"""The edit families (qwen_image_edit, qwen_image_edit_plus, flux_kontext): units and model_fn against diffusers'
edit pipelines, the sources' resize rules, the LoRA in diffusers, the encode-ahead path, and bad input."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from family_checks import check_encoded_batches_give_the_inline_loss, trained_module
from PIL import Image

from raydiff.config import ConfigError, parse_config
from raydiff.pipelines.base import run_units
from raydiff.registry import get_pipeline_class
from raydiff.training.lora import save_lora

SOURCES = {"qwen_image_edit": 1, "qwen_image_edit_plus": 2, "flux_kontext": 1}
AREA = 48 * 64  # model.edit_image_pixels in these tests: the pipelines' ~1 MP sources are minutes on CPU
H = W = 32
PROMPT = ["make the circle blue"]
MAX_LEN = {"flux_kontext": 16}  # Qwen's edit prompt holds the source's vision tokens too


def edit_config(path: str, family: str, **data) -> dict:
    return {"model": {"family": family, "path": path, "max_sequence_length": MAX_LEN.get(family, 64),
                      "edit_image_pixels": AREA},
            "data": {"metadata_path": "unused.csv", "data_file_keys": ["image", "edit_image"], **data},
            "lora": {"rank": 4, "alpha": 8}}


def source_pixels(n: int, seed=0) -> list[np.ndarray]:
    """n uint8 sources of different sizes (each resized by its own aspect ratio)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(48, 64, 3), (64, 48, 3), (40, 40, 3)][:n]]


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def small_pipeline_areas(monkeypatch) -> None:
    """Make the Qwen edit pipelines size their sources to AREA instead of ~1024² (as edit_image_pixels does ours)."""
    calculate = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: calculate(AREA, ratio))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", AREA)


def reference_calls(family: str, path: str, images: list, monkeypatch):
    """The diffusers edit pipeline's transformer calls (kwargs, output) over 2 steps at H x W."""
    ref = get_pipeline_class(family).load_diffusers(path)
    calls = []
    ref.transformer.register_forward_hook(lambda m, a, kw, out: calls.append((kw, out[0])), with_kwargs=True)
    kwargs = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, output_type="latent",
                  max_sequence_length=MAX_LEN.get(family, 64), generator=torch.Generator().manual_seed(0))
    if family == "flux_kontext":  # the target at H x W; the reference at its size floored to 16 (ours at AREA)
        kwargs.update(max_area=H * W, _auto_resize=False, guidance_scale=3.5)
    else:
        small_pipeline_areas(monkeypatch)
        kwargs.update(true_cfg_scale=1.0)
    pil = [Image.fromarray(p) for p in images]
    ref(image=pil if len(pil) > 1 else pil[0], **kwargs)
    return ref, calls


@pytest.mark.parametrize("family", list(SOURCES))
def test_parity_with_the_edit_pipeline(tiny_model, family, monkeypatch):
    path, images = tiny_model(family), source_pixels(SOURCES[family])
    ref, calls = reference_calls(family, path, images, monkeypatch)
    assert len(calls) == 2
    ours = get_pipeline_class(family).from_pretrained(path, max_sequence_length=MAX_LEN.get(family, 64),
                                                      edit_image_pixels=AREA, guidance=3.5)
    packed = (H // ref.vae_scale_factor // 2) * (W // ref.vae_scale_factor // 2)  # the target's tokens
    unpack = (lambda x: ref._unpack_latents(x, H, W, ref.vae_scale_factor)[:, :, 0]) if family != "flux_kontext" \
        else (lambda x: ref._unpack_latents(x, H, W, ref.vae_scale_factor))
    worst = 0.0
    with torch.no_grad():
        inputs = run_units(ours, {"prompt": PROMPT, "image": torch.zeros(1, 3, H, W),
                                  "edit_image": [[as_tensor(p) for p in images]]})
        for kw, out in calls:
            hidden = kw["hidden_states"]
            assert hidden.shape[1] > packed  # the sources' tokens follow the target's
            torch.testing.assert_close(inputs["edit_latents"], hidden[:, packed:], atol=1e-5, rtol=0)
            torch.testing.assert_close(inputs["prompt_embeds"], kw["encoder_hidden_states"], atol=1e-5, rtol=0)
            conditions = {k: v for k, v in inputs.items() if k not in ("prompt", "image", "edit_image", "latents")}
            pred = ours.model_fn(unpack(hidden[:, :packed]), kw["timestep"].float(), **conditions)
            worst = max(worst, (pred - unpack(out[:, :packed])).abs().max().item())
    print(f"{family} parity max abs diff: {worst:.3g}")
    assert worst < 1e-5


class _Sized(Exception):
    pass


def pipeline_source_sizes(ref, image) -> list[tuple]:
    """The (height, width) the pipeline's image processor resizes `image` to, and preprocesses it at, stopping
    before any model runs on the source."""
    seen = []

    def resize(img, height, width, **_):
        seen.append(("resize", height, width))
        return img.resize((width, height))

    def preprocess(img, height, width, **_):
        seen.append(("preprocess", height, width))
        raise _Sized

    ref.image_processor.resize, ref.image_processor.preprocess = resize, preprocess
    with pytest.raises(_Sized):
        ref(image=image, prompt="x", height=H, width=W, num_inference_steps=1, max_sequence_length=16)
    return seen


@pytest.mark.parametrize("family", list(SOURCES))
def test_sources_resize_by_the_pipeline_rule(tiny_model, family):
    """Without model.edit_image_pixels, a source is resized as the pipeline resizes it at inference (Kontext: its
    preferred resolution of the closest aspect ratio; Qwen-Edit: ~1024²; Edit-Plus: ~1024² VAE, ~384² vision)."""
    cls = get_pipeline_class(family)
    ours = cls.from_pretrained(tiny_model(family), max_sequence_length=16)
    for size in [(300, 200), (123, 457)]:
        image = Image.new("RGB", size)
        seen = pipeline_source_sizes(ours.pipe, image)
        if family == "flux_kontext":
            assert seen == [("resize", *ours.reference_size(image)), ("preprocess", *ours.reference_size(image))]
        else:
            assert seen[0] == ("resize", *ours.vision_size(image)) and seen[1] == ("preprocess", *ours.vae_size(image))
            assert (family == "qwen_image_edit") == (ours.vision_size(image) == ours.vae_size(image))


@pytest.mark.parametrize("family", ["qwen_image_edit_plus", "flux_kontext"])
def test_lora_round_trips_through_diffusers(tiny_model, family, tmp_path, lora_key_warnings):
    path = tiny_model(family)
    cfg = parse_config(edit_config(path, family))
    module = trained_module(cfg)
    save_lora(str(tmp_path), module.trainable_state_dict(), module.lora_config)
    cls = get_pipeline_class(family)
    fresh = cls(cls.load_diffusers(path), "cpu", max_sequence_length=cfg.model.max_sequence_length,
                edit_image_pixels=AREA)
    with torch.no_grad():
        inputs = run_units(fresh, {"prompt": PROMPT * 2, "image": torch.zeros(2, 3, H, W),
                                   "edit_image": torch.rand(2, 3, 1, 48, 64) * 2 - 1})
        conditions = {k: v for k, v in inputs.items() if k not in ("prompt", "image", "edit_image", "latents")}
        latents, sigma = torch.randn(inputs["latents"].shape), torch.tensor([0.3, 0.8])
        base = fresh.model_fn(latents, sigma, **conditions)
        assert lora_key_warnings(lambda: fresh.pipe.load_lora_weights(str(tmp_path))) == []
        with_lora = fresh.model_fn(latents, sigma, **conditions)
        ours = module.pipe.model_fn(latents, sigma, **conditions)
    assert (with_lora - base).abs().max() > 1e-2
    torch.testing.assert_close(with_lora, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(SOURCES))
def test_encode_ahead_gives_the_inline_loss(tiny_model, family):
    """Sources of different sizes in one batch (same aspect ratio, so one token grid after resizing)."""
    raw = edit_config(tiny_model(family), family)
    rng = np.random.default_rng(1)
    sources = np.empty(2, dtype=object)
    sources[0] = rng.integers(0, 256, (SOURCES[family], 48, 64, 3), dtype=np.uint8)
    sources[1] = rng.integers(0, 256, (SOURCES[family], 96, 128, 3), dtype=np.uint8)
    batch = {"image": rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8), "edit_image": sources,
             "prompt": np.array(["make it blue", "make the square red"]), "_row": np.arange(2)}
    stream = parse_config({**raw, "data": {**raw["data"], "preprocess": "stream"}})
    check_encoded_batches_give_the_inline_loss(parse_config(raw), stream, H, batch)


def test_edit_keys_are_checked_before_ray_starts():
    def refused(match, family="qwen_image_edit", **data):
        with pytest.raises(ConfigError, match=match):
            parse_config(edit_config("m", family, **data))

    refused(r"flux does not read 'edit_image'", family="flux")
    refused(r"qwen_image_edit trains on 'edit_image' as well; add it", data_file_keys=["image"])
    refused(r"data.random_flip: flux_kontext is refused, since a flip can change", family="flux_kontext",
            random_flip=True)
    refused(r"data.caption_dropout: qwen_image_edit's prompt embedding reads edit_image", caption_dropout=0.1,
            preprocess="stream")
    assert parse_config(edit_config("m", "qwen_image_edit", caption_dropout=0.1))  # inline re-encodes with the image
    assert parse_config(edit_config("m", "flux_kontext", caption_dropout=0.1, preprocess="stream"))  # text only
    with pytest.raises(ConfigError, match="model.edit_image_pixels: flux reads no 'edit_image'"):
        parse_config({**edit_config("m", "flux"), "data": {"metadata_path": "x.csv"}})


def test_validation_images_go_with_the_prompts():
    def config(family="qwen_image_edit_plus", **validation):
        return parse_config({**edit_config("m", family), "validation": validation})

    cfg = config(prompts=["make it blue", "add a hat"], images=["a.png", ["b.png", "c.png"]])
    assert cfg.resolved_paths("/root").validation.images == ["/root/a.png", ["/root/b.png", "/root/c.png"]]
    with pytest.raises(ConfigError, match=r"one \(or a list\) per prompt \(2 prompts, 1 images\)"):
        config(prompts=["a", "b"], images=["a.png"])
    with pytest.raises(ConfigError, match=r"validation.images\[0\]: qwen_image_edit_plus takes 1 to 3 paths"):
        config(prompts=["a"], images=[["a.png"] * 4])
    with pytest.raises(ConfigError, match=r"validation.images\[0\]: flux_kontext takes one path, not a list"):
        config("flux_kontext", prompts=["a"], images=[["a.png", "b.png"]])
    with pytest.raises(ConfigError, match="validation.images: flux samples from a prompt alone"):
        parse_config({"model": {"path": "m"}, "data": {"metadata_path": "x.csv"},
                      "validation": {"prompts": ["a"], "images": ["a.png"]}})


def test_bad_source_rows_are_refused_naming_row_file_and_column(tmp_path):
    from raydiff.data.metadata import read_metadata

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "edit_image": "a.png", "prompt": "ok"},
            {"image": "a.png", "edit_image": "gone.png", "prompt": "missing"},
            {"image": "a.png", "edit_image": ["a.png", "a.png"], "prompt": "a list"},
            {"image": "a.png", "edit_image": ["a.png"] * 4, "prompt": "too many"}]
    (tmp_path / "m.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in rows))
    read = lambda most: read_metadata(str(tmp_path / "m.jsonl"), base_path=str(tmp_path),  # noqa: E731
                                      data_file_keys=["image", "edit_image"], max_paths={"edit_image": most})
    good, bad = read(1)
    assert [r["_row"] for r in good] == [0]  # the readable row is kept
    assert str(bad[0]) == "row 1, file 'gone.png': file not found (column 'edit_image')"
    assert "row 2: column 'edit_image' takes one path, not a list" in str(bad[1])
    good, bad = read(3)
    assert [r["_row"] for r in good] == [0, 2] and "takes at most 3 paths" in str(bad[1])


def test_sources_decode_at_their_own_size(tmp_path):
    from raydiff.config import DataConfig
    from raydiff.data.decode import DecodeSample

    Image.new("RGB", (40, 24), (10, 20, 30)).save(tmp_path / "src.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "target.png")
    decode = DecodeSample(DataConfig(metadata_path="m.csv", data_file_keys=["image", "edit_image"], height=32,
                                     width=32))
    out = decode({"prompt": "p", "_row": 0, "image": str(tmp_path / "target.png"),
                  "edit_image": [str(tmp_path / "src.png"), str(tmp_path / "target.png")]})[0]
    assert out["image"].shape == (32, 32, 3) and out["edit_image"].shape == (2, 24, 40, 3)  # not the target's size


def test_sample_command_takes_repeated_images(tiny_model, tmp_path, monkeypatch, capsys):
    import raydiff.training.validation as validation
    from raydiff.launch.cli import main

    small_pipeline_areas(monkeypatch)  # the pipeline's ~1 MP sources are minutes on CPU
    calls, sample_images = [], validation.sample_images
    monkeypatch.setattr(validation, "sample_images", lambda *a, **kw: (calls.append(kw), sample_images(*a, **kw))[1])
    for name, colour in (("a.png", 200), ("b.png", 50)):
        Image.fromarray(np.full((24, 40, 3), colour, np.uint8)).save(tmp_path / name)
    argv = ["sample", "--model", tiny_model("qwen_image_edit_plus"), "--prompt", "put them together", "--steps", "1",
            "--height", "32", "--width", "32", "--guidance", "1", "--out", str(tmp_path / "out.png")]
    main([*argv, "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "b.png")])
    assert (tmp_path / "out.png").stat().st_size > 0
    images = calls[0]["call_kwargs"]["image"]
    assert [np.asarray(i)[0, 0, 0] for i in images] == [200, 50]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *["--image", str(tmp_path / "a.png")] * 4])
    assert exit_.value.code == 2 and "qwen_image_edit_plus takes at most 3 image(s); got 4" in capsys.readouterr().err


def test_validation_grid_shows_the_sources_above_the_samples(tiny_model, tmp_path, monkeypatch):
    from diffusers.pipelines.flux import pipeline_flux_kontext

    from raydiff.launch.checks import check_validation_images

    monkeypatch.setattr(pipeline_flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(48, 32)])  # not ~1 MP on CPU
    from raydiff.training.module import PipelineTrainingModule
    from raydiff.training.validation import ValidationSettings, condition_images, write_validation

    Image.fromarray(np.full((24, 40, 3), 255, np.uint8)).save(tmp_path / "src.png")
    cfg = parse_config({**edit_config(tiny_model("flux_kontext"), "flux_kontext"),
                        "validation": {"prompts": ["a", "b"], "images": [str(tmp_path / "src.png")] * 2}})
    check_validation_images(cfg)
    with pytest.raises(ConfigError, match=r"validation.images\[1\]: .*gone.png: no such file"):
        check_validation_images(cfg.model_copy(update={"validation": cfg.validation.model_copy(
            update={"images": [str(tmp_path / "src.png"), str(tmp_path / "gone.png")]})}))
    module = PipelineTrainingModule(cfg)
    settings = ValidationSettings(prompts=["a", "b"], steps=1, height=32, width=32, guidance=1.0,
                                  images=condition_images(cfg.validation.images))
    out = write_validation(str(tmp_path / "ckpt"), module.pipe, None, settings)
    grid = np.asarray(Image.open(out["grid"]))
    assert grid.shape == (3 * 32, 2 * 32, 3)  # sources, base, trained
    assert (grid[8:24, :, :] == 255).all()  # the white source, fitted (40x24 -> 32x19) into the top row


def test_kontext_validation_samples_the_reference_at_its_training_size(tiny_model):
    """With model.edit_image_pixels, validation passes the reference as training resized it (the pipeline's
    ~1 MP auto-resize off: minutes per tiny sample on CPU); without, the pipeline's own rule, as `raydiff sample`."""
    cls, path, source = get_pipeline_class("flux_kontext"), tiny_model("flux_kontext"), Image.new("RGB", (40, 24))
    small = cls.from_pretrained(path, max_sequence_length=16, edit_image_pixels=AREA)
    kwargs = small.validation_conditions({"edit_image": source})
    assert kwargs["_auto_resize"] is False and kwargs["image"].size[::-1] == small.reference_size(source)
    native = cls.from_pretrained(path, max_sequence_length=16)
    assert native.validation_conditions({"edit_image": source}) == {"image": source}
