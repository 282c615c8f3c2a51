"""The training loop: ``gmic-jax train --config configs/<name>.py --workdir DIR [--config.x=y ...]``.

``train_and_evaluate(config, workdir)`` trains GMIC with the data-parallel step of
:mod:`gmic_jax.train.step`, evaluates every ``eval.every_epochs`` epochs, appends one JSON object
per evaluation to ``WORKDIR/metrics.jsonl`` (keys: step, epoch, train_loss and the ``val_*``
metrics that are defined) and TensorBoard event files to ``WORKDIR/tensorboard``
(:mod:`gmic_jax.train.writers`), checkpoints with Orbax (asynchronously, every
``checkpoint_every_steps`` and at every evaluation, keeping the step ``config.best_metric`` /
``config.best_min_delta`` choose, see :mod:`gmic_jax.train.workdir_checkpoints`) and resumes by itself
from the latest checkpoint in WORKDIR (optimizer, data order, RNG): a run killed at any point and
restarted continues the same trajectory. A resumed run must ask for the config the workdir was
trained with (:mod:`gmic_jax.train.workdir`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from gmic_jax.train.config_lib import ConfigError

log = logging.getLogger("gmic_jax.train")

JSONL_KEYS = (
    "step",
    "epoch",
    "train_loss",
    "val_auc_malignant",
    "val_auc_benign",
    "val_prauc_malignant",
    "val_prauc_benign",
    "val_breast_auc_malignant",
    "val_breast_auc_benign",
    "val_dice_malignant",
    "val_dice_benign",
    "val_pxap_malignant",
    "val_pxap_benign",
    "val_roi_hit_rate",
    "val_pointing_malignant",
    "val_pointing_benign",
    "val_pointing_malignant_random",
    "val_pointing_benign_random",
)
# Test hooks: SIGKILL this process right after starting the (asynchronous) save of this step, or
# once that save is complete (a kill between two checkpoints, at a step the test chooses).
KILL_DURING_SAVE_ENV = "GMIC_TEST_SIGKILL_DURING_SAVE_OF_STEP"
KILL_AFTER_SAVE_ENV = "GMIC_TEST_SIGKILL_AFTER_SAVE_OF_STEP"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


class DataFailure(RuntimeError):
    """Examples of a step (or of a validation pass) could not be loaded. Training stops rather
    than train or select on other data than the config says; the message names every file and
    what is wrong, the step and the last good checkpoint, from which the run resumes once the
    data is fixed."""

    def __init__(self, step, failures, latest, workdir, where="training"):
        lines = "\n".join(f"  {f}" for f in failures)
        super().__init__(
            f"{len(failures)} {where} example(s) of step {step} could not be loaded:\n{lines}\n"
            f"stopped; last good checkpoint: step {latest} in {workdir}"
        )


def _merge_init(fresh, loaded, where):
    """Leaves of ``loaded`` replace those of ``fresh`` by path; shapes must match, and every loaded
    leaf must have a place. Leaves missing from ``loaded`` keep their fresh initialisation."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    out = {}
    taken = 0
    for col in ("params", "batch_stats"):
        f = flatten_dict(dict(fresh.get(col, {})))
        given = flatten_dict(dict(loaded.get(col, {})))
        unknown = sorted("/".join(k) for k in given if k not in f)
        if unknown:
            raise ConfigError(
                f"--init-from {where}: {col} keys not in this model: {unknown[:5]}"
                + (" ..." if len(unknown) > 5 else "")
            )
        for k, v in given.items():
            if tuple(np.shape(v)) != tuple(np.shape(f[k])):
                raise ConfigError(
                    f"--init-from {where}: {col}/{'/'.join(k)} has shape {np.shape(v)}, "
                    f"this model needs {np.shape(f[k])}"
                )
            f[k] = np.asarray(v, np.asarray(f[k]).dtype)
            taken += 1
        out[col] = unflatten_dict(f)
    total = sum(len(flatten_dict(dict(fresh.get(c, {})))) for c in ("params", "batch_stats"))
    log.info("initialised %d of %d arrays from %s", taken, total, where)
    return out


