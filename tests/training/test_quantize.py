"""model.quantize without Ray: which layers each family quantizes, the fp32 LoRA on top, its file in the
unquantized diffusers pipeline, and the loss against the fp32 base on the same batch.

int8 is the CPU mode the launcher accepts. fp8 (torchao) and nf4 (bitsandbytes) are refused by the
launcher without a CUDA GPU (tests/launch/test_checks.py), but both libraries also run them on this CPU,
so their peft wiring is checked here too.
"""

import fnmatch

import diffusers
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from peft.tuners.lora.torchao import TorchaoLoraLinear
from torchao.utils import TorchAOBaseTensor

from raydiff.config import ConfigError, parse_config
from raydiff.data.components import training_components
from raydiff.data.encoder import Encoder
from raydiff.pipelines.base import run_units
from raydiff.pipelines.flux import FluxImagePipeline
from raydiff.pipelines.quantize import weight_bytes
from raydiff.registry import get_pipeline_class
from raydiff.training.checkpoint import TrainerState, save_checkpoint
from raydiff.training.module import PipelineTrainingModule, switch_pipe_to_training_mode
from raydiff.training.step import build_optimizer

FAMILIES = ["flux", "qwen_image", "sd3", "wan"]
SCALE = 1.0  # LoRA B ~ N(0, 1): the adapter moves the tiny FLUX prediction by ~8%


def batch(n=2):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a red circle", "a blue square"][:n]}


def quantized(weight) -> bool:
    return isinstance(weight, TorchAOBaseTensor)


def module_with_trained_looking_lora(cfg) -> PipelineTrainingModule:
    """The module with a fixed non-zero LoRA B (peft initialises B = 0, which would hide the adapter)."""
    torch.manual_seed(0)
    module = PipelineTrainingModule(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * SCALE)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_quantizes_the_dit_linears_except_the_familys_skip_list(family, tiny_model):
    cls = get_pipeline_class(family)
    plain = getattr(cls.from_pretrained(tiny_model(family)).pipe, cls.dit_name)
    pipe = cls.from_pretrained(tiny_model(family), quantize="int8")
    dit = getattr(pipe.pipe, cls.dit_name)
    assert pipe.quantized == {cls.dit_name: "int8"}
    linears = {name: m for name, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    for pattern in cls.quantize_skip:  # every pattern names real layers (a typo would quantize them)
        assert any(fnmatch.fnmatchcase(name, pattern) for name in linears), pattern
    skipped = {name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in cls.quantize_skip)}
    assert {name for name, m in linears.items() if quantized(m.weight)} == set(linears) - skipped
    assert not any(quantized(linears[name].weight) for name in skipped)
    assert any("transformer_blocks" in n or "blocks." in n for n in set(linears) - skipped)
    assert weight_bytes(dit) < weight_bytes(plain)
    # Text encoders and the VAE stay as loaded unless asked.
    others = [m for name, m in pipe.pipe.components.items() if isinstance(m, torch.nn.Module) and m is not dit]
    assert not any(quantized(p) for m in others for p in m.parameters())


def test_text_encoders_are_quantized_when_asked_keeping_their_fp32_modules(tiny_model):
    pipe = FluxImagePipeline.from_pretrained(tiny_model("flux"), quantize="int8", quantize_text_encoders=True)
    assert pipe.quantized == {"transformer": "int8", "text_encoder": "int8", "text_encoder_2": "int8"}
    t5 = pipe.pipe.text_encoder_2  # T5EncoderModel._keep_in_fp32_modules == ["wo"]
    t5_linears = {n: m for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(quantized(m.weight) != n.endswith(".wo") for n, m in t5_linears.items())
    assert all(quantized(m.weight) for m in pipe.pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear))
    assert not any(quantized(p) for p in pipe.pipe.vae.parameters())


def test_stream_and_cache_workers_load_only_the_quantized_dit(make_config):
    cfg = make_config(model={"quantize": "int8", "quantize_text_encoders": True}, data={"preprocess": "stream"})
    module = PipelineTrainingModule(cfg, components=training_components(cfg))
    assert sorted(module.models) == ["transformer"] and module.pipe.quantized == {"transformer": "int8"}
    assert quantized(module.models["transformer"].transformer_blocks[0].attn.to_k.base_layer.weight)
    encoder = Encoder(cfg)  # the stream/cache encoders: text encoders quantized, no DiT
    assert encoder.pipe.quantized == {"text_encoder": "int8", "text_encoder_2": "int8"}


