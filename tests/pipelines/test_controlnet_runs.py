"""ControlNet runs around the step: checkpoints that diffusers loads and training resumes from, export as a
diffusers folder, `raydiff sample --controlnet`, `raydiff tiny-model --controlnet`, and bad input (the config's
refusals, a control image of another aspect ratio, a missing control image)."""

import numpy as np
import pytest
import torch
from controlnet_common import MAX_LEN, as_input, conditions, controlnet_config, decoded_batch, uint8_images
from PIL import Image
from safetensors.torch import load_file

from raydiff.config import DataConfig, dump_config, parse_config
from raydiff.data.collate import collate
from raydiff.data.decode import DecodeRow
from raydiff.data.metadata import SampleError, read_rows
from raydiff.data.operators import resize_image
from raydiff.data.shapes import write_control_dataset
from raydiff.launch.cli import main
from raydiff.pipelines.base import run_units
from raydiff.registry import get_pipeline_class
from raydiff.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from raydiff.training.ema import EMA, EMA_FILE
from raydiff.training.module import PipelineTrainingModule
from raydiff.training.step import build_optimizer

BATCH = collate(decoded_batch(), "cpu", ["image", "control_image"])


def trained(cfg, steps: int):
    """A module, optimizer and schedule after `steps` optimizer steps on BATCH."""
    module = PipelineTrainingModule(cfg)
    if cfg.lora is not None:  # an adapter starts as the base (one factor at zero): move it, as training would
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in module.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=10)
    for step in range(steps):
        take_step(module, optimizer, scheduler, step)
    return module, optimizer, scheduler


def take_step(module, optimizer, scheduler, step: int) -> None:
    module(BATCH, generator=torch.Generator().manual_seed(step)).backward()
    optimizer.step(), scheduler.step(), optimizer.zero_grad()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    want = a.state_dict()
    got = b.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k].float(), got[k].float()) for k in want)


def saved(tmp_path, cfg, steps=2):
    module, optimizer, scheduler = trained(cfg, steps)
    state = TrainerState(global_step=steps, epoch=0, batches_in_epoch=steps)
    save_checkpoint(str(tmp_path / "ckpt"), module, optimizer, scheduler, state, dump_config(cfg))
    return module, optimizer, scheduler, tmp_path / "ckpt"


def test_a_full_controlnet_checkpoint_loads_with_diffusers_resumes_and_exports(tiny_controlnet, tmp_path):
    cfg = parse_config(controlnet_config("flux", tiny_controlnet("flux")))
    module, optimizer, scheduler, ckpt = saved(tmp_path, cfg)
    assert (ckpt / "controlnet" / "config.json").is_file() and not (ckpt / "trainable_weights.safetensors").exists()
    cls = get_pipeline_class("flux").controlnet_class
    assert_same_weights(module.pipe.controlnet, cls.from_pretrained(str(ckpt / "controlnet")))

    fresh = PipelineTrainingModule(cfg)
    opt2, sched2 = build_optimizer(cfg, fresh.trainable_parameters(), total_steps=10)
    assert load_checkpoint(str(ckpt), fresh, opt2, sched2).global_step == 2
    assert_same_weights(module.pipe.controlnet, fresh.pipe.controlnet)
    take_step(module, optimizer, scheduler, 2), take_step(fresh, opt2, sched2, 2)  # resuming is exact
    assert_same_weights(module.pipe.controlnet, fresh.pipe.controlnet)

    main(["export", str(ckpt), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert_same_weights(cls.from_pretrained(str(ckpt / "controlnet")), cls.from_pretrained(str(tmp_path / "out")))
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(ckpt), "--format", "comfyui", "--out", str(tmp_path / "x.safetensors")])
    assert exit_.value.code == 2


def test_the_ema_of_a_controlnet_is_checkpointed_and_resumes_bitwise(tiny_controlnet, tmp_path):
    """train.ema over a full ControlNet: ema_weights.safetensors holds the average of the ControlNet's weights
    (not the step's), and a resume continues both the weights and the average exactly."""
    cfg = parse_config(controlnet_config("flux", tiny_controlnet("flux"),
                                         train={"ema": {"decay": 0.7, "device": "cpu"}, "learning_rate": 1e-2}))
    module = PipelineTrainingModule(cfg)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=10)
    ema = EMA(module.trainable_parameters(), cfg.train.ema)
    for step in range(2):
        take_step(module, optimizer, scheduler, step), ema.update(step + 1)
    averaged = ema.weights(module.trainable_state_dict)
    assert averaged and all(k.startswith("controlnet.") for k in averaged)
    assert any(not torch.equal(averaged[k], v) for k, v in module.trainable_state_dict().items())
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, module, optimizer, scheduler, TrainerState(global_step=2), dump_config(cfg),
                    ema_weights=averaged)
    saved_ema = load_file(str(tmp_path / "ckpt" / EMA_FILE))
    assert saved_ema.keys() == averaged.keys() and all(torch.equal(saved_ema[k], averaged[k]) for k in averaged)

    torch.manual_seed(5)
    fresh = PipelineTrainingModule(cfg)
    opt2, sched2 = build_optimizer(cfg, fresh.trainable_parameters(), total_steps=10)
    ema2 = EMA(fresh.trainable_parameters(), cfg.train.ema)
    load_checkpoint(ckpt, fresh, opt2, sched2, ema=ema2)
    for model, opt, sched, avg in ((module, optimizer, scheduler, ema), (fresh, opt2, sched2, ema2)):
        take_step(model, opt, sched, 2), avg.update(3)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, ema2.shadow, strict=True))
    assert_same_weights(module.pipe.controlnet, fresh.pipe.controlnet)


