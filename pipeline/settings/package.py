"""The ``[package]`` recipe table: the model card's name, licence and description, and the weights' dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import check


@dataclass(kw_only=True, slots=True)
class PackageConfig:
    # The name in the model card's title; the directory itself is always model/.
    model_name: str = "appliance-llama"
    # "other" is the model-hub tag for a licence that is not a standard one (an organisation's own
    # terms). Free text is allowed: the card then says "other" in its metadata and quotes the text.
    license: str = "other"
    # Free text for the model card: what the model is for, what it was trained on.
    description: str = ""
    # float32 is exactly what was trained; bfloat16 halves the size for GPU inference.
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        check(bool(self.model_name.strip()) and "\n" not in self.model_name, "model_name must be a non-empty single line")
        check(bool(self.license.strip()) and "\n" not in self.license, "license must be a non-empty single line")
