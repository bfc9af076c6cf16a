"""The MixEncoder's interaction layers: Eq. 1 (context embeddings E attend over [E; query]) and Eq. 2 (gated H).

Wang et al.: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Section 3.1.1. Two
blocks, chosen by ``config.interaction_block``:

- ``"authors"`` (default), as the authors' released code has it (ysngki/MixEncoder: ``MyBertSelfAttention``,
  ``DecoderLayerChunk``, ``MyLSTMBlock``): both streams leave the attention through a copy of the encoder layer's
  output dense + LayerNorm and feed-forward block (one copy per interaction layer, shared by E and H);
  ``E_j = FFN(LN(W_O Attn(Q', [K'; K], [V'; V]) + E_{j-1}))``, ``h = W_O Attn(Q*, K, V)``,
  ``g = sigmoid(W_g [mean(E_{j-1}); h; H_{j-1}])``, ``H_j = FFN(LN(g * h + (1 - g) * H_{j-1}))``, with
  ``FFN(x) = LN(W_2 act(W_1 x) + x)``.
- ``"light"``: ``E_j = E_{j-1} + W'_O Attn(...)`` and ``H_j = H_{j-1} + g * W*_O Attn(...)`` with zero-initialised
  output projections and no LayerNorm or feed-forward stage (~9 d^2 multiply-adds per candidate and layer for k=1
  against the authors' ~25 d^2).

With ``config.dual_encoder_start`` the authors' block's outputs are blended into its inputs by two learned scalars
that start at zero (``E_j = E_{j-1} + a_E (block_E - E_{j-1})``, likewise H), so an untrained model scores as the
dual encoder with the same weights; without it the block is the authors' exactly.

Every attention here is :func:`attend_query`: one softmax of candidate-side query vectors over the query's tokens
(and, for Eq. 1, their own keys), with the query's keys and values shared, not copied, when all candidates belong to
one query.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class ZeroLinear(nn.Linear):
    """A linear layer initialised to zero: an update that starts as a no-op."""


def shared_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a`` ``[n, heads, m, x]`` and ``b`` ``[1 or n, heads, x, y]`` -> ``[n, heads, m, y]``.

    When ``b`` is one query's (batch 1), all candidates' rows go through one GEMM per head instead of ``n`` small ones.
    """
    if b.shape[0] == 1 and a.shape[0] > 1:
        n, heads, m, x = a.shape
        out = torch.matmul(a.transpose(0, 1).reshape(heads, n * m, x), b[0])  # [heads, n * m, y]
        return out.view(heads, n, m, -1).transpose(0, 1)
    return torch.matmul(a, b)