def test_int8_lora_trains_in_fp32_on_top_of_the_quantized_linears(make_config):
    cfg = make_config(model={"quantize": "int8"}, train={"learning_rate": 1e-2})
    torch.manual_seed(0)
    module = PipelineTrainingModule(cfg)
    dit = module.models["transformer"]
    assert isinstance(dit.transformer_blocks[0].attn.to_q, TorchaoLoraLinear)
    assert quantized(dit.transformer_blocks[0].attn.to_q.base_layer.weight)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 and not quantized(p)
                             for n, p in trainable.items())
    optimizer, scheduler = build_optimizer(cfg, list(trainable.values()), total_steps=3)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    for step in range(3):
        loss = module(batch(), generator=torch.Generator().manual_seed(step))
        loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in trainable.items() if "lora_B" in n)


def test_int8_lora_file_loads_into_the_unquantized_diffusers_pipeline(make_config, tiny_model, tmp_path,
                                                                      lora_key_warnings):
    cfg = make_config(model={"quantize": "int8"})
    module = module_with_trained_looking_lora(cfg)
    optimizer, scheduler = build_optimizer(cfg, module.trainable_parameters(), total_steps=1)
    save_checkpoint(str(tmp_path), module, optimizer, scheduler, TrainerState(), "model: {}\n")

    pipe = diffusers.FluxPipeline.from_pretrained(tiny_model("flux"))  # fp32, not quantized
    ours = FluxImagePipeline(pipe, "cpu", max_sequence_length=16)
    with torch.no_grad():
        cond = run_units(ours, {"prompt": ["a red circle"], "image": torch.zeros(1, 3, 32, 32)})
        cond = {k: v for k, v in cond.items() if k not in ("latents", "image", "prompt")}
        latents, sigma = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([0.5])
        base = ours.model_fn(latents, sigma, **cond)
        assert lora_key_warnings(lambda: pipe.load_lora_weights(str(tmp_path))) == []
        unquantized = ours.model_fn(latents, sigma, **cond)
        trained = module.pipe.model_fn(latents, sigma, **cond)
    effect, gap = (unquantized - base).norm(), (trained - unquantized).norm()
    print(f"lora effect {effect / base.norm():.3g}, int8 gap {gap / unquantized.norm():.3g} of the prediction")
    assert effect > 0.05 * base.norm()  # the LoRA changes the prediction
    # The same LoRA over the int8 base predicts what it predicts over the fp32 base, up to int8 rounding
    # (measured: the LoRA moves the prediction by 7.8% of its norm, int8 by 0.064%).
    assert gap < 2e-3 * unquantized.norm()


@pytest.mark.parametrize("mode, tolerance", [("int8", 1e-3), ("fp8", 5e-3), ("nf4", 5e-3)])
def test_loss_over_a_quantized_base_is_close_to_the_fp32_loss(make_config, mode, tolerance):
    """Same batch, noise, timesteps and LoRA; relative difference of the loss over 8 draws. Measured on the
    tiny FLUX: int8 1.1e-4, fp8 1.1e-3, nf4 7.6e-4 at most; the tolerances leave 4.5-9x."""
    reference = module_with_trained_looking_lora(make_config())
    module = module_with_trained_looking_lora(make_config(model={"quantize": mode}))
    wrapper = TorchaoLoraLinear if mode != "nf4" else LoraLinear4bit
    to_q = module.models["transformer"].transformer_blocks[0].attn.to_q
    assert isinstance(to_q, wrapper)
    if mode == "nf4":
        assert isinstance(to_q.base_layer, Linear4bit) and to_q.base_layer.weight.dtype == torch.uint8
    with torch.no_grad():
        expected = torch.tensor([reference(batch(), generator=torch.Generator().manual_seed(s)) for s in range(8)])
        actual = torch.tensor([module(batch(), generator=torch.Generator().manual_seed(s)) for s in range(8)])
    assert not torch.equal(actual, expected)  # the base really is quantized
    print(f"{mode}: max relative loss difference {((actual - expected).abs() / expected).max():.3g}")
    assert ((actual - expected).abs() / expected).max() < tolerance
    module(batch(), generator=torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None for p in module.trainable_parameters())


def test_quantized_models_cannot_be_trained_in_full(make_config, tiny_model):
    with pytest.raises(ConfigError, match="model.quantize freezes the DiT under a LoRA"):
        make_config(model={"quantize": "int8"}, lora=None, train={"trainable_models": ["text_encoder"]})
    with pytest.raises(ConfigError, match="would train quantized weights"):
        make_config(model={"quantize": "int8"}, train={"trainable_models": ["transformer"]})
    with pytest.raises(ConfigError, match="quantize_text_encoders uses model.quantize"):
        make_config(model={"quantize_text_encoders": True})
    with pytest.raises(ConfigError, match="model.quantize"):
        parse_config({"model": {"path": "x", "quantize": "int4"}, "data": {"metadata_path": "m.csv"}})
    pipe = FluxImagePipeline.from_pretrained(tiny_model("flux"), quantize="int8", quantize_text_encoders=True)
    with pytest.raises(ValueError, match="quantized"):
        switch_pipe_to_training_mode(pipe, trainable_models=["text_encoder"], lora_base_model="transformer",
                                     lora_rank=4)
