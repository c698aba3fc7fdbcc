"""End-to-end training on real Ray: DDP across 2 workers, checkpoint contents, diffusers loading,
resume, bad data, the CLI and the Python example. Each TorchTrainer run costs ~15-25 s here."""

import glob
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
import yaml
from safetensors import safe_open

from raydiff.launch.trainer import launch_training_task
from raydiff.pipelines.base import run_units
from raydiff.pipelines.flux import FluxImagePipeline

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def read_state(checkpoint: str) -> dict:
    return json.loads(Path(checkpoint, "trainer_state.json").read_text())


def test_ddp_run_writes_complete_checkpoints_then_resumes_for_more_epochs(ray_session, make_config, tiny_model,
                                                                          lora_key_warnings):
    # 16 samples / 2 workers / batch 2 = 4 steps per epoch.
    cfg = make_config("ddp", train={"batch_size": 2, "save_steps": 2, "num_epochs": 1, "lr_scheduler": "linear"},
                      ray={"num_workers": 2, "cpus_per_worker": 1, "num_to_keep": 2})
    result = launch_training_task(cfg)
    ckpt = result.checkpoint.path
    assert ckpt.endswith("checkpoint-000004")
    assert sorted(os.listdir(ckpt)) == [".raydiff-complete", "README.md", "config.yaml", "loss.png",
                                        "pytorch_lora_weights.safetensors", "trainer_state.json", "training_state.pt"]
    state = read_state(ckpt)
    assert state["global_step"] == 4 and state["epoch"] == 1
    assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4]
    assert {"step", "epoch", "loss", "lr", "samples_per_second"} <= set(state["log_history"][0])
    assert sorted(w["rank"] for w in state["workers"]) == [0, 1]
    training_state = torch.load(Path(ckpt, "training_state.pt"), weights_only=True)
    assert training_state["scheduler"]["last_epoch"] == 4
    assert yaml.safe_load(Path(ckpt, "config.yaml").read_text())["lora"]["rank"] == 4
    with safe_open(str(Path(ckpt, "pytorch_lora_weights.safetensors")), "pt") as f:
        assert all(k.startswith("transformer.") and ".default." not in k for k in f.keys())
    card = Path(ckpt, "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front  # a local path is no hub id
    assert front["tags"][:4] == ["raydiff", "text-to-image", "flux", "lora"]
    assert "| steps | 4 |" in card and "| dataset | 16 samples |" in card and "rank 4, alpha 4 (scale 1)" in card

    # The LoRA loads into diffusers' FluxPipeline with no key warnings and changes its prediction.
    warnings, changed = prediction_change(tiny_model,
                                          lambda pipe: lora_key_warnings(lambda: pipe.load_lora_weights(ckpt)))
    assert warnings == [] and changed

    # Same name + storage, two epochs: resumes at step 4 and trains only the missing epoch.
    cfg.train.num_epochs = 2
    resumed = launch_training_task(cfg)
    state = read_state(resumed.checkpoint.path)
    assert state["global_step"] == 8 and state["epoch"] == 2
    assert [h["step"] for h in state["log_history"]] == list(range(1, 9))  # no gap, no repeat
    # The linear schedule continued from step 4 (now over 8 planned steps), not from 0.
    assert [h["lr"] for h in state["log_history"][4:]] == pytest.approx([1e-3 * (8 - k) / 8 for k in (5, 6, 7, 8)])
    kept = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cfg.ray.storage_path, "ddp", "checkpoint-*")))
    assert kept == ["checkpoint-000006", "checkpoint-000008"]  # num_to_keep: 2


