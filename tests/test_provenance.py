"""Saved runs and caches are keyed by what produced them (issue 23, item 1): the model's files, not its name."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from tiny import make_bi_encoder_folder, make_data_folder, make_model_folder

from sparse_ce.cli import main
from sparse_ce.data import read_run
from sparse_ce.provenance import ModelNotFound, model_digest, resolve_model
from sparse_ce.train.representation import bi_encoder_embeddings
from sparse_ce.train.teacher import Teacher, cached_teacher_scores


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny sparse models whose rankings differ (initializer_range 0.5: the default 0.02 gives near-equal logits)."""
    root = tmp_path_factory.mktemp("models")
    return {name: make_model_folder(root / name, seed=seed, initializer_range=0.5) for name, seed in (("A", 0), ("B", 1))}


def evaluate(data: Path, out: Path, system: str, *extra: str) -> int:
    return main(["evaluate", "--system", system, "--collections", "dl19", "--data", str(data), "--cache-dir",
                 str(out.parent / "cache"), "--output-dir", str(out), "--depth", "8", "--threads", "1",
                 "--no-progress", "--dtype", "float32", *extra])


def ndcg(out: Path, system: str = "w4") -> float:
    return json.loads((out / "results.json").read_text())["collections"]["dl19"][system]["nDCG@10"]


def test_two_models_under_one_name_each_report_their_own_scores(data, models, tmp_path):
    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    assert evaluate(data, shared, f"w4={models['A']}") == 0
    run_a = read_run(shared / "runs" / "w4-dl19-top8.run")
    assert evaluate(data, shared, f"w4={models['B']}") == 0  # same name, same folder: must not reuse A's run
    assert evaluate(data, fresh, f"w4={models['B']}") == 0
    run_b = read_run(shared / "runs" / "w4-dl19-top8.run")
    assert run_b == read_run(fresh / "runs" / "w4-dl19-top8.run") != run_a
    assert ndcg(shared) == ndcg(fresh)
    manifest = json.loads((shared / "runs" / "w4-dl19-top8.run.json").read_text())
    assert manifest["model"] == str(models["B"].resolve()) and manifest["weights_sha256"] == model_digest(models["B"])


@pytest.mark.parametrize("change", [["--dtype", "bfloat16"], ["--backend", "dense"], ["--max-length", "64"]])
def test_a_changed_setting_recomputes_the_run_and_an_equal_one_reuses_it(data, models, tmp_path, caplog, change):
    out = tmp_path / "eval"
    assert evaluate(data, out, f"w4={models['A']}") == 0
    run = out / "runs" / "w4-dl19-top8.run"
    run.write_text(run.read_text().replace(" w4\n", " planted\n"))  # marks the file: reused iff the mark stays
    with caplog.at_level(logging.INFO, "sparse_ce.provenance"):
        assert evaluate(data, out, f"w4={models['A']}") == 0
    assert "planted" in run.read_text() and "recomputing" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, "sparse_ce.provenance"):
        assert evaluate(data, out, f"w4={models['A']}", *change) == 0
    assert "planted" not in run.read_text()
    differing = change[0].removeprefix("--").replace("-", "_")
    assert f"({differing} differ); recomputing" in caplog.text
    assert str(json.loads((out / "runs" / "w4-dl19-top8.run.json").read_text())[differing]) == change[1]


def test_a_run_without_manifest_is_recomputed(data, models, tmp_path):
    out = tmp_path / "eval"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "w4-dl19-top8.run").write_text("1 Q0 nothing 1 1.0 stale\n")
    assert evaluate(data, out, f"w4={models['A']}") == 0
    assert "stale" not in (out / "runs" / "w4-dl19-top8.run").read_text()


@pytest.mark.parametrize("model", ["/no/such/model", "./nope", "no-such-name"])
def test_a_missing_model_is_an_error_before_any_work(data, tmp_path, capsys, model):
    out = tmp_path / "eval"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "w4-dl19-top8.run").write_text("1 Q0 x 1 1.0 w4\n")  # an old run under the same name
    assert evaluate(data, out, f"w4={model}") == 2
    assert capsys.readouterr().err.strip() == f"sparse-ce evaluate: --system w4={model}: no such folder"
    assert not (out / "results.json").exists() and not (out.parent / "cache").exists()


def test_model_digest_follows_content_not_path_or_model_card(models, tmp_path):
    copy = shutil.copytree(models["A"], tmp_path / "copy")
    assert model_digest(copy) == model_digest(models["A"]) != model_digest(models["B"])
    (copy / "README.md").write_text("a new model card")
    assert model_digest(copy) == model_digest(models["A"])
    shutil.copy(models["B"] / "model.safetensors", copy / "model.safetensors")
    assert model_digest(copy) == model_digest(models["B"])
    with pytest.raises(ModelNotFound, match="not a model folder"):
        resolve_model(tmp_path)


def test_teacher_cache_is_stale_never_after_new_weights(models, tmp_path):
    folder = shutil.copytree(models["A"], tmp_path / "teacher")
    queries, docs = ["do goldfish grow"] * 3, ["goldfish grow fast", "the dog", "light and heat"]
    before = cached_teacher_scores(Teacher(folder), queries, docs, tmp_path / "cache")
    shutil.copy(models["B"] / "model.safetensors", folder / "model.safetensors")  # same path, new weights
    after = cached_teacher_scores(Teacher(folder), queries, docs, tmp_path / "cache")
    assert after == pytest.approx(Teacher(models["B"]).score(queries, docs), abs=1e-6) and after != before
    assert len(list((tmp_path / "cache").glob("teacher-*.json"))) == 2


def test_embedding_cache_is_stale_never_after_new_weights(tmp_path):
    folder = make_bi_encoder_folder(tmp_path / "bi", seed=0)
    other = make_bi_encoder_folder(tmp_path / "other", seed=1)
    texts = ["goldfish grow fast", "the dog"]
    before = bi_encoder_embeddings(str(folder), texts, tmp_path / "cache")
    for name in ("model.safetensors",):
        for source in other.rglob(name):
            shutil.copy(source, folder / source.relative_to(other))
    after = bi_encoder_embeddings(str(folder), texts, tmp_path / "cache")
    assert not after.allclose(before)
    assert after.allclose(bi_encoder_embeddings(str(other), texts, None))
