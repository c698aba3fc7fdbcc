"""A family is one file: this toy family, defined here and nowhere in the package, registers and trains
through `launch_training_task` on real Ray workers without any edit to raydiff."""

import json
import sys
from pathlib import Path

import diffusers
import pytest
import ray
import torch
from safetensors import safe_open

from raydiff.config import ConfigError, parse_config
from raydiff.diffusion.flow_matching import FlowSchedule
from raydiff.launch.trainer import launch_training_task
from raydiff.pipelines.base import FamilyPipeline, PipelineUnit, pack_latents, unpack_latents
from raydiff.pipelines.flux import FluxImagePipeline, latent_image_ids
from raydiff.registry import register_family

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules


def _latents(p: "UnconditionalFlux", inputs: dict) -> dict:
    vae = p.pipe.vae
    latents = vae.encode(inputs["image"].to(p.device, vae.dtype)).latent_dist.mode()
    return {"latents": ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()}


class UnconditionalFlux(FamilyPipeline):
    """The FLUX transformer trained without text: zero prompt embeddings, a shift of 1, LoRA on q and v."""

    family = "toy_unconditional"
    diffusers_class = diffusers.FluxPipeline
    component_names = FluxImagePipeline.component_names
    schedule = FlowSchedule(shift=1.0)
    default_lora_targets = ["to_q", "to_v"]

    def make_units(self):
        return [PipelineUnit("latents", _latents, ("image",), ("latents",), ("vae",))]

    def model_fn(self, latents, sigma, **_):
        dit = self.pipe.transformer
        b, _, h, w = latents.shape
        pred = dit(hidden_states=pack_latents(latents), timestep=sigma, guidance=torch.ones(b),
                   pooled_projections=torch.zeros(b, dit.config.pooled_projection_dim),
                   encoder_hidden_states=torch.zeros(b, 1, dit.config.joint_attention_dim),
                   txt_ids=torch.zeros(1, 3), img_ids=latent_image_ids(h, w, latents.device, dit.dtype),
                   return_dict=False)[0]
        return unpack_latents(pred, h, w).float()



def test_a_family_registered_outside_the_package_trains_on_ray_workers(ray_session, make_config, tmp_path):
    toy = {"family": "toy_unconditional"}  # on the tiny FLUX checkpoint make_config points at
    with pytest.raises(ConfigError, match="unknown model family 'toy_unconditional'"):
        make_config(model=toy)
    register_family("toy_unconditional", UnconditionalFlux)
    cfg = make_config("toy", model=toy, lora={"rank": 2}, train={"max_steps": 1})
    assert cfg.lora.target_modules is None  # the family's default_lora_targets apply
    result = launch_training_task(cfg)
    state = json.loads(Path(result.checkpoint.path, "trainer_state.json").read_text())
    assert state["global_step"] == 1
    with safe_open(str(Path(result.checkpoint.path, "pytorch_lora_weights.safetensors")), "pt") as f:
        modules = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in f.keys()}
    assert modules == {"to_q", "to_v"}


def test_the_config_names_the_known_families_for_a_typo():
    with pytest.raises(ConfigError, match="unknown model family 'flxu'; did you mean 'flux'"):
        parse_config({"model": {"family": "flxu", "path": "m"}, "data": {"metadata_path": "d.csv"}})
