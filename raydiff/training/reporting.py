"""What rank 0 shows and records while training: log lines or a progress bar (drawn by the driver when
a `ConsoleRelay` carries them there), TensorBoard scalars and images, and a loss plot at the end.

    logger = RunLogger(cfg.logging, run_dir, total_steps, start_step=state.global_step, relay=relay)
    logger.log(metrics)            # every log step: a line (or the bar), plus TensorBoard scalars
    logger.image("validation/grid", path, step)
    logger.close()
    plot_losses(state.log_history, os.path.join(run_dir, "loss.png"))

TensorBoard is an optional extra (`raydiff[tensorboard]`); when it (or matplotlib) is missing the run
goes on and says so once.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from raydiff.console import say

# metrics key -> TensorBoard tag; only keys present in a log call are written.
SCALARS = {"loss": "train/loss", "reg_loss": "train/reg_loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "samples_per_second": "train/samples_per_second", "eval_loss": "eval/loss"}


def format_log(m: dict, total: int) -> str:
    """`[raydiff] step 4/8 | epoch 0.50 | loss 1.2458 [| reg 1.3001] | lr 1.00e-03 | 3.20 samples/s [| eval 0.1234]`
    (`reg`: the regularization samples' loss, with `data.regularization`)."""
    line = f"[raydiff] step {m['step']}/{total} | epoch {m['epoch']:.2f} | loss {m.get('loss', math.nan):.4f} | "
    if m.get("reg_loss") is not None:
        line += f"reg {m['reg_loss']:.4f} | "
    line += f"lr {m['lr']:.2e} | {m['samples_per_second']:.2f} samples/s"
    if m.get("eval_loss") is not None:
        line += f" | eval {m['eval_loss']:.4f}"
    return line


def use_progress_bar(mode: str, is_tty: bool | None) -> bool:
    """`auto` draws a bar only on a terminal: in a log file or CI, carriage-return redraws are noise."""
    if mode == "auto":
        return sys.stdout.isatty() if is_tty is None else is_tty
    return mode == "on"


class ConsoleView:
    """Log lines, or a tqdm bar redrawn in place with other lines printed above it. Under `raydiff train`
    it runs in the driver, fed by rank 0 through a `ConsoleRelay` (a bar drawn inside a Ray worker
    reaches the terminal one forwarded line per redraw); without a relay, in rank 0 itself."""

    def __init__(self, progress_bar: str, total_steps: int, start_step: int = 0, is_tty: bool | None = None):
        self.total_steps = total_steps
        self.bar = None
        if use_progress_bar(progress_bar, is_tty):
            from tqdm import tqdm

            # initial=start_step: a resumed run shows its true position, and tqdm's rate and ETA
            # count only the steps of this attempt. mininterval=0, miniters=1: redraw on every log
            # call (they are log_steps apart), never in between.
            self.bar = tqdm(total=total_steps, initial=start_step, position=0, file=sys.stdout,
                            desc="[raydiff] train", unit="step", dynamic_ncols=True, leave=True,
                            mininterval=0, miniters=1)

    def write(self, line: str) -> None:
        """Print a line without tearing the progress bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            say(line)

    def log(self, metrics: dict) -> None:
        if self.bar is None:
            say(format_log(metrics, self.total_steps))
            return
        postfix = {"loss": f"{metrics.get('loss', math.nan):.4f}", "lr": f"{metrics['lr']:.2e}",
                   "samples/s": f"{metrics['samples_per_second']:.2f}"}
        if metrics.get("reg_loss") is not None:
            postfix["reg"] = f"{metrics['reg_loss']:.4f}"
        if metrics.get("eval_loss") is not None:
            postfix["eval"] = f"{metrics['eval_loss']:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(metrics["step"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleRelay:
    """A Ray actor (see `relay_actor`) that carries rank 0's console events to the driver: `put` from the
    worker, `drain` from the driver. Events: ("start", {total, start}), ("line", text), ("log", metrics).
    One serves all of a driver's runs (each a new process is a second of CPU), each run on its own
    channel."""

    def __init__(self):
        self.events: dict[str, list[tuple[str, object]]] = {}

    def put(self, channel: str, kind: str, payload) -> None:
        self.events.setdefault(channel, []).append((kind, payload))

    def drain(self, channel: str) -> list[tuple[str, object]]:
        return self.events.pop(channel, [])


@dataclass(frozen=True)
class RelayChannel:
    """What rank 0 holds: the driver's `ConsoleRelay` and the channel of this run."""

    actor: Any
    channel: str

    def put(self, kind: str, payload) -> None:
        self.actor.put.remote(self.channel, kind, payload)

    def drain(self):
        """The ObjectRef of this run's events queued so far (the driver's side)."""
        return self.actor.drain.remote(self.channel)


def relay_actor():
    """`ConsoleRelay` as a Ray actor class (no CPU: it only holds lists)."""
    import ray

    return ray.remote(num_cpus=0)(ConsoleRelay)


class RunLogger:
    """Rank 0's reporter. The loop creates it once (after resume, so the bar and TensorBoard start
    at the resumed step) and calls `log` at every log step. With `relay` (a `RelayChannel`) the console
    events go to the driver, which draws them; otherwise they print here."""

    def __init__(self, cfg_logging, run_dir: str, total_steps: int, start_step: int = 0,
                 is_tty: bool | None = None, relay=None):
        self.total_steps, self.relay, self.writer = total_steps, relay, None
        self.view = None if relay else ConsoleView(cfg_logging.progress_bar, total_steps, start_step, is_tty)
        if relay is not None:
            relay.put("start", {"total": total_steps, "start": start_step})
        if cfg_logging.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self.write("[raydiff] logging.tensorboard is on but tensorboardX is not installed "
                           "(pip install 'raydiff[tensorboard]'); no TensorBoard events are written")
            else:
                # purge_step hides events a failed attempt wrote past the step this one resumed from,
                # so a resumed curve has no doubled segment.
                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                            purge_step=start_step or None, flush_secs=30)

    def write(self, line: str) -> None:
        """Print a line (use this for every rank-0 message while the logger is open)."""
        if self.relay is not None:
            self.relay.put("line", line)
        else:
            self.view.write(line)

    def log(self, metrics: dict) -> None:
        """metrics: step, epoch, loss, lr, grad_norm, samples_per_second, and maybe eval_loss,
        skipped_samples (the dict the loop appends to TrainerState.log_history)."""
        if self.relay is not None:
            self.relay.put("log", metrics)
        else:
            self.view.log(metrics)
        if self.writer is not None:
            for key, tag in SCALARS.items():
                value = metrics.get(key)
                if value is not None:
                    self.writer.add_scalar(tag, float(value), metrics["step"])

    def image(self, tag: str, path: str, step: int) -> None:
        """Add a PNG (e.g. a validation grid) to TensorBoard; a no-op without TensorBoard."""
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def ema(values: list[float], smoothing: float) -> list[float]:
    """TensorBoard's debiased exponential moving average: early points are not pulled toward 0."""
    out, last, weight = [], 0.0, 0.0
    for v in values:
        last = last * smoothing + (1 - smoothing) * v
        weight = weight * smoothing + (1 - smoothing)
        out.append(last / weight)
    return out


