"""`raydiff demo` as a user runs it: its own local Ray, 2 workers, no network; the last line is the checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def demo_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The stdout lines of a `raydiff demo --steps 4` that must have trained."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[raydiff] step 4/4" in proc.stdout and "loss" in proc.stdout
    return proc.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def commands(start_command, tmp_path_factory):
    """The module's two commands, each in a fresh process and started together (the demo's own Ray leaves a
    core idle while it starts): `raydiff demo` and `raydiff tiny-model sd3`. -> {name: (directory, Started)}"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    demo, tiny = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("tiny-model")
    cli = [sys.executable, "-m", "raydiff.launch.cli"]
    return {"demo": (demo, start_command([*cli, "demo", "--dir", str(demo), "--steps", "4"], env=env)),
            "tiny-model": (tiny, start_command([*cli, "tiny-model", "sd3", str(tiny / "m")], env=env))}


def test_demo_trains_and_prints_the_final_checkpoint(commands, lora_key_warnings):
    directory, demo = commands["demo"]
    last = demo_lines(demo.result(timeout=400))[-1]
    assert os.path.basename(last) == "checkpoint-000004"
    assert sorted(os.listdir(last)) == [".raydiff-complete", "README.md", "config.yaml", "loss.png",
                                        "pytorch_lora_weights.safetensors", "samples", "trainer_state.json",
                                        "training_state.pt"]
    state = json.loads(Path(last, "trainer_state.json").read_text())
    assert state["global_step"] == 4 and all(np.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)
    # The LoRA trained on the demo's own Ray loads into diffusers' FluxPipeline without key warnings.
    pipe = diffusers.FluxPipeline.from_pretrained(str(directory / "models" / "tiny-flux"))
    assert lora_key_warnings(lambda: pipe.load_lora_weights(last)) == []
    assert pipe.transformer.peft_config


def test_edit_demo_trains_kontext_and_shows_the_sources_above_its_samples(ray_session, tmp_path, capsys):
    """The same command in this process, on the session's Ray (the test above covers a demo's own Ray and its
    workers), in local mode (`--workers 0`, which trains what one worker trains: tests/launch/test_local_mode.py)."""
    from PIL import Image

    from raydiff.launch.cli import main

    main(["demo", "--dir", str(tmp_path), "--steps", "4", "--task", "edit", "--workers", "0"])
    out = capsys.readouterr().out
    assert "[raydiff] step 4/4" in out and "loss" in out
    last = out.strip().splitlines()[-1]
    assert os.path.basename(last) == "checkpoint-000004"
    assert os.path.isfile(os.path.join(last, "pytorch_lora_weights.safetensors"))
    grid = Image.open(os.path.join(last, "samples", "grid.png"))
    assert grid.size == (2 * 32, 3 * 32)  # two prompts; sources, base, LoRA
    source = Image.open(tmp_path / "data" / "edits" / "source" / "0000.png").convert("RGB")
    assert list(grid.crop((0, 0, 32, 32)).getdata()) == list(source.getdata())  # the top row is the source


def test_tiny_model_command_writes_a_loadable_pipeline(commands):
    directory, command = commands["tiny-model"]
    proc = command.result(timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(directory / "m"))
    assert pipe.transformer is not None and pipe.text_encoder_3 is not None
