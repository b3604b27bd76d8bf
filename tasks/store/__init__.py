"""The versioned artifact store every stage hands its output through."""
from .base import Backend, PreconditionFailed
from .fingerprint import fingerprint, public_params
from .manifest import FileEntry, InputRef, Manifest, Producer
from .names import InvalidNameError, parse_artifact_spec
from .progress import ProgressSink, RichProgress
from .stage import StageResult, StageTimeout, run_stage
from .store import (DEFAULT_STORE, ArtifactNotFound, ArtifactStore, ConcurrentWriterError, DestinationConflict,
                    IntegrityError)

__all__ = [
    "ArtifactNotFound", "ArtifactStore", "Backend", "ConcurrentWriterError", "DestinationConflict", "StageResult", "StageTimeout", "run_stage", "DEFAULT_STORE", "FileEntry", "InputRef", "IntegrityError",
    "InvalidNameError", "Manifest", "PreconditionFailed", "Producer", "ProgressSink", "RichProgress",
    "fingerprint", "parse_artifact_spec", "public_params",
]
