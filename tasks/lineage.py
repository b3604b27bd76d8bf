"""What an artifact was made from: the inputs recorded in manifests, followed back.

Export and verify find the original hf-checkpoint (config, tokenizer, the reference
weights) and an adapter run's base checkpoint this way when they are not named.
"""
from __future__ import annotations

from gptoss_model.errors import PermanentError
from tasks.kinds import Kind
from tasks.stage import InputError
from tasks.store import ArtifactStore, Manifest


class LineageError(PermanentError, LookupError):
    """The original hf-checkpoint (or an adapter run's base checkpoint) cannot be found from the input's lineage."""


def find_in_lineage(store: ArtifactStore, manifest: Manifest, kind: Kind, *, hint: str) -> Manifest:
    """The nearest artifact of `kind` an artifact descends from (breadth first over its inputs' manifests);
    `hint` names the parameter that would name one instead."""
    queue, seen = list(manifest.inputs), set()
    while queue:
        ref = queue.pop(0)
        if (ref.kind, ref.name, ref.version) in seen:
            continue
        seen.add((ref.kind, ref.name, ref.version))
        found = store.get_manifest(ref.kind, ref.name, ref.version)
        if found is None:
            continue
        if found.kind == kind:
            return found
        queue += found.inputs
    raise LineageError(f"{manifest.kind}/{manifest.name}@{manifest.version} does not descend from a "
                       f"{kind} in this store; name one with {hint}")


def holds_adapters(store: ArtifactStore, source: Manifest) -> bool:
    """Whether a checkpoint artifact is a LoRA/DoRA run's (adapter-only) checkpoint.

    Converted megatron-checkpoints never are; a train-checkpoint says so in its recorded run
    config, else (committed by other means) its common state is read, which pulls the artifact.
    """
    if source.kind != Kind.TRAIN_CHECKPOINT:
        return False
    recorded = (source.parameters or {}).get("config", {})
    if isinstance(recorded, dict) and isinstance(recorded.get("peft"), dict):
        return bool(recorded["peft"].get("method"))
    from gptoss_model.export.adapters import read_peft_config

    return read_peft_config(store.local_path(source)) is not None


def find_adapter_base(store: ArtifactStore, source: Manifest, named: Manifest | None = None) -> Manifest | None:
    """The megatron-checkpoint an adapter-only source merges into (`named`, else its run's base from the
    lineage); None when the source holds no adapters."""
    if not holds_adapters(store, source):
        if named is not None:
            raise InputError(f"base_source={named.spec!r}: {source.spec} holds no LoRA/DoRA adapters")
        return None
    return named or find_in_lineage(store, source, Kind.MEGATRON_CHECKPOINT, hint="base_source")
