"""`RaydiffConfig`: the sections together, the checks that span them, and path resolution."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from pydantic import BaseModel, model_validator

from raydiff import registry
from raydiff.config.sections import (
    CONTROLNET,
    EXPERT_COMPONENTS,
    SHARDED_STATE_OPTIMIZERS,
    DataConfig,
    EvalConfig,
    LogConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RayConfig,
    TrainConfig,
    TuneConfig,
    ValidationConfig,
    _Section,
)


def config_key_error(key: str) -> str | None:
    """Why a dotted key (`train.learning_rate`) does not name a setting Tune may vary; None if it does."""
    if key.split(".")[0] == "tune" or key in ("ray.name", "ray.storage_path"):
        return f"{key!r} is set by `raydiff tune` itself, not searched"
    leaves = _leaf_keys(RaydiffConfig)
    if key in leaves:
        return None
    inside = [k for k in leaves if k.startswith(key + ".")]
    if inside:
        return f"{key!r} is a section; name one of its keys, e.g. {inside[0]!r}"
    section, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in leaves if k.rpartition(".")[0] == section}
    if not siblings:
        close = difflib.get_close_matches(key, leaves, n=1)
        return f"unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
    close = difflib.get_close_matches(leaf, list(siblings), n=1)
    hint = f"did you mean {siblings[close[0]]!r}?" if close else f"{section} has: {', '.join(siblings)}"
    return f"unknown config key {key!r}; {hint}"


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        section = next((a for a in getattr(field.annotation, "__args__", (field.annotation,))
                        if isinstance(a, type) and issubclass(a, BaseModel)), None)
        keys += _leaf_keys(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]
    return keys


class RaydiffConfig(_Section):
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig | None = LoraConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()
    validation: ValidationConfig = ValidationConfig()
    logging: LogConfig = LogConfig()
    tune: TuneConfig | None = None

    @model_validator(mode="after")
    def _something_trains(self):
        if self.lora is None and not self.train.trainable_models:
            raise ValueError("nothing to train: set a `lora:` section or train.trainable_models")
        return self

    @model_validator(mode="after")
    def _expert_is_what_trains(self):
        denoiser = self.model.denoiser
        if self.lora is not None and self.lora.base_model is None:  # with a ControlNet, the LoRA goes into it
            self.lora.base_model = denoiser or (CONTROLNET if self.model.controlnet else "transformer")
        if denoiser is None:
            return self
        other = next(c for c in EXPERT_COMPONENTS.values() if c != denoiser)
        trained = [*self.train.trainable_models, *([self.lora.base_model] if self.lora else [])]
        if other in trained:
            key = "lora.base_model" if self.lora and self.lora.base_model == other else "train.trainable_models"
            raise ValueError(f"model.expert {self.model.expert} trains {denoiser}, but {key} names {other} (the "
                             f"other expert); train each expert in its own run")
        if self.validation.prompts:
            raise ValueError("validation.prompts needs both experts, but a model.expert run loads one; sample "
                             "checkpoints with `raydiff sample`")
        return self

    @model_validator(mode="after")
    def _controlnet_is_what_trains(self):  # before the data keys: it names the family's missing ControlNet
        spec, keys = self.model.controlnet, self.data.data_file_keys
        trained = [*self.train.trainable_models, *([self.lora.base_model] if self.lora else [])]
        if spec is None:
            if "control_image" in keys:
                raise ValueError("data.data_file_keys names control_image, a ControlNet's input; set model.controlnet "
                                 "(README: ControlNet training) or drop the column")
            if CONTROLNET in trained:
                raise ValueError("train.trainable_models / lora.base_model name controlnet; set model.controlnet")
            return self
        family, known = self.model.family, registry.controlnet_of(self.model.family)
        if known is None:
            raise ValueError(f"model.controlnet: the {family} family has no ControlNet; ControlNets train for "
                             f"{', '.join(registry.controlnet_families())}")
        if spec.num_single_layers is not None and "num_single_layers" not in known[1]:
            raise ValueError(f"model.controlnet.num_single_layers: a {known[0]} has no single-stream blocks; unset it")
        if spec.path is None and (missing := [k for k in known[1] if getattr(spec, k) is None]):
            raise ValueError(f"model.controlnet: a new {known[0]} needs {' and '.join(missing)}")
        if "control_image" not in keys:
            raise ValueError(f"model.controlnet trains on control images: add control_image to data.data_file_keys "
                             f"(e.g. {[keys[0], 'control_image']})")
        self._check_controlnet_training(trained)
        return self

    def _check_controlnet_training(self, trained: list[str]) -> None:
        if others := [m for m in trained if m != CONTROLNET]:
            raise ValueError(f"model.controlnet trains the ControlNet beside a frozen base, but train.trainable_models "
                             f"/ lora.base_model also name {others}; train only controlnet")
        if CONTROLNET not in trained:
            raise ValueError("model.controlnet: nothing trains it; set train.trainable_models: [controlnet] (and "
                             "lora: null), or lora.base_model: controlnet")
        if self.lora is not None and self.model.controlnet.path is None:
            raise ValueError("a LoRA on a new ControlNet cannot learn: its output layers start at zero (as "
                             "from_transformer makes them), so the LoRA's gradients are zero; train it fully (lora: "
                             "null, train.trainable_models: [controlnet]) or continue one (model.controlnet.path)")
        if self.ray.strategy == "fsdp":  # a ControlNet is a fraction of its DiT; DDP holds it on every GPU
            raise ValueError("ray.strategy fsdp: a ControlNet trains with ddp (the frozen DiT is not sharded either)")
        v = self.validation
        if v.prompts and (len(v.images) != len(v.prompts) or not all(isinstance(i, str) for i in v.images)):
            raise ValueError(f"validation.images: a ControlNet samples from a control image besides the prompt; give "
                             f"one path per prompt ({len(v.prompts)} prompts, {len(v.images)} images)")

    @model_validator(mode="after")
    def _data_keys_fit_the_family(self):
        if (problem := registry.data_keys_problem(self.model.family, self.data.data_file_keys)) is not None:
            raise ValueError(f"data.data_file_keys {self.data.data_file_keys}: {problem}")
        spec, family = registry.data_keys(self.model.family), self.model.family
        if self.data.random_flip and not spec.flip:
            # A mirrored pair no longer matches an instruction such as "move the cup to the left".
            raise ValueError(f"data.random_flip: {family} is refused, since a flip can change what an edit "
                             f"instruction means (\"move it left\"); flip the pairs in your data where that is safe")
        if self.model.edit_image_pixels is not None and registry.EDIT_IMAGE not in spec.conditions:
            raise ValueError(f"model.edit_image_pixels: {family} reads no {registry.EDIT_IMAGE!r}")
        if spec.prompt_conditions and self.data.caption_dropout > 0 and self.data.preprocess != "inline":
            raise ValueError(f"data.caption_dropout: {family}'s prompt embedding reads "
                             f"{', '.join(spec.prompt_conditions)} (vision tokens), so no one empty prompt can be "
                             f"encoded ahead; use data.preprocess: inline for caption dropout")
        self._validation_conditions(spec)
        return self

    def _validation_conditions(self, spec: registry.DataKeys) -> None:
        v, family = self.validation, self.model.family
        if self.model.controlnet is not None:  # its control images: checked with the ControlNet
            return
        if v.images and not spec.sampling:
            raise ValueError(f"validation.images: {family} samples from a prompt alone")
        if not v.prompts or not spec.sampling:
            return
        if spec.sampling != (registry.EDIT_IMAGE,):
            raise ValueError(f"validation.prompts: {family} samples need {', '.join(spec.sampling)} besides a "
                             f"prompt; sample checkpoints with `raydiff sample` and its condition options")
        if len(v.images) != len(v.prompts):
            raise ValueError(f"validation.images: {family} samples edit a source image; give one (or a list) per "
                             f"prompt ({len(v.prompts)} prompts, {len(v.images)} images)")
        most = dict(spec.max_paths).get(registry.EDIT_IMAGE, 1)
        for i, images in enumerate(v.images):
            if not 1 <= (len(images) if isinstance(images, list) else 1) <= most:
                raise ValueError(f"validation.images[{i}]: {family} takes "
                                 + ("one path, not a list" if most == 1 else f"1 to {most} paths"))

    @model_validator(mode="after")
    def _local_mode_has_no_workers(self):
        r, local = self.ray, "ray.num_workers 0 trains in this process (local mode), without workers"
        if r.local and r.strategy == "fsdp":
            raise ValueError(f"ray.strategy fsdp shards across workers; {local}")
        if r.local and r.max_failures != 0:
            raise ValueError(f"ray.max_failures restarts failed workers; {local}")
        return self

    @model_validator(mode="after")
    def _fsdp_is_for_full_fine_tuning(self):
        if self.ray.strategy == "fsdp":
            if self.lora is not None or not self.train.trainable_models:
                raise ValueError("ray.strategy fsdp shards full fine-tuning: set `lora: null` and "
                                 "train.trainable_models (e.g. [transformer]); LoRA trains with ddp")
            if self.validation.prompts:
                raise ValueError("validation.prompts is not supported with ray.strategy fsdp (sampling would "
                                 "need every rank); sample checkpoints with `raydiff sample`")
            if self.train.optimizer not in SHARDED_STATE_OPTIMIZERS:
                raise ValueError(f"train.optimizer {self.train.optimizer} keeps per-tensor state that ray.strategy "
                                 f"fsdp cannot shard; use {' or '.join(SHARDED_STATE_OPTIMIZERS)}")
        return self

    @model_validator(mode="after")
    def _quantized_models_are_frozen(self):
        m, trainable = self.model, self.train.trainable_models
        if m.quantize is None:
            return self
        if self.lora is None and m.controlnet is None:  # a ControlNet trains beside the frozen DiT
            raise ValueError("model.quantize freezes the DiT under a LoRA; set a `lora:` section (full fine-tuning "
                             "trains the weights quantization would freeze)")
        if "transformer" in trainable or (m.quantize_text_encoders and any(
                name.startswith("text_encoder") for name in trainable)):
            raise ValueError(f"model.quantize: train.trainable_models {trainable} would train quantized weights; "
                             f"quantization is for the frozen base")
        return self

    @model_validator(mode="after")
    def _ema_is_configured_for_validation(self):
        if self.validation.use_ema and self.train.ema is None:
            raise ValueError("validation.use_ema samples with the EMA weights; set train.ema")
        return self

    @model_validator(mode="after")
    def _sharded_data_streams(self):
        d = self.data
        if not d.sharded:
            return self
        refused = {"data.buckets": d.buckets, "data.preprocess: stream": d.preprocess == "stream",
                   "data.repeat": d.repeat > 1, "data.regularization": d.regularization is not None,
                   "eval.holdout (use eval.metadata_path)": self.eval.holdout > 0}
        if problems := [k for k, on in refused.items() if on]:
            raise ValueError(f"{', '.join(problems)}: not available with sharded data (data.metadata_path "
                             f"{d.metadata_path}), which each worker streams from its shards")
        return self

    @model_validator(mode="after")
    def _validation_has_its_models(self):
        if self.validation.prompts and self.data.preprocess != "inline":
            raise ValueError(f"validation.prompts needs the VAE and text encoders on the workers, which "
                             f"data.preprocess: {self.data.preprocess} leaves out; sample checkpoints with "
                             f"`raydiff sample`, or use data.preprocess: inline")
        return self

    @model_validator(mode="after")
    def _tune_keys(self):
        for key in (self.tune.param_space if self.tune else {}):
            if (problem := config_key_error(key)) is not None:
                raise ValueError(f"tune.param_space: {problem}")
        return self

    @model_validator(mode="after")
    def _tune_metric_is_reported(self):
        # The loop reports at eval steps and checkpoints; Tune refuses a report without its metric.
        if self.tune is not None and self.tune.metric == "eval_loss":
            every = self.eval.every_steps
            if not every:
                raise ValueError("tune.metric eval_loss needs eval.every_steps (and eval.holdout or "
                                 "eval.metadata_path)")
            if self.train.save_steps % every:
                raise ValueError(f"tune.metric eval_loss: train.save_steps ({self.train.save_steps}) must be a "
                                 f"multiple of eval.every_steps ({every}) so that every report carries eval_loss")
        return self

    def resolved_paths(self, root: str | os.PathLike = ".") -> RaydiffConfig:
        """Paths made absolute against `root` (the YAML's directory is not used: paths are relative
        to where the command runs, as with every other CLI tool)."""
        cfg = self.model_copy(deep=True)
        root = Path(root).resolve()

        def _abs(p: str) -> str:
            return p if "://" in p or os.path.isabs(p) else str(root / p)

        cfg.data.base_path = _abs(cfg.data.base_path)
        paths = cfg.data.metadata_path
        cfg.data.metadata_path = [_abs(p) for p in paths] if isinstance(paths, list) else _abs(paths)
        if cfg.data.cache_dir:
            cfg.data.cache_dir = _abs(cfg.data.cache_dir)
        if cfg.eval.metadata_path:
            cfg.eval.metadata_path = _abs(cfg.eval.metadata_path)
        if (reg := cfg.data.regularization) is not None:
            reg.metadata_path, reg.base_path = _abs(reg.metadata_path), _abs(reg.base_path)
        v = cfg.validation
        v.images = [[_abs(p) for p in i] if isinstance(i, list) else _abs(i) for i in v.images]
        if cfg.lora is not None and cfg.lora.init_from:
            cfg.lora.init_from = _abs(cfg.lora.init_from)
        cfg.ray.storage_path = _abs(cfg.ray.storage_path)
        if Path(_abs(cfg.model.path)).exists():
            cfg.model.path = _abs(cfg.model.path)
        controlnet = cfg.model.controlnet
        if controlnet is not None and controlnet.path and Path(_abs(controlnet.path)).exists():  # else a hub id
            controlnet.path = _abs(controlnet.path)
        return cfg
