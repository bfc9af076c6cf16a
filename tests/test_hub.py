"""The Hub round trip of a saved folder, offline, in fresh Python processes.

A folder written by ``save_pretrained`` must be self-contained remote code: each check below runs in a new interpreter
(``python -I``, another working directory, its own ``HF_MODULES_CACHE``, ``HF_HUB_OFFLINE=1``) in which the installed
``modeling_sparse_ce`` / ``configuration_sparse_ce`` are made unimportable. There it is loaded with the auto classes and
sentence-transformers' ``CrossEncoder`` (from the folder and from a simulated Hub cache), saved again and reloaded, and
its outputs are compared with the installed package's on the original folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import WORDS, make_model_folder
from transformers import BertTokenizerFast

from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from modeling_sparse_ce.modeling_sparse_ce import AUTO_MAP, remote_code_files

AUTO_CLASSES = ("AutoModel", "AutoModelForSequenceClassification")
QUERY = "how long is the flea life cycle"
DOCS = [
    "the flea life cycle can last a year",
    "a dog",
    "fleas grow fast in heat and water, slow in cold",
    "what is the life cycle of a cat and a dog and a goldfish",
    "search",
]
PAIRS = [(QUERY, doc) for doc in DOCS] + [("do goldfish grow", "goldfish grow in cold water"), ("wifi vs bluetooth", "a")]
HUB_REPO, HUB_SHA = "testorg/tiny-sparse", "0123456789abcdef0123456789abcdef01234567"

# Runs first in every fresh process: the folder must not lean on the installed package.
PRELUDE = """
import json, sys
sys.modules["modeling_sparse_ce"] = None
sys.modules["configuration_sparse_ce"] = None
try:
    import modeling_sparse_ce
except ImportError:
    pass
else:
    raise SystemExit("the installed modeling_sparse_ce is still importable")
import torch
"""


def run_fresh(script: str, tmp: Path, *args, **env) -> None:
    """Run ``PRELUDE + script`` with ``args`` in a new isolated interpreter, offline, from an empty directory."""
    cwd = tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp / "modules"),
        "HF_HUB_CACHE": str(tmp / "empty-hub-cache"),
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # steady timings when other jobs share the cores
        **env,
    }
    code = PRELUDE + textwrap.dedent(script)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stderr[-4000:]}"


def check_flat_folder(folder: Path) -> None:
    """Every code file of the package lies flat and unchanged in ``folder``; each auto_map entry names one of them."""
    code = {p.name: p.read_bytes() for p in remote_code_files()}
    assert {p.name for p in folder.glob("*.py")} == set(code), folder
    for name, source in code.items():
        assert (folder / name).read_bytes() == source, f"{folder / name} differs from the package source"
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == AUTO_MAP, folder
    for reference in auto_map.values():
        module, _ = reference.split(".")
        assert (folder / f"{module}.py").is_file(), reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny sparse (w=2) cross-encoder whose scores spread (the default init gives near-equal scores)."""
    return make_model_folder(tmp_path_factory.mktemp("tiny-sparse"), initializer_range=0.2)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """Inputs for PAIRS (saved for the fresh processes) and the installed package's hidden states and logits."""
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    inputs = dict(tokenizer([q for q, _ in PAIRS], [d for _, d in PAIRS], padding=True, return_tensors="pt"))
    model = SparseCrossEncoderForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hidden = model.bert(**inputs).last_hidden_state
        logits = model(**inputs).logits
    path = tmp_path_factory.mktemp("inputs") / "inputs.pt"
    torch.save(inputs, path)
    return {"inputs_file": path, "hidden": hidden, "logits": logits, "scores": logits.squeeze(-1)}  # CrossEncoder: the config's Identity


ROUND_TRIP = """
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

folder, work, inputs_file = sys.argv[1:4]
AUTO = {"AutoModel": AutoModel, "AutoModelForSequenceClassification": AutoModelForSequenceClassification}
inputs = torch.load(inputs_file)
report, tensors = {}, {}

def load(path, *chain):
    # chain: the auto classes that loaded and saved the folders on the way, then the one loading now
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AUTO[chain[-1]].from_pretrained(path, trust_remote_code=True).eval()
    key = ">".join(chain)
    report[key] = {
        "modules": [type(config).__module__, type(model).__module__],
        "config_is_instance": isinstance(config, model.config_class) and isinstance(model.config, model.config_class),
    }
    with torch.no_grad():
        has_head = chain[-1] == "AutoModelForSequenceClassification"
        tensors[f"{key}:hidden"] = (model.bert if has_head else model)(**inputs).last_hidden_state
        if has_head:
            tensors[f"{key}:logits"] = model(**inputs).logits
    return model

for first in AUTO:
    load(folder, first).save_pretrained(f"{work}/{first}")  # loaded as remote code: _auto_class is set
    for second in AUTO:
        load(f"{work}/{first}", first, second).save_pretrained(f"{work}/{first}-{second}")
        for third in AUTO:
            load(f"{work}/{first}-{second}", first, second, third)
torch.save(tensors, f"{work}/tensors.pt")
with open(f"{work}/report.json", "w") as f:
    json.dump(report, f)
"""


