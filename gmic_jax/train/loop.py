"""The training loop: ``gmic-jax train --config configs/<name>.py --workdir DIR [--config.x=y ...]``.

``train_and_evaluate(config, workdir)`` trains GMIC with the data-parallel step of
:mod:`gmic_jax.train.step`, evaluates every ``eval.every_epochs`` epochs, appends one JSON object
per evaluation to ``WORKDIR/metrics.jsonl`` (keys: step, epoch, train_loss and the ``val_*``
metrics that are defined), checkpoints with Orbax (asynchronously, every
``checkpoint_every_steps`` and at every evaluation, keeping the best by val_auc_malignant) and
resumes by itself from the latest checkpoint in WORKDIR (optimizer, data order, RNG): a run killed
at any point and restarted continues the same trajectory.
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

log = logging.getLogger("gmic_jax.train")

JSONL_KEYS = ("step", "epoch", "train_loss", "val_auc_malignant", "val_auc_benign", "val_prauc_malignant",
              "val_prauc_benign", "val_breast_auc_malignant", "val_breast_auc_benign", "val_dice_malignant",
              "val_dice_benign", "val_pxap_malignant", "val_pxap_benign", "val_roi_hit_rate")
# Test hook: SIGKILL this process right after starting the (asynchronous) save of this step.
KILL_DURING_SAVE_ENV = "GMIC_TEST_SIGKILL_DURING_SAVE_OF_STEP"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


class DataFailure(RuntimeError):
    """Examples of a step (or of a validation pass) could not be loaded. Training stops rather
    than train or select on other data than the config says; the message names every file and
    what is wrong, the step and the last good checkpoint, from which the run resumes once the
    data is fixed."""

    def __init__(self, step, failures, latest, workdir, where="training"):
        lines = "\n".join(f"  {f}" for f in failures)
        super().__init__(f"{len(failures)} {where} example(s) of step {step} could not be loaded:\n{lines}\n"
                         f"stopped; last good checkpoint: step {latest} in {workdir}")


def _merge_init(fresh, loaded, where):
    """Leaves of ``loaded`` replace those of ``fresh`` by path; shapes must match, and every loaded
    leaf must have a place. Leaves missing from ``loaded`` keep their fresh initialisation."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    out = {}
    taken = 0
    for col in ("params", "batch_stats"):
        f = flatten_dict(dict(fresh.get(col, {})))
        l = flatten_dict(dict(loaded.get(col, {})))
        unknown = sorted("/".join(k) for k in l if k not in f)
        if unknown:
            raise ValueError(f"--init-from {where}: {col} keys not in this model: {unknown[:5]}"
                             + (" ..." if len(unknown) > 5 else ""))
        for k, v in l.items():
            if tuple(np.shape(v)) != tuple(np.shape(f[k])):
                raise ValueError(f"--init-from {where}: {col}/{'/'.join(k)} has shape {np.shape(v)}, "
                                 f"this model needs {np.shape(f[k])}")
            f[k] = np.asarray(v, np.asarray(f[k]).dtype)
            taken += 1
        out[col] = unflatten_dict(f)
    total = sum(len(flatten_dict(dict(fresh.get(c, {})))) for c in ("params", "batch_stats"))
    log.info("initialised %d of %d arrays from %s", taken, total, where)
    return out


def _jsonl_record(step, epoch, train_loss, val_metrics):
    rec = {"step": int(step), "epoch": int(epoch), "train_loss": float(train_loss), **val_metrics}
    return {k: rec[k] for k in JSONL_KEYS if k in rec and rec[k] is not None
            and not (isinstance(rec[k], float) and math.isnan(rec[k]))}


def _truncate_jsonl(path: Path, max_step: int):
    """Drop records of steps after ``max_step`` (written by a run that was killed before its
    checkpoint of that step completed)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    path.write_text("".join(line + "\n" for line in keep))


class _Writers:
    """metrics.jsonl, plus TensorBoard when a writer library is installed (process 0 only)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if enabled:
            for mod in ("tensorboardX", "torch.utils.tensorboard"):
                try:
                    self.tb = __import__(mod, fromlist=["SummaryWriter"]).SummaryWriter(str(workdir / "tensorboard"))
                    break
                except Exception:
                    continue

    def write(self, record: dict):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def scalar(self, name, value, step):
        if self.enabled and self.tb is not None:
            self.tb.add_scalar(name, value, step)


