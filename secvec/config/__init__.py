"""Configs: strict, frozen pydantic models per stage, loaded from YAML; errors name file, line and field.

- `load`: `ConfigError`, the YAML loader, `check_path` (where a config may read and write), presets;
- `data`: the data config (`secvec data prepare`); `stages`: the pipeline and its stages;
- `bench`: the effectiveness benchmark (`secvec bench`).
"""

from secvec.config.attack import AttackConfig, AttackSpace, load_attack_config
from secvec.config.bench import (
    ARMS,
    PROTOCOLS,
    Arm,
    BenchConfig,
    Cell,
    DurabilityProtocol,
    ForgetFilterConfig,
    PaperProtocol,
    SweepProtocol,
    load_bench_config,
)
from secvec.config.data import DataConfig, RoleSizes, SourceConfig, load_data_config
from secvec.config.load import PRESETS_DIR, ConfigError, check_path, load_yaml_config, preset_path, yaml_line
from secvec.config.stages import (
    BootstrapConfig,
    ChampionPolicy,
    EvalConfig,
    FinetuneConfig,
    JudgeConfig,
    PipelineConfig,
    RegistryConfig,
    RuntimeConfig,
    ScreenConfig,
    Thresholds,
    TrainConfig,
    VectorConfig,
    load_pipeline_config,
    with_runtime,
)

__all__ = [
    "ARMS",
    "PRESETS_DIR",
    "PROTOCOLS",
    "Arm",
    "AttackConfig",
    "AttackSpace",
    "BenchConfig",
    "BootstrapConfig",
    "Cell",
    "ChampionPolicy",
    "ConfigError",
    "DataConfig",
    "DurabilityProtocol",
    "EvalConfig",
    "FinetuneConfig",
    "ForgetFilterConfig",
    "JudgeConfig",
    "PaperProtocol",
    "PipelineConfig",
    "RegistryConfig",
    "RoleSizes",
    "RuntimeConfig",
    "ScreenConfig",
    "SourceConfig",
    "SweepProtocol",
    "Thresholds",
    "TrainConfig",
    "VectorConfig",
    "check_path",
    "load_attack_config",
    "load_bench_config",
    "load_data_config",
    "load_pipeline_config",
    "load_yaml_config",
    "preset_path",
    "with_runtime",
    "yaml_line",
]
