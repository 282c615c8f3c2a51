"""Where a training step's time goes: the loop's phases as profiler annotations, and the
``jax.profiler`` trace of ``config.profile_steps``.

    gmic-jax train --config configs/nyu_paper.py --workdir W --config.profile_steps=10:12

traces steps 10, 11 and 12 (1-based, as the log and metrics.jsonl count them: step N is the N-th
update) into ``W/profile/plugins/profile/<time>/``: ``<host>.xplane.pb`` (TensorBoard's profile
plugin / XProf: ``tensorboard --logdir W/profile``) and ``perfetto_trace.json.gz``
(https://ui.perfetto.dev). A run that resumes after FIRST traces the steps of the range it trains;
one that starts after LAST traces nothing. With several processes each writes its own trace to
``W/profile/process_<index>``.

Every step is a ``StepTraceAnnotation("train_step", step_num=N)`` (the profile plugin's step
boundaries), inside it ``loader_wait`` (waiting for the next batch from the input pipeline),
``step_fn`` (dispatching the compiled step and waiting for its metrics: the device's work),
``checkpoint`` (starting an asynchronous save) and ``evaluate``. The annotations cost next to nothing
when no trace is being taken, so they are always on. Python function calls are not traced (the
profiler's Python tracer is off: a step that compiles makes millions of calls, past the trace's
limit of a million events); the run's first step compiles, so trace later ones.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import jax

log = logging.getLogger("gmic_jax.train")

PROFILE_DIR = "profile"


def profile_dir(workdir, process_index: int = 0, process_count: int = 1) -> Path:
    base = Path(workdir) / PROFILE_DIR
    return base if process_count == 1 else base / f"process_{process_index}"


class LoopProfile:
    """The training loop's annotations and trace. Call :meth:`begin` at the start of each step,
    :meth:`end` at its end and :meth:`close` when the loop leaves (also on an error: it ends any open
    annotation and writes the trace taken so far)."""

    def __init__(self, steps: tuple[int, int] | None, log_dir, *, first_step: int, total_steps: int):
        self.steps = steps
        self.total_steps = total_steps
        self.log_dir = Path(log_dir)
        self.tracing = False
        self.traced: list[int] = []
        self._open: list = []  # annotations entered and not yet exited, innermost last
        if steps is not None:
            first, last = steps
            if last < first_step or first > total_steps:
                log.warning(
                    "profile_steps=%d:%d: this run trains steps %d..%d, none of them is traced",
                    first,
                    last,
                    first_step,
                    total_steps,
                )

    def begin(self, step: int) -> None:
        """Step ``step`` (1-based) starts: the trace starts at the first step of the range."""
        if self.steps is not None and not self.tracing and self.steps[0] <= step <= self.steps[1]:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0  # every Python call: a compiling step fills the trace's 1M events
            jax.profiler.start_trace(str(self.log_dir), create_perfetto_trace=True, profiler_options=options)
            self.tracing = True
            log.info("profiling steps %d..%d into %s", step, min(self.steps[1], self.total_steps), self.log_dir)
        if self.tracing:
            self.traced.append(step)
        self.enter(jax.profiler.StepTraceAnnotation("train_step", step_num=step))

    def end(self, step: int) -> None:
        """Step ``step`` ends: its annotation closes, and the trace after the range's last step."""
        self._exit_all()
        if self.tracing and step >= self.steps[1]:
            self._stop()

    def enter(self, annotation) -> None:
        annotation.__enter__()
        self._open.append(annotation)

    def exit(self) -> None:
        self._open.pop().__exit__(None, None, None)

    @contextlib.contextmanager
    def phase(self, name: str):
        with jax.profiler.TraceAnnotation(name):
            yield

    def close(self) -> None:
        self._exit_all()
        if self.tracing:
            self._stop()

    def _exit_all(self) -> None:
        while self._open:
            self.exit()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.tracing = False
        runs = sorted((self.log_dir / "plugins" / "profile").glob("*"), key=lambda p: p.stat().st_mtime)
        where = runs[-1] if runs else self.log_dir
        log.info(
            "profile of steps %d..%d written to %s (tensorboard --logdir %s, or its perfetto_trace.json.gz "
            "at https://ui.perfetto.dev)",
            self.traced[0],
            self.traced[-1],
            where,
            self.log_dir,
        )
