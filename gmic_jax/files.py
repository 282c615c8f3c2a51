"""Writing outputs safely: atomic file writes and the failure report of a batch job.

A reader (or a killed run) never sees half a file: everything is written to a temporary file
beside its destination and renamed over it. Batch commands (preprocess, cache, predict) report
bad inputs the same way: one ``error: ...`` line per failure on stderr, the same lines in
``failures.txt`` beside the outputs, exit status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Union

FAILURES_TXT = "failures.txt"


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that pick the format from it
    work) that becomes ``path`` when the block succeeds; removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path, data: Union[str, bytes]) -> None:
    """Write text (UTF-8) or bytes to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def write_failures(directory, failures: Iterable) -> Path:
    """``directory/failures.txt``: one line per failure (its ``str``, which names the file and the
    problem)."""
    path = Path(directory) / FAILURES_TXT
    write_atomic(path, "".join(f"{e}\n" for e in failures))
    return path


def print_failures(failures: Iterable, stream=None) -> None:
    """One ``error: ...`` line per failure on ``stream`` (stderr)."""
    stream = stream or sys.stderr
    for e in failures:
        print(f"error: {e}", file=stream)