@pytest.mark.parametrize("family, adapter", [("qwen_image", "lora"), ("sd3", "lora"), ("sd3", "dora"),
                                             ("sd3", "lokr"), ("sd3", "loha")])
def test_a_lora_on_the_controlnet_resumes_and_exports_fused(family, adapter, tiny_controlnet, tmp_path):
    path = tiny_controlnet(family)
    cfg = parse_config(controlnet_config(family, path, lora={"rank": 4, "alpha": 8, "type": adapter},
                                         train={"trainable_models": []}))
    module, _, _, ckpt = saved(tmp_path, cfg, steps=1)
    fresh = PipelineTrainingModule(cfg)
    opt2, sched2 = build_optimizer(cfg, fresh.trainable_parameters(), total_steps=10)
    load_checkpoint(str(ckpt), fresh, opt2, sched2)
    for a, b in zip(module.trainable_parameters(), fresh.trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    main(["export", str(ckpt), "--format", "diffusers", "--out", str(tmp_path / "out")])
    cls = get_pipeline_class(family)
    exported = cls.from_pretrained(path, max_sequence_length=MAX_LEN,
                                   controlnet=cfg.model.controlnet.model_copy(update={"path": str(tmp_path / "out")}))
    base = cls.from_pretrained(path, max_sequence_length=MAX_LEN, controlnet=cfg.model.controlnet)
    with torch.no_grad():
        inputs = run_units(exported, {"prompt": ["a red circle"] * 2, "image": as_input(uint8_images()),
                                      "control_image": as_input(uint8_images(seed=1))})
        latents, sigma = torch.randn(inputs["latents"].shape), torch.tensor([0.3, 0.8])
        got = exported.model_fn(latents, sigma, **conditions(inputs))
        want = module.pipe.model_fn(latents, sigma, **conditions(inputs))
        untrained = base.model_fn(latents, sigma, **conditions(inputs))
    assert (want - untrained).abs().max() > 1e-3  # the adapter matters, so the comparison can fail
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sample_with_a_controlnet_checkpoint_follows_the_control_image(tiny_controlnet, tmp_path, capsys):
    cfg = parse_config(controlnet_config("sd3", tiny_controlnet("sd3")))
    _, _, _, ckpt = saved(tmp_path, cfg, steps=1)
    outs = []
    for seed in (1, 2):
        Image.fromarray(uint8_images(1, seed=seed)[0]).save(control := tmp_path / f"control{seed}.png")
        outs.append(tmp_path / f"sample{seed}.png")
        main(["sample", "--controlnet", str(ckpt), "--control-image", str(control), "--prompt", "a red circle",
              "--out", str(outs[-1]), "--steps", "2", "--height", "32", "--width", "32"])
    first, second = (np.asarray(Image.open(p), dtype=np.int16) for p in outs)
    assert first.shape == (32, 32, 3) and np.abs(first - second).max() > 0  # another control image, another image
    for argv in (["--control-image", str(control)], ["--lora", str(ckpt), "--control-image", str(control)]):
        with pytest.raises(SystemExit):
            main(["sample", *argv, "--prompt", "p", "--out", str(tmp_path / "x.png")])
        assert "--controlnet" in capsys.readouterr().err


def test_validation_samples_the_controlnet_from_each_prompts_control_image(tiny_controlnet, tmp_path):
    """validation.images gives each prompt its control image: the grid shows them above the samples (no base row:
    the ControlNet has no adapter to disable), and another control image gives another sample."""
    from raydiff.training.validation import ValidationSettings, condition_images, write_validation

    paths = []
    for seed in (1, 2):
        Image.fromarray(uint8_images(1, seed=seed)[0]).save(path := tmp_path / f"control{seed}.png")
        paths.append(str(path))
    cfg = parse_config(controlnet_config("flux", tiny_controlnet("flux"), validation={
        "prompts": ["a red circle", "a blue square"], "images": paths, "steps": 2, "height": 32, "width": 32}))
    module = PipelineTrainingModule(cfg)

    def validate(directory: str, prompts: list[str], images: list[str]) -> dict:
        settings = ValidationSettings(prompts=prompts, steps=2, height=32, width=32, images=condition_images(images),
                                      condition_key="control_image")
        return write_validation(str(tmp_path / directory), module.pipe, None, settings)

    written = validate("ckpt", cfg.validation.prompts, cfg.validation.images)
    grid = np.asarray(Image.open(written["grid"]), dtype=np.int16)
    assert grid.shape == (64, 64, 3)  # the control images' row, then the samples'
    assert (grid[:32, :32] == np.asarray(Image.open(paths[0]), dtype=np.int16)).all()
    # The first prompt and seed again, with the second control image:
    swapped = validate("swapped", cfg.validation.prompts[:1], paths[1:])
    first, other = (np.asarray(Image.open(r["samples"][0]), dtype=np.int16) for r in (written, swapped))
    assert np.abs(first - other).max() > 0


def test_tiny_model_writes_a_controlnet_only_for_families_that_have_one(tmp_path, capsys):
    main(["tiny-model", "sd3", str(tmp_path / "sd3"), "--controlnet"])
    controlnet = get_pipeline_class("sd3").controlnet_class.from_pretrained(str(tmp_path / "sd3" / "controlnet"))
    assert controlnet.config.num_layers == 1
    with pytest.raises(SystemExit):
        main(["tiny-model", "z_image", str(tmp_path / "z"), "--controlnet"])
    assert "the z_image family has no ControlNet" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()  # refused before writing anything


@pytest.mark.parametrize("change, message", [
    ({"data": {"data_file_keys": ["image", "control_image"]}, "model": {"controlnet": None}},
     r"data_file_keys names control_image.*set model.controlnet"),
    ({"model": {"family": "z_image"}}, r"the z_image family has no ControlNet; ControlNets train for .*flux"),
    ({"data": {"data_file_keys": ["image"]}}, r"add control_image to data.data_file_keys"),
    ({"model": {"controlnet": {"num_layers": 1, "num_single_layers": 1}}, "lora": {"rank": 4},
      "train": {"trainable_models": []}}, r"a LoRA on a new ControlNet cannot learn"),
    ({"train": {"trainable_models": ["controlnet", "transformer"]}}, r"also name \['transformer'\]"),
    ({"model": {"controlnet": {"num_layers": 1}}}, r"a new FluxControlNetModel needs num_single_layers"),
    ({"ray": {"strategy": "fsdp"}}, r"a ControlNet trains with ddp"),
    ({"validation": {"prompts": ["a red circle"]}}, r"validation.images: a ControlNet samples from a control image "
                                                     r"besides the prompt; give one path per prompt \(1 prompts, 0"),
    ({"validation": {"prompts": ["a red circle"], "images": [["a.png", "b.png"]]}}, r"one path per prompt"),
])
def test_the_config_refuses_controlnet_mistakes_before_ray_starts(change, message):
    raw = controlnet_config("flux", "/nonexistent/tiny-flux")
    for section, values in change.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


@pytest.fixture
def control_data(tmp_path):
    write_control_dataset(str(tmp_path), n=3)
    return tmp_path


def test_a_control_image_of_another_aspect_ratio_is_resized_like_the_target(control_data):
    wide = np.asarray(Image.open(control_data / "control" / "0000.png").resize((48, 24)))
    Image.fromarray(wide).save(control_data / "control" / "0000.png")  # 2:1, the target 1:1
    cfg = DataConfig(base_path=str(control_data), metadata_path=str(control_data / "metadata.csv"),
                     data_file_keys=["image", "control_image"], max_pixels=16 * 16, division_factor=16)
    sample = DecodeRow(cfg)(read_rows(cfg)[0][0])[0]
    assert sample["image"].shape == sample["control_image"].shape == (16, 16, 3)
    # Covered and centre-cropped to the target's size, exactly as a target of that shape would be.
    np.testing.assert_array_equal(sample["control_image"], resize_image(wide, (16, 16)))


def test_a_missing_control_image_names_its_row_file_and_column(control_data):
    (control_data / "control" / "0001.png").unlink()
    keys = dict(base_path=str(control_data), metadata_path=str(control_data / "metadata.csv"),
                data_file_keys=["image", "control_image"])
    with pytest.raises(SampleError, match=r"row 1, file 'control/0001.png': file not found \(column 'control_image'\)"):
        read_rows(DataConfig(**keys))
    rows, bad = read_rows(DataConfig(**keys, skip_bad_samples=True))
    assert [r["_row"] for r in rows] == [0, 2] and [b.row for b in bad] == [1]  # the other rows still train


def test_a_controlnet_trains_beside_an_int8_dit(tiny_controlnet):
    cfg = parse_config(controlnet_config("flux", tiny_controlnet("flux"), model={"quantize": "int8"}))
    module = PipelineTrainingModule(cfg)
    assert module.pipe.quantized == {"transformer": "int8"}  # the ControlNet was copied or loaded unquantized
    loss = module(BATCH, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in module.pipe.controlnet.controlnet_blocks.parameters()]
    assert torch.isfinite(loss) and all(g is not None and g.abs().sum() > 0 for g in grads)
