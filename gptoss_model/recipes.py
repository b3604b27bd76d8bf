"""`from gptoss_model.recipes import gpt_oss_20b_pretrain_config`: the seed page's recipe calls.

The definitions live in `gptoss_model.training.recipes`; this module is the short import path.
"""

from gptoss_model.training.recipes import (RECIPES, gpt_oss_20b_finetune_config, gpt_oss_20b_pretrain_config,
                                           gpt_oss_120b_finetune_config, gpt_oss_120b_pretrain_config, recipe,
                                           tiny_finetune_config, tiny_pretrain_config)

__all__ = ["RECIPES", "gpt_oss_20b_finetune_config", "gpt_oss_20b_pretrain_config",
           "gpt_oss_120b_finetune_config", "gpt_oss_120b_pretrain_config", "recipe",
           "tiny_finetune_config", "tiny_pretrain_config"]
