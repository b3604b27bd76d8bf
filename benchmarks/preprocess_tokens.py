"""Preprocess throughput: our stage vs the tokenizer's raw batch API vs Megatron-LM's tool.

    python benchmarks/preprocess_tokens.py [--mb 220] [--megatron-lm PATH --megatron-python PY]

1. Corpus: >= 200 MB of real text, the source and documentation files shipped by the
   installed Python packages and the system (.py, .pyi, .txt, .md, .rst, .c, .h, .cpp, .html),
   one file per JSONL document, in sorted path order (deterministic for a given machine).
2. Tokenizer: a 50,257-entry byte-level BPE trained here with `tokenizers` on a sample of it.
3. Timed, same corpus and tokenizer, one after the other:
   - raw `encode_batch` (and `encode_batch_fast`) on the texts already in memory: the limit;
   - our library build (read, parse, tokenise, write .bin/.idx) with 1 and 2 processes, on the
     default `tokenizers` engine and on the tiktoken engine (beside tiktoken's own raw batch call);
   - Megatron-LM `tools/preprocess_data.py` (tag core_v0.16.1), --workers = cores, --append-eod,
     when a checkout is given; then its output is compared byte for byte with each of ours.
Prints one table. Timings on a shared machine are noisy: run it when it is quiet, or say so.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SUFFIXES = (".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".cpp", ".hpp", ".html")
ROOTS = [Path(sys.prefix) / "lib", Path("/usr/lib"), Path("/usr/share")]
VOCAB = 50_257


def build_corpus(path: Path, megabytes: int) -> tuple[int, int]:
    """Write the JSONL corpus; returns (documents, text bytes)."""
    files = []
    for root in ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(SUFFIXES)]
    budget, documents, size = megabytes << 20, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        for f in files:
            try:
                if not f.is_file() or f.stat().st_size > (4 << 20):
                    continue
                text = f.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip():
                continue
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            documents += 1
            size += len(text.encode("utf-8"))
            if size >= budget:
                break
    if size < budget:
        raise SystemExit(f"only {size / 2**20:.0f} MB of text found under {ROOTS}; need {megabytes} MB")
    return documents, size


def train_tokenizer(corpus: Path, out: Path, sample_mb: int = 24) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        taken = 0
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i % 7:
                    continue
                text = json.loads(line)["text"]
                taken += len(text)
                yield text
                if taken > sample_mb << 20:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample(), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False}))
    return out


def raw_encode(corpus: Path, tokenizer_dir: Path, engine: str) -> tuple[float, int]:
    """The tokenizer alone on texts already in memory, 2048 at a time: "fast" / "slow" is
    `tokenizers`' encode_batch_fast / encode_batch, "tiktoken" its encode_ordinary_batch on all cores."""
    if engine == "tiktoken":
        from gptoss_model.data.tiktoken_engine import convert

        encoding = convert((tokenizer_dir / "tokenizer.json").read_text(), str(tokenizer_dir)).encoding()

        def lengths(texts):
            return map(len, encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count()))
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        encode = tok.encode_batch_fast if engine == "fast" else tok.encode_batch

        def lengths(texts):
            return map(len, encode(texts, add_special_tokens=False))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    batch, tokens = 2048, 0
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        tokens += sum(lengths(texts[i:i + batch]))
    return time.perf_counter() - start, tokens


def ours(corpus: Path, tokenizer_dir: Path, out: Path, workers: int, engine: str) -> tuple[float, int]:
    from gptoss_model.data.pretrain import PretrainOptions, build_pretraining_dataset
    from gptoss_model.data.tokenizer import tokenizer_spec

    spec = tokenizer_spec(tokenizer_dir)
    start = time.perf_counter()
    metrics = build_pretraining_dataset([str(corpus)], spec, out, out.with_name(out.name + ".parts"),
                                        PretrainOptions(append_eod=True, tokenizer_engine=engine), workers=workers)
    return time.perf_counter() - start, metrics["tokens"]


