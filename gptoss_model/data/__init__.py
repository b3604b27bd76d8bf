"""Tokenising corpora into megatron indexed datasets and packing chat data for SFT."""
