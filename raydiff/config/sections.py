"""The config's sections: every key, its default and its meaning, in one place (README: Config reference)."""

from __future__ import annotations

import difflib
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raydiff import registry

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes a frozen base may load in
QUANTIZE_MODES, GPU_ONLY_QUANTIZE = ("int8", "fp8", "nf4"), ("fp8", "nf4")  # model.quantize
OPTIMIZERS, SHARDED_STATE_OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy"), ("adamw",)  # train.optimizer
# A two-expert checkpoint (Wan 2.2 A14B): diffusers' pipelines route timesteps >= boundary_ratio x 1000 to
# `transformer` (high noise) and the rest to `transformer_2` (low noise).
EXPERT_COMPONENTS = {"high": "transformer", "low": "transformer_2"}
CONTROLNET = "controlnet"  # the component name of `model.controlnet` (as in diffusers' ControlNet pipelines)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ControlNetConfig(_Section):
    """`model.controlnet`: a ControlNet beside the frozen transformer, trained on `control_image` (README:
    ControlNet training)."""

    path: str | None = Field(None, description="a diffusers-format ControlNet (a directory with config.json, or a "
                                               "hub id) to continue; null = a new one from the transformer")
    num_layers: int | None = Field(None, ge=1, description="a new ControlNet's (double-stream) blocks, copied from "
                                                           "the transformer's first ones")
    num_single_layers: int | None = Field(None, ge=0, description="a new FLUX ControlNet's single-stream blocks")

    @model_validator(mode="after")
    def _new_or_continued(self):
        layers = [k for k in ("num_layers", "num_single_layers") if getattr(self, k) is not None]
        if self.path is not None and layers:
            raise ValueError(f"path continues a ControlNet whose config.json sets its layers; unset "
                             f"{', '.join(layers)}")
        if self.path is None and self.num_layers is None:
            raise ValueError("set path (a ControlNet to continue) or num_layers (a new one from the transformer's "
                             "weights)")
        return self


class ModelConfig(_Section):
    family: str = Field("flux", description="a name in raydiff.registry (see registry.BUILTIN_FAMILIES, "
                                             "or registered)")
    path: str = Field(..., description="diffusers-format pipeline directory (model_index.json) or a hub id")
    dtype: Literal[DTYPE_NAMES] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    # FLUX.1-dev distils guidance into an embedding; 1.0 during training (sd-scripts, finetrainers).
    guidance: float = 1.0
    max_sequence_length: int | None = Field(None, ge=1, description="text tokens; null = family default")
    # The frozen DiT's linears, LoRA on top in fp32: int8/fp8 torchao weight-only, nf4 bitsandbytes (README).
    quantize: Literal[QUANTIZE_MODES] | None = None
    quantize_text_encoders: bool = Field(False, description="also quantize the frozen text encoders (model.quantize)")
    expert: Literal["high", "low"] | None = Field(
        None, description="two-expert checkpoints (Wan 2.2 A14B): train the high-noise `transformer` or the "
                          "low-noise `transformer_2`, on its share of the timesteps; one run per expert")
    controlnet: ControlNetConfig | None = Field(None, description="train a ControlNet on data column control_image "
                                                                  "(flux, qwen_image, sd3); null = none")
    # Edit families resize their source images by their pipeline's rule (Kontext's preferred resolutions, Qwen-Edit's
    # ~1024² area); this scales that area for training (cheaper steps) and Kontext's validation samples; `raydiff
    # sample` always uses the pipeline's own.
    edit_image_pixels: int | None = Field(
        None, ge=256, description="edit families: the source image's area in training; null = the pipeline's rule")

    @model_validator(mode="after")
    def _text_encoders_follow_the_dit(self):
        if self.quantize_text_encoders and self.quantize is None:
            raise ValueError("model.quantize_text_encoders uses model.quantize's mode; set model.quantize")
        return self

    def family_options(self) -> dict:
        """Keyword options of the family's constructor beyond the common ones (only those set)."""
        return {} if self.edit_image_pixels is None else {"edit_image_pixels": self.edit_image_pixels}

    @property
    def denoiser(self) -> str | None:
        """The expert's component name, or None (the family's own denoiser)."""
        return EXPERT_COMPONENTS[self.expert] if self.expert else None

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        names = registry.family_names()
        if family not in names:
            close = difflib.get_close_matches(family, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown model family {family!r}; {hint}known: {', '.join(names)}")
        return family


class RegularizationConfig(_Section):
    """Prior preservation: a second dataset mixed into training (docs/data.md#regularization-data)."""

    metadata_path: str = Field(..., description="the regularization set's metadata file (same columns as data's)")
    base_path: str = Field(".", description="its files' base path")
    weight: float = Field(1.0, ge=0, description="its samples' loss weight")
    ratio: float = Field(0.5, gt=0, lt=1, description="its share of each epoch's samples")


class DataConfig(_Section):
    base_path: str = "."
    # One metadata file (read by the driver), or shards: a directory, a glob, a list, or an s3:// prefix
    # (raydiff/data/shards.py; streamed by the workers, the driver holds no rows).
    metadata_path: str | list[str]
    format: Literal["auto", "webdataset"] = Field(
        "auto", description="auto: by extension (.csv/.json/.jsonl/.parquet metadata, .tar WebDataset)")
    shuffle_buffer: int = Field(1000, ge=1, description="sharded data: samples each rank shuffles together (one chunk)")
    num_samples: int | None = Field(
        None, ge=1, description="sharded data: samples per epoch; null = counted (parquet footers, else a read)")
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
    frame_buckets: list[int] | None = Field(
        None, description="videos with buckets: frame counts (each 4k + 1) a clip's length snaps down to; "
                          "buckets are then (frames, height, width)")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="probability of training on the empty prompt")
    random_flip: bool = Field(False, description="horizontal flip of half the samples, fixed per sample and seed")
    regularization: RegularizationConfig | None = None

    @property
    def sharded(self) -> bool:
        """Whether `metadata_path` names shards streamed by the workers (a list, a directory, a glob, an
        s3:// prefix, or WebDataset) rather than one metadata file read by the driver."""
        path = self.metadata_path
        if isinstance(path, list) or self.format == "webdataset" or set("*?[") & set(path) or path.endswith("/"):
            return True
        if "://" in path:
            return os.path.splitext(path)[1].lower() not in (".csv", ".json", ".jsonl", ".parquet")
        return os.path.isdir(path)

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

    @field_validator("frame_buckets")
    @classmethod
    def _frame_rule(cls, counts: list[int] | None) -> list[int] | None:
        if counts is None:
            return None
        if not counts:
            raise ValueError("empty; list frame counts, or null for no frame buckets")
        for n in counts:
            # Video VAEs (Wan) compress time 4x after the first frame, so a clip holds 4k + 1 frames.
            if n < 1 or n % 4 != 1:
                raise ValueError(f"{n} is not 4k + 1 frames (1, 5, 9, ..., 81)")
        return sorted(set(counts))

    @model_validator(mode="after")
    def _frame_buckets_bucket_videos(self):
        if self.frame_buckets is None:
            return self
        if not self.buckets:
            raise ValueError("data.frame_buckets needs data.buckets: true")
        if self.data_file_keys[0] != "video":
            raise ValueError(f"data.frame_buckets buckets clips by length; the first of data.data_file_keys is "
                             f"{self.data_file_keys[0]!r}, not 'video'")
        if above := [n for n in self.frame_buckets if n > self.num_frames]:
            raise ValueError(f"data.frame_buckets: {', '.join(map(str, above))} above data.num_frames "
                             f"{self.num_frames} (the most frames a clip is read to), so no clip would fill it")
        return self