def megatron(corpus: Path, tokenizer_dir: Path, prefix: Path, checkout: Path, python: str) -> float:
    start = time.perf_counter()
    subprocess.run([python, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(prefix),
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir),
                    "--workers", str(os.cpu_count()), "--append-eod", "--log-interval", "100000"],
                   cwd=checkout, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (robust to other jobs' load)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=220, help="corpus size in MB of text (>= 200 for the report)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gptoss-preprocess-bench")
    parser.add_argument("--megatron-lm", type=Path, help="Megatron-LM checkout at tag core_v0.16.1")
    parser.add_argument("--megatron-python", default=sys.executable, help="python with Megatron-LM's deps")
    parser.add_argument("--quick", action="store_true", help="skip encode_batch_fast and the 2-process run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.workdir / f"corpus_{args.mb}mb.jsonl"
    if not corpus.exists():
        documents, size = build_corpus(corpus, args.mb)
        print(f"corpus: {documents:,} documents, {size / 2**20:.0f} MB of text -> {corpus}", flush=True)
    tokenizer_dir = args.workdir / f"bpe_{VOCAB}"
    if not (tokenizer_dir / "tokenizer.json").exists():
        started = time.perf_counter()
        train_tokenizer(corpus, tokenizer_dir)
        print(f"trained a {VOCAB}-entry byte-level BPE in {time.perf_counter() - started:.0f} s", flush=True)
    text_mb = sum(len(json.loads(line)["text"].encode()) for line in open(corpus, encoding="utf-8")) / 2**20

    rows, same = [], None
    cpu = []  # CPU seconds per row, same order

    class measured:
        def __enter__(self):
            self.start = cpu_seconds()

        def __exit__(self, *exc):
            cpu.append(cpu_seconds() - self.start)

    def timed(label: str, run) -> None:
        """One row: run() -> (wall seconds, tokens), with its CPU seconds beside it."""
        with measured():
            seconds, tokens = run()
        rows.append((label, seconds, tokens))
        print(f"{label}: {seconds:.1f} s", flush=True)

    outputs = []

    def ours_run(workers: int, engine: str) -> None:
        out = args.workdir / f"ours_{engine}_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
        outputs.append(out)
        timed(f"gptoss preprocess library, {engine} engine, {workers} process(es)",
              lambda: ours(corpus, tokenizer_dir, out, workers, engine))

    # The essential rows first (a shared machine may not leave time for the rest).
    timed("raw encode_batch (texts already in memory)", lambda: raw_encode(corpus, tokenizer_dir, "slow"))
    ours_run(1, "tokenizers")
    if args.megatron_lm:
        prefix = args.workdir / "megatron"
        timed(f"Megatron-LM tools/preprocess_data.py --workers {os.cpu_count()}",
              lambda: (megatron(corpus, tokenizer_dir, prefix, args.megatron_lm, args.megatron_python), rows[1][2]))
    ours_run(2, "tiktoken")
    if not args.quick:
        timed("raw encode_batch_fast (texts already in memory)", lambda: raw_encode(corpus, tokenizer_dir, "fast"))
        ours_run(2, "tokenizers")
        timed(f"raw tiktoken encode_ordinary_batch, {os.cpu_count()} threads (texts already in memory)",
              lambda: raw_encode(corpus, tokenizer_dir, "tiktoken"))
        ours_run(1, "tiktoken")
    if args.megatron_lm:
        same = all(filecmp.cmp(f"{prefix}_text_document.{ext}", out / f"shard_00000_text_document.{ext}",
                               shallow=False) for out in outputs for ext in ("bin", "idx"))

    raw = rows[0][1]
    print(f"\n{text_mb:.0f} MB of text, {rows[1][2]:,} tokens (with EOD), vocab {VOCAB:,}, "
          f"{os.cpu_count()} cores (shared machine: figures measured under contention)\n")
    print("| method | wall s | tokens/s (wall) | MB/s | wall vs raw encode_batch | CPU s | CPU vs raw |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (label, seconds, tokens), used in zip(rows, cpu):
        print(f"| {label} | {seconds:.1f} | {tokens / seconds:,.0f} | {text_mb / seconds:.2f} | "
              f"{seconds / raw:.2f}x | {used:.1f} | {used / cpu[0]:.2f}x |")
    if args.megatron_lm:
        mlm = next(r[1] for r in rows if r[0].startswith("Megatron"))
        mlm_cpu = next(c for r, c in zip(rows, cpu) if r[0].startswith("Megatron"))
        for engine in ("tokenizers", "tiktoken"):
            mine = [(r[1], c) for r, c in zip(rows, cpu) if r[0].startswith(f"gptoss preprocess library, {engine} ")]
            print(f"\nours ({engine} engine, best row) vs Megatron-LM: {mlm / min(w for w, _ in mine):.2f}x faster "
                  f"(wall), {mlm_cpu / min(c for _, c in mine):.2f}x less CPU", end="")
        print(f"\nevery output of ours byte-identical to Megatron-LM's: {same}")
        if not same:
            sys.exit("FAILED: an output of ours differs from Megatron-LM's (the speed figures above compare "
                     "different work)")


if __name__ == "__main__":
    main()
