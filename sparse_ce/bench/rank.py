"""End-to-end ranking throughput: 1 query x 100 real passages through sentence-transformers' ``CrossEncoder.rank``.

Schlatt et al., ECIR 2024 time the model alone; a user pays for tokenisation and batching too. This compares the
sparse cross-encoder with sentence-transformers' ``CrossEncoder`` on the plain BERT checkpoint holding the same weights
(``BertForSequenceClassification``, SDPA attention), tokenisation included, on the BM25 top-100 of a TREC DL 2019 query.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def dl19_passages(data: Path, count: int = 100) -> tuple[str, list[str], str]:
    """The first DL19 query and its BM25 top-``count`` passages (ftfy-repaired); the source named for the report."""
    from ..data import read_dl_json

    path = data / "trec-dl" / "bm25_top100_dl19.json"
    stage = read_dl_json(path, limit=1)
    qid = next(iter(stage.candidates))
    return stage.queries[qid], [c.text for c in stage.candidates[qid][:count]], f"DL19 query {qid}, {path.name}"


def plain_bert_copy(sparse_folder: str | Path, out: Path) -> Path:
    """Save the sparse model's weights as a plain ``BertForSequenceClassification`` folder (same tokenizer).

    A ``cosine`` score head has no BERT counterpart: the twin then gets the encoder weights and a new pooler and
    classifier, which is the same work per pair (a timing twin, not a scoring one).
    """
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from ..rank import load_tokenizer

    config = json.loads((Path(sparse_folder) / "config.json").read_text())
    bert_config = BertConfig(**{k: v for k, v in config.items() if k in BertConfig().to_dict()
                                and k not in ("model_type", "architectures", "auto_map", "transformers_version")})
    bert_config.num_labels = 1
    sparse = AutoModelForSequenceClassification.from_pretrained(sparse_folder, trust_remote_code=True, dtype=torch.float32)
    model = BertForSequenceClassification(bert_config)
    missing, unexpected = model.load_state_dict(sparse.state_dict(), strict=False)
    if config.get("score_head", "cls") != "cls":  # the head differs by design
        missing = [k for k in missing if not k.startswith(("bert.pooler.", "classifier."))]
        unexpected = [k for k in unexpected if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(f"{sparse_folder}: weights do not map onto BERT (missing {missing}, unexpected {unexpected})")
    model.save_pretrained(out)
    load_tokenizer(str(sparse_folder)).save_pretrained(out)
    return out


def rank_throughput(model_folder: str | Path, query: str, passages: list[str], repeats: int, batch_size: int = 100,
                    device: str = "cpu") -> dict[str, dict[str, float]]:
    """Median passages per second of ``CrossEncoder.rank`` for the sparse model and its plain-BERT twin, and how many
    passages ``CrossEncoder`` cut to its 512 tokens (it does so silently)."""
    from sentence_transformers import CrossEncoder

    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_bert_copy(model_folder, Path(tmp) / "bert")
        models = {
            "sparse-ce (CrossEncoder.rank)": CrossEncoder(str(model_folder), trust_remote_code=True, device=device,
                                                          max_length=512, model_kwargs={"dtype": torch.float32}),
            "plain BERT (CrossEncoder.rank)": CrossEncoder(str(plain), device=device, max_length=512,
                                                           model_kwargs={"dtype": torch.float32}),
        }
        tokenizer = next(iter(models.values())).tokenizer
        cut = sum(len(ids) > 512 for ids in tokenizer([query] * len(passages), passages)["input_ids"])
        times = {name: [] for name in models}
        for model in models.values():
            model.rank(query, passages, batch_size=batch_size)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model.rank(query, passages, batch_size=batch_size)
                times[name].append(time.perf_counter() - start)
    return {name: {"seconds": statistics.median(t), "passages_per_s": len(passages) / statistics.median(t),
                   "cut_passages": cut} for name, t in times.items()}
