"""evaluate and predict say what they made and from what: evaluate's metrics.json names the split it
scored (every metric key, the figure's title) and the checkpoint step it loaded and why; predict's
run.json names every ensemble member's step and why. Through the `gmic-jax` command line, on the
shared tiny training run (tests/conftest.py `tiny_run`: steps 4 and 6 saved, 6 evaluated).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gmic_jax.checkpoint import ASKED_FOR, SelectionRule, select_checkpoint

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = "synthetic:num=8"  # the model's window (128, 96) and the synthetic data it was trained on
RECORD_FIELDS = {
    "split",
    "num_images",
    "prediction",
    "tta_draws",
    "data",
    "checkpoint",
    "checkpoint_step",
    "checkpoint_selection",
    "command",
    "versions",
    "recorded_split",
    "failed_images",
}
HEAD_AUCS = {f"auc_{head}_{cls}" for head in ("global", "local", "fusion") for cls in ("benign", "malignant")}


def _cli(env, *args, code=0):
    r = subprocess.run(
        [sys.executable, "-m", "gmic_jax.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert r.returncode == code, r.stderr[-3000:]
    return r


def _evaluate(env, checkpoint, out, *extra, data=SYNTHETIC):
    r = _cli(env, "evaluate", "--checkpoint", checkpoint, "--data", data, "--output", out, *extra)
    return json.loads((out / "metrics.json").read_text()), r.stderr


def _metric_keys(report) -> set:
    return set(report) - RECORD_FIELDS


def _title(out) -> str:
    return Image.open(out / "roc_pr.png").text["Title"]


def test_evaluate_names_the_split_the_step_and_why(tiny_run, train_env, tmp_path):
    workdir, _ = tiny_run
    kept = select_checkpoint(workdir)
    assert kept.step == 6
    report, log = _evaluate(train_env, workdir, tmp_path / "kept")
    keys = _metric_keys(report)
    assert {"test_auc_malignant", "test_roi_hit_rate", "test_auc_global_malignant"} <= keys
    assert all(k.startswith("test_") for k in keys), sorted(keys)
    assert report["split"] == "test" and report["num_images"] == 8
    assert report["checkpoint_step"] == 6 and report["checkpoint"] == str(workdir)
    selection = report["checkpoint_selection"]
    assert selection["reason"] == kept.reason and selection["rule"] == SelectionRule.DESCRIPTION
    assert (selection["metric"], selection["min_delta"], selection["value"]) == ("val_auc_malignant", 0.0, kept.value)
    assert report["command"] == [
        "gmic-jax",
        "evaluate",
        "--checkpoint",
        str(workdir),
        "--data",
        SYNTHETIC,
        "--output",
        str(tmp_path / "kept"),
    ]
    assert report["versions"]["jax"] and report["versions"]["gmic-jax"]
    assert f"step 6 ({kept.reason})" in log and "split 'test'" in log
    assert "Given directory is read only" not in log and "Unable to initialize backend" not in log
    assert "step 6" in _title(tmp_path / "kept") and "split test" in _title(tmp_path / "kept")

    # --step: another step, recorded as asked for.
    other, log = _evaluate(train_env, workdir, tmp_path / "step4", "--step", "4")
    assert other["checkpoint_step"] == 4 and other["checkpoint_selection"] == {"rule": ASKED_FOR, "reason": ASKED_FOR}
    assert "step 4" in log and "step 4" in _title(tmp_path / "step4")

    # The validation split: training's own keys, and its numbers for the same images and step.
    val, _ = _evaluate(train_env, workdir, tmp_path / "val", "--split", "val")
    record = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 6 and val["split"] == "val"
    trained = {k for k in record if k.startswith("val_")}
    heads = {k for k in _metric_keys(val) if k.removeprefix("val_") in HEAD_AUCS}  # defined ones: one class may lack
    assert _metric_keys(val) - heads == trained and "val_auc_fusion_malignant" in heads
    for k in trained:
        assert val[k] == pytest.approx(record[k], abs=1e-6), k


def _cache(tmp_path, env):
    """`gmic-jax cache --split test` of four tiny mammograms at the tiny model's window."""
    from gmic_jax.data.image import write_png
    from gmic_jax.data.testing import breast_image

    rows = ["path,patient,laterality,view,benign,malignant,split\n"]
    for i, (benign, malignant) in enumerate([(0, 1), (1, 0), (0, 0), (1, 1)]):
        write_png(tmp_path / f"{i}.png", breast_image(300, 220, seed=i, points_right=i % 2 == 0))
        rows.append(f"{i}.png,p{i // 2},{'LR'[i % 2]},{('CC', 'MLO')[i // 2]},{benign},{malignant},test\n")
    (tmp_path / "data.csv").write_text("".join(rows))
    cache = tmp_path / "cache"
    _cli(
        env,
        "cache",
        "--source",
        "manifest",
        "--manifest",
        tmp_path / "data.csv",
        "--split",
        "test",
        "--window-shape",
        "128",
        "96",
        "--iterations",
        "2",
        "--output",
        cache,
        "--no-progress",
    )
    return cache