def prediction_change(tiny_model, load) -> tuple:
    """(what `load(pipe)` returned, whether loading changed the tiny FLUX pipeline's DiT prediction on a fixed
    input: the adapter took effect)."""
    pipe = diffusers.FluxPipeline.from_pretrained(tiny_model("flux"))
    ours = FluxImagePipeline(pipe, "cpu", max_sequence_length=16)
    with torch.no_grad():
        cond = run_units(ours, {"prompt": ["a red circle"], "image": torch.zeros(1, 3, 32, 32)})
        cond = {k: v for k, v in cond.items() if k not in ("latents", "image", "prompt")}
        latents, sigma = torch.randn(1, 4, 16, 16), torch.tensor([0.5])
        base = ours.model_fn(latents, sigma, **cond)
        loaded = load(pipe)
        return loaded, bool((ours.model_fn(latents, sigma, **cond) - base).abs().max() > 0)


def test_skip_bad_samples_counts_them_and_finishes(ray_session, make_config, tmp_path):
    data = Path(tmp_path, "dirty")
    from raydiff.data.shapes import write_shapes_dataset

    meta = write_shapes_dataset(str(data), n=6)
    (data / "truncated.png").write_bytes((data / "0000.png").read_bytes()[:40])
    (data / "text.png").write_text("not an image")
    with open(meta, "a") as f:
        f.write("truncated.png,broken\ntext.png,also broken\n")
    cfg = make_config("skip", data={"base_path": str(data), "metadata_path": meta, "skip_bad_samples": True,
                                    "repeat": 2},
                      train={"max_steps": 3, "batch_size": 2}, ray={"num_workers": 0})  # local mode
    state = read_state(launch_training_task(cfg).checkpoint.path)
    assert state["global_step"] == 3 and state["skipped_samples"] == 2
    assert state["log_history"][-1]["skipped_samples"] == 2


def run_cli(*args, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "raydiff.launch.cli", *args], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)


def test_cli_rejects_a_config_typo_before_starting_ray(tmp_path):
    Path(tmp_path, "bad.yaml").write_text("model: {path: m}\ndata: {metadata_path: d.csv}\ntrain: {learning_rat: 1}\n")
    proc = run_cli("train", "bad.yaml", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()  # one line, as for every mistake the CLI reports
    assert len(lines) == 1 and lines[0].startswith(
        "raydiff: error: invalid config: train.learning_rat: unknown key; did you mean 'learning_rate'?"), lines
    assert "Started a local Ray" not in proc.stderr + proc.stdout


def test_cli_train_with_overrides_and_a_corrupt_image_fails_clearly(ray_session, tiny_model, tmp_path, monkeypatch,
                                                                   capsys):
    """`raydiff train` with relative paths and overrides (in this process, on the session's Ray; the demo and
    Ctrl-C tests run the command on its own local Ray): a truncated image stops the run with row and file
    named."""
    from raydiff.data.shapes import write_shapes_dataset
    from raydiff.launch.cli import main

    write_shapes_dataset(str(tmp_path / "data"), n=4)
    (tmp_path / "data" / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    config = {"model": {"path": tiny_model("flux"), "max_sequence_length": 16},
              "data": {"base_path": "data", "metadata_path": "data/metadata.csv", "height": 32, "width": 32,
                       "shuffle": False},
              "ray": {"num_workers": 1, "storage_path": "runs", "name": "cli"}}
    Path(tmp_path, "run.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "run.yaml", "--set", "train.max_steps=2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert "raydiff: error: row 2, file '" in err and "0002.png'" in err


def test_simple_python_example_trains_with_its_own_training_module(ray_session, tiny_model, shapes, tmp_path,
                                                                   monkeypatch):
    # Relative paths, as the README's command gives them: the workers run elsewhere and must still find them.
    os.symlink(tiny_model("flux"), tmp_path / "tiny-flux")
    os.symlink(shapes, tmp_path / "shapes")
    monkeypatch.chdir(tmp_path)
    # Loaded as a script is loaded (not an importable module), so Ray ships its class by value.
    main = runpy.run_path(str(ROOT / "examples" / "flux" / "train_simple.py"), run_name="train_simple_script")["main"]
    result = main(["--model", "tiny-flux", "--data", "shapes", "--output", "runs", "--steps", "2", "--rank", "4"])
    state = read_state(result.checkpoint.path)
    assert state["global_step"] == 2 and len(state["log_history"]) == 2
