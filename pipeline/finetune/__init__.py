"""Fine-tuning a local base model: example files, rendering, packing, and (elsewhere) the job."""