def test_evaluate_on_a_cache_uses_the_split_it_records_or_the_one_named(tiny_run, train_env, tmp_path):
    workdir, _ = tiny_run
    cache = _cache(tmp_path, train_env)
    report, _ = _evaluate(train_env, workdir, tmp_path / "recorded", data=f"cache:{cache}")
    assert report["split"] == "test" and "recorded_split" not in report and report["num_images"] == 4
    assert "test_auc_malignant" in report and all(k.startswith("test_") for k in _metric_keys(report))

    # A cache that records no split (a manifest cached without --split holds all it lists): named by --split.
    unnamed = tmp_path / "unnamed"
    shutil.copytree(cache, unnamed)
    index = json.loads((unnamed / "index.json").read_text())
    index["metadata"]["split"] = None
    (unnamed / "index.json").write_text(json.dumps(index))
    r = _cli(
        train_env,
        "evaluate",
        "--checkpoint",
        workdir,
        "--data",
        f"cache:{unnamed}",
        "--output",
        tmp_path / "refused",
        code=2,
    )
    assert "records no split" in r.stderr and "--split NAME" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "refused").exists()
    named, _ = _evaluate(train_env, workdir, tmp_path / "named", "--split", "heldout", data=f"cache:{unnamed}")
    assert named["split"] == "heldout" and all(k.startswith("heldout_") for k in _metric_keys(named))
    assert {k.removeprefix("heldout_"): v for k, v in named.items() if k in _metric_keys(named)} == {
        k.removeprefix("test_"): v for k, v in report.items() if k in _metric_keys(report)
    }


def test_split_names_of_synthetic_data_and_caches():
    from gmic_jax.data.synthetic import SyntheticLesions
    from gmic_jax.train.evaluate import parse_data_spec, split_name

    class Cache:
        cache_dir = "c"

        def __init__(self, split):
            self.metadata = {"split": split}

    assert split_name(Cache("test"), None) == ("test", None)
    assert split_name(Cache("test"), "val") == ("val", "test")  # named otherwise: what it records is kept
    with pytest.raises(ValueError, match="records no split"):
        split_name(Cache(None), None)
    with pytest.raises(ValueError, match="a split name is"):
        split_name(Cache(None), "test set")
    shape = (64, 48)
    assert parse_data_spec("synthetic:num=2", shape).split == "test"
    assert parse_data_spec("synthetic:num=2", shape, split="val").split == "val"
    source = parse_data_spec("synthetic:num=2,split=train", shape, split="train")
    assert isinstance(source, SyntheticLesions) and split_name(source, "train") == ("train", None)
    with pytest.raises(ValueError, match="give one of them"):
        parse_data_spec("synthetic:num=2,split=train", shape, split="test")


def test_predict_records_each_members_step_and_what_it_wrote(tiny_run, train_env, tmp_path):
    workdir, _ = tiny_run
    member = tmp_path / "member"  # the same run without its evaluated step: the latest (4) is loaded
    shutil.copytree(workdir, member)
    shutil.rmtree(member / "6")
    out = tmp_path / "out"
    args = [
        "predict",
        "--synthetic",
        "1",
        "--checkpoint",
        workdir,
        "--checkpoint",
        member,
        "--output",
        out,
        "--no-progress",
    ]
    r = _cli(train_env, *args)
    run = json.loads((out / "run.json").read_text())
    members = [select_checkpoint(d) for d in (workdir, member)]
    assert [c["checkpoint"] for c in run["checkpoints"]] == [str(workdir), str(member)]
    assert [c["checkpoint_step"] for c in run["checkpoints"]] == [6, 4] == [m.step for m in members]
    assert [c["checkpoint_selection"]["reason"] for c in run["checkpoints"]] == [m.reason for m in members]
    assert "latest saved step" in members[1].reason and run["checkpoints"][1]["checkpoint_selection"]["rule"]
    assert run["command"] == ["gmic-jax", *map(str, args)] and run["versions"]["jax"]
    assert (run["num_exams"], run["num_images"], run["num_failures"]) == (1, 4, 0)
    assert run["inputs"] == {"synthetic": 1} and run["tta"] == 0
    written = sorted(p.name + "/" * p.is_dir() for p in out.iterdir())
    assert sorted(run["outputs"]) == written and "failures.txt" not in written
    assert f"{workdir}: step 6 ({members[0].reason})" in r.stderr and f"{member}: step 4" in r.stderr
    assert "Given directory is read only" not in r.stderr
    assert "run.json" in r.stdout.strip().splitlines()[-1]
