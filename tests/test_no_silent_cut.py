"""No silent cut (issue 23, item 2): a MixEncoder's query and candidate limits are checked where the sparse model's
are (:class:`PairScorer`): the query is never cut (an error naming the limit), a cut candidate is counted."""

from __future__ import annotations

import pytest
from tiny import make_mixencoder_folder

from sparse_ce.rank import PairScorer
from sparse_ce.rank.scoring import QueryError


@pytest.fixture(scope="module")
def mixencoder(tmp_path_factory) -> PairScorer:
    folder = make_mixencoder_folder(tmp_path_factory.mktemp("mix") / "mix", noise=0.2)
    return PairScorer(str(folder), dtype="float32", progress=False)


def test_limits_are_the_models(mixencoder):
    config = mixencoder.model.config
    assert (mixencoder.max_query_length, mixencoder.max_candidate_length) == (
        config.max_query_length, config.max_candidate_length)
    assert config.max_query_length < config.max_position_embeddings  # so the limit is the query encoder's own


def test_a_query_over_max_query_length_is_refused_never_cut(mixencoder):
    limit = mixencoder.max_query_length
    fits = " ".join(["flea"] * (limit - 2))  # [CLS] q [SEP]: exactly the limit
    scores, _ = mixencoder.score([fits], ["the dog"])
    assert len(scores) == 1
    # the case: queries over the limit that differ only at the end scored identically (cut inside the model)
    for words in (limit - 2, limit + 7, limit + 10):  # + " dog": one over at least
        with pytest.raises(QueryError, match=f"{words + 1} tokens exceed the MixEncoder's max_query_length {limit}"):
            mixencoder.score([" ".join(["flea"] * words) + " dog"], ["the dog"])


def test_a_long_candidate_is_cut_by_the_scorer_and_counted(mixencoder):
    room = mixencoder.max_candidate_length - 2  # [CLS] d [SEP]
    exact, longer = " ".join(["water"] * room), " ".join(["water"] * room + ["cat"] * 5)
    scores, stats = mixencoder.score(["goldfish", "goldfish"], [exact, longer])
    assert (stats.long_documents, stats.truncated) == (1, 1)
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # the counted cut is the only one: the same tokens seen
    different, _ = mixencoder.score(["goldfish"], [" ".join(["water"] * (room - 5) + ["cat"] * 5)])
    assert different[0] != pytest.approx(scores[0], abs=1e-6)  # the tail matters when it fits: the test can fail


def test_a_bi_encoder_teacher_counts_the_texts_it_cuts(tmp_path, caplog):
    from tiny import make_bi_encoder_folder

    from sparse_ce.train.teacher import Teacher

    teacher = Teacher(make_bi_encoder_folder(tmp_path / "bi"))  # max_seq_length 64
    long = " ".join(["water"] * 100)
    with caplog.at_level("WARNING", "sparse_ce.train.teacher"):
        teacher.score(["goldfish", "goldfish"], ["the dog", long])
    assert teacher.cut_texts == 1 and "1 of 3 distinct texts are longer than its max_seq_length 64" in caplog.text
    teacher.score(["goldfish"], ["the dog"])
    assert teacher.cut_texts == 0
