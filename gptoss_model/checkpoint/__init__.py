"""Checkpoints on disk: the HF<->Megatron name map and mappings, MXFP4, HF safetensors read/write/validate,
Megatron torch_dist read and layout, loading HF weights into a model, tiny test checkpoints."""
