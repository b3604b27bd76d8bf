"""Megatron checkpoint -> Hugging Face directory (bf16 or MXFP4), adapters merged or as PEFT."""
