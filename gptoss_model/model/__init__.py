"""The GPT-OSS model on megatron-core: configuration, build, parallel state, CPU patches, the transformers reference."""
