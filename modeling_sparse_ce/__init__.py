"""Sparse cross-encoder models (Schlatt et al., ECIR 2024). Import-only: no side effects."""

from configuration_sparse_ce import PRESETS, SparseCrossEncoderConfig

from .modeling_sparse_ce import (
    SparseCrossEncoderForSequenceClassification,
    SparseCrossEncoderModel,
    SparseCrossEncoderPreTrainedModel,
)
from .pattern import AttentionPattern
from .segments import Segment, SegmentationError, SegmentLayout, build_segment_layout

__all__ = [
    "PRESETS",
    "AttentionPattern",
    "Segment",
    "SegmentLayout",
    "SegmentationError",
    "SparseCrossEncoderConfig",
    "SparseCrossEncoderForSequenceClassification",
    "SparseCrossEncoderModel",
    "SparseCrossEncoderPreTrainedModel",
    "build_segment_layout",
]
