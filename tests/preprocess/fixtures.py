"""Test inputs shared by the preprocess tests: tokenizer directories and corpora.

The uint16 tokenizer is committed (tests/preprocess/golden/tokenizer_u16/); the int32
one is derived from it deterministically by adding reserved tokens past 65,500 entries
and making the last of them the end-of-document token, so its id (above 65,535)
reaches the output.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
U16_TOKENIZER = GOLDEN / "tokenizer_u16"
INT32_RESERVED = 66_000 - 512


def make_int32_tokenizer(out: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(U16_TOKENIZER / "tokenizer.json"))
    names = [f"<|reserved_{i}|>" for i in range(INT32_RESERVED)]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((U16_TOKENIZER / "tokenizer_config.json").read_text())
    config["eos_token"] = names[-1]
    config.pop("added_tokens_decoder", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def tokenizer_dir(kind: str, tmp: Path) -> Path:
    """A checkpoint-like directory holding only the tokenizer files."""
    if kind == "u16":
        dest = tmp / "tokenizer_u16"
        shutil.copytree(U16_TOKENIZER, dest, dirs_exist_ok=True)
        return dest
    return make_int32_tokenizer(tmp / "tokenizer_i32")


def corpus_lines() -> list[bytes]:
    return (GOLDEN / "corpus.jsonl").read_bytes().splitlines(keepends=True)


def write_split(lines: list[bytes], directory: Path, parts: int, suffix: str = ".jsonl") -> list[Path]:
    """The corpus in `parts` consecutive files (sorted names keep the order)."""
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(lines) // parts)
    paths = []
    for i in range(parts):
        p = directory / f"part_{i:03d}{suffix}"
        p.write_bytes(b"".join(lines[i * size:(i + 1) * size]))
        paths.append(p)
    return paths
