"""Model cards: what they say, the front matter Hugging Face and Civitai read, and where they are written."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from raydiff.config import parse_config, to_dict
from raydiff.training import lora as lora_lib
from raydiff.training import model_card
from raydiff.training.lora_formats import export_lora
from raydiff.training.module import PipelineTrainingModule


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def run_config(model: str, **lora) -> dict:
    return to_dict(parse_config({"model": {"path": model}, "data": {"metadata_path": "d.csv"},
                                 "lora": {"rank": 4, "alpha": 8, **lora}, "ray": {"name": "sks-dog"},
                                 "validation": {"prompts": ["sks dog on the moon", "sks dog"]}}))


def test_trigger_words_are_the_words_most_captions_share():
    prompts = ["sks dog on a beach", "a photo of sks dog", "sks dog sleeping", "a cat"]
    assert model_card.trigger_words(prompts) == ["dog", "sks"]  # 3 of 4 each; `a`, `of`, `on` are stop words
    assert model_card.trigger_words(["a red circle", "a blue square"]) == []
    assert model_card.dataset_summary([{"prompt": "sks dog"}, {"prompt": "sks cat"}] * 3, 3, 6) == {
        "size": 2, "trigger_words": ["sks"]}
    assert model_card.dataset_summary(None, 2, 10) == {"size": 5, "trigger_words": []}  # sharded data


def test_a_checkpoint_card_says_what_was_trained_and_how_to_load_it(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [flux]\n---\n# a base model\n")
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "samples").mkdir(parents=True)
    for name in ("0.png", "1.png", "grid.png"):
        (checkpoint / "samples" / name).write_bytes(b"")
    facts = model_card.facts_from_config(run_config(str(base)), steps=500,
                                         dataset={"size": 12, "trigger_words": ["sks", "dog"]},
                                         directory=str(checkpoint))
    path = model_card.write_card(str(checkpoint), facts, weights="pytorch_lora_weights.safetensors")
    text = open(path).read()
    front = front_matter(text)
    assert "base_model" not in front  # a local directory is not a hub id
    assert front["license"] == "apache-2.0" and front["library_name"] == "diffusers"
    assert front["tags"] == ["raydiff", "text-to-image", "flux", "lora", "diffusers"]
    assert front["instance_prompt"] == "sks dog"
    assert front["widget"] == [{"text": "sks dog on the moon", "output": {"url": "samples/0.png"}},
                               {"text": "sks dog", "output": {"url": "samples/1.png"}}]
    for line in ("| adapter | lora, rank 4, alpha 8 (scale 2) on family default |", "| steps | 500 |",
                 "| learning rate | 0.0001 |", "| dataset | 12 samples |", "| trigger words | `sks` `dog` |",
                 "![validation grid: base model on top, with the adapter below](samples/grid.png)",
                 'pipe.load_lora_weights(".", weight_name="pytorch_lora_weights.safetensors")',
                 "raydiff export . --format comfyui"):
        assert line in text, line


@pytest.mark.parametrize("kind, loads, absent", [
    ("lokr", 'pipe.transformer.load_lora_adapter(".", weight_name="pytorch_lora_weights.safetensors", '
             'prefix="transformer")', "pipe.load_lora_weights"),
    ("loha", "raydiff sample --lora pytorch_lora_weights.safetensors", "from diffusers import"),
    ("dora", "pipe.load_lora_weights", "raydiff export . --format comfyui"),
])
def test_each_adapter_type_is_loaded_the_way_that_works_for_it(tmp_path, kind, loads, absent):
    facts = model_card.facts_from_config(run_config("black-forest-labs/FLUX.1-dev", type=kind), steps=1,
                                         dataset=None, directory=str(tmp_path))
    text = model_card.render(facts, weights="pytorch_lora_weights.safetensors")
    front = front_matter(text)
    assert front["base_model"] == "black-forest-labs/FLUX.1-dev" and front["base_model_relation"] == "adapter"
    assert "license" not in front  # not in the (offline) cache: omitted, never guessed
    assert kind in front["tags"] and ("library_name" in front) == (kind != "loha")
    assert loads in text and absent not in text


def test_exports_get_a_card_beside_them_and_never_replace_another(tiny_model, tmp_path):
    cfg = parse_config({"model": {"path": tiny_model("flux")}, "data": {"metadata_path": "d.csv"},
                        "lora": {"rank": 4, "alpha": 8}})
    module = PipelineTrainingModule(cfg)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape) * 0.1
    checkpoint = tmp_path / "checkpoint"
    lora_lib.save_lora(str(checkpoint), module.trainable_state_dict(), module.lora_config)
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (checkpoint / "trainer_state.json").write_text('{"global_step": 7}')
    facts = model_card.facts_from_config(to_dict(cfg), steps=7, dataset=None, directory=str(checkpoint))
    own = model_card.write_card(str(checkpoint), facts, weights="pytorch_lora_weights.safetensors")

    export_lora(str(checkpoint), "comfyui", str(tmp_path / "out" / "lora_comfyui.safetensors"))
    text = (tmp_path / "out" / "README.md").read_text()
    assert "`lora_comfyui.safetensors` is in comfyui format, its scale folded into the weights" in text
    assert "rank 4, alpha 4 (scale 1)" in text and "| steps | 7 |" in text and "LoraLoaderModelOnly" in text
    export_lora(str(checkpoint), "kohya", str(checkpoint / "lora_kohya.safetensors"))  # beside the checkpoint
    assert open(own).read() == model_card.render(facts, weights="pytorch_lora_weights.safetensors")
    assert "kohya format" in (checkpoint / "lora_kohya.README.md").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my notes")
    export_lora(str(checkpoint), "diffusers", str(tmp_path / "mine" / "lora.safetensors"))
    assert (tmp_path / "mine" / "README.md").read_text() == "my notes"
    assert os.path.isfile(tmp_path / "mine" / "lora.README.md")
