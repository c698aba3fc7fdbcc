"""`raydiff train` in data.preprocess inline, stream and cache modes: the same losses, eval loss and
LoRA; stream/cache workers never load the VAE or the text encoders; `raydiff preprocess` writes the
cache once. Mixed aspect ratios with buckets, batch_size 4 across 2 workers, each row twice (data.repeat),
caption dropout, flips and regularization data on, so every per-sample decision has to agree across the three
paths; a whole epoch, so every bucket batch is trained in every mode."""

import json

import numpy as np
import pytest
import ray
import yaml
from conftest import final  # noqa: E402  (pytest puts tests/ on sys.path)

from raydiff.config import to_dict
from raydiff.data.shapes import write_shapes_dataset
from raydiff.launch.cli import main
from raydiff.launch.trainer import launch_training_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """27 images cycling through 32x32, 64x32 and 32x64 (w x h): 24 train (8 per bucket), 3 held out."""
    path = str(tmp_path_factory.mktemp("mixed"))
    write_shapes_dataset(path, n=27, size=[(32, 32), (64, 32), (32, 64)])
    return path


@pytest.fixture(scope="module")
def regularization(tmp_path_factory):
    """5 more images of the same three sizes: the regularization set."""
    path = str(tmp_path_factory.mktemp("regularization"))
    write_shapes_dataset(path, n=5, size=[(32, 32), (64, 32), (32, 64)], seed=7)
    return {"metadata_path": f"{path}/metadata.csv", "base_path": path, "weight": 0.5, "ratio": 0.25}


def mixed_config(make_config, mixed, tmp_path, mode, regularization=None):
    return make_config(
        f"modes-{mode}",
        data={"base_path": mixed, "metadata_path": f"{mixed}/metadata.csv", "height": None, "width": None,
              "max_pixels": 2048, "buckets": True, "caption_dropout": 0.5, "random_flip": True,
              "preprocess": mode, "cache_dir": str(tmp_path / "cache"), "encoder_num_cpus": 0.5,
              "encoder_batch_size": 4, "regularization": regularization, "repeat": 2},
        train={"batch_size": 4, "max_steps": None, "num_epochs": 1, "learning_rate": 1e-3},
        eval={"holdout": 3, "batch_size": 2},
        ray={"num_workers": 2})


def test_inline_stream_and_cache_train_the_same_lora(ray_session, make_config, mixed, regularization, tmp_path,
                                                     capfd):
    runs = {}
    for mode in ("inline", "stream", "cache"):
        cfg = mixed_config(make_config, mixed, tmp_path, mode, regularization)
        if mode == "cache":  # as README.md describes: `raydiff preprocess`, then `raydiff train` reads that cache
            preprocess_command_writes_the_cache_once(cfg, tmp_path, capfd)
            eval_set_written = (tmp_path / "cache" / "eval_set.parquet").stat().st_mtime_ns
        result = launch_training_task(cfg)
        runs[mode] = final(result)
        if mode == "cache":  # the run scored the eval set `raydiff preprocess` encoded, without encoding it again
            assert (tmp_path / "cache" / "eval_set.parquet").stat().st_mtime_ns == eval_set_written
        if mode == "inline":
            inline = cfg, result.checkpoint.path
        if mode == "cache":
            out = capfd.readouterr().out  # train found the command's cache current
            assert "is complete and current (29 samples)" in out and "encoding" not in out
    encoders = {"vae", "text_encoder", "text_encoder_2"}
    for mode, (state, _) in runs.items():
        assert [w["rank"] for w in state["workers"]] == [0, 1]
        for worker in state["workers"]:
            loaded = set(worker["models"])
            assert "transformer" in loaded
            # stream/cache: the training workers never construct the VAE or the text encoders
            assert loaded >= encoders if mode == "inline" else not loaded & encoders, (mode, loaded)
    losses = {mode: [h["loss"] for h in state["log_history"] if "loss" in h] for mode, (state, _) in runs.items()}
    evals = {mode: [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
             for mode, (state, _) in runs.items()}
    reg_losses = {mode: [h.get("reg_loss") for h in state["log_history"] if "loss" in h]
                  for mode, (state, _) in runs.items()}
    # 24 rows x 2 + 16 regularization copies, whole batches of 4 per bucket per worker: 7 steps.
    assert len(losses["inline"]) == 7 and len(evals["inline"]) == 1
    assert losses["inline"][0] != losses["inline"][1]  # step 2 sees the trained LoRA
    assert any(reg_losses["inline"])  # regularization samples trained, their loss logged apart
    for mode in ("stream", "cache"):
        np.testing.assert_allclose(losses[mode], losses["inline"], rtol=1e-4)
        np.testing.assert_allclose(np.array(reg_losses[mode], float), np.array(reg_losses["inline"], float), rtol=1e-4)
        np.testing.assert_allclose(evals[mode], evals["inline"], rtol=1e-4)
        lora, reference = runs[mode][1], runs["inline"][1]
        assert lora.keys() == reference.keys()
        for key in reference:
            np.testing.assert_allclose(lora[key], reference[key], atol=1e-5, err_msg=f"{mode}: {key}")
    # The eval loss does not depend on the world size: the 2 workers' (3 held-out samples of 3 sizes, scored
    # 2 + 1 by the ranks) is what one rank in this process scores for the run's final LoRA.
    assert evals["inline"][-1] == pytest.approx(eval_loss_on_one_rank(*inline), rel=1e-5)


def eval_loss_on_one_rank(cfg, checkpoint: str) -> float:
    """The eval loss of `checkpoint`'s LoRA over `cfg`'s held-out rows, scored by one rank in this process."""
    from raydiff.data.eval_set import start_eval_set
    from raydiff.data.metadata import family_max_paths, train_and_eval_rows
    from raydiff.training.evaluation import EvalSet
    from raydiff.training.module import PipelineTrainingModule

    held = train_and_eval_rows(cfg.data, cfg.eval, family_max_paths(cfg))[1]
    assert len(held) == 3
    module = PipelineTrainingModule(cfg.model_copy(update={"lora": cfg.lora.model_copy(
        update={"init_from": checkpoint})}))
    return EvalSet(ray.get(start_eval_set(cfg, held).samples), cfg, "cpu", 0, 1).loss(module)


def preprocess_command_writes_the_cache_once(cfg, tmp_path, capfd):
    """`raydiff preprocess` encodes the 24 + 5 regularization samples and the 3 held-out ones, then, run again,
    leaves them."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    capfd.readouterr()
    main(["preprocess", str(path)])
    out, err = capfd.readouterr()
    assert "encoding 29 samples into 1 cache shards" in out and "cache complete: 29 samples" in out
    # Ray's error line for actors made restartable with arguments in the object store (ray-project/ray#53727),
    # which a Ray Data actor pool of shard writers printed on the terminal: the writers are plain actors.
    assert "has constructor arguments in the object store" not in err
    assert "eval set: 3 samples in the cache" in out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 29 and manifest["model"]["path"] == cfg.model.path
    written = (tmp_path / "cache" / "eval_set.parquet").stat().st_mtime_ns
    main(["preprocess", str(path)])
    out = capfd.readouterr().out
    assert "encoding" not in out and "is complete and current (29 samples)" in out
    assert (tmp_path / "cache" / "eval_set.parquet").stat().st_mtime_ns == written


def test_preprocess_command_needs_a_cache_dir(make_config, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(make_config())))
    with pytest.raises(SystemExit) as exit_:
        main(["preprocess", str(path)])
    assert exit_.value.code == 2 and "set it" in capsys.readouterr().err
