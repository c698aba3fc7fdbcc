"""Checkpoint I/O. A checkpoint is a directory that describes itself:

  pytorch_lora_weights.safetensors  the adapter in diffusers' key format; type, rank, alpha in metadata
  trainable_weights.safetensors     (full fine-tuning instead of LoRA)
  controlnet/                       a fully trained ControlNet (model.controlnet) as a diffusers folder:
                                    config.json and diffusion_pytorch_model.safetensors, which the family's
                                    ControlNet class `from_pretrained` loads
  ema_weights.safetensors           train.ema: the EMA of the weights above, in their format
  training_state.pt                 optimizer + LR scheduler state, read with weights_only=True
                                    (FSDP: the full optimizer state, keyed by parameter name)
  trainer_state.json                global_step, epoch, position in the epoch, log_history
  config.yaml                       the resolved config of the run
  .raydiff-complete                 written into the stored copy once it is whole (checkpoint_store.py)

No RNG state is stored: every step's randomness is seeded from (seed, step, rank).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from raydiff.config import CONTROLNET
from raydiff.training import lora as lora_lib
from raydiff.training.ema import EMA, EMA_FILE
from raydiff.training.fsdp import load_full_state
from raydiff.training.step import StepResult

STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
FULL_WEIGHTS_FILE = "trainable_weights.safetensors"
# Fully trained models stored as their own diffusers folder (loaded as they are), not in FULL_WEIGHTS_FILE.
FOLDER_MODELS = (CONTROLNET,)
MODEL_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' name in a model folder


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0  # epochs finished
    batches_in_epoch: int = 0  # micro-batches of the current epoch already trained (per worker)
    skipped_samples: int = 0
    bad_steps: int = 0  # optimizer steps skipped for non-finite loss or gradients
    log_history: list[dict] = field(default_factory=list)
    positions: list[list[int]] = field(default_factory=list)  # sharded data: each rank's (pass, cursor, offset, taken)
    workers: list[dict] = field(default_factory=list)  # rank -> node id and host of the latest attempt

    def advance(self, result: StepResult, micro_batches: int, micro_per_epoch: int) -> None:
        """After an optimizer step over `micro_batches` (skipped or not): the step count and the position
        in the epoch, which is complete once its last micro-batch is trained."""
        self.global_step += not result.skipped
        self.batches_in_epoch += micro_batches
        if self.batches_in_epoch >= micro_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def end_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_in_epoch = epoch + 1, 0

    @classmethod
    def read(cls, directory: str) -> TrainerState:
        with open(os.path.join(directory, TRAINER_STATE_FILE)) as f:
            return cls(**json.load(f))


def save_checkpoint(directory: str, module, optimizer, scheduler, state: TrainerState, config_yaml: str,
                    weights: dict | None = None, optimizer_state: dict | None = None,
                    ema_weights: dict | None = None) -> None:
    """Write the checkpoint directory. `weights` / `optimizer_state`: already gathered full dicts
    (FSDP, raydiff.training.fsdp); by default the module's and the optimizer's own. `ema_weights`: the
    EMA in the weights' format (`trainable_state_dict()` with the EMA applied), written when given."""
    os.makedirs(directory, exist_ok=True)
    _save_weights(directory, module, module.trainable_state_dict() if weights is None else weights)
    if ema_weights is not None:
        _save_weights(directory, module, ema_weights, EMA_FILE)
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
               os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_yaml)
    # Written last: a directory with trainer_state.json is complete.
    with open(os.path.join(directory, TRAINER_STATE_FILE), "w") as f:
        json.dump(asdict(state), f, indent=1)


def _save_weights(directory: str, module, weights: dict, name: str | None = None) -> None:
    if module.lora_config is not None:
        lora_lib.save_lora(directory, weights, module.lora_config, weight_name=name or lora_lib.LORA_FILE,
                           prefix=lora_lib.key_prefix(module.lora_base_model))
    elif name is None:
        write_full_weights(directory, module, weights)
    else:
        save_file(weights, os.path.join(directory, name))


def write_full_weights(directory: str, module, weights: dict) -> None:
    """Full fine-tuning weights (`{model}.{param}`): FOLDER_MODELS as diffusers folders, the rest in
    FULL_WEIGHTS_FILE."""
    for name in FOLDER_MODELS:
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        if own:
            folder = os.path.join(directory, name)
            module.models[name].save_config(folder)
            save_file(own, os.path.join(folder, MODEL_WEIGHTS_FILE), metadata={"format": "pt"})
    rest = {k: v for k, v in weights.items() if k.split(".", 1)[0] not in FOLDER_MODELS}
    if rest:
        save_file(rest, os.path.join(directory, FULL_WEIGHTS_FILE))


