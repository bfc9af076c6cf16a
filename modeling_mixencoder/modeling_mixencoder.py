"""MixEncoder: candidates pre-computed into k context embeddings, the query encoded once, light cross-attention.

Wang et al.: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Sections 3.1-3.2.
The encoder is Hugging Face BERT, run on the query alone and on the candidate alone; at each interaction layer the
candidates' context embeddings ``E`` attend over [their own keys; the query's keys] (Eq. 1) and a candidate-aware
query state ``H`` is updated by a gate from the attention of the pooled candidate over the query (Eq. 2; the layers
are in :mod:`.interaction`). Scores from a candidate store and from ``[CLS] q [SEP] d [SEP]``
rows go through the same :meth:`MixEncoderForSequenceClassification.score_candidates`.

The interaction block is the authors' (output dense + LayerNorm + feed-forward for E and H; see
:mod:`.interaction`), or a lighter one. With ``dual_encoder_start`` (default) an untrained model equals the dual
encoder with the same weights (a budget of a few CPU hours cannot re-learn what the bi-encoder knows): ``H_0`` is the
mean-pooled query instead of zeros and each block's outputs are blended in by learned scalars that start at zero.
Table 3's ablations (``ablation="without_H"`` / ``"without_E"``) score without the candidate-aware query state H (the
query's own mean-pooled vector instead) or without the updated E (the stored ``E_0`` instead). Every departure from
the paper and its code is listed in docs/precompute.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import BCEWithLogitsLoss, MSELoss
from transformers import BertModel, BertPreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_mixencoder import MixEncoderConfig
from .interaction import INTERACTION_BLOCKS, AuthorsInteractionLayer, ZeroLinear

try:  # Hub folder: segments.py and hub_folder.py are flat siblings
    from .hub_folder import HubFolderMixin
    from .segments import SegmentLayout, build_segment_layout
except ImportError:  # installed package: the sparse cross-encoder's package owns both
    from modeling_sparse_ce.hub_folder import HubFolderMixin
    from modeling_sparse_ce.segments import SegmentLayout, build_segment_layout

AUTO_MAP = {
    "AutoConfig": "modeling_mixencoder.MixEncoderConfig",
    "AutoModelForSequenceClassification": "modeling_mixencoder.MixEncoderForSequenceClassification",
}
"""``auto_map`` of a Hub folder (config class named through this module, as for the sparse cross-encoder)."""


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled dot-product attention with a key mask: the C-strategy's context codes over a candidate's states.

    Args:
        query: ``[n, heads, lq, dim]``; key, value: ``[n, heads, lk, dim]``.
        key_mask: ``[n, lk]`` bool, True on keys that may be attended.
        scaling: Score scale.

    Returns:
        ``[n, heads, lq, dim]``.
    """
    return F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask[:, None, None, :], scale=scaling)


