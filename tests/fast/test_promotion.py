"""Who becomes @champion: clearly better than chance, comparable, and better than the champion."""
from __future__ import annotations

from types import SimpleNamespace

from pipeline.registry.promote import (CHALLENGER, CHAMPION, CONTENDS_TAG, ERA_TAG, NONE, SCORE_TAG,
                                       Scored, decide, rightful_champion)

SET = "s" * 64


def test_gate_against_chance():
    decision, why = decide(Scored("1", 0.10, SET, 10), None)
    assert decision == NONE and "not clearly better than chance" in why and "0.100 for 10" in why
    assert decide(Scored("1", 0.21, SET, 10), None)[0] == CHAMPION
    assert decide(Scored("1", 0.30, SET, 10), None, min_val_top1=0.5)[0] == NONE


def test_like_is_compared_with_like():
    champion = Scored("1", 0.60, SET, 4)
    assert decide(Scored("2", 1.0, "other" * 10, 2), champion)[0] == NONE
    assert decide(Scored("2", 1.0, SET, 4), Scored("1", 0.6, None, 4))[0] == NONE
    assert decide(Scored("2", 0.70, SET, 4), champion)[0] == CHAMPION
    assert decide(Scored("2", 0.60, SET, 4), champion)[0] == CHALLENGER   # a tie keeps the old


def test_a_champion_scored_zero_is_scored_and_none_scores_do_not_crash():
    zero = Scored("1", 0.0, SET, 4)
    assert decide(Scored("2", 0.60, SET, 4), zero)[0] == CHAMPION
    assert decide(Scored("2", None, SET, 4), zero)[0] == NONE
    assert decide(Scored("2", 0.6, SET, 4), Scored("1", None, SET, 4))[0] == CHAMPION


def v(version, score, contends=None, era="0"):
    tags = {SCORE_TAG: str(score)}
    if contends:
        tags.update({CONTENDS_TAG: contends, ERA_TAG: era})
    return SimpleNamespace(version=version, tags=tags)


def test_racing_promotions_agree_on_the_best():
    versions = [v("1", 0.5), v("2", 0.6, "1"), v("3", 0.7, "1"), v("4", 0.65, "3")]
    assert rightful_champion(versions, "1", "0") == "3"      # 4 contended 3 and lost
    versions.append(v("5", 0.8, "3"))
    assert rightful_champion(versions, "1", "0") == "5"
    assert rightful_champion(versions, "none", "0") == "none"
    tie = [v("1", 0.5), v("2", 0.6, "1"), v("3", 0.6, "1")]
    assert rightful_champion(tie, "1", "0") == "2"           # the older of a tie


def test_an_operators_rollback_starts_a_new_era():
    """v3 won against v1 before the operator rolled back to v1: v3 must not come back."""
    versions = [v("1", 0.6), v("2", 0.7, "1", era="0"), v("3", 0.65, "1", era="rollback")]
    assert rightful_champion(versions, "1", "rollback") == "3"
    assert rightful_champion([v("1", 0.6), v("2", 0.7, "1", era="0")], "1", "rollback") == "1"


def test_a_run_without_a_checkpoint_is_not_registered():
    import pytest

    from pipeline.errors import UserError
    from pipeline.registry.promote import register

    with pytest.raises(UserError, match="has no checkpoint"):
        register(None, "m")
