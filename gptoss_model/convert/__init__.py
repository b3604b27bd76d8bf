"""HF checkpoint -> megatron-core torch_dist checkpoint: plan, chunk writers, the streamed conversion."""
