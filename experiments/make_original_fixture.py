"""Write tests/fixtures/original-sparse-ce-w4: a tiny checkpoint saved BY THE ORIGINAL CODE, with its own scores.

Provenance: the model class, its ``save_pretrained`` and its forward are those of the authors' code
(webis-de/ecir24-sparse-cross-encoder, ``sparse_cross_encoder/model/sparse_cross_encoder.py``), windowed with their
C++ CPU kernel (webis-de/pytorch-window-matmul, built without CUDA). Nothing of this package is imported here.
The commit of each repository is read from its git directory and written into the fixture's ``scores.json``.

One documented bug of the original is patched before scoring (see /work/shared/notes/reference-implementation.md):
``get_input_tensors`` takes the longest document's length *before* appending [SEP] and pads every document to it,
so the longest document of a batch loses its final [SEP]. The patch adds 1 to that length (one textual replacement,
checked to match exactly once). Scores of the unpatched code are recorded too, for information only.

The original needs a transformers of its era (4.36); run this in a throwaway venv, e.g. (torch 2.13 CPU is borrowed
from the project venv through a .pth file, so nothing large is downloaded)::

    python3 -m venv /tmp/orig-venv
    /work/main/.venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
        > /tmp/orig-venv/lib/python3.11/site-packages/zz_main_venv.pth
    /tmp/orig-venv/bin/pip install "transformers==4.36.2"        # brings tokenizers 0.15.2, huggingface-hub 0.36.2
    git --git-dir=<pytorch-window-matmul.git> archive HEAD | tar -x -C /tmp/wm
    (cd /tmp/wm && env -u CUDA_HOME /tmp/orig-venv/bin/python setup.py build_ext --inplace)   # CPU-only kernel
    PYTHONPATH=/tmp/wm /tmp/orig-venv/bin/python experiments/make_original_fixture.py \
        --sce-git <ecir24-sparse-cross-encoder.git> --wm-git <pytorch-window-matmul.git>

The model is seeded (torch.manual_seed(0)); the run is deterministic on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import platform
import string
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import transformers

MODEL_FILE = "sparse_cross_encoder/model/sparse_cross_encoder.py"
SEP_BUG = "            input_ids.shape[0]\n            for batch_input_ids in doc_input_ids\n"
SEP_FIX = "            input_ids.shape[0] + 1  # [SEP] padding fix (sparse-ce fixture)\n            for batch_input_ids in doc_input_ids\n"

WORDS = (
    "the a of and to in is for on what how why who when does do did are was were can with by from at as it that this "
    "flea life cycle long dog cat goldfish grow wifi bluetooth war enter us year day water heat cold light fast slow "
    "model rank search query document passage attention sparse window token"
).split()

# (query, documents): ragged queries, ragged documents, documents longer and shorter than the window w=4 * 2 + 1
PAIRS = [
    ("how long do fleas live", [
        "the flea life cycle is long",
        "a dog and a cat in the water for a long day and the year of the war",
        "fleas",
    ]),
    ("wifi", [
        "bluetooth and wifi are fast on a dog",
        "what is the sparse attention window of a cross encoder model for passage search",
    ]),
    ("why is the water cold in the year of the war", [
        "cold water and light heat",
        "the goldfish grow slow in cold water and fast in heat",
        "query document token",
        "rank",
    ]),
]

CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
    initializer_range=0.2,  # spreads the logits so that a 1e-5 check means something
    # the paper's pattern, as in webis/sparse-cross-encoder-4-512 (configs/models/sparse-cross-encoder.json)
    attention_window_size=4, cls_query_attention=True, cls_doc_attention=True, query_cls_attention=False,
    query_doc_attention=False, doc_cls_attention=True, doc_query_attention=True,
)


def git_head(git_dir: Path) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def model_source(git_dir: Path) -> str:
    tar = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", MODEL_FILE], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return archive.extractfile(MODEL_FILE).read().decode()


def load_module(name: str, source: str, folder: Path):
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_tokenizer(folder: Path):
    """The vocabulary of tests/tiny.py (written as vocab.txt; transformers 4.36 builds the fast tokenizer from it)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *string.ascii_lowercase, *string.digits]
    vocab += [f"##{c}" for c in string.ascii_lowercase + string.digits] + list(string.punctuation)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(vocab_file), model_max_length=CONFIG["max_position_embeddings"])


