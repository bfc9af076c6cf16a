"""First stages, topics, corpora, qrels and runs (:mod:`.first_stage`), and the test collections (:mod:`.collections`)."""

from .first_stage import (
    Candidate,
    FirstStage,
    iter_corpus,
    open_text,
    read_corpus,
    read_dl_json,
    read_qrels,
    read_run,
    read_run_first_stage,
    read_topics,
    write_run,
)

__all__ = [
    "Candidate",
    "FirstStage",
    "iter_corpus",
    "open_text",
    "read_corpus",
    "read_dl_json",
    "read_qrels",
    "read_run",
    "read_run_first_stage",
    "read_topics",
    "write_run",
]