def _jsonl_record(step, epoch, train_loss, val_metrics):
    rec = {"step": int(step), "epoch": int(epoch), "train_loss": float(train_loss), **val_metrics}
    return {
        k: rec[k]
        for k in JSONL_KEYS
        if k in rec and rec[k] is not None and not (isinstance(rec[k], float) and math.isnan(rec[k]))
    }


def _read_jsonl(path: Path) -> dict:
    """{step: record} of metrics.jsonl (empty when there is none)."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): r for r in records}


def _describe_devices(mesh) -> str:
    import jax

    devices = list(mesh.devices.flat)
    kinds = sorted({d.platform for d in devices})
    return (
        f"{len(devices)} {'/'.join(kinds)} device(s) in {jax.process_count()} process(es) "
        f"({', '.join(str(d) for d in devices[:8])}{', ...' if len(devices) > 8 else ''})"
    )


def _batch_size_message(batch_size: int, mesh) -> str:
    n = mesh.devices.size
    lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
    sizes = " or ".join(str(b) for b in (lower, upper) if b > 0)
    return (
        f"batch_size={batch_size} is not a multiple of the {n} devices in use ({_describe_devices(mesh)}); "
        f"use a multiple of {n}, e.g. {sizes}, or choose the devices (JAX_PLATFORMS, CUDA_VISIBLE_DEVICES)"
    )


def _truncate_jsonl(path: Path, max_step: int):
    """Drop records of steps after ``max_step`` (written by a run that was killed before its
    checkpoint of that step completed)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    path.write_text("".join(line + "\n" for line in keep))


