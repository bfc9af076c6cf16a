"""Weight-space interpolation of two checkpoints (``sparse_ce.train.interpolate``) and its dev-set sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ir_measures
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_data_folder, make_model_folder

from sparse_ce.train.interpolate import interpolate

ROOT = Path(__file__).parents[1]


@pytest.fixture
def pair(tmp_path):
    """Two tiny w=2 models with different weights; the second stored in float16 with a training record."""
    start = make_model_folder(tmp_path / "start", seed=0)
    end = make_model_folder(tmp_path / "end", seed=1)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(end / "model.safetensors").items()}
    save_file(weights, str(end / "model.safetensors"), metadata={"format": "pt"})
    (end / "training.json").write_text(json.dumps({"loss": "listwise", "steps": 7}))
    return start, end


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_interpolation_is_the_weighted_mean_in_the_end_dtype(pair, tmp_path, alpha):
    start, end = pair
    out = interpolate(start, end, alpha, tmp_path / "mixed")
    a, b, mixed = (load_file(f / "model.safetensors") for f in (start, end, out))
    assert mixed.keys() == b.keys()
    for name, value in mixed.items():
        assert value.dtype == b[name].dtype
        if value.is_floating_point():
            expected = ((1 - alpha) * a[name].double() + alpha * b[name].double()).to(b[name].dtype)
            assert torch.equal(value, expected), name
    if alpha == 1.0:
        assert all(torch.equal(mixed[n], b[n]) for n in b)
    if alpha == 0.0:  # the start's weights, rounded to the end's float16
        assert all(torch.equal(mixed[n], a[n].to(b[n].dtype)) for n in b)
    assert json.loads((out / "config.json").read_text()) == json.loads((end / "config.json").read_text())
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 7 and record["interpolation"] == {"start": str(start), "end": str(end), "alpha": alpha}


def test_interpolation_refuses_other_architectures_and_bad_alpha(tmp_path):
    start = make_model_folder(tmp_path / "w2", window=2)
    other = make_model_folder(tmp_path / "w3", window=3)
    with pytest.raises(ValueError, match="attention_window_size"):
        interpolate(start, other, 0.5, tmp_path / "out")
    with pytest.raises(ValueError, match="alpha must lie in"):
        interpolate(start, start, 1.5, tmp_path / "out")
    wider = make_model_folder(tmp_path / "wide", intermediate_size=96)
    with pytest.raises(ValueError, match="shape"):
        interpolate(start, wider, 0.5, tmp_path / "out")
    (tmp_path / "w2" / "model.safetensors").rename(tmp_path / "w2" / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        interpolate(start, start, 0.5, tmp_path / "out")


@pytest.mark.slow
def test_interpolate_script_scores_the_dev_queries_per_alpha(pair, tmp_path):
    start, end = pair
    data = make_data_folder(tmp_path / "data")
    out = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "interpolate.py"), str(start), str(end), "--output", str(out),
         "--alphas", "0", "1", "--data", str(data), "--dev-queries", "1", "--max-length", "64", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "interpolation.jsonl").read_text().splitlines()]
    assert [r["alpha"] for r in rows] == [0.0, 1.0]
    assert all(0.0 <= r["dev_ndcg@10_top100"] <= 1.0 for r in rows)
    for row in rows:  # each folder records its own dev figures
        assert json.loads((out / f"alpha-{row['alpha']:g}" / "training.json").read_text())["dev"]["dev_ndcg@10_top100"] \
            == row["dev_ndcg@10_top100"]
    assert "| 0 |" in result.stdout and "| 1 |" in result.stdout


@pytest.mark.slow
def test_fusion_dev_script_scores_once_and_reports_each_weight(pair, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    _, end = pair
    data = make_data_folder(tmp_path / "data")
    out = tmp_path / "fusion.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "fusion_dev.py"), str(end), "--weights", "0", "1000", "--data",
         str(data), "--dev-queries", "1", "--max-length", "64", "--threads", "1", "--output", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["weight"] for r in rows] == [0.0, 1000.0]
    # a huge weight ranks by BM25 alone: the first stage's own nDCG@10 on the dev query
    from interpolate import dev_evaluator  # experiments/interpolate.py

    evaluator = dev_evaluator(data, 1, 64)
    bm25 = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], evaluator.qrels,
                                         {q: dict(h) for q, h in evaluator.first_stage.ranking().items()})
    assert rows[1]["dev_ndcg@10_top100"] == pytest.approx(bm25[ir_measures.nDCG @ 10], abs=1e-4)
