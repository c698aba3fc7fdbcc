"""`raydiff` command line: train, preprocess, tune, demo, tiny-model, export, sample.

Errors a user can fix (bad config, bad data, missing files) print one clear message and exit 2;
anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from raydiff.console import quiet_libraries, say
from raydiff.launch.interrupts import Terminated, raise_on_sigterm


def config_of(args):
    """The command's config: its YAML, `--set` overrides and `--verbose`."""
    from raydiff.config import load_config

    return load_config(args.config, [*args.set, *(["logging.verbose=true"] if args.verbose else [])])


def cmd_train(args) -> None:
    from raydiff.config.libraries import hide_unused_libraries
    from raydiff.launch.trainer import launch_training_task

    cfg = config_of(args)
    hide_unused_libraries(cfg)  # this process serves one run; its adapter check imports peft
    launch_training_task(cfg)


def cmd_preprocess(args) -> None:
    from raydiff.config import ConfigError
    from raydiff.data.dataset import build_cache
    from raydiff.data.metadata import family_max_paths, train_and_eval_rows
    from raydiff.launch.checks import check_devices, check_model
    from raydiff.launch.cluster import init_ray

    cfg = config_of(args).resolved_paths()
    if not cfg.data.cache_dir:
        raise ConfigError("raydiff preprocess writes to data.cache_dir; set it (and data.preprocess: cache to train "
                          "from it)")
    # Before Ray starts, and before a cache that no longer matches the config is cleared for re-encoding.
    check_model(cfg)
    check_devices(cfg)
    rows = train_and_eval_rows(cfg.data, cfg.eval, family_max_paths(cfg))
    init_ray(cfg)
    build_cache(cfg, rows)


def cmd_tune(args) -> None:
    from raydiff.launch.tune import tune

    tune(config_of(args))


def cmd_demo(args) -> None:
    from raydiff.launch.demo import run_demo

    run_demo(args.dir, steps=args.steps, num_workers=args.workers, task=args.task)


def cmd_tiny_model(args) -> None:
    from raydiff.config import UserError
    from raydiff.registry import get_pipeline_class

    cls = get_pipeline_class(args.family)
    if args.variant is not None and args.variant not in cls.tiny_variants:
        choices = ", ".join(cls.tiny_variants) or "none"
        raise UserError(f"--variant {args.variant}: the {args.family} family's variants are: {choices}")
    if args.controlnet and cls.controlnet_class is None:
        raise UserError(f"--controlnet: the {args.family} family has no ControlNet")
    cls.write_tiny(args.dir, seed=args.seed, **({"variant": args.variant} if args.variant else {}))
    which = f" ({args.variant})" if args.variant else ""
    print(f"[raydiff] wrote a tiny random {args.family}{which} pipeline to {os.path.abspath(args.dir)}")
    if args.controlnet:
        from raydiff.pipelines.controlnet import write_tiny_controlnet

        folder = write_tiny_controlnet(cls, args.dir, seed=args.seed)
        print(f"[raydiff] wrote a tiny {cls.controlnet_class.__name__} to {os.path.abspath(folder)}")


def cmd_export(args) -> None:
    from raydiff.config import UserError
    from raydiff.training.checkpoint import controlnet_of_checkpoint
    from raydiff.training.lora_formats import export_lora

    if not os.path.exists(args.checkpoint):
        raise UserError(f"no checkpoint directory or LoRA file at {args.checkpoint}")
    source = args.checkpoint
    if args.ema:
        from raydiff.training.ema import EMA_FILE

        source = os.path.join(args.checkpoint, EMA_FILE)
        if not os.path.isfile(source):
            raise UserError(f"--ema: {args.checkpoint} has no {EMA_FILE} (a checkpoint directory of a run with "
                            f"train.ema)")
    if controlnet_of_checkpoint(args.checkpoint) is not None:
        return export_trained_controlnet(args)
    try:
        out = export_lora(source, args.format, args.out, family=args.family)
    except ValueError as err:  # an unsupported family/format pair, keys no format knows
        raise UserError(str(err)) from None
    print(f"[raydiff] wrote {args.format} {'EMA ' if args.ema else ''}LoRA to {os.path.abspath(out)}")


def export_trained_controlnet(args) -> None:
    """A ControlNet run's checkpoint exports as a diffusers ControlNet folder (its adapter, if any, fused in)."""
    from raydiff.config import UserError
    from raydiff.training.checkpoint import export_controlnet

    if args.format != "diffusers" or args.ema:
        raise UserError(f"{args.checkpoint} trained a ControlNet, which exports as a diffusers folder only: "
                        f"--format diffusers, without --ema")
    try:
        out = export_controlnet(args.checkpoint, args.out)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"[raydiff] wrote the trained ControlNet as a diffusers folder to {os.path.abspath(out)}")


