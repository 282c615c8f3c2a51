"""The training loop behind ``gmic-jax train`` (its command line: :mod:`gmic_jax.train.main`).

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

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from tqdm import tqdm

from gmic_jax import checkpoint as ckpt_lib
from gmic_jax import executable_cache
from gmic_jax.augment import tta_augment
from gmic_jax.config import GMICConfig
from gmic_jax.data import batch as batch_lib
from gmic_jax.data.image import DataError
from gmic_jax.data.pipeline import FAILURES, load_batches
from gmic_jax.models import init_variables
from gmic_jax.train import workdir as workdir_lib
from gmic_jax.train import workdir_checkpoints
from gmic_jax.train.config_check import check_config
from gmic_jax.train.config_lib import ConfigError, parse_profile_steps
from gmic_jax.train.defaults import GAP_MARGIN, GAP_WEIGHT, augment_config
from gmic_jax.train.distributed import maybe_initialize_distributed
from gmic_jax.train.evaluate import evaluate
from gmic_jax.train.input import TrainExamples, TrainPlan
from gmic_jax.train.profiling import LoopProfile, profile_dir
from gmic_jax.train.sampling import make_sources, source_labels, steps_per_epoch
from gmic_jax.train.state import create_train_state, learning_rate_schedule, make_optimizer
from gmic_jax.train.step import local_copy, make_mesh, make_train_step, make_window_fn, replicate, shard_array
from gmic_jax.train.writers import MetricWriters, jsonl_record, read_jsonl, truncate_jsonl

log = logging.getLogger("gmic_jax.train")


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


# What fails a run on its data, a checkpoint or its own numbers (``gmic-jax train`` exits 1).
RUN_FAILURES = (DataError, ckpt_lib.CheckpointError, TrainingDiverged, DataFailure)


def _merge_init(fresh, loaded, where):
    """Leaves of ``loaded`` replace those of ``fresh`` by path; shapes must match, and every loaded
    leaf must have a place. Leaves missing from ``loaded`` keep their fresh initialisation."""
    merged = {}
    taken = 0
    for col in ("params", "batch_stats"):
        initial = flatten_dict(dict(fresh.get(col, {})))
        given = flatten_dict(dict(loaded.get(col, {})))
        unknown = sorted("/".join(k) for k in given if k not in initial)
        if unknown:
            raise ConfigError(
                f"--init-from {where}: {col} keys not in this model: {unknown[:5]}"
                + (" ..." if len(unknown) > 5 else "")
            )
        for k, v in given.items():
            if tuple(np.shape(v)) != tuple(np.shape(initial[k])):
                raise ConfigError(
                    f"--init-from {where}: {col}/{'/'.join(k)} has shape {np.shape(v)}, "
                    f"this model needs {np.shape(initial[k])}"
                )
            initial[k] = np.asarray(v, np.asarray(initial[k]).dtype)
            taken += 1
        merged[col] = unflatten_dict(initial)
    total = sum(len(flatten_dict(dict(fresh.get(c, {})))) for c in ("params", "batch_stats"))
    log.info("initialised %d of %d arrays from %s", taken, total, where)
    return merged


def _describe_devices(mesh) -> str:
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


@dataclasses.dataclass
class StepReport:
    """What a hook sees after each step the loop trains (``hook(step, report)``, ``step`` 1-based)."""

    state: Any  # the train state after the step (device arrays)
    metrics: dict  # the step's metrics on the host: loss, grad_norm, finite, ...
    loader_wait_s: float  # waiting for the step's batch
    step_s: float  # the step until its metrics were on the host (the run's first step includes compiling it)
    host_s: float  # the loop's other work since the previous step (for the first, since the loop started)
    checkpoints: Any  # the Orbax CheckpointManager; its saves are asynchronous (``wait_until_finished()``)


# A hook: ``hook(step, report)`` after every step the loop trains, once that step's evaluation and
# checkpoint have been started. A hook with a ``wrap_train_step(train_step) -> train_step`` method
# may also replace or wrap the compiled step ``(state, batch) -> (state, metrics)`` before the loop
# (a benchmark's simulated device).
Hook = Callable[[int, StepReport], None]


class StepTimes(list):
    """A hook that keeps, per step, {step, loader_wait_s, step_s, host_s} (see :class:`StepReport`)."""

    def __call__(self, step: int, report: StepReport) -> None:
        self.append(
            {"step": step, "loader_wait_s": report.loader_wait_s, "step_s": report.step_s, "host_s": report.host_s}
        )


@dataclasses.dataclass
class _Run:
    """A training run once set up: what the loop and its evaluations read, and the running loss."""

    config: Any
    workdir: Path
    is_main: bool
    model_config: GMICConfig
    val_source: Any
    mesh: Any
    steps_per_epoch: int
    total_steps: int
    rule: ckpt_lib.SelectionRule
    manager: Any
    state: Any
    learning_rate_at: Callable
    plan: TrainPlan
    examples: TrainExamples
    windows: Callable | None
    # Set by _resume and _train_step, once the state is restored:
    start_step: int = 0
    writers: MetricWriters | None = None
    evaluated: dict = dataclasses.field(default_factory=dict)  # step -> metrics.jsonl record (selection)
    train_step: Callable | None = None
    loss_sum: float = 0.0
    loss_count: int = 0
    bar: Any = None
    last_record: dict = dataclasses.field(default_factory=dict)

    def data_position(self, step: int) -> dict:
        return {
            "epoch": np.int64(step // self.steps_per_epoch),
            "loss_sum": np.float64(self.loss_sum),
            "loss_count": np.int64(self.loss_count),
        }

    def say(self, message: str) -> None:
        (self.bar.write(message) if self.bar is not None else log.info(message))


def train_and_evaluate(config, workdir, *, config_changes_ok: bool = False, hooks: Sequence[Hook] = ()) -> dict:
    """Train as ``config`` says in ``workdir`` (resuming what is there); returns the last metrics
    record. A resumed run whose config differs from the workdir's in a field that changes the
    computation raises :class:`~gmic_jax.train.workdir.WorkdirError` unless ``config_changes_ok``.

    ``hooks`` (see :data:`Hook`) are called after every step the loop trains: how tests and
    benchmarks observe the loop (:class:`StepTimes`) or stop it at a chosen step.
    ``config.profile_steps`` ('FIRST:LAST') writes a profiler trace of those steps to
    WORKDIR/profile (:mod:`gmic_jax.train.profiling`)."""
    maybe_initialize_distributed()
    check_config(config)
    run = _set_up(config, Path(workdir).absolute(), config_changes_ok, hooks)
    t0 = time.time()
    _train(run, hooks, t0)
    return _finish(run, t0)


def _set_up(config, workdir: Path, config_changes_ok: bool, hooks: Sequence[Hook]) -> _Run:
    """Check the config against the devices and the workdir, then build (or restore) the state."""
    is_main = jax.process_index() == 0
    model_config = GMICConfig.from_dict(config.model.to_dict())
    train_source, val_source, preprocessing = make_sources(config.data)
    labels = source_labels(train_source)
    mesh = make_mesh()
    devices, batch_size = mesh.devices.size, int(config.batch_size)
    if batch_size % devices:
        raise ConfigError(_batch_size_message(batch_size, mesh))
    if is_main:
        log.info(
            "devices: %s; batch_size %d = %d per device", _describe_devices(mesh), batch_size, batch_size // devices
        )
    try:
        epoch_steps = steps_per_epoch(labels, batch_size, config.data.balanced_sampling)
    except ValueError as e:
        raise ConfigError(f"batch_size={batch_size}: {e}") from None
    total_steps = epoch_steps * int(config.num_epochs)
    optimizer = make_optimizer(config.optimizer, total_steps)
    rule = ckpt_lib.SelectionRule(config.best_metric, config.best_min_delta)
    requested = {
        "model": model_config.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "train": config.to_dict(),
        ckpt_lib.SELECTION_KEY: rule.to_dict(),
    }
    resume = workdir_lib.check(workdir, requested, steps_per_epoch=epoch_steps, config_changes_ok=config_changes_ok)
    variables = _initial_variables(config, model_config)
    if is_main:  # the first write to WORKDIR: every check above has passed
        workdir_lib.record(workdir, resume)
    state = replicate(create_train_state(variables, optimizer, config.seed), mesh)
    manager = workdir_checkpoints.make_manager(
        workdir, keep_latest=config.keep_latest, rule=rule, keep_evaluated=config.keep_evaluated
    )
    run = _Run(
        config=config,
        workdir=workdir,
        is_main=is_main,
        model_config=model_config,
        val_source=val_source,
        mesh=mesh,
        steps_per_epoch=epoch_steps,
        total_steps=total_steps,
        rule=rule,
        manager=manager,
        state=state,
        learning_rate_at=learning_rate_schedule(config.optimizer, total_steps),
        plan=TrainPlan(
            labels,
            batch_size=batch_size,
            steps_per_epoch=epoch_steps,
            num_steps=total_steps,
            seed=config.seed,
            balanced=config.data.balanced_sampling,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ),
        examples=TrainExamples(train_source, seed=config.seed, window_noise=config.data.window_noise),
        # Window noise: the batches carry each draw's context band and crop borders; this program
        # makes the windows from them on the device, ahead of the step.
        windows=make_window_fn(model_config.image_shape, mesh) if config.data.window_noise else None,
    )
    _resume(run)
    run.train_step = _train_step(run, optimizer, hooks)
    return run


def _initial_variables(config, model_config: GMICConfig) -> dict:
    """Fresh variables from the seed, with those of ``config.init_from`` (if any) in their place."""
    loaded = ckpt_lib.load_checkpoint(config.init_from)[1] if config.init_from else None  # before compiling
    variables = init_variables(model_config, jax.random.key(config.seed))
    variables = jax.tree.map(np.asarray, dict(variables))
    if loaded is not None:
        variables = _merge_init(variables, loaded, config.init_from)
    return variables


def _resume(run: _Run) -> None:
    """The state, running loss and metrics records of WORKDIR's latest step (if any)."""
    data_template = {
        "epoch": np.zeros((), np.int64),
        "loss_sum": np.zeros((), np.float64),
        "loss_count": np.zeros((), np.int64),
    }
    restored = workdir_checkpoints.restore(run.manager, run.state, data_template)
    if restored is not None:
        run.state, position = restored
        run.loss_sum, run.loss_count = float(position["loss_sum"]), int(position["loss_count"])
        log.info("resumed from %s at step %d", run.workdir, int(local_copy(run.state.step)))
    run.start_step = int(local_copy(run.state.step))
    run.writers = MetricWriters(run.workdir, run.is_main, start_step=run.start_step)
    if run.is_main:
        truncate_jsonl(run.writers.path, run.start_step)
    run.evaluated = read_jsonl(run.writers.path) if run.is_main else {}


