"""``sparse-ce convert``: BERT checkpoints to sparse cross-encoder Hub folders (:mod:`.command`), position-table
extension (:mod:`.positions`) and the model card template."""

from .command import build_config, convert, parse_window, render_model_card

__all__ = ["build_config", "convert", "parse_window", "render_model_card"]