@dataclass
class QueryStates:
    """What the interaction layers need of encoded queries.

    Attributes:
        keys, values: One ``[queries, tokens, heads, dim]`` tensor per interaction layer (the layer's own key and
            value projections of the query's input states there).
        mask: ``[queries, tokens]`` bool, True on real tokens.
        pooled: ``[queries, hidden]`` mean of the final states: ``H_0`` and the dual encoder's query vector.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    pooled: torch.Tensor


class ContextCompressor(nn.Module):
    """Section 3.1: a candidate's encoder states into ``k`` context embeddings (S- or C-strategy)."""

    def __init__(self, config: MixEncoderConfig) -> None:
        super().__init__()
        self.strategy = config.context_strategy
        # S: input embeddings of k special tokens; C: k context codes (Humeau et al., poly-encoders)
        self.vectors = nn.Parameter(torch.zeros(config.num_context, config.hidden_size))
        self.scaling = config.hidden_size**-0.5

    def forward(self, bert: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [n, len] of "[CLS] d [SEP]" rows -> E: [n, k, hidden]
        mask = attention_mask.bool()
        n, k = input_ids.shape[0], self.vectors.shape[0]
        if self.strategy == "S":  # k special tokens take [CLS]'s place
            words = bert.embeddings.word_embeddings(input_ids[:, 1:])
            embeds = torch.cat([self.vectors[None].expand(n, -1, -1).to(words.dtype), words], 1)
            full_mask = torch.cat([mask.new_ones(n, k), mask[:, 1:]], 1)
            states = bert(inputs_embeds=embeds, attention_mask=full_mask.long(), token_type_ids=torch.zeros_like(full_mask, dtype=torch.long)).last_hidden_state
            return states[:, :k]
        states = bert(input_ids=input_ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        return self.pool(states, mask)

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """C-strategy: the k codes attend over a candidate's final states ``[n, len, hidden]`` -> ``[n, k, hidden]``."""
        codes = self.vectors[None, None].expand(states.shape[0], 1, -1, -1).to(states.dtype)  # [n, 1 head, k, hidden]
        return attend(codes, states[:, None], states[:, None], mask, self.scaling)[:, 0]


class MixEncoderPreTrainedModel(HubFolderMixin, BertPreTrainedModel):
    """Weight init and loading of BERT, plus a ``save_pretrained`` that writes a self-contained Hub folder."""

    config_class = MixEncoderConfig
    base_model_prefix = "bert"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ZeroLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, AuthorsInteractionLayer) and module.blend is not None:
            init.zeros_(module.blend)
        elif isinstance(module, ContextCompressor):
            init.normal_(module.vectors, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, CosineHead):
            init.constant_(module.scale, self.config.cosine_scale)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    hub_auto_map = AUTO_MAP

    def hub_code_files(self) -> list[Path]:
        return remote_code_files()


def remote_code_files() -> list[Path]:
    """The Python files a MixEncoder Hub folder needs: this package's modules, and the sparse package's segments and
    Hub-folder modules."""
    here = Path(__file__).resolve().parent
    files = [p for p in sorted(here.glob("*.py")) if p.name != "__init__.py"]
    shared = [Path(sys.modules[module].__file__).resolve()
              for module in (SegmentLayout.__module__, HubFolderMixin.__module__)]
    return files + [p for p in shared if p not in files]


class CosineHead(nn.Module):
    """Section 3.2: ``scale * cos(e, h) + bias``."""

    def __init__(self, config: MixEncoderConfig) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(config.cosine_scale)))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, candidate: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(candidate.dtype, torch.float32)  # at least float32 under bf16 autocast
        return (self.scale * torch.cosine_similarity(candidate.to(dtype), query.to(dtype), dim=-1) + self.bias)[:, None]


