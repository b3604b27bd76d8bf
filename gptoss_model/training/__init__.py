"""Training on megatron-core: config tree, recipes, pre-flight, data, LoRA/DoRA, loop, checkpoints, metrics.

Entry point: `python -m gptoss_model.train CONFIG.yaml key.sub=value ...` (under torchrun).
"""