def attend_query(
    q: torch.Tensor, query_key: torch.Tensor, query_value: torch.Tensor, query_mask: torch.Tensor, scaling: float,
    own_key: torch.Tensor | None = None, own_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of candidate-side vectors over the query's tokens (and their own keys).

    Args:
        q: ``[n, heads, m, dim]``.
        query_key, query_value: ``[b, heads, t, dim]`` with ``b`` 1 (one query for all) or ``n``.
        query_mask: ``[b, t]`` bool, True on the query's real tokens.
        own_key, own_value: ``[n, heads, m', dim]``: keys in the same softmax as the query's (Eq. 1), or ``None``.

    Returns:
        ``[n, heads, m, dim]``.
    """
    scores = shared_matmul(q, query_key.transpose(-1, -2)) * scaling  # [n, heads, m, t]
    scores = scores.masked_fill(~query_mask[:, None, None, :], float("-inf"))
    if own_key is not None:
        scores = torch.cat([torch.matmul(q, own_key.transpose(-1, -2)) * scaling, scores], -1)  # [n, heads, m, m' + t]
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    if own_key is None:
        return shared_matmul(probs, query_value)
    own = own_key.shape[2]
    return torch.matmul(probs[..., :own], own_value) + shared_matmul(probs[..., own:].contiguous(), query_value)


class InteractionBase(nn.Module):
    """Head layout shared by both blocks."""

    def __init__(self, config) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.candidate_query, self.candidate_key, self.candidate_value = (nn.Linear(d, d) for _ in range(3))
        self.compress_query = nn.Linear(d, d)
        self.gate = nn.Linear(3 * d, d)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [n, m, hidden] -> [n, heads, m, dim]

    def attend(self, context, query_key, query_value, query_mask):
        """Eq. 1's and Eq. 2's attention outputs before any output projection: ``[n, k, hidden]``, ``[n, hidden]``."""
        key_q, value_q = query_key.transpose(1, 2), query_value.transpose(1, 2)  # [b, heads, t, dim]
        mixed = attend_query(self.heads(self.candidate_query(context)), key_q, value_q, query_mask, self.scaling,
                             self.heads(self.candidate_key(context)), self.heads(self.candidate_value(context)))
        pooled = context.mean(1)  # Q* from E_{j-1}
        summary = attend_query(self.heads(self.compress_query(pooled)[:, None]), key_q, value_q, query_mask, self.scaling)
        return mixed.transpose(1, 2).flatten(-2), summary[:, :, 0].flatten(-2), pooled

    def copy_from(self, layer) -> None:
        """Start the projections from BERT layer ``layer``'s, as the paper's code does."""
        source = layer.attention.self
        for target, origin in ((self.candidate_query, source.query), (self.candidate_key, source.key),
                               (self.candidate_value, source.value), (self.compress_query, source.query)):
            target.load_state_dict(origin.state_dict())


class AuthorsInteractionLayer(InteractionBase):
    """The authors' block (module docstring): output dense + LayerNorm + feed-forward of the copied layer for E and H."""

    def __init__(self, config) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.output_dense = nn.Linear(d, d)
        self.output_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(d, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.ffn_output = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.blend = nn.Parameter(torch.zeros(2)) if config.dual_encoder_start else None  # a_E, a_H

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_norm(self.dropout(self.ffn_output(self.activation(self.intermediate(x)))) + x)

    def forward(self, context, state, query_key, query_value, query_mask):
        # context E: [n, k, hidden]; state H: [n, hidden]; query_key/value: [b, tokens, heads, dim]; query_mask: [b, tokens]
        mixed, summary, pooled = self.attend(context, query_key, query_value, query_mask)
        new_context = self.feed_forward(self.output_norm(self.dropout(self.output_dense(mixed)) + context))  # Eq. 1
        update = self.dropout(self.output_dense(summary))
        gate = torch.sigmoid(self.gate(torch.cat([pooled, update, state], -1)))  # Eq. 2
        new_state = self.feed_forward(self.output_norm(gate * update + (1 - gate) * state))
        if self.blend is not None:
            new_context = context + self.blend[0] * (new_context - context)
            new_state = state + self.blend[1] * (new_state - state)
        return new_context, new_state

    def copy_from(self, layer) -> None:
        super().copy_from(layer)
        for target, origin in ((self.output_dense, layer.attention.output.dense),
                               (self.output_norm, layer.attention.output.LayerNorm),
                               (self.intermediate, layer.intermediate.dense),
                               (self.ffn_output, layer.output.dense), (self.ffn_norm, layer.output.LayerNorm)):
            target.load_state_dict(origin.state_dict())


class LightInteractionLayer(InteractionBase):
    """The light block (module docstring): residual updates through zero-initialised output projections."""

    def __init__(self, config) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.candidate_output = ZeroLinear(d, d)
        self.query_output = ZeroLinear(d, d)

    def forward(self, context, state, query_key, query_value, query_mask):
        mixed, summary, pooled = self.attend(context, query_key, query_value, query_mask)
        new_context = context + self.dropout(self.candidate_output(mixed))  # Eq. 1
        delta = self.dropout(self.query_output(summary))
        gate = torch.sigmoid(self.gate(torch.cat([pooled, delta, state], -1)))  # Eq. 2
        return new_context, state + gate * delta


INTERACTION_BLOCKS = {"authors": AuthorsInteractionLayer, "light": LightInteractionLayer}
"""``config.interaction_block`` -> its layer class."""
