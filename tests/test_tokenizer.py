"""Tokenizer: byte-identical reruns, long lines split not skipped, newlines and indentation survive."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from pipeline.config import from_mapping
from pipeline.errors import ConfigError, DataError
from pipeline.tokenizer import TokenizerConfig, load_tokenizer, run_tokenizer, split_long_line

SYLLABLES = "ka ri to mu ne sa lo pi de vu ha zo in en ar st qu".split()


def corpus(n_docs: int = 80, seed: int = 1) -> list[str]:
    """Multi-line documents of made-up words with indentation, tabs and numbers (~40 KB)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(3, 15)):
            indent = rng.choice(["", "", "    ", "        ", "\t"])
            tail = rng.choice(["", "", f" {rng.randint(0, 99999)}", ".", ":"])
            lines.append(indent + " ".join(rng.choice(words) for _ in range(rng.randint(2, 14))) + tail)
        docs.append("\n".join(lines))
    return docs


def write_dataset(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": list(range(len(texts))), "text": texts}), path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tok") / "dataset.parquet", corpus())


SMALL = TokenizerConfig(vocab_size=500)


def test_two_runs_give_byte_identical_models(dataset: Path, tmp_path: Path) -> None:
    a = run_tokenizer(dataset, tmp_path / "a", SMALL)
    b = run_tokenizer(dataset, tmp_path / "b", SMALL)
    assert a.outputs["tokenizer"].read_bytes() == b.outputs["tokenizer"].read_bytes()
    assert a.outputs["vocab"].read_bytes() == b.outputs["vocab"].read_bytes()
    assert a.outputs == {"tokenizer": tmp_path / "a" / "tokenizer.model", "vocab": tmp_path / "a" / "tokenizer.vocab"}
    assert a.stats["vocab_size"] == 500 and a.stats["long_lines_split"] == 0
    assert a.stats["lines_total"] == a.stats["sample_sentences"] == sum(len(d.split("\n")) for d in corpus())
    assert len(a.outputs["vocab"].read_text(encoding="utf-8").splitlines()) == 500
    # The temporary directory must not leak into the model (it would break reproducibility).
    assert str(tmp_path).encode() not in a.outputs["tokenizer"].read_bytes()


def test_sampling_is_seeded(dataset: Path, tmp_path: Path) -> None:
    cfg = TokenizerConfig(vocab_size=400, sample_sentences=300, seed=7)
    a = run_tokenizer(dataset, tmp_path / "a", cfg)
    b = run_tokenizer(dataset, tmp_path / "b", cfg)
    c = run_tokenizer(dataset, tmp_path / "c", TokenizerConfig(vocab_size=400, sample_sentences=300, seed=8))
    assert a.stats["sample_sentences"] == 300 and a.stats["lines_total"] > 300
    assert a.outputs["tokenizer"].read_bytes() == b.outputs["tokenizer"].read_bytes()
    assert a.outputs["tokenizer"].read_bytes() != c.outputs["tokenizer"].read_bytes()


def test_special_ids_and_multiline_round_trip(dataset: Path, tmp_path: Path) -> None:
    run_tokenizer(dataset, tmp_path, SMALL)
    sp = load_tokenizer(tmp_path / "tokenizer.model")
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    doc = "def karito(x):\n    if x:\n\t\treturn  12345\n\n\n  mune sa  \n    café 中文 🎉 ~`\n"
    ids = sp.encode(doc)
    assert sp.decode(ids) == doc
    assert ids.count(sp.piece_to_id("\n")) == doc.count("\n")
    assert sp.unk_id() not in ids  # byte fallback: nothing becomes <unk>
    for text in corpus(5, seed=99):
        assert sp.decode(sp.encode(text)) == text


def test_long_lines_are_split_not_skipped(tmp_path: Path) -> None:
    long_line = " ".join(f"zulumoxi{i % 10}" for i in range(400))  # ~4 KB, one line
    texts = corpus(20) + [long_line]
    data = write_dataset(tmp_path / "d.parquet", texts)
    result = run_tokenizer(data, tmp_path / "out", TokenizerConfig(vocab_size=400, max_sentence_length=1000))
    assert result.stats["long_lines_split"] == 1
    chunks = split_long_line(long_line, 1000)
    assert len(chunks) == 4  # 3,999 bytes
    assert result.stats["sentences_total"] == result.stats["lines_total"] + len(chunks) - 1
    # The word only exists inside the long line: SentencePiece learned it, so the line was used.
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert any("zulu" in sp.id_to_piece(i) or "moxi" in sp.id_to_piece(i) for i in range(sp.get_piece_size()))


@pytest.mark.parametrize(
    "line",
    ["a b c d e f g h", "word " * 100, "x" * 250, "é" * 99 + " short " + "中" * 70, "   indented  " + "ab " * 60, "🎉" * 40],
)
def test_split_long_line(line: str) -> None:
    chunks = split_long_line(line, 32)
    assert "".join(chunks) == line
    assert all(0 < len(c.encode("utf-8")) <= 32 for c in chunks)
    if len(line.encode("utf-8")) <= 32:
        assert chunks == [line]


def test_split_prefers_whitespace() -> None:
    assert split_long_line("alpha beta gamma delta", 12) == ["alpha beta", " gamma delta"]


def test_corpus_too_small_names_the_key(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        run_tokenizer(dataset, tmp_path / "out", TokenizerConfig(vocab_size=20000))
    assert "tokenizer.vocab_size" in info.value.message and "lower tokenizer.vocab_size" in info.value.hint
    # Above the fixed minimum (5 special + 256 byte pieces + 1) but below what this corpus's
    # characters need: only the corpus can say so.
    with pytest.raises(ConfigError) as info:
        run_tokenizer(dataset, tmp_path / "out", TokenizerConfig(vocab_size=270))
    assert "raise tokenizer.vocab_size" in info.value.hint
    # Below the fixed minimum: refused when the recipe is read, before any stage.
    with pytest.raises(ValueError, match="below the 262 pieces"):
        TokenizerConfig(vocab_size=100)
    assert not (tmp_path / "out").exists()


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing.parquet"):
        run_tokenizer(tmp_path / "nothing.parquet", tmp_path / "out", SMALL)
    empty = write_dataset(tmp_path / "empty.parquet", ["", "\n\n"])
    with pytest.raises(DataError, match="empty.parquet"):
        run_tokenizer(empty, tmp_path / "out", SMALL)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model"):
        load_tokenizer(tmp_path / "junk.model")


def test_config_validation() -> None:
    cfg = from_mapping(TokenizerConfig, {"vocab_size": 8000, "model_type": "unigram"}, source="recipe.toml", prefix="tokenizer")
    assert cfg.vocab_size == 8000
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab"):
        from_mapping(TokenizerConfig, {"vocab": 8000}, source="recipe.toml", prefix="tokenizer")
    with pytest.raises(ConfigError, match="character_coverage"):
        from_mapping(TokenizerConfig, {"character_coverage": 1.5}, source="recipe.toml", prefix="tokenizer")
