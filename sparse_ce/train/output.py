"""Saving a fine-tuned sparse cross-encoder as a Hub folder with its model card and training record.

The folder is what ``sparse-ce convert`` writes (remote code, tokenizer, config; Schlatt et al., ECIR 2024 pattern
settings in the card), plus ``training.json`` (the command, the recipe, the dev and test scores) and a card section
on how the model was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..eval import evaluate as evaluation
from ..convert import render_model_card


def save(model, output: Path, dtype: str) -> None:
    """Save the trained CrossEncoder ``model`` in the Hub layout (remote code included), the head marked trained.

    With ``dtype`` float16/bfloat16 the safetensors hold that dtype while ``config.json`` keeps ``dtype: float32``,
    so ``from_pretrained`` (dtype "auto") computes in float32 unless the caller asks for half precision.
    """
    hf_model = model.model
    hf_model.config.sparse_ce_untrained_head = False
    if dtype != "float32":
        hf_model.to(getattr(torch, dtype))
    model.save_pretrained(str(output), create_model_card=False)
    if dtype != "float32":
        hf_model.float()
        config_path = output / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_card(output: Path, config, record: dict, model_id: str, extra: list[str] | None = None) -> None:
    """The model card: the settings of ``config``, how the model was trained (``record``, also written to
    ``training.json``), what it scored, and ``extra`` Markdown paragraphs."""
    teacher = f", teacher {record['teacher']}" if record.get("teacher") else ""
    lists = record.get("lists") or {}
    unit = f"list(s) of {lists['list_size']} candidates" if lists.get("list_size") else "examples"
    lines = [
        f"Fine-tuned with `train_st.py` (sentence-transformers `CrossEncoderTrainer`, {record['loss']} loss{teacher}, "
        f"{record.get('score_head', 'cls')} score head) for {record['steps']} steps of {record['batch_size']} "
        f"{unit} × {record['world_size']} device(s), lr {record['lr']}, seed {record['seed']}, on "
        f"{record['train_rows']} training rows from TREC DL 2021/2022 candidates; {record['train_seconds']:.0f} s on "
        f"{record['device']}.",
    ]
    dev = record.get("dev") or {}
    if dev:
        values = ", ".join(f"{v:.4f} over the top-{k.rsplit('top', 1)[-1]}" for k, v in dev.items() if "ndcg" in k)
        lines.append(f"Held-out judged DL21 queries ({record.get('dev_queries', '?')}, never trained on), "
                     f"nDCG@10 re-ranking their BM25 run: {values}.")
    mix = record.get("interpolation")
    if mix:
        lines.append(f"Weights: `{(1 - mix['alpha']):g} × {mix['start']} + {mix['alpha']:g} × {mix['end']}` (weight-space "
                     "interpolation of the two training stages, WiSE-FT; alpha chosen on the dev queries by "
                     "`experiments/interpolate.py`); the command below trained the second.")
    if record.get("test"):
        lines.append(evaluation.markdown_single(record["test"], record["eval_depth"], record["eval_queries"]))
    lines += extra or []
    if getattr(config, "model_type", None) == "sparse_ce_mixencoder":
        from ..precompute.convert import model_card

        card = model_card(config, record["init"], model_id) + "\n## Training\n\n" + "\n\n".join(
            [*lines, f"```bash\n{record['command']}\n```"]) + "\n"
    else:
        card = render_model_card(config, record["init"], record.get("base_model"), model_id, lines, record["command"])
    (output / "README.md").write_text(card, encoding="utf-8")
