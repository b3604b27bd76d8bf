"""Numeric gates: logit parity with transformers, and layer-wise comparison for models too big to run whole."""
