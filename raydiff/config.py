"""The typed training config: every key, its default and its meaning, in one place.

A YAML file maps onto `RaydiffConfig`; `--set section.key=value` overrides apply before
validation. Unknown keys and bad values fail here, before Ray starts, with a message that
names the key. The worker receives the validated config and never re-applies defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydiff import registry

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes a frozen base may load in


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    family: str = Field("flux", description="a name in raydiff.registry (flux, qwen_image, sd3, wan, or registered)")
    path: str = Field(..., description="diffusers-format pipeline directory (model_index.json) or a hub id")
    dtype: Literal[DTYPE_NAMES] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    # FLUX.1-dev distils guidance into an embedding; 1.0 during training (sd-scripts, finetrainers).
    guidance: float = 1.0
    max_sequence_length: int | None = Field(None, ge=1, description="text tokens; null = family default")

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        names = registry.family_names()
        if family not in names:
            import difflib

            close = difflib.get_close_matches(family, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown model family {family!r}; {hint}known: {', '.join(names)}")
        return family


class DataConfig(_Section):
    base_path: str = "."
    metadata_path: str
    data_file_keys: list[str] = ["image"]
    repeat: int = Field(1, ge=1)
    height: int | None = Field(None, ge=16)
    width: int | None = Field(None, ge=16)
    max_pixels: int = Field(1024 * 1024, ge=256)
    division_factor: int = Field(16, ge=1)
    num_frames: int = Field(81, ge=1, description="video families: frames per clip (n % 4 == 1)")
    skip_bad_samples: bool = False
    allow_outside_base: bool = False
    max_image_pixels: int = Field(178_956_970, ge=1, description="refuse larger images before decoding")
    shuffle: bool = True
    num_cpus: float = Field(0.5, gt=0, description="CPUs per Ray Data decode task")
    # Where the frozen encoders (VAE, text encoders) run: `inline` in the training step, `stream` in a
    # Ray Data actor pool ahead of the workers, `cache` once into parquet under `cache_dir`.
    preprocess: Literal["inline", "stream", "cache"] = "inline"
    encoder_actors: int = Field(1, ge=1, description="stream/cache: encoder actors (each loads the encoders)")
    encoder_num_gpus: float = Field(0, ge=0, description="stream/cache: GPUs per encoder actor")
    encoder_num_cpus: float = Field(1, gt=0, description="stream/cache: CPUs per encoder actor")
    encoder_batch_size: int = Field(8, ge=1, description="stream/cache: samples per encoder call")
    cache_dir: str | None = Field(None, description="cache mode: local dir or s3:// URI of the parquet cache")
    buckets: bool = Field(False, description="aspect-ratio buckets at max_pixels; batches come from one bucket")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="probability of training on the empty prompt")
    random_flip: bool = Field(False, description="horizontal flip of half the samples, fixed per sample and seed")

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.height is None) != (self.width is None):
            raise ValueError("data.height and data.width must be set together (or both omitted for dynamic size)")
        if self.buckets and self.height is not None:
            raise ValueError("data.buckets sizes images from data.max_pixels; unset data.height/width")
        if self.preprocess == "cache" and not self.cache_dir:
            raise ValueError("data.preprocess: cache needs data.cache_dir")
        for side in (self.height, self.width):
            if side is not None and side % self.division_factor:
                raise ValueError(f"data.height/width must be multiples of data.division_factor "
                                 f"({self.division_factor})")
        return self


ADAPTER_TYPES = ("lora", "dora", "lokr", "loha")  # peft's LoraConfig, LoraConfig(use_dora), LoKrConfig, LoHaConfig


class LoraConfig(_Section):
    base_model: str = "transformer"
    # The adapter peft injects: low-rank B @ A, DoRA (a learned magnitude per output row on top of it),
    # LoKr (a Kronecker product) or LoHa (a Hadamard product of two low-rank pairs).
    type: Literal[ADAPTER_TYPES] = "lora"
    target_modules: list[str] | None = Field(
        None, description="module names or globs (README: target matching); null = the family's default targets")
    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0, description="null = rank (scale 1.0)")
    lokr_factor: int = Field(-1, description="LoKr: the Kronecker factor's size (peft decompose_factor); -1 = "
                                             "near the square root of each dimension")
    init_from: str | None = Field(None, description="a LoRA file or checkpoint dir to continue from")

    @field_validator("lokr_factor")
    @classmethod
    def _factor(cls, factor: int) -> int:
        if factor == 0 or factor < -1:
            raise ValueError("must be -1 (near the square root) or a positive factor size")
        return factor


class TrainConfig(_Section):
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    num_epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(1, ge=1, description="per worker")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    gradient_checkpointing: bool | Literal["offload"] = True  # offload: saved activations in pinned CPU memory
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast; LoRA params and Adam state stay fp32
    compile: bool = False  # torch.compile each transformer block (regional: compiles once per block type)
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" skips code generation)
    attention_backend: str | None = Field(None, description="diffusers attention backend (flash, sage); null = SDPA")
    trainable_models: list[str] = []
    max_bad_steps: int = Field(5, ge=1, description="stop after this many consecutive non-finite steps")
    seed: int = 0
    save_steps: int = Field(100, ge=1)
    log_steps: int = Field(10, ge=1)


class LossConfig(_Section):
    timestep_sampling: Literal["diffsynth", "uniform", "logit_normal", "mode"] = "diffsynth"
    shift: float | None = Field(None, gt=0, description="static shift; null = the family's default")
    dynamic_shift: bool = False
    weighting: Literal["diffsynth", "none", "cosmap", "sigma_sqrt"] = "diffsynth"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29


class EvalConfig(_Section):
    """A deterministic eval loss: fixed sigma quantiles and fixed noise per (sample, sigma)."""

    every_steps: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (and at the end)")
    metadata_path: str | None = Field(None, description="held-out metadata (paths relative to data.base_path)")
    holdout: int = Field(0, ge=0, description="without metadata_path: hold out the last N training rows")
    num_sigmas: int = Field(8, ge=1)
    seed: int = 1234
    batch_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _has_data(self):
        if self.every_steps and not (self.metadata_path or self.holdout):
            raise ValueError("eval.every_steps needs eval.metadata_path or eval.holdout > 0")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.metadata_path or self.holdout)


class ValidationConfig(_Section):
    """Sample images with the current LoRA into each checkpoint (rank 0; see README for the memory cost)."""

    prompts: list[str] = []
    every_steps: int | None = Field(
        None, ge=1, description="sample at checkpoints whose step is a multiple; null = every checkpoint")
    seed: int = 0
    steps: int = Field(20, ge=1)
    guidance: float = 3.5
    height: int = Field(512, ge=16)
    width: int = Field(512, ge=16)
    num_frames: int = Field(1, ge=1)


class RayConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    storage_path: str = "runs"
    name: str = "raydiff"
    num_to_keep: int | None = Field(3, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # ddp: every worker holds the whole model; fsdp: full fine-tuning with the trainable models sharded
    # block by block across workers (FSDP2), for models whose weights + Adam state exceed one GPU.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 = forever")
    address: str | None = Field(None, description="cluster address; null = RAY_ADDRESS or a new local Ray")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray; null = max(4, cores)")
    startup_timeout: float = Field(600, gt=0, description="seconds to wait for an autoscaling cluster to grow to "
                                                           "the run's needs before failing")
    # storage_path may be s3://bucket/prefix. For S3-compatible servers (MinIO, Ceph, moto) set the
    # endpoint URL, e.g. http://127.0.0.1:9000 (scheme http/https taken from it). Credentials come from
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) on the driver, else the AWS SDK chain.
    storage_endpoint: str | None = Field(None, description="S3-compatible endpoint URL; null = AWS S3")
    storage_region: str | None = Field(None, description="S3 region; null = AWS_REGION / AWS_DEFAULT_REGION / SDK")


class LogConfig(_Section):
    """What rank 0 reports (raydiff/training/reporting.py). Named LogConfig: ray.train has a LoggingConfig."""

    tensorboard: bool = Field(
        False, description="scalars and validation images in <run>/tensorboard (needs tensorboardX)")
    plot: bool = Field(True, description="loss.png in the run directory when matplotlib is installed")
    progress_bar: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: a tqdm bar when stdout is a terminal, plain log lines otherwise")
    verbose: bool = Field(False, description="also Ray's own log lines (workers, Ray Data, Tune); `--verbose`")


# Distribution name -> how many arguments its YAML list takes (raydiff/launch/tune.py builds the Tune domains).
DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "quniform": 3, "randint": 2, "choice": None, "grid_search": None}


class TuneConfig(_Section):
    """`raydiff tune`: one Ray Train run per trial; ASHA counts reports (eval steps and checkpoints)."""

    param_space: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="dotted config key -> {loguniform|uniform|quniform|randint|choice|grid_search: [...]}")
    num_samples: int = Field(1, ge=1, description="samples of the space; each grid_search combination runs this often")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="null = as many as the cluster's CPUs/GPUs hold (workers + a decode task each)")
    metric: Literal["eval_loss", "loss"] = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial can be stopped")
    reduction_factor: float = Field(4, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung")
    max_t: int = Field(100, ge=1, description="ASHA: stop every trial after this many reports")
    search_alg: Literal["random", "grid"] = Field(
        "random", description="Tune's BasicVariantGenerator; grid: choice lists become grid_search, nothing is sampled")
    seed: int | None = Field(0, description="seed of the random search; null = a new search each time")
    trial_cpus: float = Field(0.01, gt=0, description="CPUs of each trial's driver (the workers ask for their own)")

    @model_validator(mode="after")
    def _known_keys_and_distributions(self):
        for key, dist in self.param_space.items():
            if (problem := config_key_error(key)) is not None:
                raise ValueError(f"tune.param_space: {problem}")
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"tune.param_space.{key}: expected one of {', '.join(DISTRIBUTIONS)} "
                                 f"with a list, e.g. {{choice: [4, 8]}}")
            (name, args), = dist.items()
            arity = DISTRIBUTIONS[name]
            if (arity is None and not args) or (arity is not None and len(args) != arity):
                want = "a non-empty list" if arity is None else f"{arity} numbers"
                raise ValueError(f"tune.param_space.{key}: {name} takes {want} (got {args!r})")
            if self.search_alg == "grid" and arity is not None:
                raise ValueError(f"tune.param_space.{key}: search_alg grid samples nothing; use choice or grid_search")
        return self


def config_key_error(key: str) -> str | None:
    """Why a dotted key (`train.learning_rate`) does not name a setting Tune may vary; None if it does."""
    if key.split(".")[0] == "tune" or key in ("ray.name", "ray.storage_path"):
        return f"{key!r} is set by `raydiff tune` itself, not searched"
    leaves = _leaf_keys(RaydiffConfig)
    if key in leaves:
        return None
    import difflib

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
    def _fsdp_is_for_full_fine_tuning(self):
        if self.ray.strategy == "fsdp":
            if self.lora is not None or not self.train.trainable_models:
                raise ValueError("ray.strategy fsdp shards full fine-tuning: set `lora: null` and "
                                 "train.trainable_models (e.g. [transformer]); LoRA trains with ddp")
            if self.validation.prompts:
                raise ValueError("validation.prompts is not supported with ray.strategy fsdp (sampling would "
                                 "need every rank); sample checkpoints with `raydiff sample`")
        return self

    @model_validator(mode="after")
    def _validation_has_its_models(self):
        if self.validation.prompts and self.data.preprocess != "inline":
            raise ValueError(f"validation.prompts needs the VAE and text encoders on the workers, which "
                             f"data.preprocess: {self.data.preprocess} leaves out; sample checkpoints with "
                             f"`raydiff sample`, or use data.preprocess: inline")
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
        cfg.data.metadata_path = _abs(cfg.data.metadata_path)
        if cfg.data.cache_dir:
            cfg.data.cache_dir = _abs(cfg.data.cache_dir)
        if cfg.eval.metadata_path:
            cfg.eval.metadata_path = _abs(cfg.eval.metadata_path)
        if cfg.lora is not None and cfg.lora.init_from:
            cfg.lora.init_from = _abs(cfg.lora.init_from)
        cfg.ray.storage_path = _abs(cfg.ray.storage_path)
        if Path(_abs(cfg.model.path)).exists():
            cfg.model.path = _abs(cfg.model.path)
        return cfg


class UserError(ValueError):
    """A mistake the user can fix (a config, a path, a file): the CLI prints its message alone and exits 2."""


class ConfigError(UserError):
    """A config that fails validation; the message names each offending key."""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_did_you_mean(e['loc'])}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{got}")
    return "invalid config:\n" + "\n".join(lines)


def _did_you_mean(loc: tuple) -> str:
    model: type[BaseModel] = RaydiffConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        ann = next((a for a in getattr(ann, "__args__", (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if ann is None:
            return ""
        model = ann
    keys = list(model.model_fields)
    import difflib

    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (expected one of: {', '.join(keys)})"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values parse as YAML (`1e-4`, `[a, b]`, `null`)."""
    raw = dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        node = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            child = node.get(p)
            node[p] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[leaf] = yaml.safe_load(value)
    return raw


def parse_config(raw: dict) -> RaydiffConfig:
    try:
        return RaydiffConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                raw: dict | None = None) -> RaydiffConfig:
    """Read a YAML config (or a dict), apply overrides, validate, and resolve relative paths."""
    if raw is None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return parse_config(apply_overrides(raw, list(overrides))).resolved_paths()


def dump_config(cfg: RaydiffConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def to_dict(cfg: RaydiffConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def to_remote(cfg: RaydiffConfig) -> dict[str, Any]:
    """The config as Ray's processes (workers, encoder actors) receive it, with any families registered
    in this process (a registration does not reach other processes by itself)."""
    return {"config": to_dict(cfg), "families": registry.registered_families()}


def from_remote(payload: dict[str, Any]) -> RaydiffConfig:
    """The inverse of `to_remote`, in the receiving process."""
    registry.adopt_families(payload["families"])
    return parse_config(payload["config"])
