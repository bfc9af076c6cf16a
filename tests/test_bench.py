"""``sparse-ce bench``: inputs, target checks, report, and a smoke run of the whole pipeline (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from configuration_sparse_ce import ATTENTION_BACKENDS
from sparse_ce.bench.measure import QUERY_LEN, SEP, SYSTEMS, Setting, make_inputs
from sparse_ce.bench.report import check_targets, flex_targets, markdown
from sparse_ce.cli import main


def test_inputs_share_one_query_and_mark_segments():
    batch = make_inputs(Setting(3, 40), torch.device("cpu"))
    ids, types = batch["input_ids"], batch["token_type_ids"]
    assert ids.shape == (3, 40) and bool(batch["attention_mask"].all())
    assert (ids[:, 1 : 1 + QUERY_LEN] == ids[0, 1 : 1 + QUERY_LEN]).all()
    assert (ids[:, 1 + QUERY_LEN] == SEP).all() and (ids[:, -1] == SEP).all()
    assert not (ids[:, 2 + QUERY_LEN : -1] == ids[0, 2 + QUERY_LEN : -1]).all()  # documents differ
    assert (types[:, : 2 + QUERY_LEN] == 0).all() and (types[:, 2 + QUERY_LEN :] == 1).all()
    with pytest.raises(ValueError, match="at least"):
        make_inputs(Setting(1, QUERY_LEN + 2), torch.device("cpu"))


def fake_results(sparse_ms: float, sparse_mb: float) -> dict:
    ms = {f"1x{n}": {"floor": n / 4, "bert-sdpa": n, "sparse-w4:kernel": sparse_ms * n / 4} for n in (256, 512, 4096)}
    ms["100x164"] = {"floor": 20.0, "bert-sdpa": 30.0, "sparse-w4:kernel": sparse_ms * 20}
    mb = {"floor": {"1x4096": 100.0}, "bert-sdpa": {"1x4096": 130.0}, "sparse-w4:kernel": {"1x4096": sparse_mb}}
    return {"environment": {"device": "cpu", "torch": "x", "transformers": "y", "threads": "2"}, "dtype": "float32",
            "repeats": 5, "warmup": 1, "systems": ["floor", "bert-sdpa", "sparse-w4:kernel"], "skipped": [],
            "settings": list(ms), "passages": "100x164", "ms": ms, "mb": mb, "rank": None, "seconds": 1.0,
            "command": "sparse-ce bench"}


def test_targets_follow_the_measured_ratios():
    good = check_targets(fake_results(sparse_ms=1.05, sparse_mb=105.0))
    assert [ok for *_, ok in good] == [True, True, True, True]
    bad = check_targets(fake_results(sparse_ms=1.2, sparse_mb=120.0))
    assert [ok for *_, ok in bad] == [True, False, False, False]  # 4096 / (1.2 * 1024) still beats 2.4x
    assert "worst 1.20× (at 512)" in [measured for _, measured, _ in bad][1]  # 256 is below the target's range
    table = markdown(fake_results(1.2, 120.0))
    assert "| 4096 tokens |" in table and "| 100 × 164 tokens |" in table and "| no |" in table


def test_report_marks_systems_not_run_at_a_setting():
    results = fake_results(1.05, 105.0)
    results["systems"].append("bert-eager")
    results["ms"]["1x256"]["bert-eager"] = 300.0  # eager attention runs only at short lengths
    table = markdown(results)
    rows = [line for line in table.splitlines() if line.startswith("| 4096 tokens |")]
    assert len(rows) == 4 and all(row.endswith("| – |") for row in rows)  # ms, MB and both ratio tables
    assert "| 256 tokens | 64.0 | 256.0 | 67.2 | 300.0 |" in table


def test_every_system_names_a_known_backend():
    for name, system in SYSTEMS.items():
        assert system.kind in ("bert", "sparse", "floor")
        assert (system.kind == "sparse") == (system.backend in ATTENTION_BACKENDS), name


def test_materialised_flex_runs_only_on_short_forwards():
    """Uncompiled FlexAttention scores every packed token against every other: never 100 x 164 tokens."""
    from sparse_ce.bench.measure import Setting, runs_at

    eager, compiled = SYSTEMS["sparse-w4:flex-eager"], SYSTEMS["sparse-w4:flex"]
    assert runs_at(eager, Setting(1, 1024)) and not runs_at(eager, Setting(100, 164))
    assert runs_at(compiled, Setting(100, 164)) and runs_at(SYSTEMS["bert-eager"], Setting(100, 164))


@pytest.mark.slow
def test_bench_smoke_writes_tables_json_and_figure(tmp_path, capsys):
    assert main(["bench", "--smoke", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["systems"] == ["floor", "bert-sdpa", "sparse-w4:windowed"]
    assert results["settings"] == ["1x32", "1x64", "4x32"]
    for setting in results["settings"]:
        assert all(results["ms"][setting][s] > 0 for s in results["systems"])
    assert set(results["mb"]) == set(results["systems"])
    assert all(v >= 0 for per_system in results["mb"].values() for v in per_system.values())
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "**Milliseconds per forward**" in out and "CPU targets" not in out  # no targets from a smoke run


def test_flex_targets_on_cpu_and_cuda():
    systems = ["floor", "bert-sdpa", "sparse-w4:kernel", "sparse-w4:flex", "sparse-w4:auto"]
    ms = {"1x4096": {"floor": 500, "bert-sdpa": 2000, "sparse-w4:kernel": 600, "sparse-w4:flex": 900, "sparse-w4:auto": 600},
          "100x164": {"floor": 50, "bert-sdpa": 80, "sparse-w4:kernel": 60, "sparse-w4:flex": 70, "sparse-w4:auto": 90}}
    cpu = {"environment": {"device": "cpu"}, "systems": systems, "ms": ms, "passages": "100x164"}
    (name, measured, met), = flex_targets(cpu)
    assert "within 1.3×" in name and measured == "1.50×" and not met
    cuda = dict(cpu, environment={"device": "H100", "cuda": "13.0"})
    (_, fast, fast_met), (_, passages, passages_met) = flex_targets(cuda)
    assert (fast, fast_met) == ("3.33×", True) and (passages, passages_met) == ("0.89×", False)