def train_and_evaluate(config, workdir, *, step_fn=None, step_times: list | None = None) -> dict:
    """Train as ``config`` says in ``workdir`` (resuming what is there); returns the last metrics record.

    ``step_fn`` replaces the compiled training step ``(state, batch) -> (state, metrics)`` (the
    input benchmark's simulated device). ``step_times``, a list, receives per step
    {loader_wait_s: waiting for the next batch, step_s: the step until its metrics are on the
    host, host_s: the loop's other work}."""
    from gmic_jax.train.distributed import maybe_initialize_distributed

    maybe_initialize_distributed()
    import jax

    from gmic_jax import checkpoint as ckpt_lib
    from gmic_jax.config import GMICConfig
    from gmic_jax.models import init_variables
    from gmic_jax.train import checkpointing
    from gmic_jax.train.defaults import PREDICTIONS, augment_config
    from gmic_jax.train.evaluate import evaluate
    from gmic_jax.data.pipeline import FAILURES, load_batches
    from gmic_jax.train.input import TrainExamples, TrainPlan
    from gmic_jax.train.sampling import make_sources, source_labels, steps_per_epoch
    from gmic_jax.train.state import create_train_state, make_optimizer
    from gmic_jax.train.step import local_copy, make_mesh, make_train_step, replicate, shard_array

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if config.eval.prediction not in PREDICTIONS:
        raise ValueError(f"eval.prediction={config.eval.prediction!r}; expected one of {PREDICTIONS}")

    model_cfg = GMICConfig.from_dict(config.model.to_dict())
    train_src, val_src, preprocessing = make_sources(config.data)
    labels = source_labels(train_src)
    mesh = make_mesh()
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    B = int(config.batch_size)
    if B % n_dev:
        raise ValueError(f"batch_size={B} must be a multiple of the {n_dev} devices")
    spe = steps_per_epoch(labels, B, config.data.balanced_sampling)
    total_steps = spe * int(config.num_epochs)
    tx = make_optimizer(config.optimizer, total_steps)
    augment = augment_config(config)

    if is_main:
        ckpt_lib.write_config(workdir, model_cfg, preprocessing, train=config.to_dict())
    variables = init_variables(model_cfg, jax.random.key(config.seed))
    variables = jax.tree.map(np.asarray, dict(variables))
    if config.init_from:
        _, loaded = ckpt_lib.load_checkpoint(config.init_from)
        variables = _merge_init(variables, loaded, config.init_from)
    state = replicate(create_train_state(variables, tx, config.seed), mesh)

    manager = checkpointing.make_manager(workdir, keep_latest=config.keep_latest)
    data_template = {"epoch": np.zeros((), np.int64), "loss_sum": np.zeros((), np.float64),
                     "loss_count": np.zeros((), np.int64)}
    restored = checkpointing.restore(manager, state, data_template)
    loss_sum, loss_count = 0.0, 0
    if restored is not None:
        state, pos = restored
        loss_sum, loss_count = float(pos["loss_sum"]), int(pos["loss_count"])
        log.info("resumed from %s at step %d", workdir, int(local_copy(state.step)))
    start = int(local_copy(state.step))
    writers = _Writers(workdir, is_main)
    if is_main:
        _truncate_jsonl(writers.path, start)

    if step_fn is None:
        step_fn = make_train_step(model_cfg, tx, mesh, beta=config.loss.beta,
                                  saliency_reduction=config.loss.saliency_reduction, batch_norm=config.batch_norm,
                                  augment=augment, normalization=config.data.normalization)
    plan = TrainPlan(labels, batch_size=B, steps_per_epoch=spe, num_steps=total_steps, seed=config.seed,
                     balanced=config.data.balanced_sampling, process_index=jax.process_index(), process_count=n_proc)
    examples = TrainExamples(train_src, seed=config.seed, window_noise=config.data.window_noise)
    workers = int(config.data.workers)

    def data_position(step):
        return {"epoch": np.int64(step // spe), "loss_sum": np.float64(loss_sum), "loss_count": np.int64(loss_count)}

    kill_step = int(os.environ.get(KILL_DURING_SAVE_ENV, "-1"))
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
    t_step = t_log = time.perf_counter()
    try:
        for step in range(start, total_steps):
            t_start = time.perf_counter()
            batch = next(batches)
            t_batch = time.perf_counter()
            if batch[FAILURES]:
                manager.wait_until_finished()
                raise DataFailure(step + 1, batch[FAILURES], manager.latest_step(), workdir)
            state, m = step_fn(state, {"image": batch["image"], "label": batch["label"]})
            m = local_copy(m)
            t_previous, t_step = t_step, time.perf_counter()
            waited += t_batch - t_start
            if step_times is not None and step > start:  # host: from the last step's end to this batch's request
                step_times.append({"loader_wait_s": t_batch - t_start, "step_s": t_step - t_batch,
                                   "host_s": t_start - t_previous})
            if not bool(m["finite"]):
                manager.wait_until_finished()
                latest = manager.latest_step()
                raise TrainingDiverged(
                    f"non-finite loss or gradient at step {step + 1} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}): stopped; parameters not updated; "
                    f"last good checkpoint: step {latest} in {workdir}")
            loss_sum += float(m["loss"])
            loss_count += 1
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}")
            if done % config.log_every_steps == 0:
                writers.scalar("train/loss_step", float(m["loss"]), done)
                if bar is None and is_main:
                    log.info("step %d/%d loss %.4f (%.2f s/step, %.0f%% of it waiting for data)", done, total_steps,
                             float(m["loss"]), (time.time() - t0) / (done - start),
                             100 * waited / max(time.perf_counter() - t_log, 1e-9))
                waited, t_log = 0.0, time.perf_counter()
            epoch_end = done % spe == 0
            epoch = done // spe
            if epoch_end and every > 0 and (epoch % every == 0 or done == total_steps):
                val, details = evaluate(model_cfg, local_copy(state.variables), val_src, mesh,
                                        batch_size=config.eval.batch_size, normalization=config.data.normalization,
                                        prediction=config.eval.prediction, augment=augment,
                                        tta_draws=config.eval.tta_draws, seed=config.seed, workers=workers)
                if details["failures"]:
                    manager.wait_until_finished()
                    raise DataFailure(done, details["failures"], manager.latest_step(), workdir, "validation")
                record = _jsonl_record(done, epoch, loss_sum / max(loss_count, 1), val)
                loss_sum, loss_count = 0.0, 0
                writers.write(record)
                last_record = record
                heads = " ".join(f"{k}={v:.3f}" for k, v in details.items() if k.startswith("auc_") and "malignant" in k)
                msg = f"epoch {epoch} step {done}: " + " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()) + f" | {heads}"
                (bar.write(msg) if bar is not None else log.info(msg))
                checkpointing.save(manager, state, data_position(done), metrics=val)
            elif done % config.checkpoint_every_steps == 0 or done == total_steps:
                checkpointing.save(manager, state, data_position(done))
            if done == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        batch = None  # released before the pipeline closes (its memory is shared with a worker)
        batches.close()
    manager.wait_until_finished()
    manager.close()
    if bar is not None:
        bar.close()
    log.info("trained steps %d..%d in %.1f s", start, total_steps, time.time() - t0)
    if not last_record and writers.path.exists():  # nothing left to train: report the last evaluation
        lines = writers.path.read_text().splitlines()
        last_record = json.loads(lines[-1]) if lines else {}
    return last_record


# ------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file (configs/<name>.py[:arg])")
    parser.add_argument("--workdir", required=True, help="output directory; a run resumes from what it holds")
    parser.add_argument("--init-from", default=None,
                        help="start from this checkpoint directory (converted model or pretrained global network)")
    parser.epilog = "Override any config field with --config.FIELD=VALUE (e.g. --config.optimizer.learning_rate=3e-4)."


def parse_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The declared arguments plus any number of --config.FIELD=VALUE overrides."""
    from gmic_jax.train.config_lib import split_config_args

    ns, rest = parser.parse_known_args(argv)
    rest, overrides = split_config_args(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    ns.config_overrides = overrides
    return ns


def main(args) -> int:
    from gmic_jax.train.config_lib import apply_overrides, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    try:
        config = load_config(args.config)
        apply_overrides(config, getattr(args, "config_overrides", []))
    except (OSError, KeyError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.init_from:
        config.init_from = args.init_from
    try:
        record = train_and_evaluate(config, args.workdir)
    except (TrainingDiverged, DataFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(record, sort_keys=True))
    return 0
