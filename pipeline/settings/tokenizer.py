"""The ``[tokenizer]`` recipe table: the SentencePiece model to train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import check

# Pieces every tokenizer of ours holds whatever the corpus: <unk>, <s>, </s>, "\n" and "\t"
# (pipeline.tokenizer), plus 256 byte pieces with byte_fallback, plus at least one character.
SPECIAL_PIECES = 5
BYTE_PIECES = 256


def min_vocab_size(byte_fallback: bool) -> int:
    """The smallest vocab_size SentencePiece accepts before it has seen the corpus's characters."""
    return SPECIAL_PIECES + (BYTE_PIECES if byte_fallback else 0) + 1


@dataclass(kw_only=True)
class TokenizerConfig:
    # Small private corpora and small models: 4k pieces keeps the embedding table a modest
    # share of the parameters and is learnable from a few MB of text.
    vocab_size: int = 4000
    # BPE: byte-identical reruns measured; unigram is offered for users who prefer it.
    model_type: Literal["bpe", "unigram"] = "bpe"
    # Seeds our own line sampling (and SentencePiece's generator, used by unigram).
    seed: int = 0
    # ~1M lines (~100 MB) trains in well under a minute on one core and is plenty for 4k–32k pieces.
    sample_sentences: int = 1_000_000
    # SentencePiece's recommendation for mixed-script text; rarer characters use byte pieces.
    character_coverage: float = 0.9995
    # Unknown characters become UTF-8 byte pieces instead of <unk>: no text is ever lost.
    byte_fallback: bool = True
    # SentencePiece's own default (bytes); longer lines are split at whitespace to fit.
    max_sentence_length: int = 4192

    def __post_init__(self) -> None:
        least = min_vocab_size(self.byte_fallback)
        check(
            self.vocab_size >= least,
            f"vocab_size is {self.vocab_size}, below the {least} pieces every tokenizer here needs "
            f"({SPECIAL_PIECES} special pieces{f', {BYTE_PIECES} byte pieces' if self.byte_fallback else ''}, and the corpus's characters)",
            fix="use a few thousand, e.g. the default tokenizer.vocab_size = 4000",
        )
        check(self.sample_sentences > 0, "sample_sentences must be > 0")
        check(0.0 < self.character_coverage <= 1.0, "character_coverage must be in (0, 1]")
        check(self.max_sentence_length >= 16, "max_sentence_length must be >= 16 bytes")