@pytest.fixture(scope="module")
def round_trip(model_dir, reference, tmp_path_factory):
    """Load -> save -> load -> save -> load with every auto class, in one fresh process."""
    tmp = tmp_path_factory.mktemp("round-trip")
    work = tmp / "saved"
    work.mkdir()
    run_fresh(ROUND_TRIP, tmp, model_dir, work, reference["inputs_file"])
    report = json.loads((work / "report.json").read_text())
    return work, report, torch.load(work / "tensors.pt")


def test_folder_loads_as_self_contained_remote_code(round_trip):
    _, report, _ = round_trip
    for name in AUTO_CLASSES:
        loaded = report[name]  # straight from the folder the installed package saved
        assert all(module.startswith("transformers_modules.") for module in loaded["modules"]), loaded
        assert loaded["config_is_instance"], name
    assert all(entry["config_is_instance"] for entry in report.values())


def test_save_load_twice_with_every_auto_class_keeps_outputs(round_trip, reference):
    _, report, tensors = round_trip
    assert len(report) == 2 + 4 + 8
    compared = 0
    for key, tensor in tensors.items():
        if key.endswith(":hidden"):
            torch.testing.assert_close(tensor, reference["hidden"], rtol=0, atol=1e-6, msg=key)
        elif "AutoModel>" not in key:  # the classifier survives unless an AutoModel (no head) saved on the way
            torch.testing.assert_close(tensor, reference["logits"], rtol=0, atol=1e-6, msg=key)
            compared += 1
    assert compared == 3


def test_every_saved_folder_is_flat_with_complete_auto_map(round_trip, model_dir):
    work, _, _ = round_trip
    saved = [p for p in work.iterdir() if p.is_dir()]
    assert len(saved) == 2 + 4
    for folder in [model_dir, *saved]:
        check_flat_folder(folder)


def test_folder_saved_from_remote_code_keeps_the_flat_layout(round_trip):
    """transformers' custom_object_save runs for classes loaded as remote code; the layout must stay complete."""
    work, report, _ = round_trip
    for name in AUTO_CLASSES:
        folder = work / name
        assert report[name]["modules"][1].startswith("transformers_modules.")
        check_flat_folder(folder)
        assert json.loads((folder / "config.json").read_text())["architectures"] == [
            {"AutoModel": "SparseCrossEncoderModel"}.get(name, "SparseCrossEncoderForSequenceClassification")
        ]


HUB_LOAD = """
from sentence_transformers import CrossEncoder
from transformers import AutoModelForSequenceClassification

repo, inputs_file, out = sys.argv[1:4]
pairs = json.loads(sys.argv[4])
model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**torch.load(inputs_file)).logits
cross_encoder = CrossEncoder(repo, trust_remote_code=True)
torch.save({
    "logits": logits,
    "scores": torch.as_tensor(cross_encoder.predict(pairs)),
    "modules": [type(model).__module__, type(cross_encoder.model).__module__],
    "config_is_instance": isinstance(model.config, model.config_class),
}, out)
"""