def plot_losses(log_history: list[dict], path: str, smoothing: float = 0.9) -> str | None:
    """Plot training loss (raw and EMA-smoothed) and eval loss, where logged, against step.

    Returns `path`, or None (with a printed note) when matplotlib is missing or nothing was logged.
    """
    assert 0.0 <= smoothing < 1.0, "smoothing is an EMA factor in [0, 1)"
    try:
        from matplotlib.figure import Figure
    except ImportError:
        say("[raydiff] logging.plot: matplotlib is not installed (pip install matplotlib); no loss plot")
        return None
    # The final-checkpoint entry carries no loss; NaN losses would break the EMA.
    train = [(h["step"], h["loss"]) for h in log_history
             if h.get("loss") is not None and math.isfinite(h["loss"])]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if h.get("eval_loss") is not None]
    if not train and not evals:
        say("[raydiff] logging.plot: no losses logged yet; no loss plot")
        return None

    # Figure without pyplot: no global backend switch and no state shared with a user's session
    # (savefig renders with Agg).
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, ema(list(losses), smoothing), color="tab:blue", linewidth=2,
                label=f"train loss (EMA {smoothing:g})")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, color="tab:orange", marker="o", linewidth=1.5, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path


def peak_memory_gib(device) -> float:
    """This process's peak memory so far: allocated CUDA memory on a GPU, resident memory on a CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
