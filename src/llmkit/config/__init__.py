"""Configs are data: dataclasses whose attribute docstrings are the `--help` text.

`sections` holds the dataclasses (model, data, train, finetune) and the model presets; `machinery` turns YAML
and command lines into them, and them into YAML and `--help`. Everything is importable from `llmkit.config`.
"""

from llmkit.config.distill import DistillRunConfig, KDConfig
from llmkit.config.machinery import (
    add_dataclass_args,
    apply_overrides,
    build,
    coerce,
    dataclass_from_args,
    field_docs,
    help_text,
    load_run_config,
    load_yaml,
    model_preset,
    parse_override_args,
    read_run_folder_config,
    save_yaml,
    to_dict,
)
from llmkit.config.sections import (
    MODEL_PRESETS,
    DataConfig,
    FinetuneConfig,
    FinetuneRunConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "MODEL_PRESETS", "DataConfig", "DistillRunConfig", "KDConfig",
    "FinetuneConfig", "FinetuneRunConfig", "ModelConfig", "RunConfig", "TrainConfig",
    "add_dataclass_args", "apply_overrides", "build", "coerce", "dataclass_from_args", "field_docs", "help_text",
    "load_run_config", "load_yaml", "model_preset", "parse_override_args", "read_run_folder_config", "save_yaml",
    "to_dict",
]
