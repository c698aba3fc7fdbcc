"""The typed training config: `sections` holds every key with its default and meaning, `root` the
`RaydiffConfig` that joins them (and the checks spanning sections), `loading` YAML, `--set` overrides,
error messages and the payload Ray's processes receive. Torch-free: the CLI checks a config in a second."""

from raydiff.config.loading import (
    ConfigError,
    UserError,
    apply_overrides,
    dump_config,
    from_remote,
    load_config,
    parse_config,
    to_dict,
    to_remote,
)
from raydiff.config.root import RaydiffConfig, config_key_error
from raydiff.config.sections import (
    ADAPTER_TYPES,
    DISTRIBUTIONS,
    DTYPE_NAMES,
    EXPERT_COMPONENTS,
    GPU_ONLY_QUANTIZE,
    OPTIMIZERS,
    QUANTIZE_MODES,
    SHARDED_STATE_OPTIMIZERS,
    DataConfig,
    EMAConfig,
    EvalConfig,
    LogConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RayConfig,
    TrainConfig,
    TuneConfig,
    ValidationConfig,
)

__all__ = [
    "ADAPTER_TYPES", "DISTRIBUTIONS", "DTYPE_NAMES", "EXPERT_COMPONENTS", "GPU_ONLY_QUANTIZE", "OPTIMIZERS",
    "QUANTIZE_MODES", "SHARDED_STATE_OPTIMIZERS",
    "ConfigError", "DataConfig", "EMAConfig", "EvalConfig", "LogConfig", "LoraConfig", "LossConfig", "ModelConfig",
    "RayConfig", "RaydiffConfig", "TrainConfig", "TuneConfig", "UserError", "ValidationConfig", "apply_overrides",
    "config_key_error", "dump_config", "from_remote", "load_config", "parse_config", "to_dict", "to_remote",
]
