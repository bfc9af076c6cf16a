"""Matching mechanisms of a cross-encoder: which attention directions and which heads detect relevance.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604): a row splits into [CLS], query, [SEP]1,
document and [SEP]2; ``sparse-ce analyze ablate`` removes each of the 25 directions between them (and groups of
them) in all, the lower or the upper layers, or (``--heads``) chosen attention heads against random ones; ``analyze
heads`` compares attention of relevant passages, hard and easy negatives per head; ``analyze svd`` measures how
aligned each head's query-key matrix is. Patterns are the config's ``attention_pattern`` (see
``configuration_sparse_ce``).
"""
