"""Logging of the command line: gmic-jax's own progress at INFO, libraries at WARNING, and the
libraries' known harmless messages dropped.

Dropped (each names its source; nothing else is filtered, so real warnings and errors still show):

* Orbax's ``Given directory is read only=DIR``, printed by every read-only ``CheckpointManager``,
  i.e. every :func:`gmic_jax.load_checkpoint` (reading is what read-only is for);
* Orbax's ``Requested `tracked_metric`; did not provide metrics.``, printed by every training save
  between evaluations (only evaluation steps carry metrics, by design).

JAX's ``Unable to initialize backend 'tpu'`` is an INFO message of ``jax._src.xla_bridge`` (the
probe for a TPU runtime on a machine without one): it shows only when the root logger is at INFO,
which :func:`configure` no longer does.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(name)s: %(message)s"
# (logger name, message prefix) of harmless library messages.
LIBRARY_NOISE = (
    ("absl", "Given directory is read only"),
    ("absl", "Requested `tracked_metric`; did not provide metrics"),
)


class _DropNoise(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not message.startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Drop the messages of :data:`LIBRARY_NOISE` (idempotent; safe to call from library code)."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix in LIBRARY_NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(prefixes))


def configure(level: int = logging.INFO) -> None:
    """The CLI's logging: ``gmic_jax.*`` at ``level``, everything else at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=FORMAT)
    logging.getLogger("gmic_jax").setLevel(level)
    quiet_library_noise()