def train_and_evaluate(
    config, workdir, *, config_changes_ok: bool = False, step_fn=None, step_times: list | None = None
) -> dict:
    """Train as ``config`` says in ``workdir`` (resuming what is there); returns the last metrics
    record. A resumed run whose config differs from the workdir's in a field that changes the
    computation raises :class:`~gmic_jax.train.workdir.WorkdirError` unless ``config_changes_ok``.

    ``step_fn`` replaces the compiled training step ``(state, batch) -> (state, metrics)`` (the
    input benchmark's simulated device). ``step_times``, a list, receives per step this run trains
    {step: its number (1-based), loader_wait_s: waiting for the next batch, step_s: the step until
    its metrics are on the host (the run's first step includes compiling it), host_s: the loop's
    other work since the previous step (for the first, since the loop started)}.
    ``config.profile_steps`` ('FIRST:LAST') writes a profiler trace of those steps to
    WORKDIR/profile (:mod:`gmic_jax.train.profiling`)."""
    from gmic_jax.train.config_lib import check_config, parse_profile_steps
    from gmic_jax.train.distributed import maybe_initialize_distributed

    maybe_initialize_distributed()
    check_config(config)
    import jax

    from gmic_jax import checkpoint as ckpt_lib
    from gmic_jax import executable_cache
    from gmic_jax.augment import tta_augment
    from gmic_jax.config import GMICConfig
    from gmic_jax.data import batch as batch_lib
    from gmic_jax.data.pipeline import FAILURES, load_batches
    from gmic_jax.models import init_variables
    from gmic_jax.train import workdir as workdir_lib
    from gmic_jax.train import workdir_checkpoints
    from gmic_jax.train.defaults import augment_config
    from gmic_jax.train.evaluate import evaluate
    from gmic_jax.train.input import TrainExamples, TrainPlan
    from gmic_jax.train.loss import GAP_MARGIN
    from gmic_jax.train.profiling import LoopProfile, profile_dir
    from gmic_jax.train.sampling import make_sources, source_labels, steps_per_epoch
    from gmic_jax.train.state import create_train_state, learning_rate_schedule, make_optimizer
    from gmic_jax.train.step import local_copy, make_mesh, make_train_step, make_window_fn, replicate, shard_array
    from gmic_jax.train.writers import MetricWriters

    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0

    model_cfg = GMICConfig.from_dict(config.model.to_dict())
    train_src, val_src, preprocessing = make_sources(config.data)
    labels = source_labels(train_src)
    mesh = make_mesh()
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    B = int(config.batch_size)
    if B % n_dev:
        raise ConfigError(_batch_size_message(B, mesh))
    if is_main:
        log.info("devices: %s; batch_size %d = %d per device", _describe_devices(mesh), B, B // n_dev)
    try:
        spe = steps_per_epoch(labels, B, config.data.balanced_sampling)
    except ValueError as e:
        raise ConfigError(f"batch_size={B}: {e}") from None
    total_steps = spe * int(config.num_epochs)
    tx = make_optimizer(config.optimizer, total_steps)
    augment = augment_config(config)

    rule = ckpt_lib.SelectionRule(config.best_metric, config.best_min_delta)
    resume = workdir_lib.check(
        workdir,
        {
            "model": model_cfg.to_dict(),
            "preprocessing": preprocessing.to_dict(),
            "train": config.to_dict(),
            ckpt_lib.SELECTION_KEY: rule.to_dict(),
        },
        steps_per_epoch=spe,
        config_changes_ok=config_changes_ok,
    )
    loaded = ckpt_lib.load_checkpoint(config.init_from)[1] if config.init_from else None  # before compiling
    variables = init_variables(model_cfg, jax.random.key(config.seed))
    variables = jax.tree.map(np.asarray, dict(variables))
    if loaded is not None:
        variables = _merge_init(variables, loaded, config.init_from)
    if is_main:  # the first write to WORKDIR: every check above has passed
        workdir_lib.record(workdir, resume)
    state = replicate(create_train_state(variables, tx, config.seed), mesh)

    manager = workdir_checkpoints.make_manager(
        workdir, keep_latest=config.keep_latest, rule=rule, keep_evaluated=config.keep_evaluated
    )
    data_template = {
        "epoch": np.zeros((), np.int64),
        "loss_sum": np.zeros((), np.float64),
        "loss_count": np.zeros((), np.int64),
    }
    restored = workdir_checkpoints.restore(manager, state, data_template)
    loss_sum, loss_count = 0.0, 0
    if restored is not None:
        state, pos = restored
        loss_sum, loss_count = float(pos["loss_sum"]), int(pos["loss_count"])
        log.info("resumed from %s at step %d", workdir, int(local_copy(state.step)))
    start = int(local_copy(state.step))
    writers = MetricWriters(workdir, is_main, start_step=start)
    if is_main:
        _truncate_jsonl(writers.path, start)
    evaluated = _read_jsonl(writers.path) if is_main else {}  # step -> record: what the kept step is chosen from
    lr_at = learning_rate_schedule(config.optimizer, total_steps)

    if step_fn is None:
        step_fn = make_train_step(
            model_cfg,
            tx,
            mesh,
            beta=config.loss.beta,
            saliency_reduction=config.loss.saliency_reduction,
            batch_norm=config.batch_norm,
            augment=augment,
            normalization=config.data.normalization,
            gap_weight=config.loss.get("gap_weight", 0.0),
            gap_margin=config.loss.get("gap_margin", GAP_MARGIN),
        )
        # Later runs of the same config and code load this executable instead of tracing the step.
        salt = f"{config.to_json_best_effort(sort_keys=True)}\n{model_cfg!r}\ntotal_steps={total_steps}"
        step_fn = executable_cache.cached(step_fn, "train_step", salt)
    plan = TrainPlan(
        labels,
        batch_size=B,
        steps_per_epoch=spe,
        num_steps=total_steps,
        seed=config.seed,
        balanced=config.data.balanced_sampling,
        process_index=jax.process_index(),
        process_count=n_proc,
    )
    examples = TrainExamples(train_src, seed=config.seed, window_noise=config.data.window_noise)
    # Window noise: the batches carry each draw's context band and crop borders; this program makes
    # the windows from them on the device, ahead of the step.
    windows = make_window_fn(model_cfg.image_shape, mesh) if config.data.window_noise else None
    workers = int(config.data.workers)

    def data_position(step):
        return {"epoch": np.int64(step // spe), "loss_sum": np.float64(loss_sum), "loss_count": np.int64(loss_count)}

    kill_step = int(os.environ.get(KILL_DURING_SAVE_ENV, "-1"))
    kill_after_step = int(os.environ.get(KILL_AFTER_SAVE_ENV, "-1"))
    bar = None
    if config.progress_bar and is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="train", dynamic_ncols=True)
    last_record: dict = {}
    t0 = time.time()
    # Batches of this process's rows from `start` on (the step is the data position), loaded by
    # `workers` processes and put on device ahead of use.
    batches = load_batches(plan, examples, workers=workers, start=start, put=functools.partial(shard_array, mesh=mesh))
    batch = None
    every = int(config.eval.every_epochs)  # <= 0: no evaluation
    waited = 0.0  # seconds spent waiting for batches since the last log line (at t_log)
    # Annotations of the loop's phases, and the trace of config.profile_steps (train/profiling.py).
    profile = LoopProfile(
        parse_profile_steps(config.get("profile_steps", "")),
        profile_dir(workdir, jax.process_index(), n_proc),
        first_step=start + 1,
        total_steps=total_steps,
    )
    t_step = t_log = time.perf_counter()
    try:
        for step in range(start, total_steps):
            profile.begin(step + 1)
            t_start = time.perf_counter()
            with profile.phase("loader_wait"):
                batch = next(batches)
            t_batch = time.perf_counter()
            if batch[FAILURES]:
                manager.wait_until_finished()
                raise DataFailure(step + 1, batch[FAILURES], manager.latest_step(), workdir)
            with profile.phase("step_fn"):  # dispatch, and the device's work until the metrics are here
                inputs = {k: batch[k] for k in batch_lib.TRAIN_KEYS if k in batch}
                state, m = step_fn(state, inputs if windows is None else windows(inputs))
                m = local_copy(m)
            t_previous, t_step = t_step, time.perf_counter()
            waited += t_batch - t_start
            if step_times is not None:  # host: from the last step's end (the loop's start) to this batch's request
                step_times.append(
                    {
                        "step": step + 1,
                        "loader_wait_s": t_batch - t_start,
                        "step_s": t_step - t_batch,
                        "host_s": t_start - t_previous,
                    }
                )
            if not bool(m["finite"]):
                manager.wait_until_finished()
                latest = manager.latest_step()
                raise TrainingDiverged(
                    f"non-finite loss or gradient at step {step + 1} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}): stopped; parameters not updated; "
                    f"last good checkpoint: step {latest} in {workdir}"
                )
            loss_sum += float(m["loss"])
            loss_count += 1
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}")
            if done % config.log_every_steps == 0:
                writers.train_step(done, {"loss": m["loss"], "grad_norm": m["grad_norm"], "learning_rate": lr_at(step)})
                if bar is None and is_main:
                    log.info(
                        "step %d/%d loss %.4f (%.2f s/step, %.0f%% of it waiting for data)",
                        done,
                        total_steps,
                        float(m["loss"]),
                        (time.time() - t0) / (done - start),
                        100 * waited / max(time.perf_counter() - t_log, 1e-9),
                    )
                waited, t_log = 0.0, time.perf_counter()
            epoch_end = done % spe == 0
            epoch = done // spe
            if epoch_end and every > 0 and (epoch % every == 0 or done == total_steps):
                with profile.phase("evaluate"):
                    val, details = evaluate(
                        model_cfg,
                        local_copy(state.variables),
                        val_src,
                        mesh,
                        batch_size=config.eval.batch_size,
                        normalization=config.data.normalization,
                        prediction=config.eval.prediction,
                        augment=tta_augment(config.augment),
                        tta_draws=config.eval.tta_draws,
                        seed=config.seed,
                        workers=workers,
                    )
                if details["failures"]:
                    manager.wait_until_finished()
                    raise DataFailure(done, details["failures"], manager.latest_step(), workdir, "validation")
                record = _jsonl_record(done, epoch, loss_sum / max(loss_count, 1), val)
                loss_sum, loss_count = 0.0, 0
                head_aucs = {k: float(v) for k, v in details.items() if k.startswith("auc_")}
                writers.evaluation(record, head_aucs)
                last_record = record
                heads = " ".join(f"{k}={v:.3f}" for k, v in head_aucs.items() if "malignant" in k)
                msg = (
                    f"epoch {epoch} step {done}: "
                    + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
                    + f" | {heads}"
                )
                evaluated[done] = record
                kept = rule.select(evaluated) if is_main else None
                if kept is not None:
                    msg += f"\nkept as the run's checkpoint: step {kept.step} ({kept.reason})"
                (bar.write(msg) if bar is not None else log.info(msg))
                with profile.phase("checkpoint"):
                    workdir_checkpoints.save(manager, state, data_position(done), metrics=val)
            elif done % config.checkpoint_every_steps == 0 or done == total_steps:
                with profile.phase("checkpoint"):
                    workdir_checkpoints.save(manager, state, data_position(done))
            if done == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if done == kill_after_step:
                manager.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            profile.end(done)
    finally:
        profile.close()  # the trace taken so far is written, also when the loop stops on an error
        batch = None  # released before the pipeline closes (its memory is shared with a worker)
        batches.close()
    manager.wait_until_finished()
    manager.close()
    writers.close()
    if bar is not None:
        bar.close()
    log.info("trained steps %d..%d in %.1f s", start, total_steps, time.time() - t0)
    kept = ckpt_lib.select_checkpoint(workdir)  # in every process: Orbax readers may synchronise them
    if is_main:
        log.info("load_checkpoint(%s) (predict, evaluate) uses step %d: %s", workdir, kept.step, kept.reason)
    if not last_record and writers.path.exists():  # nothing left to train: report the last evaluation
        lines = writers.path.read_text().splitlines()
        last_record = json.loads(lines[-1]) if lines else {}
    return last_record


# ------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file (configs/<name>.py[:arg])")
    parser.add_argument("--workdir", required=True, help="output directory; a run resumes from what it holds")
    parser.add_argument(
        "--init-from",
        default=None,
        help="start from this checkpoint directory (converted model or pretrained global network)",
    )
    parser.add_argument(
        "--config-changes-ok",
        action="store_true",
        help="resume WORKDIR although the config differs from its config.json in fields that change "
        "the computation (logged and recorded in config.json's history)",
    )
    parser.epilog = (
        "Override any config field with --config.FIELD=VALUE (e.g. --config.optimizer.learning_rate=3e-4). "
        "Devices: all that JAX sees (choose with JAX_PLATFORMS=cpu|cuda, CUDA_VISIBLE_DEVICES); "
        "batch_size must be a multiple of their number."
    )


def parse_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The declared arguments plus any number of --config.FIELD=VALUE overrides."""
    from gmic_jax.train.config_lib import split_config_args

    ns, rest = parser.parse_known_args(argv)
    try:
        rest, overrides = split_config_args(rest)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    ns.config_overrides = overrides
    return ns


def main(args) -> int:
    """Exit 0 when trained; 2 for a mistake in the command or config (one line, nothing written);
    1 when the data, a checkpoint or the run fails."""
    from gmic_jax import logs
    from gmic_jax.checkpoint import CheckpointError
    from gmic_jax.data.image import DataError
    from gmic_jax.train.config_lib import apply_overrides, load_config

    logs.configure()
    try:
        config = load_config(args.config)
        apply_overrides(config, getattr(args, "config_overrides", []))
        if args.init_from:
            config.init_from = args.init_from
        record = train_and_evaluate(config, args.workdir, config_changes_ok=getattr(args, "config_changes_ok", False))
    except ConfigError as e:  # includes WorkdirError
        print(f"gmic-jax train: error: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, TrainingDiverged, DataFailure) as e:
        print(f"gmic-jax train: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(record, sort_keys=True))
    return 0
