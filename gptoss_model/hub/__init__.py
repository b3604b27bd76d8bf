"""Hugging Face Hub snapshots: resumable, verified download into a local directory."""
