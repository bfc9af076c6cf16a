"""Configuration of the MixEncoder: candidates pre-computed into k context embeddings, light cross-attention.

Wang, Yang, Qi, Liu, Xu, Gao: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling"
(MixEncoder), Section 3. A BERT configuration plus the number ``k`` of context embeddings per candidate, how they are
made (S- or C-strategy, Section 3.1), the interaction layers (Eqs. 1-2) and the score head (Section 3.2).
"""

from __future__ import annotations

from transformers import BertConfig

SCORE_ACTIVATION = "torch.nn.modules.linear.Identity"
"""sentence-transformers' default activation for this ranker's logit (``config.sentence_transformers``): the identity,
as ``configuration_sparse_ce.SCORE_ACTIVATION`` (restated: a MixEncoder Hub folder carries no sparse-ce config)."""

CONTEXT_STRATEGIES = ("S", "C")
"""S: k special tokens prepended to the candidate, their outputs kept; C: k learned codes attending over its outputs."""

INTERACTION_BLOCKS = ("authors", "light")
"""authors: output dense + LayerNorm + feed-forward of the copied layer for E and H (the authors' code); light: residual
updates through zero-initialised output projections only (see modeling_mixencoder/interaction.py)."""

ABLATIONS = (None, "without_H", "without_E")
"""Table 3: score with H replaced by the query's own mean-pooled vector, or with the updated E replaced by E_0."""

SCORE_HEADS = ("cosine", "classifier")
"""cosine: ``scale * cos(mean(E), H) + bias`` (Section 3.2); classifier: a linear layer on ``[e; h]``."""


class MixEncoderConfig(BertConfig):
    """BERT plus the MixEncoder fields.

    Args:
        num_context: ``k``, context embeddings per candidate (k << candidate length).
        context_strategy: ``"S"`` or ``"C"`` (see :data:`CONTEXT_STRATEGIES`). C starts as the dual encoder with the
            same weights: near-uniform codes average the candidate's token states as mean pooling does.
        interaction_layers: 0-based encoder layers at which the candidates' context embeddings attend over the
            query; ``None``: the last layer. Negative indices count from the end.
        score_head: ``"cosine"`` or ``"classifier"`` (see :data:`SCORE_HEADS`).
        interaction_block: ``"authors"`` (default) or ``"light"`` (see :data:`INTERACTION_BLOCKS`).
        dual_encoder_start: An untrained model scores as the dual encoder with the same weights: ``H_0`` is the
            mean-pooled query (the paper: zeros) and the authors' block's outputs are blended in by learned scalars
            that start at zero. ``False``: the authors' block exactly (the light block needs ``True``).
        ablation: ``None``, ``"without_H"`` or ``"without_E"`` (Table 3, see :data:`ABLATIONS`).
        cosine_scale: Initial scale of the cosine head.
        max_query_length: Query tokens kept, [CLS] and [SEP] included (default 64).
        max_candidate_length: Candidate tokens kept, [CLS] and [SEP] included (default 256; the store truncates
            alike, so on-the-fly and stored scores agree).
    """

    model_type = "sparse_ce_mixencoder"

    def __init__(
        self,
        num_context: int = 1,
        context_strategy: str = "C",
        interaction_layers: list[int] | None = None,
        score_head: str = "cosine",
        cosine_scale: float = 20.0,
        max_query_length: int | None = None,
        max_candidate_length: int | None = None,
        interaction_block: str = "authors",
        dual_encoder_start: bool = True,
        ablation: str | None = None,
        **kwargs,
    ) -> None:
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = 1  # a ranker: one logit per (query, candidate)
        super().__init__(**kwargs)
        self.num_context = num_context
        self.context_strategy = context_strategy
        self.interaction_layers = list(interaction_layers) if interaction_layers is not None else None
        self.score_head = score_head
        self.cosine_scale = cosine_scale
        self.interaction_block = interaction_block
        self.dual_encoder_start = dual_encoder_start
        self.ablation = ablation
        # defaults 64 and 256 tokens, within the position table (S-strategy context tokens take [CLS]'s place and more)
        room = self.max_position_embeddings - (num_context - 1 if context_strategy == "S" else 0)
        self.max_query_length = max_query_length if max_query_length is not None else min(64, self.max_position_embeddings)
        self.max_candidate_length = max_candidate_length if max_candidate_length is not None else min(256, room)
        settings = getattr(self, "sentence_transformers", None)
        if not isinstance(settings, dict) or "activation_fn" not in settings:
            self.sentence_transformers = {**(settings if isinstance(settings, dict) else {}),
                                          "activation_fn": SCORE_ACTIVATION}
        self.validate_mixencoder()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config without ``interaction_block`` predates the authors' block: its weights are the light block's."""
        if "num_context" in config_dict and "interaction_block" not in config_dict:
            config_dict = {**config_dict, "interaction_block": "light"}
        return super().from_dict(config_dict, **kwargs)

    def validate_mixencoder(self) -> None:
        """Raise a ValueError naming the first field that is out of range."""
        if not isinstance(self.num_context, int) or self.num_context < 1:
            raise ValueError(f"num_context: expected an int >= 1, got {self.num_context!r}")
        if self.context_strategy not in CONTEXT_STRATEGIES:
            raise ValueError(f"context_strategy: expected one of {CONTEXT_STRATEGIES}, got {self.context_strategy!r}")
        if self.score_head not in SCORE_HEADS:
            raise ValueError(f"score_head: expected one of {SCORE_HEADS}, got {self.score_head!r}")
        if self.interaction_block not in INTERACTION_BLOCKS:
            raise ValueError(f"interaction_block: expected one of {INTERACTION_BLOCKS}, got {self.interaction_block!r}")
        if not isinstance(self.dual_encoder_start, bool):
            raise ValueError(f"dual_encoder_start: expected a bool, got {self.dual_encoder_start!r}")
        if self.interaction_block == "light" and not self.dual_encoder_start:
            raise ValueError("dual_encoder_start: the light block starts from the dual encoder by construction "
                             "(zero-initialised output projections, H_0 the mean-pooled query); it cannot be False")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation: expected one of {ABLATIONS}, got {self.ablation!r}")
        for name in ("max_query_length", "max_candidate_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 3:
                raise ValueError(f"{name}: expected an int >= 3 ([CLS], one token, [SEP]), got {value!r}")
        if self.context_strategy == "S" and self.max_candidate_length - 1 + self.num_context > self.max_position_embeddings:
            raise ValueError(
                f"max_candidate_length: {self.max_candidate_length} tokens plus {self.num_context} context tokens exceed "
                f"max_position_embeddings {self.max_position_embeddings}"
            )
        self.interaction_layer_indices()

    def interaction_layer_indices(self) -> list[int]:
        """The interaction layers as sorted 0-based indices (default: the last layer)."""
        layers = self.interaction_layers if self.interaction_layers is not None else [-1]
        n = self.num_hidden_layers
        if not layers or any(not isinstance(i, int) or not -n <= i < n for i in layers):
            raise ValueError(f"interaction_layers: expected non-empty layer indices in [-{n}, {n}), got {layers!r}")
        resolved = sorted({i % n for i in layers})
        if len(resolved) != len(layers):
            raise ValueError(f"interaction_layers: {layers!r} names a layer twice")
        return resolved
