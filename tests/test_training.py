"""Training sets, teacher scores and ``train_st.py`` end to end on a tiny model and a miniature data folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import GRADES, PASSAGES, TOPICS, make_bi_encoder_folder, make_data_folder, make_model_folder

from sparse_ce import training_data
from sparse_ce.teacher import Teacher, cached_teacher_scores, is_bi_encoder

sys.path.insert(0, str(Path(__file__).parents[1]))
import train_st  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def pool(data):
    return training_data.read_training_pool(train_st.default_sources(data))


def test_pool_merges_sources_per_query_without_duplicates(pool):
    assert set(pool) == set(TOPICS)
    for qid, entry in pool.items():
        assert entry.text == TOPICS[qid]
        assert sorted(entry.documents) == sorted(PASSAGES)  # the extra source adds no duplicate
        assert all(PASSAGES[d] == text for d, text in entry.documents.items())


def test_pool_rejects_one_query_id_with_two_texts(data, tmp_path):
    entries = json.loads((data / "trec-dl" / "bm25_top100_dl21.json").read_text())
    entries[0]["query"] = "another text"
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="query 101 reads"):
        training_data.read_training_pool([str(data / "trec-dl" / "bm25_top100_dl21.json"), str(tmp_path / "bad.json")])


def fake_teacher(pool):
    """Scores that put judged passages by grade above the rest."""
    return {qid: {d: GRADES.get(qid, {}).get(d, -1) + 0.01 * i for i, d in enumerate(e.documents)}
            for qid, e in pool.items()}


def test_margin_triples_carry_the_teacher_margin(pool):
    teacher = fake_teacher(pool)
    dataset = training_data.margin_mse_dataset(pool, teacher, triples_per_query=5, grades=GRADES, top_k=2, seed=3)
    assert dataset.column_names == list(training_data.LOSS_COLUMNS["margin-mse"])
    assert len(dataset) == 5 * len(pool)
    text_to_id = {t: d for d, t in PASSAGES.items()}
    query_to_id = {t: q for q, t in TOPICS.items()}
    for row in dataset:
        qid, pos, neg = query_to_id[row["query"]], text_to_id[row["positive"]], text_to_id[row["negative"]]
        assert pos != neg
        assert row["label"] == pytest.approx(teacher[qid][pos] - teacher[qid][neg])
        top2 = sorted(teacher[qid], key=lambda d: -teacher[qid][d])[:2]
        assert pos in top2 or GRADES[qid].get(pos, 0) >= 2
    again = training_data.margin_mse_dataset(pool, teacher, 5, GRADES, top_k=2, seed=3)
    assert again["label"] == dataset["label"]  # seeded


def test_bce_and_lambda_use_judged_grades(pool):
    bce = training_data.bce_dataset(pool, GRADES)
    assert len(bce) == sum(len(v) for v in GRADES.values())
    assert max(bce["label"]) == 1.0 and min(bce["label"]) == 0.0
    lists = training_data.lambda_dataset(pool, GRADES, list_size=3, lists_per_query=2)
    assert len(lists) == 2 * len(GRADES)
    for docs, labels in zip(lists["docs"], lists["labels"]):
        assert len(docs) == len(labels) <= 3 and labels[0] > 0
    with pytest.raises(ValueError, match="no pooled"):
        training_data.bce_dataset(pool, {"999": {"x": 1}})
    with pytest.raises(ValueError, match="qrels"):
        training_data.lambda_dataset(pool, {}, list_size=3)


def test_teacher_scores_are_cached_by_content(tmp_path, tiny_model_dir):
    teacher = Teacher(tiny_model_dir, batch_size=4)
    assert teacher.kind == "cross-encoder"
    queries, docs = ["do goldfish grow"] * 3, ["goldfish grow fast", "the dog", "light and heat"]
    scores = cached_teacher_scores(teacher, queries, docs, tmp_path)
    assert scores == pytest.approx(teacher.score(queries, docs), abs=1e-6)
    (cache,) = tmp_path.glob("teacher-*.json")
    cache.write_text(json.dumps([1.0, 2.0, 3.0]))  # proves the second call reads the cache
    assert cached_teacher_scores(teacher, queries, docs, tmp_path) == [1.0, 2.0, 3.0]
    assert cached_teacher_scores(teacher, queries, docs[::-1], tmp_path) != [1.0, 2.0, 3.0]


def test_bi_encoder_teacher_is_cosine(tmp_path):
    folder = make_bi_encoder_folder(tmp_path / "bi")
    assert is_bi_encoder(folder) and not is_bi_encoder(tmp_path)
    scores = Teacher(folder).score(["goldfish", "goldfish"], ["goldfish", "the war year"])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and -1.0 <= scores[1] < 1.0


@pytest.mark.slow
def test_train_st_end_to_end(tmp_path, data):
    init = make_model_folder(tmp_path / "init", preset="full", window=None)
    teacher = make_bi_encoder_folder(tmp_path / "teacher")
    out = tmp_path / "trained"
    argv = ["--output", str(out), "--init", str(init), "--pattern", "sparse", "--window", "1", "--teacher",
            str(teacher), "--data", str(data), "--max-steps", "3", "--batch-size", "2", "--triples-per-query", "4",
            "--dev-queries", "1", "--eval-steps", "2", "--lr", "1e-3", "--max-length", "64", "--save-dtype", "float16",
            "--eval", "dl19", "vaswani", "--eval-depth", "6", "--cache-dir", str(tmp_path / "cache"),
            "--run-dir", str(tmp_path / "runs")]
    assert train_st.main(argv) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["pattern"] == "sparse" and record["window"] == 1 and record["steps"] == 3
    assert set(record["test"]) == {"dl19", "vaswani"} and "dev_ndcg@10" in record["dev"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "sparse_ce" and config["sparse_ce_untrained_head"] is False
    assert config["attention_window_size"] == 1 and config["dtype"] == "float32"  # stored fp16, computed fp32
    with safe_open(out / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert all(f.get_tensor(n).dtype == torch.float16 for n in names)
    with safe_open(init / "model.safetensors", "pt") as f:
        before = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight")
    with safe_open(out / "model.safetensors", "pt") as f:
        after = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight").float()
    assert not torch.allclose(before, after, atol=1e-4)  # trained
    card = (out / "README.md").read_text()
    assert "train_st.py" in card and "| dl19 |" in card and "untrained" not in card
    assert not (out / "trainer").exists() and (out / "modeling_sparse_ce.py").is_file()
    assert list((tmp_path / "cache" / "teacher").glob("teacher-*.json"))
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(out), trust_remote_code=True)
    assert model.model.dtype == torch.float32
    assert len(model.predict([("do goldfish grow", "goldfish grow fast")])) == 1


@pytest.mark.slow
def test_train_st_runs_unchanged_under_torchrun(tmp_path, data):
    """Two CPU processes (gloo): one conversion, one teacher pass, one saved model, the same as a single process."""
    import os
    import subprocess

    init = make_model_folder(tmp_path / "init", preset="full", window=None)
    teacher = make_bi_encoder_folder(tmp_path / "teacher")
    out = tmp_path / "ddp"
    script = Path(__file__).parents[1] / "train_st.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(script), "--output", str(out), "--init", str(init), "--teacher", str(teacher), "--data", str(data),
               "--max-steps", "2", "--batch-size", "2", "--triples-per-query", "4", "--dev-queries", "1",
               "--eval-steps", "2", "--max-length", "64", "--cache-dir", str(tmp_path / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "training.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 2
    assert len(list((tmp_path / "cache" / "teacher").glob("teacher-*.json"))) == 1
    assert (out / "model.safetensors").is_file() and not (out / "trainer").exists()
