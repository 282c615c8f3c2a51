"""A measure of the suite's teeth: deliberate faults in the model, ROI, loss, resume and data-order
code, and whether the tests meant to guard each one catch it.

    python tests/mutations.py                   # baseline, then every fault; a markdown table at the end
    python tests/mutations.py --list            # the faults and the tests each one is checked with
    python tests/mutations.py --only NAME ...   # some faults only
    python tests/mutations.py --json OUT.json   # the results as JSON as well
    python tests/mutations.py --only NAME --tests NODE_ID ...  # does another test catch it?

A script, not a test module: pytest collects only test_*.py files (pytest.ini: testpaths = tests).

The repository's files (tracked, and untracked ones git does not ignore, as they are in the working
tree) are copied to a temporary directory, with ``shared`` beside the copy pointing at this
repository's ``../shared`` (the parity fixtures). A baseline run first checks that every designated
test passes on the unmutated copy: a fault whose tests already fail there is reported ``baseline
fails`` and not run (its row would mean nothing). Then each fault in turn: its
original snippet must occur exactly once in its file (a fault that no longer applies is reported
``stale``, never skipped), the copy's file gets the faulty snippet, the fault's tests run there
(``python -m pytest -x -q -n 0 -p no:randomly NODE_IDS``, in the copy, which imports the copy's
gmic_jax), and the file is restored. A fault is ``caught`` when its tests fail, ``survived`` when
they pass; ``error`` is a run that neither passed nor failed a test (pytest's exit status not 0 or
1: a designated test no longer exists, a usage error, a timeout). The exit status is 1 when any
fault is not ``caught``.

Not among the faults: dropping the ``stop_gradient`` before patch selection (retrieve_roi's, or the
one on ``patch_locations`` in gmic.py). The selection's outputs are integers, which carry no
gradient in JAX, so without it the parameters' gradients are the same bit for bit (checked on a
small model): no test can tell, and the calls only state the intent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:randomly"]
TIMEOUT_S = 1800  # one pytest run; the slowest designated test (a kill-and-resume training) takes minutes


@dataclasses.dataclass(frozen=True)
class Fault:
    name: str
    path: str  # file, relative to the repository root
    original: str  # must occur exactly once in the file
    faulty: str
    tests: tuple[str, ...]  # pytest node ids (file or file::test[param]) that should catch it
    what: str  # the fault in words


ROI, GMIC_PY, POOLING, ATTENTION = (
    "gmic_jax/models/roi.py",
    "gmic_jax/models/gmic.py",
    "gmic_jax/models/pooling.py",
    "gmic_jax/models/attention.py",
)
ROI_ALGORITHM_1 = "tests/test_roi.py::test_retrieve_roi_matches_numpy_algorithm_1"
PARITY = "tests/test_parity.py::test_outputs_match_original"

FAULTS = (
    Fault(
        "crop_rows_cols_swapped",
        ROI,
        "    r = locations[..., 0] + pad_h\n    c = locations[..., 1] + pad_w\n",
        "    r = locations[..., 1] + pad_h\n    c = locations[..., 0] + pad_w\n",
        ("tests/test_roi.py::test_extract_patches_matches_original_border_rule",),
        "extract_patches reads a location's row as its column and the column as its row",
    ),
    Fault(
        "greedy_mask_not_applied",
        ROI,
        "m = jnp.where(inside, 0.0, m)",
        "m = jnp.where(inside, m, m)",
        (ROI_ALGORITHM_1,),
        "retrieve_roi does not zero a picked window: the same window can be picked K times",
    ),
    Fault(
        "argmax_last_maximum",
        ROI,
        "flat_idx = jnp.argmax(sums.reshape(n, -1), axis=-1)  # first maximum",
        "flat_idx = sums[0].size - 1 - jnp.argmax(sums.reshape(n, -1)[:, ::-1], axis=-1)",
        (ROI_ALGORITHM_1,),
        "ties between windows go to the last maximum in row-major order, not the first",
    ),
    Fault(
        "top_t_smallest_values",
        POOLING,
        "return jnp.mean(lax.top_k(flat, k)[0], axis=-1)",
        "return jnp.mean(-lax.top_k(-flat, k)[0], axis=-1)",
        ("tests/test_mutation_checks.py::test_top_t_pooling_is_the_mean_of_the_largest_rounded_t_percent",),
        "top-t pooling averages the t% smallest saliency values",
    ),
    Fault(
        "top_t_count_truncated",
        POOLING,
        "max(1, int(round(h * w * percent_t)))",
        "max(1, int(h * w * percent_t))",
        ("tests/test_mutation_checks.py::test_top_t_pooling_is_the_mean_of_the_largest_rounded_t_percent",),
        "the number of pooled cells is truncated instead of rounded",
    ),
    Fault(
        "attention_softmax_over_batch",
        ATTENTION,
        "alpha = jax.nn.softmax(scores, axis=-1)",
        "alpha = jax.nn.softmax(scores, axis=0)",
        ("tests/test_config_variants.py::test_base_outputs", PARITY),
        "gated attention normalises over the images of the batch instead of over the K patches",
    ),
    Fault(
        "fusion_mean_pool",
        GMIC_PY,
        "global_vec = spatial_max(h_g)",
        "global_vec = jnp.mean(h_g, axis=(1, 2))",
        (PARITY,),
        "y_fusion takes the global average of h_g instead of its global max",
    ),
    Fault(
        "saliency_l1_sign",
        "gmic_jax/train/loss.py",
        '+ beta * parts["saliency_reg"]',
        '- beta * parts["saliency_reg"]',
        ("tests/test_loss.py::test_hand_computed_loss_sum_and_mean_reduction",),
        "the L1 saliency term is subtracted from the loss (it rewards saliency)",
    ),
    Fault(
        "bce_label_columns_swapped",
        "gmic_jax/train/loss.py",
        "binary_cross_entropy(outputs[h], labels).mean()",
        "binary_cross_entropy(outputs[h], labels[:, ::-1]).mean()",
        ("tests/test_loss.py::test_hand_computed_loss_sum_and_mean_reduction",),
        "the heads' BCE compares benign predictions with malignant labels and vice versa",
    ),
    Fault(
        "converter_kernel_hw_swapped",
        "gmic_jax/convert.py",
        "return np.transpose(a, (2, 3, 1, 0))",
        "return np.transpose(a, (3, 2, 1, 0))",
        ("tests/test_convert.py::test_round_trip_is_exact[resnet18]",),
        "converting an original conv kernel (OIHW) to HWIO transposes its spatial axes",
    ),
    Fault(
        "standardize_by_variance",
        "gmic_jax/preprocessing.py",
        "return (x - mean) / jnp.maximum(std, FLOOR)",
        "return (x - mean) / jnp.maximum(std * std, FLOOR)",
        ("tests/test_mutation_checks.py::test_normalize_images_standardizes_each_image",),
        "'standardize' divides by the variance instead of the standard deviation",
    ),
    Fault(
        "mask_cut_at_other_borders",
        "gmic_jax/data/window.py",
        "return window, crop_resized(masks, borders, window_shape, nearest=True)",
        "return window, crop_resized(masks, noise_borders(context.shape, window_at, window_shape, rng, (ny, nx), s),"
        " window_shape, nearest=True)",
        ("tests/test_window_noise.py::test_masks_move_with_the_image",),
        "a window-noise draw cuts the masks at other (freshly drawn) borders than its image",
    ),
    Fault(
        "step_epoch_off_by_one",
        "gmic_jax/train/input.py",
        "epoch, j = divmod(int(step), self.steps_per_epoch)",
        "epoch, j = divmod(int(step) + 1, self.steps_per_epoch)",
        ("tests/test_data_pipeline.py::test_train_plan_is_the_epoch_order_cut_into_process_rows",),
        "the training plan reads step s's batch from position s + 1 of the epoch order",
    ),
    Fault(
        "resumed_batches_shifted_by_one",
        "gmic_jax/data/pipeline.py",
        "ds = ds[start:]",
        "ds = ds[start - 1:]",
        ("tests/test_data_pipeline.py::test_grain_batches_equal_in_process_batches[0]",),
        "a resumed input pipeline starts one batch before the resumed step",
    ),
    Fault(
        "resume_restarts_the_data",
        "gmic_jax/train/loop.py",
        "workers=int(config.data.workers), start=start, put=",
        "workers=int(config.data.workers), start=0, put=",
        ("tests/test_train_resume.py::test_kill_and_resume_is_bitwise_identical",),
        "a resumed training run reads the batches from the first step again",
    ),
    Fault(
        "batch_norm_not_synchronised",
        "gmic_jax/models/layers.py",
        "axis_name = None if self.is_initializing() else self.axis_name",
        "axis_name = None",
        ("tests/test_train_parallel.py::test_four_devices_equal_one_device_with_synchronised_batch_norm",),
        "batch_norm='sync' computes each device's own batch statistics",
    ),
    Fault(
        "tta_mean_over_batch",
        "gmic_jax/train/step.py",
        "out[h] = s / tta_draws",
        "out[h] = jnp.broadcast_to(s.mean(axis=0), s.shape) / tta_draws",
        ("tests/test_mutation_checks.py::test_eval_step_tta_is_each_images_mean_over_its_draws",),
        "the evaluation step's test-time augmentation averages over the batch instead of over the draws",
    ),
    Fault(
        "checkpoint_step_ignored",
        "gmic_jax/checkpoint.py",
        "return Selection(int(step), ASKED_FOR",
        "return Selection(int(max(steps)), ASKED_FOR",
        ("tests/test_checkpoint_selection.py::test_a_step_asked_for_is_the_step_loaded",),
        "load_checkpoint(step=s) loads the latest saved step whatever s",
    ),
)


def repo_files(repo: Path) -> list[str]:
    """The files git tracks or would track (untracked, not ignored) that exist in the working tree."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted(f for f in set(out.split("\0")) if f and (repo / f).is_file())


