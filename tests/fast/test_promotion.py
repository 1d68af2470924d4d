"""Who becomes @champion: clearly better than chance, comparable, and better than the champion."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.config import TrainConfig
from pipeline.registry.promote import (
    CHALLENGER,
    CHAMPION,
    CONTENDS_TAG,
    ERA_TAG,
    NONE,
    SCORE_TAG,
    Scored,
    comparability_key,
    decide,
    eval_protocol,
    rightful_champion,
)
from pipeline.training import checkpoint

SET = "s" * 64
TTA = "val_res=256 crop_ratio=0.875 lr_tta=on"
PLAIN = "val_res=256 crop_ratio=0.875 lr_tta=off"


def scored(version, score, val_set=SET, classes=4, protocol=TTA) -> Scored:
    return Scored(version, score, val_set, classes, protocol)


def test_gate_against_chance():
    decision, why = decide(scored("1", 0.10, classes=10), None)
    assert decision == NONE and "not clearly better than chance" in why and "0.100 for 10" in why
    assert decide(scored("1", 0.21, classes=10), None)[0] == CHAMPION
    assert decide(scored("1", 0.30, classes=10), None, min_val_top1=0.5)[0] == NONE


def test_like_is_compared_with_like():
    champion = scored("1", 0.60)
    assert decide(scored("2", 1.0, "other" * 10, 2), champion)[0] == NONE
    assert decide(scored("2", 1.0), scored("1", 0.6, val_set=None))[0] == NONE
    assert decide(scored("2", 0.70), champion)[0] == CHAMPION
    assert decide(scored("2", 0.60), champion)[0] == CHALLENGER   # a tie keeps the old


@pytest.mark.parametrize("new, champion", [(TTA, PLAIN), (PLAIN, TTA),
                                           (TTA, "val_res=224 crop_ratio=0.875 lr_tta=on"),
                                           (TTA, "val_res=256 crop_ratio=1 lr_tta=on"),
                                           (TTA, None), (None, TTA), (None, None)])
def test_scores_measured_differently_are_never_ranked(new, champion):
    """Flip averaging, another val resolution or crop, or a protocol nobody recorded: the new
    version gets no alias however much higher it scores, and the reason says why."""
    decision, why = decide(scored("2", 0.99, protocol=new), scored("1", 0.30, protocol=champion))
    assert decision == NONE
    assert "another evaluation protocol" in why and "not comparable" in why
    assert f"({new or 'not recorded'}) than champion version 1 ({champion or 'not recorded'})" in why


def test_the_comparability_key_covers_the_val_set_and_the_protocol():
    key = comparability_key(SET, TTA)
    assert key == comparability_key(SET, TTA) and len(key) == 64
    assert len({key, comparability_key("t" * 64, TTA), comparability_key(SET, PLAIN)}) == 3
    assert comparability_key(None, TTA) is None and comparability_key(SET, None) is None
    assert comparability_key("", TTA) is None


def test_the_protocol_is_read_from_the_checkpoint():
    def cfg(**kw):
        return TrainConfig(arch="resnet18", **kw)

    classes = [{"index": 0, "wnid": "n0", "name": "a"}]
    meta = checkpoint.meta(cfg(val_res=160, lr_tta=True), classes, 1, {})
    assert meta["preprocessing"]["lr_tta"] is True
    assert eval_protocol(meta) == "val_res=160 crop_ratio=0.875 lr_tta=on"
    assert eval_protocol(checkpoint.meta(cfg(val_res=160, lr_tta=False), classes, 1, {})) == \
        "val_res=160 crop_ratio=0.875 lr_tta=off"
    # written before meta.json recorded lr_tta: its config says what its validation ran with
    older = checkpoint.meta(cfg(lr_tta=False), classes, 1, {})
    del older["preprocessing"]["lr_tta"]
    assert eval_protocol(older) == "val_res=256 crop_ratio=0.875 lr_tta=off"
    # neither: unknown, so never ranked against a champion
    del older["config"]
    assert eval_protocol(older) is None
    assert eval_protocol({}) is None


def test_a_champion_scored_zero_is_scored_and_none_scores_do_not_crash():
    zero = scored("1", 0.0)
    assert decide(scored("2", 0.60), zero)[0] == CHAMPION
    assert decide(scored("2", None), zero)[0] == NONE
    assert decide(scored("2", 0.6), scored("1", None))[0] == CHAMPION


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
