"""Console output shared by the driver and the workers: one clean line per event."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings


def say(line: str) -> None:
    """Print a line. Inside Ray Train workers print() is patched into a logger that also tees to
    stdout, which doubles every line; writing to stdout directly prints it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_libraries() -> None:
    """Silence per-component loading bars and advisory warnings that drown the training log."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated")
    # peft: a LoRA over torchao weights cannot be merged back into them, which training never does.
    warnings.filterwarnings("ignore", message=".*instantiated without `get_apply_tensor_subclass`")
    # Imported by peft/transformers when installed (model.quantize, train.optimizer): torchao logs the CUDA
    # extensions a CPU build cannot load, torch a deprecation per torchao enum, bitsandbytes an optional
    # CPU kernel package, diffusers tensor types torchao 0.18 no longer has. None of it concerns raydiff.
    import logging

    for name in ("torchao", "torch.utils._pytree", "bitsandbytes", "diffusers.quantizers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@contextlib.contextmanager
def quiet_imports():
    """Import the model stack in a driver without its import-time chatter (torchao's, bitsandbytes' and
    diffusers' notices about optional kernels, torch's deprecation lines): a driver's console has raydiff's
    lines only. Warnings and log records below ERROR are dropped while the block runs."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def quiet_ray_train_reports() -> None:
    """Silence Ray Train v2's INFO line per `ray.train.report` ("Reporting training result ..."), one
    per checkpoint. Ray logs it through a logger named by its source file's path, which Ray's own
    `LoggingConfig` does not reach, so the only handle is that file's `__file__`: a private module,
    imported here alone."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
