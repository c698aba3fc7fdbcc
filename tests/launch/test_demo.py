"""`raydiff demo` as a user runs it: its own local Ray, 2 workers, no network; the last line is the checkpoint."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_trains_and_prints_the_final_checkpoint(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "raydiff.launch.cli", "demo", "--dir", str(tmp_path), "--steps", "4"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert os.path.basename(last) == "checkpoint-000004"
    assert os.path.isfile(os.path.join(last, "pytorch_lora_weights.safetensors"))
    assert "[raydiff] step 4/4" in proc.stdout and "loss" in proc.stdout


def test_tiny_model_command_writes_a_loadable_pipeline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "raydiff.launch.cli", "tiny-model", "sd3", str(tmp_path / "m")],
                          env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "m"))
    assert pipe.transformer is not None and pipe.text_encoder_3 is not None