ADAPTER_TYPES = ("lora", "dora", "lokr", "loha")  # peft's LoraConfig, LoraConfig(use_dora), LoKrConfig, LoHaConfig


class LoraConfig(_Section):
    base_model: str | None = Field(None, description="the model the LoRA goes into; null = the denoiser "
                                                     "(`transformer`, or the model.expert's)")
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


class EMAConfig(_Section):
    decay: float = Field(0.999, gt=0, lt=1, description="ema = decay * ema + (1 - decay) * weights, per update")
    start_step: int = Field(0, ge=0, description="until this optimizer step the EMA copies the weights")
    every: int = Field(1, ge=1, description="update every N optimizer steps after start_step")
    device: Literal["cpu", "same"] = Field("same", description="where the EMA lives: the weights' device, or "
                                                               "host memory (full fine-tuning on small GPUs)")


class TrainConfig(_Section):
    optimizer: Literal[OPTIMIZERS] = "adamw"
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
    ema: EMAConfig | None = Field(None, description="EMA of the trainable weights; null = off")

    @model_validator(mode="after")
    def _prodigy_learning_rate(self):
        if self.optimizer == "prodigy" and self.learning_rate < 0.1:
            raise ValueError(f"train.optimizer prodigy estimates the step size; train.learning_rate scales it and "
                             f"should be about 1.0 (got {self.learning_rate:g})")
        return self


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
    # Condition images per prompt (edit families' sources: a path or a list of paths; a ControlNet's control
    # image: one path), parallel to `prompts`.
    images: list[str | list[str]] = Field([], description="per prompt, the condition image(s) edit families sample "
                                                          "from, or a ControlNet's control image; same length as "
                                                          "prompts")
    every_steps: int | None = Field(
        None, ge=1, description="sample at checkpoints whose step is a multiple; null = every checkpoint")
    seed: int = 0
    steps: int = Field(20, ge=1)
    guidance: float = 3.5
    height: int = Field(512, ge=16)
    width: int = Field(512, ge=16)
    num_frames: int = Field(1, ge=1)
    use_ema: bool = Field(False, description="sample with the EMA weights (train.ema) instead of the trained ones")


class RayConfig(_Section):
    num_workers: int = Field(2, ge=0, description="training workers; 0 = train in this process (Ray Train's local "
                                                  "mode: one rank, no restarts, for pdb and quick tries)")
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
    dashboard: bool = Field(False, description="a local Ray's dashboard for train and preprocess (Tune always "
                                               "starts it); off, the run starts sooner and polls less")
    startup_timeout: float = Field(600, gt=0, description="seconds to wait for an autoscaling cluster to grow to "
                                                           "the run's needs before failing")
    # storage_path may be s3://bucket/prefix. For S3-compatible servers (MinIO, Ceph, moto) set the
    # endpoint URL, e.g. http://127.0.0.1:9000 (scheme http/https taken from it). Credentials come from
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) on the driver, else the AWS SDK chain.
    storage_endpoint: str | None = Field(None, description="S3-compatible endpoint URL; null = AWS S3")
    storage_region: str | None = Field(None, description="S3 region; null = AWS_REGION / AWS_DEFAULT_REGION / SDK")

    @property
    def local(self) -> bool:
        """Train in the driver's process (num_workers 0)."""
        return self.num_workers == 0

    @property
    def ranks(self) -> int:
        """Ranks the data is split across: the workers, or the driver alone in local mode."""
        return max(1, self.num_workers)


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
    def _distributions(self):
        for key, dist in self.param_space.items():  # the keys themselves: RaydiffConfig._tune_keys
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