class ClassifierHead(nn.Module):
    """Section 3.2's alternative: a linear layer on ``[e; h]``."""

    def __init__(self, config: MixEncoderConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.linear = nn.Linear(2 * config.hidden_size, config.num_labels)

    def forward(self, candidate: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(torch.cat([candidate, query], -1)))


class MixEncoderForSequenceClassification(MixEncoderPreTrainedModel):
    """One logit per ``[CLS] q [SEP] d [SEP]`` row (what ``CrossEncoder`` feeds), or per stored candidate.

    Pair rows are split into the query (encoded once per distinct query of the batch) and the candidate (encoded
    alone, as a store would have it), so both routes compute the same numbers.
    """

    def __init__(self, config: MixEncoderConfig) -> None:
        super().__init__(config)
        config.validate_mixencoder()
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.context = ContextCompressor(config)
        block = INTERACTION_BLOCKS[config.interaction_block]
        self.interaction = nn.ModuleList(block(config) for _ in config.interaction_layer_indices())
        self.classifier = CosineHead(config) if config.score_head == "cosine" else ClassifierHead(config)
        self.post_init()

    def init_from_encoder(self) -> None:
        """Copy the encoder's weights into the new parts, as the paper does (call after loading BERT weights).

        Each interaction layer's candidate and compress projections start as its encoder layer's query/key/value
        projections (the authors' block also copies the layer's output dense, LayerNorms and feed-forward);
        S-strategy special tokens start at the [CLS] embedding (plus the init noise that tells them apart). The
        blends (authors' block) and output projections (light block) stay zero: with ``dual_encoder_start`` the
        model still scores as the dual encoder.
        """
        with torch.no_grad():
            for index, layer in zip(self.config.interaction_layer_indices(), self.interaction):
                layer.copy_from(self.bert.encoder.layer[index])
            if self.config.context_strategy == "S":
                cls_id = self.config.cls_token_id if getattr(self.config, "cls_token_id", None) is not None else 101
                self.context.vectors.add_(self.bert.embeddings.word_embeddings.weight[cls_id])

    # ---- the two offline/online halves -------------------------------------------------------------------------

    def encode_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids=None) -> QueryStates:
        """Encode ``[CLS] q [SEP]`` rows once: per interaction layer their keys and values, and their mean state.

        ``token_type_ids`` is accepted so that a tokenizer's output can be passed as is; a single text is type 0.
        """
        out = self.bert(
            input_ids=input_ids, attention_mask=attention_mask.long(), token_type_ids=torch.zeros_like(input_ids),
            output_hidden_states=True,
        )
        mask = attention_mask.bool()
        keys, values = [], []
        for index in self.config.interaction_layer_indices():
            attention = self.bert.encoder.layer[index].attention.self
            hidden = out.hidden_states[index]  # the input of layer ``index``
            keys.append(attention.key(hidden).unflatten(-1, (self.config.num_attention_heads, -1)))
            values.append(attention.value(hidden).unflatten(-1, (self.config.num_attention_heads, -1)))
        return QueryStates(keys, values, mask, masked_mean(out.last_hidden_state, mask))

    def encode_candidates(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        """Context embeddings ``E`` ``[n, k, hidden]`` of ``[CLS] d [SEP]`` rows: what a candidate store holds."""
        return self.context(self.bert, input_ids, attention_mask)

    def score_candidates(self, queries: QueryStates, context: torch.Tensor, row_to_query: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[n, num_labels]`` of candidates ``context`` ``[n, k, hidden]`` against ``queries``.

        Args:
            row_to_query: ``[n]`` index of each candidate's query in ``queries``; ``None``: one query for all.
        """
        n = context.shape[0]
        if row_to_query is None:  # one query for all: its keys and values stay [1, ...], shared, not copied
            if queries.mask.shape[0] != 1:
                raise ValueError(f"row_to_query: needed for {queries.mask.shape[0]} queries")
            pick = lambda x: x  # noqa: E731
        else:
            pick = lambda x: x[row_to_query]  # noqa: E731
        pooled = pick(queries.pooled).to(context.dtype).expand(n, -1)  # the query's own (dual-encoder) vector
        state = pooled if self.config.dual_encoder_start else torch.zeros_like(pooled)  # H_0
        first = context
        for layer, key, value in zip(self.interaction, queries.keys, queries.values):
            context, state = layer(context, state, pick(key).to(context.dtype), pick(value).to(context.dtype), pick(queries.mask))
        ablation = self.config.ablation
        candidate = (first if ablation == "without_E" else context).mean(1)
        return self.classifier(candidate, pooled if ablation == "without_H" else state)

    # ---- pair rows (CrossEncoder) -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        if input_ids is None:
            raise ValueError("input_ids: required ([CLS] query [SEP] candidate [SEP] rows)")
        layout = build_segment_layout(
            input_ids, attention_mask, token_type_ids, self.config.sep_token_id, True,
            pad_token_id=self.config.pad_token_id, cls_token_id=getattr(self.config, "cls_token_id", None),
        )
        query_ids, query_mask = split_queries(input_ids, layout, self.config)
        candidate_ids, candidate_mask = split_candidates(input_ids, layout, self.config)
        queries = self.encode_queries(query_ids, query_mask)
        logits = self.score_candidates(queries, self.encode_candidates(candidate_ids, candidate_mask), layout.row_to_query)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = MSELoss()(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits, labels.to(logits.dtype))
        output = SequenceClassifierOutput(loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens (sentence-transformers' mean pooling): ``[n, len, hidden]`` -> ``[n, hidden]``."""
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1)


def truncate_rows(ids: torch.Tensor, lengths: torch.Tensor, max_length: int, sep_id: int, pad_id: int):
    """Cut ``[CLS] ... [SEP]`` rows to ``max_length`` tokens keeping the final [SEP], as a tokenizer truncates."""
    cut = lengths > max_length
    lengths = lengths.clamp(max=max_length)
    ids = ids[:, : max(int(lengths.max()), 1)].clone()
    if bool(cut.any()):
        ids[cut, max_length - 1] = sep_id
    mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    return ids.masked_fill(~mask, pad_id), mask


def split_queries(input_ids: torch.Tensor, layout: SegmentLayout, config: MixEncoderConfig):
    """The distinct queries of pair rows as ``[CLS] q [SEP]`` rows: ids and mask ``[queries, len]``."""
    lengths = layout.query_lengths + 1  # [CLS] + query + [SEP]1
    return truncate_rows(input_ids[layout.query_rows], lengths, config.max_query_length, config.sep_token_id, config.pad_token_id)


def split_candidates(input_ids: torch.Tensor, layout: SegmentLayout, config: MixEncoderConfig):
    """Each pair row's candidate as a ``[CLS] d [SEP]`` row: ids and mask ``[rows, len]``."""
    start = 1 + layout.query_lengths[layout.row_to_query]  # first document token
    width = int(layout.doc_lengths.max())
    index = (start[:, None] + torch.arange(width, device=input_ids.device)[None]).clamp(max=input_ids.shape[1] - 1)
    docs = torch.gather(input_ids, 1, index)
    cls = input_ids[:, :1]  # every row starts with [CLS]
    return truncate_rows(torch.cat([cls, docs], 1), layout.doc_lengths + 1, config.max_candidate_length, config.sep_token_id, config.pad_token_id)
