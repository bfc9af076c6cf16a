"""The ``flex`` backend on CUDA: outputs and q/k/v gradients against the dense backend, a model, a training run.

FlexAttention has a backward on CUDA only (torch <= 2.13), so its gradients are checked here, by
``kernel_src/scripts/gpu_check.sh`` on a lent device. Without CUDA the module is skipped, unless
``SPARSE_CE_REQUIRE_CUDA=1``, which turns that skip into a failure (a device run must never pass by skipping).
The dense backend (masked SDPA, checked against the five-segment oracle in test_layer_patterns.py) is the reference.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_layer_patterns import make_batch
from tiny import make_config, make_tokenizer

from configuration_sparse_ce import DIRECTION_FLAGS
from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from modeling_sparse_ce.attention import ATTENTION_FUNCTIONS
from modeling_sparse_ce.pattern import AttentionPattern
from modeling_sparse_ce.segments import build_segment_layout

if not torch.cuda.is_available():
    if os.environ.get("SPARSE_CE_REQUIRE_CUDA") == "1":
        pytest.fail("SPARSE_CE_REQUIRE_CUDA=1 but torch sees no CUDA device", pytrace=False)
    pytest.skip("no CUDA device", allow_module_level=True)

PAPER = {f: True for f in DIRECTION_FLAGS} | {"query_cls_attention": False, "query_doc_attention": False}
# tolerances against float32 dense: fp32 accumulation order differs (1e-5 relative); bf16 inputs hold 8 bits
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def layouts():
    """(name, query lengths, document lengths, query ids, pattern): shared queries, long documents, odd patterns."""
    odd = AttentionPattern.from_flags(PAPER, 4).matrix
    odd[2][3], odd[4][0] = 1, 0  # [SEP]1 sees the document, [SEP]2 not [CLS]: outside the six-flag family
    return [
        ("paper-100x164", [10] * 100, [151] * 100, [0] * 100, AttentionPattern.from_flags(PAPER, 4)),
        ("paper-1x4096", [10], [4083], [0], AttentionPattern.from_flags(PAPER, 4)),
        ("ragged-w0", [3, 7, 7], [500, 0, 37], [0, 1, 1], AttentionPattern.from_flags(PAPER, 0)),
        ("full-flags-w16", [5, 9], [300, 129], None, AttentionPattern.from_flags({f: True for f in DIRECTION_FLAGS}, 16)),
        ("odd-unlimited", [4, 4], [200, 90], None, AttentionPattern.from_matrix(odd, None)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", layouts(), ids=lambda c: c[0])
def test_flex_outputs_and_gradients_match_dense(case, dtype):
    _, query_lens, doc_lens, query_ids, pattern = case
    ids, types, mask, _ = make_batch(query_lens, doc_lens, query_ids)
    share = query_ids is not None and pattern.query_is_independent
    layout = build_segment_layout(ids.cuda(), mask.cuda(), types.cuda(), share_query=share)
    gen = torch.Generator().manual_seed(0)
    tokens, heads, dim = layout.positions.shape[0], 12, 32
    base = [torch.randn(tokens, heads, dim, generator=gen).cuda() for _ in range(4)]  # q, k, v, upstream gradient
    results = {}
    for backend, run_dtype in (("dense", torch.float32), ("flex", dtype)):
        qkv = [x.to(run_dtype).requires_grad_() for x in base[:3]]
        out = ATTENTION_FUNCTIONS[backend](*qkv, layout, pattern, scaling=dim**-0.5)[0]
        out.backward(base[3].to(run_dtype))
        results[backend] = [out.detach().float(), *[x.grad.float() for x in qkv]]
    tol = TOLERANCE[dtype]
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["flex"], results["dense"]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name} {dtype}: {m}")


def test_auto_runs_flex_on_cuda_and_trains(tmp_path):
    """The model's ``auto`` on CUDA is flex; a short CrossEncoderTrainer run through it lowers the loss."""
    losses, calls = train_through("flex", "cuda", tmp_path)
    assert calls > 0
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]), losses


def train_through(backend: str, device: str, tmp_path) -> tuple[list[float], int]:
    """Train a tiny model (``auto`` backend, no dropout) with CrossEncoderTrainer for 9 steps on ``device``; returns
    the logged losses and how often ``backend``'s function ran (``auto`` must pick it)."""
    import sys

    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    tokenizer = make_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = SparseCrossEncoderForSequenceClassification(make_config(tokenizer, window=4, initializer_range=0.2))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cross_encoder = CrossEncoder(str(tmp_path / "model"), trust_remote_code=True, device=device)
    queries = ["how long do fleas live", "what is wifi", "why is water cold"] * 8
    docs = ["the flea life cycle is long", "wifi and bluetooth", "water heat and cold light"] * 8
    labels = [1.0] * 12 + [0.0] * 12  # first half matching pairs, second half shifted ones
    docs = docs[:12] + docs[13:] + docs[12:13]
    data = Dataset.from_dict({"query": queries, "doc": docs, "label": labels})
    args = CrossEncoderTrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=3, per_device_train_batch_size=8,
                                         learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                         use_cpu=device == "cpu")
    trainer = CrossEncoderTrainer(model=cross_encoder, args=args, train_dataset=data,
                                  loss=BinaryCrossEntropyLoss(cross_encoder))
    # the Hub folder's own attention module (remote code), whose dispatch table the loaded model reads every forward
    attention = sys.modules[type(cross_encoder.model).__module__.rsplit(".", 1)[0] + ".attention"]
    original, calls = attention.ATTENTION_FUNCTIONS[backend], []
    attention.ATTENTION_FUNCTIONS[backend] = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        trainer.train()
    finally:
        attention.ATTENTION_FUNCTIONS[backend] = original
    return [row["loss"] for row in trainer.state.log_history if "loss" in row], len(calls)
