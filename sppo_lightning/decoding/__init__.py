"""Inference-time decoding methods."""

from sppo_lightning.decoding.linear_alignment import (
    LinearAlignmentSettings,
    linear_alignment_generate,
    linear_alignment_step,
    nucleus_mask,
)

from sppo_lightning.decoding.generator import LinearAlignmentGenerator  # noqa: E402

__all__ = ["LinearAlignmentGenerator", "LinearAlignmentSettings", "linear_alignment_generate", "linear_alignment_step", "nucleus_mask"]
