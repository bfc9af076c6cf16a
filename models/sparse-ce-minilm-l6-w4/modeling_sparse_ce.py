"""Sparse cross-encoder: BERT with the asymmetric, windowed attention pattern.

Schlatt, Fröbe, Hagen: "Investigating the Effects of Sparse Attention on Cross-Encoders", ECIR 2024.
Parameter names equal Hugging Face BERT's, so any ``BertForSequenceClassification`` cross-encoder loads unchanged.
The encoder runs on packed tokens (``cls | query | doc``, see :mod:`.segments`): no padding waste, and a query shared by
several rows is computed once when it attends only to itself.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPooler,
    BertPreTrainedModel,
    BertSelfOutput,
)
from transformers.utils import logging

try:  # Hub folder: the config module is a flat sibling
    from .configuration_sparse_ce import SparseCrossEncoderConfig
except ImportError:  # installed package: one top-level module, one class
    from configuration_sparse_ce import SparseCrossEncoderConfig

from .attention import ATTENTION_FUNCTIONS, resolve_backend
from .attention_flex import flex_available
from .attention_kernel import find_kernel
from .hub_folder import HubFolderMixin
from .pattern import AttentionPattern
from .segments import SegmentLayout, build_segment_layout, token_types

logger = logging.get_logger(__name__)

AUTO_MAP = {
    # the config class as this module imports it: transformers 5 loads remote code from a local folder into one module
    # folder per auto_map file (named by a hash of the file and its relative imports), so a "configuration_sparse_ce"
    # entry would give AutoConfig a second class and ``isinstance(model.config, model.config_class)`` would fail
    "AutoConfig": "modeling_sparse_ce.SparseCrossEncoderConfig",
    "AutoModel": "modeling_sparse_ce.SparseCrossEncoderModel",
    "AutoModelForSequenceClassification": "modeling_sparse_ce.SparseCrossEncoderForSequenceClassification",
}
"""``auto_map`` of a Hub folder: all code files lie flat beside ``config.json``, so saving again keeps the layout."""


class SparseSelfAttention(nn.Module):
    """Query/key/value projections (BERT names) and a call into the attention dispatch table."""

    def __init__(self, config: SparseCrossEncoderConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size: {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout_prob = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden: torch.Tensor, layout: SegmentLayout, pattern: AttentionPattern, attend, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # hidden: [tokens, hidden]; q/k/v: [tokens, heads, dim]; attend: a function of the dispatch table
        q, k, v = (proj(hidden).unflatten(-1, (self.num_heads, self.head_dim)) for proj in (self.query, self.key, self.value))
        out, weights = attend(
            q, k, v, layout, pattern,
            scaling=self.scaling,
            dropout=self.dropout_prob if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return out.flatten(-2), weights


class SparseAttention(nn.Module):
    def __init__(self, config: SparseCrossEncoderConfig) -> None:
        super().__init__()
        self.self = SparseSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden, layout, pattern, backend, output_attentions):
        out, weights = self.self(hidden, layout, pattern, backend, output_attentions)
        return self.output(out, hidden), weights


class SparseLayer(GradientCheckpointingLayer):
    """A BERT layer whose attention follows the sparse pattern; feed-forward on packed tokens."""

    def __init__(self, config: SparseCrossEncoderConfig) -> None:
        super().__init__()
        self.attention = SparseAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden, layout, pattern, backend, output_attentions):
        attended, weights = self.attention(hidden, layout, pattern, backend, output_attentions)
        return self.output(self.intermediate(attended), attended), weights


class SparseEncoder(nn.Module):
    def __init__(self, config: SparseCrossEncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(SparseLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden, layout, patterns, backends, output_attentions, output_hidden_states):
        all_hidden, all_weights = [hidden] if output_hidden_states else None, [] if output_attentions else None
        for layer, pattern, backend in zip(self.layer, patterns, backends):
            hidden, weights = layer(hidden, layout, pattern, backend, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden)
            if output_attentions:
                all_weights.append(weights)
        return hidden, all_hidden, all_weights


class SparseCrossEncoderPreTrainedModel(HubFolderMixin, BertPreTrainedModel):
    """Weight init and loading of BERT, plus a ``save_pretrained`` that writes a self-contained Hub folder."""

    config_class = SparseCrossEncoderConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_record_outputs = {}

    hub_auto_map = AUTO_MAP

    def hub_code_files(self) -> list[Path]:
        return remote_code_files()


def remote_code_files() -> list[Path]:
    """The Python files a Hub folder needs: this package's modules and the config module."""
    here = Path(__file__).resolve().parent
    files = [p for p in sorted(here.glob("*.py")) if p.name != "__init__.py"]
    config_file = Path(sys.modules[SparseCrossEncoderConfig.__module__].__file__).resolve()
    if config_file not in files:
        files.append(config_file)
    return files