def make_copy(repo: Path, root: Path) -> Path:
    """The repository's files under root/repo, and root/shared -> repo's ../shared when it exists."""
    copy = root / "repo"
    for f in repo_files(repo):
        dest = copy / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / f, dest)
    shared = repo.parent / "shared"
    if shared.exists():
        (root / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    return copy


def copy_env(copy: Path) -> dict:
    """The tests' environment: the copy's gmic_jax first on the path (also in the subprocesses tests
    start), and no bytecode written (a restored file must not be shadowed by the mutant's .pyc)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def check_imports_copy(copy: Path, env: dict) -> None:
    r = subprocess.run(
        [sys.executable, "-c", "import gmic_jax; print(gmic_jax.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    where = Path(r.stdout.strip()).resolve()
    if copy.resolve() not in where.parents:
        raise SystemExit(f"the copy at {copy} imports gmic_jax from {where}: the results would not be the copy's")


def run_tests(copy: Path, env: dict, tests, first_failure: bool = True) -> tuple[int, float, str]:
    """(pytest's exit status, seconds, its output)."""
    cmd = PYTEST if first_failure else [a for a in PYTEST if a != "-x"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*cmd, *tests], cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timed out after {TIMEOUT_S} s\n{e.stdout or ''}"
    return rc, time.perf_counter() - t0, out


def failed_tests(output: str) -> list[str]:
    """The node ids of the 'FAILED node' and 'ERROR node' lines of pytest's short summary."""
    return [
        line.split(" - ")[0].split(" ", 1)[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))
    ]


def designates(test: str, node: str) -> bool:
    """Whether the node id ``node`` is, or is part of, the designated ``test`` (a file or a test)."""
    return node == test or node.startswith((test + "[", test + "::"))


def tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def run_fault(fault: Fault, copy: Path, env: dict) -> dict:
    path = copy / fault.path
    text = path.read_text()
    count = text.count(fault.original)
    result = {"name": fault.name, "path": fault.path, "tests": list(fault.tests), "what": fault.what}
    if count != 1:
        return {**result, "status": "stale", "seconds": 0.0, "detail": f"original snippet occurs {count} times"}
    path.write_text(text.replace(fault.original, fault.faulty))
    try:
        rc, seconds, output = run_tests(copy, env, fault.tests)
    finally:
        path.write_text(text)
    status = {0: "survived", 1: "caught"}.get(rc, "error")
    failed = failed_tests(output)
    detail = (failed[0] if failed else "") if rc == 1 else "" if rc == 0 else f"pytest exit status {rc}: {tail(output)}"
    return {**result, "status": status, "seconds": round(seconds, 1), "detail": detail}


def markdown_table(results: list[dict], baseline: dict | None) -> str:
    lines = ["| fault | file | result | caught by / detail | time (s) |", "|---|---|---|---|---|"]
    for r in results:
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {r['name']} | {r['path']} | {r['status']} | {detail} | {r['seconds']:.1f} |")
    total = sum(r["seconds"] for r in results)
    counts = {
        s: sum(r["status"] == s for r in results) for s in ("caught", "survived", "stale", "error", "baseline fails")
    }
    lines.append("")
    lines.append(
        f"{counts['caught']} of {len(results)} caught, {counts['survived']} survived, "
        f"{counts['stale']} stale, {counts['error']} errors, {counts['baseline fails']} not run (their "
        f"tests fail unmutated); faults {total:.0f} s" + (f", baseline {baseline['seconds']:.0f} s" if baseline else "")
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these faults only")
    parser.add_argument("--list", action="store_true", help="list the faults and their tests, run nothing")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument(
        "--tests",
        nargs="+",
        metavar="NODE_ID",
        help="check the faults against these pytest node ids instead of their own tests",
    )
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="do not first check that the designated tests pass unmutated (the result is then "
        "only as good as that check done before)",
    )
    args = parser.parse_args(argv)

    faults = FAULTS
    if args.only:
        unknown = sorted(set(args.only) - {f.name for f in FAULTS})
        if unknown:
            parser.error(f"unknown fault(s) {unknown}; --list shows them")
        faults = tuple(f for f in FAULTS if f.name in args.only)
    if args.tests:
        faults = tuple(dataclasses.replace(f, tests=tuple(args.tests)) for f in faults)
    if args.list:
        for f in faults:
            print(f"{f.name}  ({f.path}): {f.what}\n    " + "\n    ".join(f.tests))
        return 0

    with tempfile.TemporaryDirectory(prefix="gmic-mutations-") as tmp:
        copy = make_copy(REPO, Path(tmp))
        env = copy_env(copy)
        check_imports_copy(copy, env)
        print(f"copy of {REPO} in {copy}", flush=True)
        baseline, failing = None, []
        if not args.skip_baseline:
            tests = list(dict.fromkeys(t for f in faults for t in f.tests))
            rc, seconds, output = run_tests(copy, env, tests, first_failure=False)
            failing = failed_tests(output)
            baseline = {
                "status": "passed" if rc == 0 else f"failed (pytest exit status {rc})",
                "seconds": round(seconds, 1),
                "tests": tests,
                "failed": failing,
            }
            print(f"baseline: {baseline['status']} in {seconds:.0f} s", flush=True)
            if rc != 0:
                print(tail(output, 40))
            if rc not in (0, 1) or (rc == 1 and not failing):  # no verdict on the tests: not found, timeout, ...
                if args.json:
                    Path(args.json).write_text(json.dumps({"baseline": baseline, "faults": []}, indent=1))
                return 1
        results = []
        for f in faults:
            broken = [n for n in failing if any(designates(t, n) for t in f.tests)]
            if broken:
                r = {
                    "name": f.name,
                    "path": f.path,
                    "tests": list(f.tests),
                    "what": f.what,
                    "status": "baseline fails",
                    "seconds": 0.0,
                    "detail": "fails unmutated: " + ", ".join(broken),
                }
            else:
                r = run_fault(f, copy, env)
            print(f"{f.name}: {r['status']} ({r['seconds']:.0f} s) {r['detail'][:300]}", flush=True)
            results.append(r)
    print()
    print(markdown_table(results, baseline))
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": baseline, "faults": results}, indent=1))
    return 0 if all(r["status"] == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
