"""The recipe's typed tables, one module per stage, importing neither torch nor sentencepiece nor pyarrow.

The service, the CLI and ``appliance.recipe`` read and check recipes through these; the stage
modules (``pipeline.model``, ``pipeline.ingest``, …) import them back, so
``from pipeline.model import ModelConfig`` keeps working. ``[train]`` and ``[distributed]``
live in ``pipeline.training.config``, which is torch-free too.
"""
