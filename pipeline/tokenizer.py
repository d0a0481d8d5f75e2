"""Tokenizer: ``dataset.parquet`` -> a SentencePiece model, reproducible to the byte.

SentencePiece's own sampling (``input_sentence_size``) and multi-threaded training give a
different model on each run, and it silently skips lines over ``max_sentence_length``
bytes. So this stage does the sampling itself (a seeded reservoir over the corpus lines),
splits long lines at whitespace instead of losing them, trains on one thread, and feeds the
sentences through an iterator with an in-memory model writer — so no temporary path ends
up inside the model's recorded trainer spec either. Two runs on the same dataset and
config give byte-identical ``tokenizer.model`` files.

Documents are encoded whole later (the shard stage), newlines included: ``"\\n"`` and
``"\\t"`` are user-defined pieces, whitespace is kept as is (identity normalisation, no
dummy prefix, whitespace-only pieces allowed), so decode(encode(doc)) == doc for indented,
multi-line text. ``add_dummy_prefix`` is off so that a line start looks the same in
training (one line per sentence) and in encoding (after a ``"\\n"`` piece).
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from keys.files import atomic_write, atomic_write_text
from pipeline.errors import ConfigError, DataError
from pipeline.ingest import iter_rows, open_parquet
from pipeline.result import ProgressFn, StageResult, no_progress

# The [tokenizer] table lives in a torch-free module, so a recipe loads without sentencepiece; its names stay importable from here.
from pipeline.settings.tokenizer import TokenizerConfig

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1
# Pieces every model has whatever the corpus: newline and tab survive encoding as themselves.
USER_SYMBOLS = ["\n", "\t"]
# Split before whitespace that follows a non-space: each piece is (leading spaces + word).
_WORD_BOUNDARY = re.compile(r"(?<=\S)(?=\s)")


def split_long_line(line: str, limit: int) -> list[str]:
    """``line`` cut into chunks of at most ``limit`` UTF-8 bytes, at whitespace where possible.

    A single word longer than ``limit`` (a hash, base64, a URL) is cut at a character boundary.
    Joining the chunks gives back ``line``.
    """
    if len(line.encode("utf-8")) <= limit:
        return [line]
    chunks: list[str] = []
    current, current_bytes = "", 0
    for piece in _WORD_BOUNDARY.split(line):
        size = len(piece.encode("utf-8"))
        if current_bytes + size <= limit:
            current, current_bytes = current + piece, current_bytes + size
            continue
        if current:
            chunks.append(current)
        if size <= limit:
            current, current_bytes = piece, size
            continue
        data = piece.encode("utf-8")
        while len(data) > limit:
            cut = limit
            while data[cut] & 0xC0 == 0x80:  # never cut inside a UTF-8 sequence
                cut -= 1
            chunks.append(data[:cut].decode("utf-8"))
            data = data[cut:]
        current, current_bytes = data.decode("utf-8"), len(data)
    if current:
        chunks.append(current)
    return chunks


def run_tokenizer(dataset_parquet: Path, out_dir: Path, cfg: TokenizerConfig, progress: ProgressFn = no_progress) -> StageResult:
    """Train ``out_dir/tokenizer.model`` (and a human-readable ``tokenizer.vocab``) on the dataset."""
    dataset_parquet, out_dir = Path(dataset_parquet), Path(out_dir)
    pf = open_parquet(dataset_parquet, ["text"], "point at the clean stage's dataset.parquet")
    counts = {"documents": 0, "lines_total": 0, "long_lines_split": 0, "sentences_total": 0}
    total_docs = pf.metadata.num_rows

    def sentences() -> Iterator[str]:
        for rows in iter_rows(pf, ["text"]):
            for text in rows["text"]:
                counts["documents"] += 1
                for line in (text or "").split("\n"):
                    if not line:
                        continue  # SentencePiece ignores empty lines anyway
                    counts["lines_total"] += 1
                    chunks = split_long_line(line, cfg.max_sentence_length)
                    counts["long_lines_split"] += int(len(chunks) > 1)
                    yield from chunks
            progress(counts["documents"], total_docs, {"phase": "reading"})

    with pf:
        sample = _reservoir(sentences(), cfg.sample_sentences, random.Random(cfg.seed), counts)
    if not sample:
        raise DataError(f"{dataset_parquet} holds no text to train a tokenizer on", "check the clean stage's output (clean.min_chars, the sources)")
    model = _train(sample, cfg, dataset_parquet)
    sp = spm.SentencePieceProcessor(model_proto=model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, vocab_path = out_dir / "tokenizer.model", out_dir / "tokenizer.vocab"
    # 0644: later stages, the service and the packaged model read them.
    atomic_write(model_path, model, mode=0o644)
    atomic_write_text(vocab_path, _vocab_text(sp), mode=0o644)
    progress(total_docs, total_docs, {"phase": "trained"})
    return StageResult(
        outputs={"tokenizer": model_path, "vocab": vocab_path},
        stats={
            "vocab_size": sp.get_piece_size(),
            "sample_sentences": len(sample),
            "long_lines_split": counts["long_lines_split"],
            "lines_total": counts["lines_total"],
            "sentences_total": counts["sentences_total"],
            "documents": counts["documents"],
        },
    )


def _reservoir(stream: Iterator[str], k: int, rng: random.Random, counts: dict[str, int]) -> list[str]:
    """Uniform sample of ``k`` items (algorithm R), returned in corpus order; deterministic for a seed."""
    picked: list[tuple[int, str]] = []
    for i, item in enumerate(stream):
        counts["sentences_total"] += 1
        if i < k:
            picked.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                picked[j] = (i, item)
    picked.sort()
    return [item for _, item in picked]


def _train(sample: list[str], cfg: TokenizerConfig, dataset: Path) -> bytes:
    # Only unigram draws random numbers inside SentencePiece; seeding it is harmless for BPE.
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            max_sentence_length=cfg.max_sentence_length,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=USER_SYMBOLS,
            # We sampled already; SentencePiece's own sampling is not reproducible.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            # Measured: two threads give a different model than one; one thread is reproducible.
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise _translate(exc, cfg, dataset, len(sample)) from None
    return model.getvalue()


def _translate(exc: RuntimeError, cfg: TokenizerConfig, dataset: Path, n: int) -> ConfigError | DataError:
    text = str(exc)
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", text):
        return ConfigError(
            f"{dataset}: the corpus is too small for tokenizer.vocab_size = {cfg.vocab_size}; {n} sampled lines yield at most {m.group(1)} pieces",
            f"lower tokenizer.vocab_size to {m.group(1)} or less, or add more text",
        )
    if m := re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", text):
        return ConfigError(
            f"tokenizer.vocab_size = {cfg.vocab_size} is smaller than the {m.group(1)} pieces this corpus needs "
            "(its characters, 256 byte pieces, special pieces)",
            f"raise tokenizer.vocab_size to more than {m.group(1)}, or lower tokenizer.character_coverage",
        )
    return DataError(f"SentencePiece could not train on {dataset}: {text}", "check the [tokenizer] settings of the recipe")


def _vocab_text(sp: spm.SentencePieceProcessor) -> str:
    # One "piece<TAB>score" line per id, like SentencePiece's own .vocab; newline and tab
    # pieces are written escaped so that the file stays one line per id.
    lines = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i).replace("\n", "\\n").replace("\t", "\\t")
        lines.append(f"{piece}\t{sp.get_score(i):g}\n")
    return "".join(lines)


def load_tokenizer(model_path: Path) -> spm.SentencePieceProcessor:
    """Load a tokenizer.model; DataError naming the file if it is missing or not a model."""
    model_path = Path(model_path)
    try:
        return spm.SentencePieceProcessor(model_proto=model_path.read_bytes())
    except OSError as exc:
        raise DataError(f"cannot read tokenizer {model_path}: {exc.strerror}", "point at the tokenizer stage's tokenizer.model") from None
    except RuntimeError as exc:
        raise DataError(f"{model_path} is not a SentencePiece model ({exc})", "re-run the tokenizer stage") from None
