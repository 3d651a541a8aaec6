"""Model definitions. `build_model(config)` picks the family; models know nothing of files."""

from __future__ import annotations

from nanoseek.models.config import DeepseekConfig, DeepseekV4Config, DenseConfig, ModelConfig


def build_model(cfg: ModelConfig):
    if isinstance(cfg, DeepseekV4Config):
        from nanoseek.models.deepseek_v4 import DeepseekV4ForCausalLM

        return DeepseekV4ForCausalLM(cfg)
    if isinstance(cfg, DeepseekConfig):
        from nanoseek.models.deepseek import DeepseekForCausalLM

        return DeepseekForCausalLM(cfg)
    if isinstance(cfg, DenseConfig):
        from nanoseek.models.dense import DenseForCausalLM

        return DenseForCausalLM(cfg)
    raise TypeError(f"not a model config: {type(cfg).__name__}")
