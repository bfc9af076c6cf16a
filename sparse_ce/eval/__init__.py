"""``sparse-ce evaluate``: re-rank test collections with several systems and test equivalence (:mod:`.evaluate`)."""