class SparseCrossEncoderModel(SparseCrossEncoderPreTrainedModel):
    """The sparse encoder: embeddings, sparse layers and BERT's pooler.

    Its ``forward`` takes what ``BertModel`` takes (``input_ids`` of right-padded ``[CLS] q [SEP] d [SEP]`` rows) and
    returns ``last_hidden_state [batch, seq, hidden]`` (zeros on padding) and ``pooler_output``.
    """

    base_model_prefix = "bert"

    def __init__(self, config: SparseCrossEncoderConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        config.validate_pattern()
        self.embeddings = BertEmbeddings(config)
        self.encoder = SparseEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def layer_patterns(self) -> list[AttentionPattern]:
        """The attention pattern of each layer: the config's ``attention_pattern``, or its six flags in every layer."""
        return AttentionPattern.for_layers(self.config)

    def attention_functions(self, name: str, patterns: list[AttentionPattern], output_attentions: bool) -> list:
        """The attention function of each layer for backend ``name``; loads the kernel when it may be used."""
        dropout = self.training and self.config.attention_probs_dropout_prob > 0  # neither the kernel nor flex has it
        flex_ready = flex_available()
        wants_kernel = name == "kernel" or (
            name == "auto"
            and not output_attentions
            and not dropout
            and not (self.device.type == "cuda" and flex_ready)  # auto runs flex there
            and any(p.in_flag_family and not p.is_full for p in patterns)
        )
        kernel = find_kernel(self.config, self.device) if wants_kernel else None
        if name == "kernel" and kernel is None:
            raise RuntimeError(
                f"attention_backend='kernel': no kernel for {self.device} (see the log for the sources tried); "
                "use 'auto' to fall back to the windowed backend"
            )
        names = [
            resolve_backend(name, p, output_attentions, kernel is not None, self.device.type, layer=i,
                            flex_ready=flex_ready, dropout=dropout)
            for i, p in enumerate(patterns)
        ]
        outside = [i for i, (p, n) in enumerate(zip(patterns, names)) if not p.in_flag_family and n == "dense"]
        if name == "auto" and outside and not output_attentions:
            logger.warning_once(
                f"attention_pattern: layers {outside} are outside the six-flag family; 'auto' runs them with the "
                "dense backend (quadratic in length)"
            )
        if name == "auto" and dropout and flex_ready and self.device.type == "cuda":
            logger.warning_once(
                f"attention_probs_dropout_prob={self.config.attention_probs_dropout_prob}: FlexAttention has no "
                "attention dropout, so 'auto' trains with the windowed/dense backends; set it to 0 to train through flex"
            )
        _log_backends(name, self.device.type, tuple(names))
        return [functools.partial(ATTENTION_FUNCTIONS[n], kernel=kernel) if n == "kernel" else ATTENTION_FUNCTIONS[n] for n in names]

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_backend: str | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, SegmentLayout, list | None, list | None]:
        """Run the encoder on packed tokens; returns packed hidden states ``[tokens, hidden]`` and the layout."""
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        patterns = self.layer_patterns()
        share = self.config.share_query and all(p.query_is_independent for p in patterns)
        layout = build_segment_layout(
            input_ids, attention_mask, token_type_ids, self.config.sep_token_id, share,
            pad_token_id=self.config.pad_token_id, cls_token_id=getattr(self.config, "cls_token_id", None),
        )
        for name, lengths in (("query", layout.query_lengths), ("document", layout.doc_lengths)):
            if bool((lengths == 1).any()):  # the segment holds only its [SEP]
                logger.warning_once(f"some rows have an empty {name} ([SEP] only); they are scored as they are")
        backends = self.attention_functions(attention_backend or self.config.attention_backend, patterns, output_attentions)
        flat_ids = input_ids.flatten()[layout.positions]
        seq = layout.seq_len
        segment = layout.segment_ids.flatten()[layout.positions]
        hidden = self.embeddings(
            input_ids=flat_ids[None],
            token_type_ids=token_types(segment)[None],
            position_ids=(layout.positions % seq)[None],
        )[0]
        hidden, all_hidden, all_weights = self.encoder(hidden, layout, patterns, backends, output_attentions, output_hidden_states)
        return hidden, layout, all_hidden, all_weights

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_backend: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        _only_positions(position_ids, inputs_embeds)
        hidden, layout, all_hidden, all_weights = self.encode(
            input_ids, attention_mask, token_type_ids, attention_backend, bool(output_attentions), bool(output_hidden_states)
        )
        last = layout.unpack(hidden)
        pooled = self.pooler(last) if self.pooler is not None else None
        hidden_states = tuple(layout.unpack(h) for h in all_hidden) if all_hidden is not None else None
        output = BaseModelOutputWithPooling(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=tuple(all_weights) if all_weights is not None else None,
        )
        return output if return_dict is not False else output.to_tuple()

    def _check_inputs(self, input_ids, attention_mask, token_type_ids) -> None:
        if input_ids is None:
            raise ValueError("input_ids: required (inputs_embeds is not supported by the sparse cross-encoder)")
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is None:
                continue
            if tensor.dtype.is_floating_point and name != "attention_mask":
                raise TypeError(f"{name}: expected an integer tensor, got {tensor.dtype}")
            if tensor.device != self.device:
                raise ValueError(f"{name}: on {tensor.device} but the model is on {self.device}; move inputs to the model")
        if input_ids.dim() == 2 and input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids: sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; truncate the document or score it by MaxP windows"
            )


