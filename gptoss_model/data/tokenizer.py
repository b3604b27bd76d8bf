"""The checkpoint's tokenizer, as the preprocess stage uses it.

Loaded from a local checkpoint directory (`tokenizer.json` + `tokenizer_config.json`), never
downloaded. Ids are what Megatron-LM's `preprocess_data.py` gets from
`tokenizer.tokenize()` + `convert_tokens_to_ids()`: the fast tokenizer's encoding WITHOUT
the special tokens its post-processor would add. We run transformers' own backend
`tokenizers.Tokenizer` through its batch API (`encode_batch_fast`, Rust threads), which
yields those same ids without the Python round trip through token strings.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from gptoss_model.errors import PermanentError

UINT16_VOCAB_LIMIT = 65500  # megatron-core DType.optimal_dtype's threshold


class TokenizerError(PermanentError, ValueError):
    """The checkpoint has no usable tokenizer for this stage."""


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a worker needs to rebuild the tokenizer (picklable, no files)."""

    backend_json: str
    vocab_size: int          # len(tokenizer): the base vocabulary plus added tokens
    max_token_id: int
    eod_token_id: int | None  # the eos token, as Megatron-LM's HuggingFaceTokenizer.eod
    pad_token_id: int | None
    source: str

    def token_dtype(self) -> type[np.number]:
        """uint16 as Megatron-LM picks it (vocabulary under 65,500), unless an id would not fit.

        Megatron-LM decides on the vocabulary size alone; a tokenizer with fewer than 65,500
        entries but ids above 65,535 would be silently wrapped there. We take int32 then.
        """
        if self.vocab_size < UINT16_VOCAB_LIMIT and self.max_token_id <= np.iinfo(np.uint16).max:
            return np.uint16
        return np.int32


def load_hf_tokenizer(checkpoint_dir: str | os.PathLike):
    """transformers' AutoTokenizer from a local directory only."""
    from transformers import AutoTokenizer

    path = Path(checkpoint_dir)
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{path}: no tokenizer.json (the preprocess stage needs the checkpoint's fast tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise TokenizerError(f"{path}: cannot load the tokenizer: {e}") from e


def tokenizer_spec(checkpoint_dir: str | os.PathLike, *, eod_token: str | None = None) -> TokenizerSpec:
    hf = load_hf_tokenizer(checkpoint_dir)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{checkpoint_dir}: {type(hf).__name__} is not a fast tokenizer")
    vocab = hf.get_vocab()
    eod_name = eod_token or hf.eos_token
    eod_id = None
    if eod_name is not None:
        eod_id = vocab.get(eod_name)
        if eod_id is None:
            raise TokenizerError(f"{checkpoint_dir}: end-of-document token {eod_name!r} is not in the vocabulary")
    return TokenizerSpec(backend_json=backend.to_str(), vocab_size=len(hf), max_token_id=max(vocab.values()),
                         eod_token_id=eod_id, pad_token_id=hf.pad_token_id, source=str(checkpoint_dir))


TOKENIZER_ENGINES = ("tokenizers", "tiktoken")


class BatchEncoder:
    """Token ids of many texts at once, as numpy arrays.

    engine "tokenizers" is Megatron-LM's own path (by construction the same ids); "tiktoken"
    runs convertible byte-level BPE tokenizers on tiktoken, checked against tokenizers on a
    sample (see `tiktoken_engine`)."""

    def __init__(self, spec: TokenizerSpec, engine: str = "tokenizers"):
        from tokenizers import Tokenizer

        if engine not in TOKENIZER_ENGINES:
            raise TokenizerError(f"tokenizer engine {engine!r}: expected one of {TOKENIZER_ENGINES}")
        self.spec = spec
        self._tokenizer = Tokenizer.from_str(spec.backend_json)
        self.dtype = spec.token_dtype()
        self._tiktoken = None
        if engine == "tiktoken":
            from gptoss_model.data.tiktoken_engine import TiktokenEncoder

            self._tiktoken = TiktokenEncoder(spec.backend_json, spec.source, self._tokenizer)

    def encode(self, texts: Sequence[str], verify_chars: int = 0, describe=str) -> tuple[np.ndarray, np.ndarray]:
        """(all ids back to back in the stage's dtype, int64 per-text lengths).

        On the tiktoken engine the leading texts, up to `verify_chars`, are checked against
        tokenizers; `describe(i)` names text i if they differ."""
        if self._tiktoken is not None:
            arrays = self._tiktoken.encode(list(texts), self.dtype, verify_chars, describe)
            lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
            return (np.concatenate(arrays) if arrays else np.zeros(0, self.dtype)), lengths
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        if not encodings:
            return np.zeros(0, self.dtype), lengths
        # one list -> array conversion per document (in C), not a Python step per token
        flat = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])
        return flat.astype(self.dtype, copy=False), lengths
