"""Byte-level BPE tokenizers run on tiktoken's engine, checked against `tokenizers`.

Why: on the benchmark corpus (benchmarks/preprocess_tokens.py) tiktoken's batch call spends
about a quarter of the CPU of `tokenizers`' `encode_batch_fast` (no per-character alignment
bookkeeping, no per-token strings). Tokenising is nearly all of the preprocess stage's work,
so this is the stage's speed.

Why the ids agree, and where that rests on a check rather than on construction:
- Both split the text with the same regex, then byte-pair-merge each piece. tiktoken merges
  the adjacent pair whose concatenation has the lowest rank; `tokenizers` merges the
  registered pair with the lowest merge rank. With rank = token id, those choices agree when
  merge order and result ids rise together, which `convert` requires.
- tiktoken takes a piece that is itself a token whole. `tokenizers` does so only with
  `ignore_merges`; otherwise `convert` requires every token to encode to itself.
- What the vocabulary cannot show: a pair that concatenates to a token without being its
  registered merge, ties between two merges of one token, and the two regex engines'
  Unicode tables (onig vs Rust's regex). `TiktokenEncoder` re-encodes a sample of every
  work unit with `tokenizers` and stops on the first difference.
- Texts containing an added token's text go to `tokenizers` whole: it splits those out
  before the regex. (Texts are valid Unicode: the record reader refuses lone surrogates.)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from gptoss_model.errors import PermanentError

# tokenizers' ByteLevel pre-tokenizer (use_regex=True) splits with GPT-2's pattern
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class NotConvertible(PermanentError, ValueError):
    """The tokenizer cannot run on tiktoken with the same ids; the message says why."""


class EngineMismatch(PermanentError, RuntimeError):
    """tiktoken and tokenizers gave different ids for a sampled text."""


@lru_cache(maxsize=1)
def byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table that byte-level BPE vocabularies use.

    transformers has the forward table (`convert_slow_tokenizer.bytes_to_unicode`), but its
    module has moved between releases and costs a second to import in every worker."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


@dataclass(frozen=True)
class Conversion:
    pattern: str
    ranks: dict[bytes, int]
    added: tuple[str, ...]      # added tokens' texts: a text containing one goes to tokenizers

    def encoding(self):
        """The tiktoken Encoding: ranks are the token ids, no special tokens (added ones are routed)."""
        import tiktoken

        return tiktoken.Encoding("gptoss-preprocess", pat_str=self.pattern, mergeable_ranks=self.ranks,
                                 special_tokens={})


def _pattern(pre: dict | None, where: str) -> str:
    def byte_level(step: dict, use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex
                and not step.get("add_prefix_space", False))

    if pre and byte_level(pre, use_regex=True):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in (steps[0].get("pattern") or {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and byte_level(steps[1], use_regex=False)):
        return steps[0]["pattern"]["Regex"]
    raise NotConvertible(f"{where}: pre-tokenizer {json.dumps(pre)[:200]} is neither ByteLevel (GPT-2 regex, "
                         "no prefix space) nor Split(regex, Isolated) + ByteLevel(use_regex=false)")


def convert(backend_json: str, where: str) -> Conversion:
    """tiktoken's ranks and pattern for a `tokenizers` JSON, or NotConvertible naming the reason."""
    spec = json.loads(backend_json)
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None:
        raise NotConvertible(f"{where}: has a normalizer ({spec['normalizer'].get('type')}); tiktoken has none")
    if model.get("type") != "BPE":
        raise NotConvertible(f"{where}: model is {model.get('type')}, not BPE")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise NotConvertible(f"{where}: BPE option {option}={model[option]!r} has no tiktoken equivalent")
    if model.get("byte_fallback"):
        raise NotConvertible(f"{where}: byte_fallback BPE is not byte-level BPE")
    pattern = _pattern(spec.get("pre_tokenizer"), where)
    to_byte = byte_of_char()
    ranks: dict[bytes, int] = {}
    for token, token_id in model["vocab"].items():
        try:
            ranks[bytes(to_byte[c] for c in token)] = token_id
        except KeyError:
            raise NotConvertible(f"{where}: vocabulary entry {token!r} (id {token_id}) is not byte-level") from None
    if len(ranks) != len(model["vocab"]) or len(set(ranks.values())) != len(ranks):
        raise NotConvertible(f"{where}: two vocabulary entries share bytes or an id")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise NotConvertible(f"{where}: {len(missing)} of the 256 bytes have no token (first: {missing[0]:#04x})")
    _check_merge_order(model, where)
    added = tuple(sorted({a["content"] for a in spec.get("added_tokens", []) if a.get("content")}))
    return Conversion(pattern=pattern, ranks=ranks, added=added)