@functools.lru_cache(maxsize=None)
def _log_backends(requested: str, device: str, names: tuple[str, ...]) -> None:
    """One log line per distinct choice: which backend runs each layer."""
    runs = ", ".join(sorted(set(names))) if len(set(names)) > 1 else names[0]
    logger.info(f"sparse-ce: attention_backend={requested!r} on {device} runs {runs} ({len(names)} layers)")


def _only_positions(position_ids, inputs_embeds) -> None:
    if inputs_embeds is not None:
        raise ValueError("inputs_embeds: not supported; pass input_ids")
    if position_ids is not None:
        raise ValueError("position_ids: not supported; positions follow the [CLS] q [SEP] d [SEP] layout")


class CosineScore(nn.Module):
    """The ``cosine`` score heads: ``scale * cos(mean query state, mean document state or [CLS] state) + bias``."""

    def __init__(self, config: SparseCrossEncoderConfig) -> None:
        super().__init__()
        self.against_cls = config.score_head == "cls-cosine"
        self.initial_scale = float(config.cosine_scale)
        self.scale = nn.Parameter(torch.full((1,), self.initial_scale))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        # hidden: [tokens, hidden] packed -> logits [batch, 1]
        query, doc = layout.segment_means(hidden)
        if self.against_cls:
            doc = hidden[: layout.batch_size]  # packed order starts with each row's [CLS]
        return (self.scale * torch.cosine_similarity(query.float(), doc.float(), dim=-1) + self.bias)[:, None]


class SparseCrossEncoderForSequenceClassification(SparseCrossEncoderPreTrainedModel):
    """The cross-encoder: one logit per row from the sparse encoder's final states.

    ``score_head="cls"``: [CLS] -> BERT pooler -> dropout -> linear, as ``BertForSequenceClassification``;
    ``score_head="cosine"`` or ``"cls-cosine"``: :class:`CosineScore` (no pooler).
    """

    def __init__(self, config: SparseCrossEncoderConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        cosine = config.score_head != "cls"
        self.bert = SparseCrossEncoderModel(config, add_pooling_layer=not cosine)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = CosineScore(config) if cosine else nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, CosineScore):  # transformers' init functions skip loaded parameters
            init.constant_(module.scale, module.initial_scale)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def score(self, hidden: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        """Logits ``[batch, num_labels]`` from packed final states ``[tokens, hidden]``."""
        if isinstance(self.classifier, CosineScore):
            return self.classifier(hidden, layout)
        cls = hidden[: layout.batch_size]  # packed order starts with each row's [CLS]
        pooled = self.bert.pooler(cls[:, None]) if self.bert.pooler is not None else cls
        return self.classifier(self.dropout(pooled))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_backend: str | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        _only_positions(position_ids, inputs_embeds)
        hidden, layout, all_hidden, all_weights = self.bert.encode(
            input_ids, attention_mask, token_type_ids, attention_backend, bool(output_attentions), bool(output_hidden_states)
        )
        logits = self.score(hidden, layout)
        output = SequenceClassifierOutput(
            loss=self._loss(logits, labels) if labels is not None else None,
            logits=logits,
            hidden_states=tuple(layout.unpack(h) for h in all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_weights) if all_weights is not None else None,
        )
        return output if return_dict is not False else output.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BERT's loss choice: regression for one label, else single- or multi-label classification."""
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return MSELoss()(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype)) if self.num_labels == 1 else MSELoss()(logits, labels)
        if problem == "single_label_classification":
            return CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
        return BCEWithLogitsLoss()(logits, labels)
