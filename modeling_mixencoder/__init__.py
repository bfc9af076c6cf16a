"""MixEncoder models ("Once is Enough", Wang et al.). Import-only: no side effects."""

from .configuration_mixencoder import CONTEXT_STRATEGIES, MixEncoderConfig
from .modeling_mixencoder import MixEncoderForSequenceClassification, QueryStates, attend

__all__ = ["CONTEXT_STRATEGIES", "MixEncoderConfig", "MixEncoderForSequenceClassification", "QueryStates", "attend"]
