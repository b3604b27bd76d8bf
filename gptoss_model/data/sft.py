"""Chat JSONL -> packed, loss-masked SFT samples (the format of `packed_sft`).

Each record's `messages` (OpenAI/HF style: role + content) is rendered with the
checkpoint's own chat template (`apply_chat_template`, GPT-OSS: harmony) and tokenised
with character offsets. The loss mask is 1 exactly on the tokens that lie inside an
assistant message's content in the rendered text (located in order, so a repeated
phrase elsewhere is never matched); template tokens, role headers, the end-of-turn
markers and every non-assistant message stay 0.

Conversations are packed into samples of at most `target_length` tokens by best-fit
decreasing (longest first, each into the fullest sample that still has room, ties to the
earliest): at least as tight as first-fit decreasing. A conversation longer than the
target is bad input (`too_long`) under the stage's policy.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from gptoss_model.data.packed_sft import PackedSample, write_packed_sft
from gptoss_model.data.progress import CorpusProgress, ProgressFn
from gptoss_model.data.sources import MAX_RECORD_BYTES, CorpusError, RecordReader, expand_sources, plan_units
from gptoss_model.errors import PermanentError


class ChatTemplateError(PermanentError, ValueError):
    """The chat template does not render a conversation so that its assistant turns can be found."""


@dataclass(frozen=True)
class Conversation:
    tokens: np.ndarray     # int32
    loss_mask: np.ndarray  # uint8


def tokenize_conversation(tokenizer, messages: Sequence[dict]) -> Conversation:
    """Render with the chat template, tokenise, mask assistant content (see the module docstring)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans, position = [], 0
    for message in messages:
        content = message["content"]
        found = text.find(content, position) if content else position
        if found < 0:
            raise ChatTemplateError(f"the chat template changed the {message['role']} message "
                                    f"{content[:40]!r}...: cannot locate it in the rendered text")
        if message["role"] == "assistant" and content:
            spans.append((found, found + len(content)))
        position = found + len(content)
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int32)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for start, end in spans:
        mask[(offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])] = 1
    return Conversation(ids, mask)


def pack_best_fit_decreasing(lengths: Sequence[int], target_length: int) -> list[list[int]]:
    """Bins of document indices, each summing to <= target_length; bins in creation order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        if n > target_length:
            raise ValueError(f"document {i} of {n} tokens exceeds the target length {target_length}")
        slot = bisect.bisect_left(free, (n, -1))
        if slot < len(free):
            room, b = free.pop(slot)
        else:
            room, b = target_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def build_sft_dataset(sources: Sequence[str], checkpoint_dir: str | Path, out_dir: str | Path, *,
                      target_length: int, messages_key: str = "messages", bad_input: str = "fail",
                      shard_samples: int | None = None, storage_options: dict | None = None,
                      progress: ProgressFn | None = None, max_record_bytes: int = MAX_RECORD_BYTES) -> dict:
    """Tokenise, mask and pack every conversation; write the shards and `sft.json`; return metrics.
    `progress(bytes done, bytes in all, note)` as for pretraining (data/progress.py)."""
    from gptoss_model.data.packed_sft import write_sft_metadata
    from gptoss_model.data.tokenizer import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(checkpoint_dir)
    if not tokenizer.chat_template:
        raise ChatTemplateError(f"{checkpoint_dir}: the tokenizer has no chat template")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ChatTemplateError(f"{checkpoint_dir}: the tokenizer has neither a pad nor an eos token")
    files = expand_sources(sources, storage_options)
    meter = CorpusProgress(sum(f.size for f in files), progress)
    conversations: list[Conversation] = []
    skipped = {}
    examples = {}
    for unit in plan_units(files, unit_bytes=1 << 62):
        reader = RecordReader(unit, (messages_key,), bad_input, storage_options, conversations=True,
                              max_record_bytes=max_record_bytes)
        for (messages,) in reader:
            conversation = tokenize_conversation(tokenizer, messages)
            if len(conversation.tokens) > target_length:
                reader.reject("too_long", reader.last_line, f"{len(conversation.tokens)} tokens > target "
                              f"length {target_length}")
                continue
            meter(1, len(conversation.tokens), 0)
            conversations.append(conversation)
        meter(0, 0, unit.end - unit.start)  # a chat file's bytes count once it is read whole
        for reason, n in reader.bad.counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
            examples.setdefault(reason, []).extend(reader.bad.examples[reason])
    meter.finish()
    if not conversations or not sum(int(c.loss_mask.sum()) for c in conversations):
        raise CorpusError(f"the corpus ({', '.join(sources)}) yields no trainable tokens"
                          + (f"; skipped records: {skipped}" if skipped else ""))
    bins = pack_best_fit_decreasing([len(c.tokens) for c in conversations], target_length)
    per_shard = shard_samples or len(bins)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefixes, shards = [], []
    for s, first in enumerate(range(0, len(bins), per_shard)):
        prefix = f"shard_{s:05d}_sft"
        samples = (PackedSample.from_documents([(conversations[i].tokens, conversations[i].loss_mask) for i in b])
                   for b in bins[first:first + per_shard])
        counts = write_packed_sft(out_dir / prefix, samples, target_length=target_length)
        prefixes.append(prefix)
        shards.append({"shard": s, **counts})
    write_sft_metadata(out_dir, target_length=target_length, pad_token_id=pad_id,
                       eod_token_id=tokenizer.eos_token_id, prefixes=prefixes)
    tokens = sum(len(c.tokens) for c in conversations)
    return {
        "documents": len(conversations), "tokens": tokens, "samples": len(bins),
        "loss_tokens": sum(int(c.loss_mask.sum()) for c in conversations),
        "target_length": target_length,
        "packing_efficiency": round(tokens / (len(bins) * target_length), 6),
        "skipped_records": {"counts": dict(sorted(skipped.items())),
                            "examples": {k: v[:5] for k, v in sorted(examples.items())}},
        "input_files": len(files), "input_bytes": sum(f.size for f in files),
        "shards": shards, "data_prefixes": prefixes,
    }