def _train_step(run: _Run, optimizer, hooks: Sequence[Hook]) -> Callable:
    """The compiled step ``(state, batch) -> (state, metrics)``, as the hooks wrap it."""
    config = run.config
    train_step = make_train_step(
        run.model_config,
        optimizer,
        run.mesh,
        beta=config.loss.beta,
        saliency_reduction=config.loss.saliency_reduction,
        batch_norm=config.batch_norm,
        augment=augment_config(config),
        normalization=config.data.normalization,
        gap_weight=config.loss.get("gap_weight", GAP_WEIGHT),
        gap_margin=config.loss.get("gap_margin", GAP_MARGIN),
    )
    for hook in hooks:
        wrap = getattr(hook, "wrap_train_step", None)
        if wrap is not None:
            train_step = wrap(train_step)
    # Later runs of the same config and code load this executable instead of tracing the step.
    salt = f"{config.to_json_best_effort(sort_keys=True)}\n{run.model_config!r}\ntotal_steps={run.total_steps}"
    return executable_cache.cached(train_step, "train_step", salt)


def _train(run: _Run, hooks: Sequence[Hook], t0: float) -> None:
    """Steps ``start_step`` to ``total_steps``: train, log, evaluate, checkpoint, call the hooks."""
    config, start = run.config, run.start_step
    if config.progress_bar and run.is_main:
        run.bar = tqdm(total=run.total_steps, initial=start, desc="train", dynamic_ncols=True)
    # Batches of this process's rows from `start` on (the step is the data position), loaded by
    # `data.workers` processes and put on device ahead of use.
    put = functools.partial(shard_array, mesh=run.mesh)
    batches = load_batches(run.plan, run.examples, workers=int(config.data.workers), start=start, put=put)
    batch = None
    waited = 0.0  # seconds spent waiting for batches since the last log line (at t_log)
    # Annotations of the loop's phases, and the trace of config.profile_steps (train/profiling.py).
    profile = LoopProfile(
        parse_profile_steps(config.get("profile_steps", "")),
        profile_dir(run.workdir, jax.process_index(), jax.process_count()),
        first_step=start + 1,
        total_steps=run.total_steps,
    )
    t_step = t_log = time.perf_counter()
    try:
        for step in range(start, run.total_steps):
            profile.begin(step + 1)
            t_start = time.perf_counter()
            with profile.phase("loader_wait"):
                batch = next(batches)
            t_batch = time.perf_counter()
            if batch[FAILURES]:
                run.manager.wait_until_finished()
                raise DataFailure(step + 1, batch[FAILURES], run.manager.latest_step(), run.workdir)
            with profile.phase("step_fn"):  # dispatch, and the device's work until the metrics are here
                inputs = {k: batch[k] for k in batch_lib.TRAIN_KEYS if k in batch}
                run.state, metrics = run.train_step(run.state, inputs if run.windows is None else run.windows(inputs))
                metrics = local_copy(metrics)
            t_previous, t_step = t_step, time.perf_counter()
            waited += t_batch - t_start
            trained = step + 1  # the number of steps trained, and this step's number (1-based)
            _account(run, trained, metrics)
            if trained % config.log_every_steps == 0:
                _log_progress(run, trained, metrics, t0, waited / max(time.perf_counter() - t_log, 1e-9))
                waited, t_log = 0.0, time.perf_counter()
            _evaluate_or_save(run, trained, profile)
            report = StepReport(
                run.state, metrics, t_batch - t_start, t_step - t_batch, t_start - t_previous, run.manager
            )
            for hook in hooks:
                hook(trained, report)
            profile.end(trained)
    finally:
        profile.close()  # the trace taken so far is written, also when the loop stops on an error
        batch = None  # released before the pipeline closes (its memory is shared with a worker)
        batches.close()