def score(model, tokenizer) -> list[list[float]]:
    """The original's forward: one batch of all queries, each with its ragged documents (no special tokens given;
    the model adds [CLS] and both [SEP]s itself)."""
    ids = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    with torch.no_grad():
        logits = model(query_input_ids=[ids(q) for q, _ in PAIRS],
                       doc_input_ids=[[ids(d) for d in docs] for _, docs in PAIRS]).logits
    return [[float(x) for x in row] for row in logits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sce-git", type=Path, required=True, help="git dir of webis-de/ecir24-sparse-cross-encoder")
    parser.add_argument("--wm-git", type=Path, required=True, help="git dir of webis-de/pytorch-window-matmul")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/original-sparse-ce-w4")
    args = parser.parse_args()

    import window_matmul  # the authors' kernel; built as in the module docstring
    import window_matmul_kernel

    source = model_source(args.sce_git)
    assert source.count(SEP_BUG) == 1, "the [SEP] padding code changed; check the patch"
    tmp = Path(tempfile.mkdtemp())
    original = load_module("original_sparse_cross_encoder", source, tmp)
    patched = load_module("original_sparse_cross_encoder_sep_fix", source.replace(SEP_BUG, SEP_FIX), tmp)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out)
    config = patched.SparseCrossEncoderConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, **CONFIG,
    )
    torch.manual_seed(0)
    patched.SparseCrossEncoderModelForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)

    # score what was saved, loaded back by the original's own from_pretrained
    model = patched.SparseCrossEncoderModelForSequenceClassification.from_pretrained(out).eval()
    scores = score(model, tokenizer)
    unpatched = score(original.SparseCrossEncoderModelForSequenceClassification.from_pretrained(out).eval(), tokenizer)
    model.config.attention_window_size = 0  # the original's truthiness test: 0 means "no window"
    scores_w0 = score(model, tokenizer)
    model.config.attention_window_size = None
    scores_none = score(model, tokenizer)
    assert max(abs(a - b) for r0, rn in zip(scores_w0, scores_none) for a, b in zip(r0, rn)) == 0.0

    record = {
        "pairs": [{"query": q, "documents": docs} for q, docs in PAIRS],
        "scores": scores,
        "scores_window_0": scores_w0,
        "scores_unpatched_original": unpatched,
        "notes": [
            "scores: the original forward (window 4, paper flags) with its [SEP] padding bug patched: the longest "
            "document's length is taken after [SEP] is appended (max_doc_len + 1). Compare against these.",
            "scores_window_0: the same weights with attention_window_size=0, which the original treats as no window "
            "(its `if not any(attention_window_sizes)`); equal to attention_window_size=None there.",
            "scores_unpatched_original: the original at HEAD, unpatched: the longest document of each query's batch "
            "loses its final [SEP]. For information only.",
        ],
        "provenance": {
            "model_code": {"repository": "webis-de/ecir24-sparse-cross-encoder", "commit": git_head(args.sce_git),
                           "file": MODEL_FILE, "class": "SparseCrossEncoderModelForSequenceClassification",
                           "patch": "max_doc_len: input_ids.shape[0] + 1 ([SEP] padding fix)"},
            "kernel": {"repository": "webis-de/pytorch-window-matmul", "commit": git_head(args.wm_git),
                       "build": "setup.py build_ext --inplace, CUDA_HOME unset (C++ CPU kernel)",
                       "module": window_matmul_kernel.__file__.rsplit("/", 1)[-1]},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "seed": 0,
            "script": "experiments/make_original_fixture.py",
        },
    }
    (out / "scores.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"scores": scores, "unpatched": unpatched, "window_0": scores_w0}, indent=1))
    assert window_matmul.window_matmul is not None


if __name__ == "__main__":
    main()