def read_full_weights(directory: str) -> dict[str, torch.Tensor]:
    """What `write_full_weights` wrote, as `{model}.{param}`."""
    weights = load_file(path) if os.path.isfile(path := os.path.join(directory, FULL_WEIGHTS_FILE)) else {}
    for name in FOLDER_MODELS:
        if os.path.isfile(path := os.path.join(directory, name, MODEL_WEIGHTS_FILE)):
            weights.update({f"{name}.{k}": v for k, v in load_file(path).items()})
    return weights


def _load_full(module, weights: dict) -> None:
    for name, model in module.models.items():
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        if own:
            model.load_state_dict(own)


def _load_weights(path: str, module, sharded_models: Sequence[str]) -> None:
    """Weights from `path` (a file in the format `_save_weights` writes) into the module, in place."""
    if sharded_models:
        load_full_state(module, sharded_models, load_file(path))
    elif module.lora_config is not None:
        base = module.lora_base_model
        lora_lib.load_lora_into(module.models[base], path, lora_lib.key_prefix(base), config=module.lora_config)
    else:
        _load_full(module, load_file(path))


def load_checkpoint(directory: str, module, optimizer, scheduler, sharded_models: Sequence[str] = (),
                    ema: EMA | None = None) -> TrainerState:
    """Restore weights, optimizer, scheduler and `ema` in place; returns where training stopped.
    `sharded_models`: the FSDP-sharded models (a collective load: every rank calls this). A checkpoint
    without EMA weights (train.ema turned on at this resume) starts the EMA at the restored weights."""
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    saved_ema = os.path.join(directory, EMA_FILE)
    if ema is not None and os.path.exists(saved_ema):  # through the parameters: the weights' own loader
        _load_weights(saved_ema, module, sharded_models)
        ema.capture()
    if sharded_models:
        load_full_state(module, sharded_models, read_full_weights(directory), optimizer, state["optimizer"])
    else:
        if module.lora_config is not None:
            _load_weights(os.path.join(directory, lora_lib.LORA_FILE), module, ())
        else:
            _load_full(module, read_full_weights(directory))
        optimizer.load_state_dict(state["optimizer"])
    if ema is not None and not os.path.exists(saved_ema):
        ema.capture()
    scheduler.load_state_dict(state["scheduler"])
    return TrainerState.read(directory)


def controlnet_of_checkpoint(checkpoint: str) -> dict | None:
    """`model:` of a ControlNet run's checkpoint (its config.yaml sets model.controlnet), else None."""
    path = os.path.join(checkpoint, CONFIG_FILE)
    if not os.path.isdir(checkpoint) or not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        model = (yaml.safe_load(f) or {}).get("model") or {}
    return model if model.get(CONTROLNET) else None


def load_trained_controlnet(checkpoint: str, dtype: torch.dtype = torch.float32):
    """The ControlNet a checkpoint holds, as its diffusers model: the fully trained `controlnet/` folder, or the
    continued ControlNet (model.controlnet.path) with the checkpoint's adapter loaded and fused into it."""
    from raydiff.registry import get_pipeline_class

    model = controlnet_of_checkpoint(checkpoint)
    if model is None:
        raise ValueError(f"{checkpoint}: not a checkpoint of a ControlNet run (its config.yaml sets no "
                         f"model.controlnet)")
    cls = get_pipeline_class(model.get("family", "flux")).controlnet_class
    if os.path.isfile(os.path.join(checkpoint, CONTROLNET, MODEL_WEIGHTS_FILE)):
        return cls.from_pretrained(os.path.join(checkpoint, CONTROLNET), dtype=dtype)
    if not os.path.isfile(os.path.join(checkpoint, lora_lib.LORA_FILE)):
        raise ValueError(f"{checkpoint}: neither {CONTROLNET}/{MODEL_WEIGHTS_FILE} nor {lora_lib.LORA_FILE}")
    controlnet = cls.from_pretrained(model[CONTROLNET]["path"], dtype=dtype)
    # Not diffusers' load_lora_adapter: it builds a LoraConfig, so it reads no LoKr or LoHa file.
    lora_lib.attach_adapter(controlnet, checkpoint, family=None, adapter_name="trained", prefix=CONTROLNET)
    controlnet.fuse_lora()
    controlnet.unload_lora()  # the fused weights stay; the adapter layers go
    return controlnet


def export_controlnet(checkpoint: str, out: str) -> str:
    """Write the checkpoint's trained ControlNet (`load_trained_controlnet`) to the diffusers folder `out`, which
    the family's ControlNet class `from_pretrained` loads. Returns `out`."""
    load_trained_controlnet(checkpoint).save_pretrained(out)
    return out