def _account(run: _Run, trained: int, metrics: dict) -> None:
    """Stop on a non-finite step; add its loss to the running sum since the last evaluation."""
    if not bool(metrics["finite"]):
        run.manager.wait_until_finished()
        latest = run.manager.latest_step()
        raise TrainingDiverged(
            f"non-finite loss or gradient at step {trained} (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}): stopped; parameters not updated; "
            f"last good checkpoint: step {latest} in {run.workdir}"
        )
    run.loss_sum += float(metrics["loss"])
    run.loss_count += 1
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")


def _log_progress(run: _Run, trained: int, metrics: dict, t0: float, waiting_share: float) -> None:
    """The step's scalars to TensorBoard and, without a progress bar, a log line."""
    scalars = {
        "loss": metrics["loss"],
        "grad_norm": metrics["grad_norm"],
        "learning_rate": run.learning_rate_at(trained - 1),
    }
    run.writers.train_step(trained, scalars)
    if run.bar is None and run.is_main:
        log.info(
            "step %d/%d loss %.4f (%.2f s/step, %.0f%% of it waiting for data)",
            trained,
            run.total_steps,
            float(metrics["loss"]),
            (time.time() - t0) / (trained - run.start_step),
            100 * waiting_share,
        )


def _evaluate_or_save(run: _Run, trained: int, profile: LoopProfile) -> None:
    """At the end of every ``eval.every_epochs``-th epoch (and of the last): evaluate, record,
    select and save; otherwise save every ``checkpoint_every_steps`` steps and at the end."""
    every = int(run.config.eval.every_epochs)  # <= 0: no evaluation
    epoch = trained // run.steps_per_epoch
    epoch_end = trained % run.steps_per_epoch == 0
    if epoch_end and every > 0 and (epoch % every == 0 or trained == run.total_steps):
        with profile.phase("evaluate"):
            val, details = _evaluate(run)
        if details["failures"]:
            run.manager.wait_until_finished()
            raise DataFailure(trained, details["failures"], run.manager.latest_step(), run.workdir, "validation")
        _record(run, trained, epoch, val, details)
        with profile.phase("checkpoint"):
            workdir_checkpoints.save(run.manager, run.state, run.data_position(trained), metrics=val)
    elif trained % run.config.checkpoint_every_steps == 0 or trained == run.total_steps:
        with profile.phase("checkpoint"):
            workdir_checkpoints.save(run.manager, run.state, run.data_position(trained))


