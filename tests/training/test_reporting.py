"""RunLogger and plot_losses without Ray: log lines, the tqdm bar, TensorBoard events, the loss plot."""

import glob
import os
import sys

import numpy as np
import pytest
from PIL import Image

from raydiff.config import LogConfig
from raydiff.training.reporting import RunLogger, ema, format_log, plot_losses


def metrics(step: int, **extra) -> dict:
    return {"step": step, "epoch": step / 8, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5 * step,
            "samples_per_second": 3.2, "skipped_samples": 0, **extra}


def read_events(run_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    acc = EventAccumulator(event_file, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_plain_lines_one_per_call(tmp_path, capsys):
    logger = RunLogger(LogConfig(progress_bar="auto"), str(tmp_path), total_steps=8, is_tty=False)
    logger.log(metrics(4))
    logger.log(metrics(8, eval_loss=0.1234))
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[raydiff] step 4/8 | epoch 0.50 | loss 0.2500 | lr 1.00e-03 | 3.20 samples/s",
                     "[raydiff] step 8/8 | epoch 1.00 | loss 0.1250 | lr 1.00e-03 | 3.20 samples/s | eval 0.1234"]
    assert not (tmp_path / "tensorboard").exists()  # tensorboard is off by default


def test_tty_draws_a_bar_instead_of_lines(tmp_path, capsys):
    logger = RunLogger(LogConfig(), str(tmp_path), total_steps=8, is_tty=True)
    for step in (2, 4, 6, 8):
        logger.log(metrics(step))
    logger.write("[raydiff] a message above the bar")
    logger.close()
    out = capsys.readouterr().out
    assert "[raydiff] step" not in out
    final = out.split("\r")[-1]
    assert "8/8" in final and "loss=0.1250" in final and "samples/s=3.20" in final
    assert "[raydiff] a message above the bar\n" in out


def test_bar_resumes_at_start_step(tmp_path, capsys):
    logger = RunLogger(LogConfig(progress_bar="on"), str(tmp_path), total_steps=8, start_step=4, is_tty=False)
    logger.log(metrics(6))
    logger.close()
    assert "6/8" in capsys.readouterr().out.split("\r")[-1]


def test_tensorboard_scalars_and_image(tmp_path, capsys):
    logger = RunLogger(LogConfig(tensorboard=True, progress_bar="off"), str(tmp_path), total_steps=8)
    logger.log(metrics(4))
    logger.log(metrics(8, eval_loss=0.75))
    grid = tmp_path / "grid.png"
    Image.fromarray(np.full((16, 24, 3), 200, dtype=np.uint8)).save(grid)
    logger.image("validation/grid", str(grid), 8)
    logger.close()

    acc = read_events(str(tmp_path))
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_second",
                                    "eval/loss"}

    def series(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert series("train/loss") == [(4, pytest.approx(0.25)), (8, pytest.approx(0.125))]
    assert series("train/grad_norm") == [(4, pytest.approx(2.0)), (8, pytest.approx(4.0))]
    assert series("train/lr") == [(4, pytest.approx(1e-3)), (8, pytest.approx(1e-3))]
    assert series("eval/loss") == [(8, pytest.approx(0.75))]  # only where present
    (img,) = acc.Images("validation/grid")
    assert (img.step, img.width, img.height) == (8, 24, 16)


def test_tensorboard_missing_is_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    logger = RunLogger(LogConfig(tensorboard=True, progress_bar="off"), str(tmp_path), total_steps=8)
    logger.log(metrics(4))
    logger.image("validation/grid", "unused.png", 4)
    logger.close()
    out = capsys.readouterr().out
    assert "tensorboardX is not installed" in out and "[raydiff] step 4/8" in out


@pytest.mark.parametrize("with_eval", [False, True])
def test_plot_losses_writes_png(tmp_path, with_eval):
    history = [metrics(s) for s in range(1, 9)]
    if with_eval:
        history[3]["eval_loss"], history[7]["eval_loss"] = 0.4, 0.3
    history.append({"step": 8, "epoch": 1, "skipped_samples": 0})  # the final-checkpoint entry has no loss
    path = plot_losses(history, str(tmp_path / "plots" / "loss.png"))
    assert path == str(tmp_path / "plots" / "loss.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 0


def test_plot_losses_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot_losses([metrics(1)], str(tmp_path / "loss.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "loss.png").exists()


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_format_log_is_the_documented_line():
    m = {"step": 4, "epoch": 0.5, "loss": 1.2458, "lr": 1e-3, "samples_per_second": 3.2}
    assert format_log(m, 8) == "[raydiff] step 4/8 | epoch 0.50 | loss 1.2458 | lr 1.00e-03 | 3.20 samples/s"
