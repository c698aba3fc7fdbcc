"""Console output shared by the driver and the workers: one clean line per event."""

from __future__ import annotations

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
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
