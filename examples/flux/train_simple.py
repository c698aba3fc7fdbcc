"""Train a FLUX.1 LoRA from Python, in the style of DiffSynth-Studio's simple training script.

    python examples/flux/train_simple.py --model models/tiny-flux --data data/shapes --steps 4

The training module is an ordinary class; raydiff's launcher runs it on a Ray Train
TorchTrainer. Each worker builds its own module from the factory (nothing big is pickled).
"""

import argparse
import functools
import os

import torch

from raydiff import load_config
from raydiff.diffusion.loss import FlowMatchSFTLoss
from raydiff.launch.trainer import launch_training_task
from raydiff.pipelines.base import run_units
from raydiff.pipelines.flux import FluxImagePipeline
from raydiff.training.module import DiffusionTrainingModule, switch_pipe_to_training_mode


class FluxTrainingModule(DiffusionTrainingModule):
    def __init__(self, model_path, lora_target_modules="to_q,to_k,to_v,to_out.0", lora_rank=8, loss_config=None,
                 device="cpu"):
        super().__init__()
        pipe = FluxImagePipeline.from_pretrained(model_path, dtype=torch.float32, device=device,
                                                 max_sequence_length=32)
        self.lora_base_model = "transformer"
        self.lora_config = switch_pipe_to_training_mode(
            pipe, lora_base_model="transformer", lora_target_modules=lora_target_modules.split(","),
            lora_rank=lora_rank, gradient_checkpointing=True)
        self.register_pipe(pipe)
        self.loss_config = loss_config

    def forward(self, data, generator=None):
        # Run the same units inference uses (prompt encoding, VAE latents, guidance), then the loss.
        inputs = run_units(self.pipe, data, self.units_to_run(data))
        return FlowMatchSFTLoss(self.pipe, inputs, self.loss_config, generator)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers-format FLUX directory or hub id")
    parser.add_argument("--data", required=True, help="directory with metadata.csv (image,prompt)")
    parser.add_argument("--output", default="runs", help="Ray storage path for checkpoints")
    parser.add_argument("--name", default="flux-simple")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    # The config carries data, optimizer and Ray settings; the model comes from the module above.
    cfg = load_config(raw={
        "model": {"path": args.model},
        "data": {"base_path": args.data, "metadata_path": os.path.join(args.data, "metadata.csv"),
                 "height": 32, "width": 32},
        "lora": {"rank": args.rank},
        "train": {"learning_rate": 1e-3, "max_steps": args.steps, "log_steps": 1},
        "ray": {"num_workers": args.workers, "storage_path": args.output, "name": args.name},
    })
    # cfg.model.path, not args.model: load_config made local paths absolute, and the module is built in
    # the Ray workers, whose working directory is not this one.
    factory = functools.partial(FluxTrainingModule, cfg.model.path, lora_rank=args.rank, loss_config=cfg.loss)
    return launch_training_task(cfg, module_factory=lambda device: factory(device=device))


if __name__ == "__main__":
    main()
