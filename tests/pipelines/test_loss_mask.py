"""Masked loss: a `mask` image weights the loss on the latent grid (white trained, black ignored)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from wan_common import inline_and_ahead_losses, randomize_lora

from raydiff.config import ConfigError, parse_config
from raydiff.data.collate import collate
from raydiff.data.decode import DecodeRow
from raydiff.diffusion.flow_matching import per_sample_mse
from raydiff.diffusion.loss import flow_matching_loss
from raydiff.registry import data_keys, data_keys_problem, family_names
from raydiff.training.module import PipelineTrainingModule


def masked_config(path: str, keys=("image", "mask"), **data) -> dict:
    return {"model": {"family": "flux", "path": path, "max_sequence_length": 16},
            "data": {"metadata_path": "unused.csv", "data_file_keys": list(keys), "height": 32, "width": 32, **data},
            "lora": {"rank": 4}}


def left_half_black(h=32, w=32) -> np.ndarray:
    mask = np.full((h, w, 3), 255, np.uint8)
    mask[:, : w // 2] = 0
    return mask


def images(b=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)


def test_mask_weighted_mse_is_normalised_by_the_mask_area():
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(2, 1, 2, 2)
    half = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    # sample 0 counts the left column (1, 9): mean 5; sample 1 weighs all four equally: mean 7.5
    assert per_sample_mse(pred, target, half).tolist() == pytest.approx([5.0, 7.5])
    assert per_sample_mse(pred, target, torch.zeros(2, 1, 2, 2)).tolist() == [0.0, 0.0]  # black: nothing trained


def test_the_mask_becomes_loss_weights_on_the_latent_grid(tiny_model):
    module = PipelineTrainingModule(parse_config(masked_config(tiny_model("flux"))))
    batch = {"prompt": np.array(["a", "b"], dtype=object), "image": images(), "mask": np.stack([left_half_black()] * 2)}
    inputs = module.run_units(collate(batch, "cpu", ["image", "mask"]))
    latents, weights = inputs["latents"], inputs["loss_mask"]
    assert weights.shape == (2, 1, *latents.shape[-2:])
    w = latents.shape[-1]
    assert weights[..., : w // 2].eq(0).all() and weights[..., w // 2:].eq(1).all()


def test_gradient_ignores_what_the_masked_half_should_become(tiny_model):
    """At sigma = 1 the denoiser sees pure noise, so the target's left half enters only through the loss:
    with the mask the LoRA gradient is the same whatever that half holds; without it, it is not."""
    module = PipelineTrainingModule(parse_config(masked_config(tiny_model("flux"))))
    randomize_lora(module)
    batch = {"prompt": np.array(["a"], dtype=object), "image": images(1), "mask": left_half_black()[None]}
    inputs = module.run_units(collate(batch, "cpu", ["image", "mask"]))
    other = dict(inputs, latents=inputs["latents"].clone())
    other["latents"][..., : other["latents"].shape[-1] // 2] += 3.0
    noise = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(0))

    def lora_grads(x: dict) -> torch.Tensor:
        module.zero_grad()
        flow_matching_loss(module.pipe, x, torch.ones(1), noise).backward()
        return torch.cat([p.grad.flatten() for n, p in module.named_parameters() if "lora" in n])

    torch.testing.assert_close(lora_grads(inputs), lora_grads(other), rtol=0, atol=0)
    def unmasked(x: dict) -> dict:
        return {k: v for k, v in x.items() if k != "loss_mask"}

    assert not torch.equal(lora_grads(unmasked(inputs)), lora_grads(unmasked(other)))


def test_masked_loss_is_the_same_inline_and_encoded_ahead(tiny_model):
    batch = {"prompt": np.array(["a", "b"], dtype=object), "_row": np.array([0, 1]), "image": images(),
             "mask": np.stack([left_half_black(), 255 - left_half_black()])}
    inline, ahead = inline_and_ahead_losses(masked_config(tiny_model("flux")), batch)
    assert math.isfinite(inline) and inline == pytest.approx(ahead, rel=1e-5)


def test_the_mask_is_sized_cropped_and_flipped_with_its_image(tmp_path):
    """A mask of the image's size goes through the same resize, crop and flip as the image."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(image[..., 0]).convert("RGB").save(tmp_path / "m.png")  # the image's red channel as a mask
    cfg = parse_config(masked_config("m", random_flip=True)).data
    row = {"prompt": "p", "_row": 0, "image": str(tmp_path / "x.png"), "mask": str(tmp_path / "m.png")}
    for seed in range(4):  # flipped for some seeds, not others: both follow the image
        sample, = DecodeRow(cfg, seed)(row)
        assert sample["image"].shape == sample["mask"].shape == (32, 32, 3)
        np.testing.assert_array_equal(sample["mask"][..., 0], sample["image"][..., 0])


def test_every_family_takes_a_mask_and_other_keys_are_still_refused():
    for family in family_names():
        spec = data_keys(family)
        assert data_keys_problem(family, [spec.targets[0], *spec.required, "mask"]) is None, family
    with pytest.raises(ConfigError, match="does not read 'masks'.*optionally .*mask"):
        parse_config(masked_config("m", keys=("image", "masks")))
