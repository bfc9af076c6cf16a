"""``sparse-ce bench --precomputed`` end to end on tiny models and a miniature data folder (the pipeline, not speed)."""

from __future__ import annotations

import json

from tiny import PASSAGES, make_data_folder, make_mixencoder_folder

from sparse_ce.cli import main


def test_precomputed_bench_times_every_system_and_measures_quality(tmp_path, capsys):
    data = make_data_folder(tmp_path / "data")
    mixes = [make_mixencoder_folder(tmp_path / f"mix-k{k}", k=k, layers=(1,)) for k in (1, 2)]
    (tmp_path / "quality.json").write_text(json.dumps({"sparse-ce-w4": {"dl19": 0.5, "dl20": 0.4}}))
    assert main(["bench", "--precomputed", "--mix-models", *map(str, mixes), "--candidates", str(len(PASSAGES)),
                 "--timed-queries", "2", "--cross-timed-queries", "1", "--threads", "1", "--data", str(data), "--quality", str(tmp_path / "quality.json"),
                 "--output-dir", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "precomputed.json").read_text())
    systems = results["systems"]
    assert set(systems) == {"mixencoder-k1", "mixencoder-k2", "dual-encoder", "sparse-ce-w4", "full-attention"}
    assert systems["full-attention"]["speedup_vs_full"] == 1.0 and all(s["seconds"] > 0 for s in systems.values())
    hidden = 32
    assert systems["mixencoder-k2"]["bytes_per_candidate"] == 2 * hidden * 4 == 2 * systems["dual-encoder"]["bytes_per_candidate"]
    for name in ("mixencoder-k1", "mixencoder-k2", "dual-encoder"):  # measured here
        assert set(systems[name]["quality"]) == {"dl19", "dl20"} and 0 <= systems[name]["quality"]["dl19"] <= 1
    assert systems["sparse-ce-w4"]["quality"] == {"dl19": 0.5, "dl20": 0.4} and "quality" not in systems["full-attention"]
    assert (tmp_path / "out" / "precomputed.png").is_file()
    assert systems["sparse-ce-w4"]["quality_of_other_model"] and "other model" in results["quality_source"]["sparse-ce-w4"]
    for name in ("mixencoder-k1", "mixencoder-k2"):  # spread, the time split and the paired test
        entry = systems[name]
        assert entry["timed_queries"] == 2 and entry["q1"] <= entry["seconds"] <= entry["q3"]
        parts = entry["breakdown"]
        assert parts["interaction_gflop"] > 0 and parts["gemm_gflops"] > 0 and parts["interaction"] > 0
        assert entry["vs_dual_encoder"]["queries"] >= 2 and -1 <= entry["vs_dual_encoder"]["delta"] <= 1
    assert systems["dual-encoder"]["vs_dual_encoder_time"] == 1.0
    assert results["protocol"]["max_query_length"] == 64
    out = capsys.readouterr().out
    assert "| mixencoder-k2 |" in out and "interaction + head (ms)" in out


def test_precomputed_bench_needs_mixencoders(tmp_path, capsys):
    assert main(["bench", "--precomputed", "--output-dir", str(tmp_path)]) == 2
    assert "--mix-models" in capsys.readouterr().err