def _check_merge_order(model: dict, where: str) -> None:
    """Merge rank and result id must rise together, so ranking by id ranks by merge."""
    vocab, previous = model["vocab"], -1
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        result = vocab.get(left + right)
        if result is None:
            raise NotConvertible(f"{where}: merge {rank} ({left!r} {right!r}) makes a token not in the vocabulary")
        if result < previous:
            raise NotConvertible(f"{where}: merge {rank} makes id {result}, below an earlier merge's {previous}: "
                                 "merge order and ids disagree")
        previous = result


def check_tokens_encode_to_themselves(reference, added: tuple[str, ...], where: str) -> None:
    """tiktoken takes a piece that is a token whole; `tokenizers` must reach the same token by merging.

    Added tokens' texts are exempt: a text containing one never reaches tiktoken."""
    model = reference.model
    if getattr(model, "ignore_merges", False):
        return  # tokenizers takes a whole-token piece whole too
    exempt = {text.encode("utf-8") for text in added}
    to_byte = byte_of_char()
    for token, token_id in reference.get_vocab(with_added_tokens=False).items():
        if len(token) < 2 or bytes(to_byte[c] for c in token) in exempt:
            continue
        got = [t.id for t in model.tokenize(token)]
        if got != [token_id]:
            raise NotConvertible(f"{where}: token {token!r} (id {token_id}) encodes to {got} in tokenizers, "
                                 "so tiktoken's whole-piece match would differ")


class AddedTokenScan:
    """Does a text contain any added token's literal text? (Exact; one regex pass over the text.)"""

    def __init__(self, contents: tuple[str, ...]):
        self.tokens = frozenset(contents)
        self.lengths = sorted({len(c) for c in contents})
        head = min(3, *self.lengths) if contents else 0
        heads = sorted({c[:head] for c in contents}, key=len, reverse=True)
        # a lookahead finds every start position, overlapping ones included
        self._starts = re.compile("(?=" + "|".join(map(re.escape, heads)) + ")") if contents else None

    def found_in(self, text: str) -> bool:
        if self._starts is None:
            return False
        for match in self._starts.finditer(text):
            at = match.start()
            if any(text[at:at + n] in self.tokens for n in self.lengths):
                return True
        return False


class TiktokenEncoder:
    """Per-text ids from tiktoken, from `tokenizers` for the texts tiktoken does not cover."""

    def __init__(self, backend_json: str, where: str, reference):
        conversion = convert(backend_json, where)
        check_tokens_encode_to_themselves(reference, conversion.added, where)
        self.where = where
        self.reference = reference
        self.encoding = conversion.encoding()
        self.added = AddedTokenScan(conversion.added)

    def encode(self, texts: list[str], dtype, verify_chars: int = 0, describe=str) -> list[np.ndarray]:
        """Ids per text. The leading texts, up to `verify_chars` characters, are also encoded by
        tokenizers and must agree; `describe(i)` names text i in the error."""
        out: list[np.ndarray | None] = [None] * len(texts)
        by_reference = []
        for i, text in enumerate(texts):
            if not self.added.found_in(text):
                out[i] = np.array(self.encoding.encode_ordinary(text), dtype=dtype)
            else:
                by_reference.append(i)
        if by_reference:
            encodings = self.reference.encode_batch_fast([texts[i] for i in by_reference], add_special_tokens=False)
            for i, encoding in zip(by_reference, encodings):
                out[i] = np.array(encoding.ids, dtype=dtype)
        self._verify(texts, out, verify_chars, describe)
        return out

    def _verify(self, texts: list[str], got: list[np.ndarray], verify_chars: int, describe) -> None:
        count, size = 0, 0
        while count < len(texts) and size < verify_chars:
            size += len(texts[count])
            count += 1
        if not count:
            return
        expected = self.reference.encode_batch_fast(texts[:count], add_special_tokens=False)
        for i, encoding in enumerate(expected):
            want = np.asarray(encoding.ids, dtype=np.int64)
            have = got[i].astype(np.int64)
            if not np.array_equal(want, have):
                n = min(len(want), len(have))
                differs = np.flatnonzero(want[:n] != have[:n])
                at = int(differs[0]) if differs.size else n  # else one is a prefix of the other
                raise EngineMismatch(
                    f"{describe(i)}: tiktoken and tokenizers disagree at token {at} "
                    f"(tiktoken {have[at:at + 4].tolist()}, tokenizers {want[at:at + 4].tolist()}) with the "
                    f"tokenizer {self.where}; rerun with tokenizer_engine='tokenizers'")