def test_load_from_simulated_hub_cache(model_dir, reference, tmp_path):
    """``HF_HUB_CACHE/models--testorg--tiny-sparse/{refs/main, snapshots/<sha>}`` loads by repo id, offline."""
    repo_cache = tmp_path / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(HUB_SHA)
    shutil.copytree(model_dir, repo_cache / "snapshots" / HUB_SHA)
    out = tmp_path / "out.pt"
    run_fresh(HUB_LOAD, tmp_path, HUB_REPO, reference["inputs_file"], out, json.dumps(PAIRS), HF_HUB_CACHE=str(tmp_path / "hub"))
    result = torch.load(out, weights_only=False)
    hub_module = f"transformers_modules.testorg.tiny_hyphen_sparse.{HUB_SHA}."
    assert all(module.startswith(hub_module) for module in result["modules"]), result["modules"]
    assert result["config_is_instance"]
    torch.testing.assert_close(result["logits"], reference["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(result["scores"], reference["scores"], rtol=0, atol=1e-5)


CROSS_ENCODER = """
import random
from sentence_transformers import CrossEncoder
from transformers import AutoModel

folder, new_folder, out = sys.argv[1:4]
query, docs, pairs, words = (json.loads(arg) for arg in sys.argv[4:8])
cross_encoder = CrossEncoder(folder, trust_remote_code=True)
ranked = cross_encoder.rank(query, docs)
result = {
    "scores": cross_encoder.predict(pairs).tolist(),
    "rank": [{"corpus_id": int(r["corpus_id"]), "score": float(r["score"])} for r in ranked],
}
cross_encoder.save(new_folder)
result["saved_scores"] = CrossEncoder(new_folder, trust_remote_code=True).predict(pairs).tolist()
result["saved_auto_model"] = type(AutoModel.from_pretrained(new_folder, trust_remote_code=True)).__name__

# 10,000 pairs (a few queries, short random documents): scored in one call, and shuffled in chunks of 100
rng = random.Random(0)
queries = ["how long is the flea life cycle", "do goldfish grow", "wifi vs bluetooth", "what is sparse attention"]
many = [(rng.choice(queries), " ".join(rng.choices(words, k=rng.randint(1, 12)))) for _ in range(10_000)]
order = list(range(len(many)))
rng.shuffle(order)
at_once = cross_encoder.predict(many)
shuffled = [float(s) for start in range(0, len(many), 100) for s in cross_encoder.predict([many[i] for i in order[start:start + 100]])]
in_input_order = [0.0] * len(many)
for position, i in enumerate(order):
    in_input_order[i] = shuffled[position]
result.update(many=many, at_once=at_once.tolist(), shuffled_in_chunks=in_input_order)
with open(out, "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def cross_encoder_run(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross-encoder")
    new_folder, out = tmp / "saved-by-cross-encoder", tmp / "result.json"
    run_fresh(CROSS_ENCODER, tmp, model_dir, new_folder, out, *map(json.dumps, (QUERY, DOCS, PAIRS, WORDS)))
    return new_folder, json.loads(out.read_text())


def test_cross_encoder_predict_is_the_logit(cross_encoder_run, reference):
    """The folder's config stores activation_fn = Identity for sentence-transformers (test_score_activation.py)."""
    _, result = cross_encoder_run
    assert result["scores"] == pytest.approx(reference["scores"].tolist(), abs=1e-5)
    assert max(result["scores"]) - min(result["scores"]) > 1e-2  # scores differ, so order checks are meaningful


def test_cross_encoder_rank_sorts_every_doc(cross_encoder_run, reference):
    _, result = cross_encoder_run
    ranked = result["rank"]
    assert sorted(r["corpus_id"] for r in ranked) == list(range(len(DOCS)))
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True)
    for r in ranked:
        assert r["score"] == pytest.approx(float(reference["scores"][r["corpus_id"]]), abs=1e-5)


def test_cross_encoder_save_reloads_with_same_scores_and_auto_map(cross_encoder_run):
    new_folder, result = cross_encoder_run
    assert result["saved_scores"] == pytest.approx(result["scores"], abs=1e-6)
    assert result["saved_auto_model"] == "SparseCrossEncoderModel"
    check_flat_folder(new_folder)


def test_predict_10k_pairs_keeps_input_order(cross_encoder_run, model_dir):
    _, result = cross_encoder_run
    many, at_once = result["many"], torch.tensor(result["at_once"])
    assert len(at_once) == len(many) == 10_000
    assert len({round(s, 4) for s in result["at_once"]}) > 100
    torch.testing.assert_close(torch.tensor(result["shuffled_in_chunks"]), at_once, rtol=0, atol=1e-5)
    # spot check against the installed package, pair by pair
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    model = SparseCrossEncoderForSequenceClassification.from_pretrained(model_dir).eval()
    picks = random.Random(1).sample(range(len(many)), 50)
    inputs = tokenizer([many[i][0] for i in picks], [many[i][1] for i in picks], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits.squeeze(-1)
    torch.testing.assert_close(at_once[picks], expected, rtol=0, atol=1e-5)


def test_push_to_hub_uploads_the_complete_folder(model_dir, tmp_path, monkeypatch):
    """``save_pretrained(push_to_hub=True)`` pushes only after the code files and auto_map are written."""
    model = SparseCrossEncoderForSequenceClassification.from_pretrained(model_dir)
    pushed = []

    def fake_push(repo_id, **kwargs):  # stands in for the network upload; records the folder as it is then
        pushed.append((repo_id, kwargs, sorted(p.name for p in (tmp_path / "out").iterdir())))

    monkeypatch.setattr(model, "push_to_hub", fake_push)
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/tiny", commit_message="hi")
    assert len(pushed) == 1
    repo_id, kwargs, files = pushed[0]
    assert repo_id == "me/tiny" and kwargs == {"commit_message": "hi"}
    assert {p.name for p in remote_code_files()} <= set(files) and "config.json" in files


def test_tokenizer_loads_without_running_remote_code(model_dir, tmp_path):
    """A saved folder's tokenizer is a plain BERT tokenizer: sparse-ce loads it with no remote code and no prompt."""
    modules = tmp_path / "modules"
    script = f"""
import sys
from sparse_ce.rank import load_tokenizer
tokenizer = load_tokenizer({str(model_dir)!r})
print(type(tokenizer).__name__, tokenizer("do goldfish grow", "goldfish grow")["input_ids"][0])
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(modules))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] in ("BertTokenizer", "BertTokenizerFast") and "Do you wish" not in result.stdout
    assert not list(modules.rglob("modeling_sparse_ce.py"))  # no remote code was copied, let alone run
