"""The checkpoint a run keeps: the selection rule, Orbax keeping exactly what it needs, and
load_checkpoint picking the step the rule (and so the training log) names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmic_jax import checkpoint as ckpt_lib
from gmic_jax.checkpoint import SelectionRule
from gmic_jax.config import GMICConfig


def _m(v):
    return {"val_auc_malignant": v, "val_dice_malignant": 1.0 - v}


def test_zero_delta_keeps_the_best_and_a_tie_goes_to_the_later_step():
    rule = SelectionRule()
    chosen = rule.select({50: _m(0.9), 100: _m(0.98), 150: _m(0.97)})
    assert (chosen.step, chosen.best_step) == (100, 100) and "best of 3" in chosen.reason
    assert rule.select({50: _m(0.98), 100: _m(0.98)}).step == 100


def test_min_delta_lets_the_later_step_win_within_noise_only():
    # The case: 0.9818 at step 250, 0.9811 at step 600.
    evaluated = {250: _m(0.9818), 300: _m(0.90), 600: _m(0.9811)}
    assert SelectionRule(min_delta=0.0).select(evaluated).step == 250
    chosen = SelectionRule(min_delta=0.005).select(evaluated)
    assert chosen.step == 600 and chosen.best_step == 250
    assert "within best_min_delta 0.005" in chosen.reason and "step 250" in chosen.reason
    # A later step worse by more than min_delta does not win.
    assert SelectionRule(min_delta=0.005).select({250: _m(0.9818), 600: _m(0.975)}).step == 250


def test_other_metric_undefined_values_and_no_metric():
    rule = SelectionRule(metric="val_dice_malignant")
    assert rule.select({1: _m(0.9), 2: _m(0.5)}).step == 2
    assert SelectionRule().select({1: _m(0.7), 2: {"val_auc_malignant": float("nan")}, 3: {}}).step == 1
    assert SelectionRule().select({1: {}, 2: None}) is None
    with pytest.raises(ValueError, match="best_min_delta"):
        SelectionRule(min_delta=-0.1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]), min_size=1, max_size=12),
    st.sampled_from([0.0, 0.05, 0.1, 0.3]),
)
def test_preserving_only_the_chosen_and_best_steps_never_changes_the_choice(values, min_delta):
    """Orbax deletes everything else as steps come; the choice among what is left must be the
    choice among all evaluated steps, at every point of the run."""
    rule = SelectionRule(min_delta=min_delta)
    kept: dict = {}
    for i, v in enumerate(values):
        kept[i] = _m(v)
        kept = {s: m for s, m in kept.items() if s in rule.steps_to_preserve(kept)}
        everything = {j: _m(values[j]) for j in range(i + 1)}
        assert rule.select(kept).step == rule.select(everything).step


def _save_steps(directory, metrics_by_step, rule, keep_evaluated=False, keep_latest=1):
    import orbax.checkpoint as ocp

    from gmic_jax.train import workdir_checkpoints

    ckpt_lib.write_config(directory, GMICConfig(), train={}, **{ckpt_lib.SELECTION_KEY: rule.to_dict()})
    manager = workdir_checkpoints.make_manager(
        directory, keep_latest=keep_latest, asynchronous=False, rule=rule, keep_evaluated=keep_evaluated
    )
    for step, metrics in metrics_by_step.items():
        tree = {"params": {"w": np.full((2,), float(step), np.float32)}, "batch_stats": {}}
        manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    ckpt_lib.VARIABLES_ITEM: ocp.args.StandardSave(tree),
                    workdir_checkpoints.TRAIN_STATE_ITEM: ocp.args.StandardSave({"step": np.int64(step)}),
                }
            ),
            metrics=metrics,
            force=True,
        )
    manager.wait_until_finished()
    manager.close()


def test_orbax_keeps_the_chosen_best_and_latest_and_load_checkpoint_loads_the_chosen(tmp_path):
    rule = SelectionRule(min_delta=0.005)
    history = {10: _m(0.90), 20: _m(0.9818), 25: None, 30: _m(0.95), 40: _m(0.9811), 45: None, 50: _m(0.96)}
    _save_steps(tmp_path, history, rule)
    # 40 is chosen (within 0.005 of 20's 0.9818, later), 20 is the best, 50 the latest.
    assert ckpt_lib.saved_steps(tmp_path) == [20, 40, 50]
    chosen = ckpt_lib.select_checkpoint(tmp_path)
    assert chosen.step == 40 and chosen.step == rule.select({s: m for s, m in history.items() if m}).step
    _, variables = ckpt_lib.load_checkpoint(tmp_path)
    np.testing.assert_array_equal(variables["params"]["w"], [40.0, 40.0])
    # The rule is read from config.json: another recorded rule, another step.
    doc = json.loads((tmp_path / "config.json").read_text())
    doc[ckpt_lib.SELECTION_KEY]["min_delta"] = 0.0
    (tmp_path / "config.json").write_text(json.dumps(doc))
    assert ckpt_lib.select_checkpoint(tmp_path).step == 20
    assert ckpt_lib.select_checkpoint(tmp_path, step=50).reason == "the step asked for"


def test_keep_evaluated_keeps_every_evaluated_step(tmp_path):
    history = {10: _m(0.90), 15: None, 20: _m(0.98), 30: _m(0.95), 35: None}
    _save_steps(tmp_path, history, SelectionRule(), keep_evaluated=True)
    assert ckpt_lib.saved_steps(tmp_path) == [10, 20, 30, 35]
    assert set(ckpt_lib.evaluated_steps(tmp_path)) == {10, 20, 30}
    assert ckpt_lib.select_checkpoint(tmp_path).step == 20


def test_a_checkpoint_without_evaluations_loads_its_latest_step(tmp_path):
    ckpt_lib.save_checkpoint(tmp_path, GMICConfig(), {"params": {"w": np.ones(2)}, "batch_stats": {}}, step=3)
    chosen = ckpt_lib.select_checkpoint(tmp_path)
    assert chosen.step == 3 and "latest" in chosen.reason


def test_a_step_asked_for_is_the_step_loaded(tmp_path):
    """An explicit step wins over the recorded rule and over the latest step, for any saved step."""
    history = {10: _m(0.90), 20: _m(0.98), 30: _m(0.95)}
    _save_steps(tmp_path, history, SelectionRule(), keep_evaluated=True)
    assert ckpt_lib.saved_steps(tmp_path) == [10, 20, 30] and ckpt_lib.select_checkpoint(tmp_path).step == 20
    for step in (10, 20, 30):  # neither the chosen (20) nor the latest (30) alone
        chosen = ckpt_lib.select_checkpoint(tmp_path, step=step)
        assert (chosen.step, chosen.reason) == (step, "the step asked for")
        _, variables = ckpt_lib.load_checkpoint(tmp_path, step=step)
        np.testing.assert_array_equal(variables["params"]["w"], [float(step)] * 2)
