"""Inference-time decoding methods."""

from sppo_lightning.decoding.linear_alignment import (
    LinearAlignmentSettings,
    linear_alignment_generate,
    linear_alignment_step,
    nucleus_mask,
)

__all__ = ["LinearAlignmentSettings", "linear_alignment_generate", "linear_alignment_step", "nucleus_mask"]