def _evaluate(run: _Run) -> tuple[dict, dict]:
    config = run.config
    return evaluate(
        run.model_config,
        local_copy(run.state.variables),
        run.val_source,
        run.mesh,
        batch_size=config.eval.batch_size,
        normalization=config.data.normalization,
        prediction=config.eval.prediction,
        augment=tta_augment(config.augment),
        tta_draws=config.eval.tta_draws,
        seed=config.seed,
        workers=int(config.data.workers),
    )


def _record(run: _Run, trained: int, epoch: int, val: dict, details: dict) -> None:
    """The evaluation's metrics.jsonl record and TensorBoard scalars; the step the run keeps now."""
    record = jsonl_record(trained, epoch, run.loss_sum / max(run.loss_count, 1), val)
    run.loss_sum, run.loss_count = 0.0, 0
    head_aucs = {k: float(v) for k, v in details.items() if k.startswith("auc_")}
    run.writers.evaluation(record, head_aucs)
    run.last_record = record
    heads = " ".join(f"{k}={v:.3f}" for k, v in head_aucs.items() if "malignant" in k)
    message = (
        f"epoch {epoch} step {trained}: "
        + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        + f" | {heads}"
    )
    run.evaluated[trained] = record
    kept = run.rule.select(run.evaluated) if run.is_main else None
    if kept is not None:
        message += f"\nkept as the run's checkpoint: step {kept.step} ({kept.reason})"
    run.say(message)


def _finish(run: _Run, t0: float) -> dict:
    """Wait for the last checkpoint, close the writers; the last metrics record of the run."""
    run.manager.wait_until_finished()
    run.manager.close()
    run.writers.close()
    if run.bar is not None:
        run.bar.close()
    log.info("trained steps %d..%d in %.1f s", run.start_step, run.total_steps, time.time() - t0)
    kept = ckpt_lib.select_checkpoint(run.workdir)  # in every process: Orbax readers may synchronise them
    if run.is_main:
        log.info("load_checkpoint(%s) (predict, evaluate) uses step %d: %s", run.workdir, kept.step, kept.reason)
    last_record = run.last_record
    if not last_record and run.writers.path.exists():  # nothing left to train: report the last evaluation
        lines = run.writers.path.read_text().splitlines()
        last_record = json.loads(lines[-1]) if lines else {}
    return last_record