def add_config_arguments(p: argparse.ArgumentParser, config_help: str) -> None:
    """The positional CONFIG and the repeatable `--set` every config-driven command takes."""
    p.add_argument("config", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value; repeatable; values parse as YAML")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own log lines (logging.verbose)")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its mistakes said as every other raydiff mistake is: one `raydiff: error:` line, exit 2
    (argparse prints the usage block first). Subcommand parsers inherit the class."""

    def error(self, message: str):
        sys.stderr.write(f"raydiff: error: {message}; see `{self.prog} --help`\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from raydiff.registry import LORA_FORMATS, family_names

    parser = OneLineParser(prog="raydiff",
                           description="Fine-tune diffusion transformers (LoRA or full) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config (joins RAY_ADDRESS if set, else starts a local Ray)")
    add_config_arguments(p, "YAML config file (see README: Config reference)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preprocess", help="encode the dataset once into data.cache_dir (parquet) for "
                                          "data.preprocess: cache; a complete, current cache is left alone")
    add_config_arguments(p, "the YAML config you train with")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("tune", help="search config values with Ray Tune (the `tune:` section), one run per trial")
    add_config_arguments(p, "YAML config file with a `tune:` section (see README: Tune)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="write a tiny model and dataset, train a LoRA with 2 workers, no network")
    p.add_argument("--task", choices=["text-to-image", "edit"], default="text-to-image",
                   help="text-to-image: tiny FLUX.1 on shapes (default); edit: tiny FLUX.1 Kontext on shapes "
                        "recoloured by instruction")
    p.add_argument("--dir", default="raydiff-demo", help="where the model, data and runs go (default: ./raydiff-demo)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (default 8)")
    p.add_argument("--workers", type=int, default=2, help="training workers (default 2; 0: local mode)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tiny-model", help="write a tiny random diffusers-format pipeline (for tests and demos)")
    p.add_argument("family", choices=family_names())
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default=None, help="a checkpoint variant of the family, e.g. wan: wan21 (default), "
                                                   "wan22_a14b, wan22_ti2v_5b")
    p.add_argument("--controlnet", action="store_true", help="also a tiny ControlNet in DIR/controlnet (flux, "
                                                            "qwen_image, sd3; model.controlnet.path)")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("export", help="convert a checkpoint's LoRA for other tools (ComfyUI, kohya, DiffSynth); a "
                                      "ControlNet run's as a diffusers ControlNet folder")
    p.add_argument("checkpoint", help="a checkpoint directory or a .safetensors LoRA file")
    p.add_argument("--format", required=True, choices=LORA_FORMATS)
    p.add_argument("--out", required=True, help="output .safetensors file (a ControlNet run's checkpoint: a folder)")
    p.add_argument("--family", choices=family_names(),
                   help="model family (default: read from the checkpoint's config.yaml)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (train.ema) instead")
    p.set_defaults(func=cmd_export)

    from raydiff.launch.sample import add_sample_parser

    add_sample_parser(sub)
    return parser


def user_error(err: BaseException) -> str | None:
    """The message of an error the user can fix, found through Ray's wrappers; None otherwise."""
    from raydiff.config import UserError
    from raydiff.data.metadata import MetadataError, SampleError
    from raydiff.launch.run_lock import RunLockedError
    from raydiff.launch.storage import StorageError

    fixable = (UserError, MetadataError, SampleError, StorageError, RunLockedError, FileNotFoundError)
    seen, todo = set(), [err]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, fixable):  # a Ray task's error is re-raised as both RayTaskError and its own type
            cause = getattr(err, "cause", None)
            return str(cause if isinstance(cause, fixable) else err)
        text = str(err)
        for cls in (SampleError, MetadataError, UserError):  # Ray may re-raise a worker's error as its own type
            marker = f"{cls.__name__}: "
            if marker in text:
                return text.rsplit(marker, 1)[1].strip().splitlines()[0]
        # Ray Train keeps each rank's exception in `worker_failures`; Ray tasks chain causes.
        todo += [*getattr(err, "worker_failures", {}).values(), err.__cause__, err.__context__]
    return None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command not in ("train", "tune", "preprocess"):
        # These load models in this process. train/tune/preprocess load them only in Ray workers, which
        # quiet themselves: importing diffusers and transformers here would only delay their start.
        quiet_libraries()
    previous = raise_on_sigterm()  # SIGTERM at any point, not only during training, ends as Ctrl-C does
    try:
        args.func(args)
    except KeyboardInterrupt as stopped:  # where a re-run continues is already printed, if anything was written
        if not getattr(stopped, "announced", False):  # stopped outside the run itself
            say(f"[raydiff] interrupted{' (SIGTERM)' if isinstance(stopped, Terminated) else ''}: raydiff "
                f"{args.command} stopped")
        sys.exit(getattr(stopped, "exit_code", 130))  # 130 for Ctrl-C, 143 for SIGTERM
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        message = user_error(err)
        if message is None:
            raise
        print(f"raydiff: error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
