"""What the benchmark programs share: the unit (an exam of 4 images) and the model config of a
worker spec, worker processes pinned to cores, resident-memory measurement, versions and hardware
names, timing statistics, and the JAX loss / training step.

Importing jax starts no backend: XLA_FLAGS and JAX_PLATFORMS reach the workers through the
environment the parent spawns them with (`worker_env`), and `gmic_jax.xla_flags.apply_cpu_defaults`
still takes effect in a worker that imported this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax._src import monitoring

from gmic_jax import GMICConfig, init_variables
from gmic_jax.convert import variables_to_state_dict
from gmic_jax.train.loss import gmic_loss

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SHARED_REFERENCE = REPO.parent / "shared" / "reference"
IMAGES_PER_EXAM = 4
UNIT = "exam of 4 images"

# Where the model's parameters belong in the parameter counts (original state_dict prefixes and
# the Flax top-level module names alike).
GLOBAL_PREFIXES = ("ds_net", "left_postprocess_net")
LOCAL_PREFIXES = ("dn_resnet",)


# ----------------------------------------------------------------------------- processes
def parse_cores(text: str | None, threads: int) -> list[int]:
    """CPU ids to pin to: '0-1,4' -> [0, 1, 4]; default: the first `threads` CPUs this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if not text:
        if threads > len(allowed):
            raise ValueError(f"--threads {threads} but this process may only run on {len(allowed)} CPUs {allowed}")
        return allowed[:threads]
    cores: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    missing = sorted(set(cores) - set(allowed))
    if missing:
        raise ValueError(f"--cores {text}: CPUs {missing} are not available to this process (allowed: {allowed})")
    return cores


def model_spec(args) -> dict:
    """A worker's model and batch from the command line's --image-shape, --crop-shape, --K,
    --percent-t, --dtype, --remat and --batch-exams (one value each)."""
    return {
        "image_shape": list(args.image_shape),
        "crop_shape": list(args.crop_shape),
        "K": args.K,
        "percent_t": args.percent_t,
        "dtype": args.dtype,
        "remat": args.remat,
        "batch_exams": args.batch_exams,
    }


def make_config(spec: dict) -> GMICConfig:
    """The GMICConfig of a worker spec (image and crop shape, K, percent_t, dtype, remat)."""
    return GMICConfig(
        image_shape=tuple(spec["image_shape"]),
        crop_shape=tuple(spec["crop_shape"]),
        K=spec["K"],
        percent_t=spec["percent_t"],
        dtype=spec["dtype"],
        remat=spec.get("remat", "none"),
    )


def worker_env(threads: int, device: str, xla_flags: str = "", extra: Mapping[str, str] | None = None) -> dict:
    """Environment of a worker: one thread count for every library, the JAX platform, XLA flags."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NPROC"):
        env[var] = str(threads)
    # On GPU the CPU backend stays too: XLA's cost analysis of a program before optimisation runs there.
    env["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda,cpu"}[device]
    if device == "gpu":  # several workers share the GPU; each allocates what it uses
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
    if flags:
        env["XLA_FLAGS"] = flags
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(BENCH_DIR), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class Worker:
    """A benchmark worker: `python SCRIPT --worker SPEC_JSON`, pinned to `cores`, speaking one JSON
    object per line on its stdin/stdout. Its stderr goes to `log_path`, shown when it fails."""

    def __init__(
        self, script: Path, spec: Mapping[str, Any], cores: Sequence[int], env: Mapping[str, str], log_path: Path
    ):
        self.name = f"{spec.get('impl', '?')}/{spec.get('phase', '?')}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        cpus = set(cores)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=dict(env),
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(
                f"benchmark worker {self.name} exited with code {self.proc.returncode}; "
                f"its log ({self.log_path}) ends with:\n{tail(self.log_path)}"
            )
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"benchmark worker {self.name} failed: {msg['error']}\n{tail(self.log_path)}")
        return msg

    def call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def serve(handler: Callable[[dict], dict], ready: Callable[[], dict]) -> int:
    """Worker side of `Worker`: stdout carries only the protocol (stray prints go to stderr)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg):
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    try:
        send(ready())
        for line in sys.stdin:
            msg = json.loads(line)
            if msg["cmd"] == "quit":
                break
            send(handler(msg))
    except Exception as e:  # reported to the parent, which names the worker and shows its log
        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


# ----------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def process_memory(pid: int) -> dict[str, int]:
    """Resident memory of process `pid` now and its high-water mark (since the process started or
    last reset it through /proc/PID/clear_refs, as `ResidentRise` does), in bytes."""
    return {"rss_bytes": _status_kb("VmRSS", pid), "hwm_bytes": _status_kb("VmHWM", pid)}


def malloc_trim() -> None:
    """Give freed heap memory back to the OS, so the baseline before a step is the live set."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ResidentRise:
    """Rise of resident memory (bytes) during the `with` block: peak RSS inside it minus the RSS
    at its start, after freed heap memory has been returned to the OS. The peak comes from the
    kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs), or, where that cannot
    be reset, from sampling RSS every millisecond."""

    def __enter__(self):
        gc.collect()
        malloc_trim()
        self.baseline = rss_bytes()
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampling"
            self._peak = self.baseline
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = max(self._peak, rss_bytes())
        else:
            peak = _status_kb("VmHWM")
        self.peak = peak
        self.rise = peak - self.baseline
        return False


# ----------------------------------------------------------------------------- reporting
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_identity() -> dict:
    """The CPU as /proc/cpuinfo names it: model name, family and model numbers, and whether its
    flags include AMX (amx_tile / amx_bf16 / amx_int8) and AVX-512. Two Xeons of one model name
    can differ in both, and the speed of XLA's and PyTorch's CPU kernels with them."""
    info = {"name": cpu_model(), "family": None, "model": None, "amx": False, "avx512": False, "amx_flags": []}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "cpu family" and info["family"] is None:
                info["family"] = int(value)
            elif key == "model" and info["model"] is None:
                info["model"] = int(value)
            elif key == "flags":
                flags = value.split()
                info["amx_flags"] = sorted(f for f in flags if f.startswith("amx"))
                info["amx"] = bool(info["amx_flags"])
                info["avx512"] = "avx512f" in flags
                break
    return info


def cpu_name(info: dict | None = None) -> str:
    """'Intel(R) Xeon(R) Processor (family 6 model 207, AVX-512, no AMX)'."""
    info = info or cpu_identity()
    parts = [f"family {info['family']} model {info['model']}"] if info["family"] is not None else []
    parts.append("AVX-512" if info["avx512"] else "no AVX-512")
    parts.append(f"AMX ({', '.join(info['amx_flags'])})" if info["amx"] else "no AMX")
    return f"{info['name']} ({', '.join(parts)})"


# The JAX GPU plugin and the CUDA libraries it runs on, named in the versions of a GPU run.
GPU_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")


def versions(with_torch: bool = False, extra: Sequence[str] = ()) -> dict[str, str]:
    out = {"python": platform.python_version()}
    names = ["jax", "jaxlib", "flax", "optax", "numpy", "gmic-jax"]
    if with_torch:
        names += ["torch", "torchvision"]
    for name in [*names, *extra]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in names:  # the `extra` ones are named only where installed
                out[name] = "not installed"
    out["os"] = f"{platform.system()} {platform.release()}"
    return out


def gpu_count() -> int:
    """GPUs JAX sees, asked in a subprocess with every platform allowed (so this process never
    claims GPU memory); 0 when none, or when JAX does not answer within 2 minutes."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import jax; print(sum(d.platform == 'gpu' for d in jax.devices()))"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JAX_PLATFORMS": ""},
        )
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return 0


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """Median and spread (interquartile range; max - min below 4 values) of the runs."""
    values = sorted(values)
    med = statistics.median(values)
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4, method="inclusive")
        return med, q[2] - q[0]
    return med, values[-1] - values[0]


# ----------------------------------------------------------------------------- JAX side
class CompileCacheEvents:
    """Whether the compilations inside the block went through JAX's persistent compilation cache:
    `status` is "off" (not used), "hit" (every cache lookup hit) or "miss"."""

    def __enter__(self):
        self.events: list[str] = []
        self._listener = lambda event, **kw: self.events.append(event)
        jax.monitoring.register_event_listener(self._listener)
        return self

    def __exit__(self, *exc):
        monitoring.unregister_event_listener(self._listener)
        return False

    @property
    def status(self) -> str:
        lookups = self.events.count("/jax/compilation_cache/compile_requests_use_cache")
        if not lookups:
            return "off"
        return "hit" if self.events.count("/jax/compilation_cache/cache_hits") >= lookups else "miss"


def param_counts(flat: Mapping[str, int]) -> dict[str, int]:
    """{'params', 'params_global', 'params_local', 'params_heads'} from {dotted name: size}."""
    out = {"params_global": 0, "params_local": 0, "params_heads": 0}
    for name, size in flat.items():
        part = (
            "params_global"
            if name.startswith(GLOBAL_PREFIXES)
            else "params_local"
            if name.startswith(LOCAL_PREFIXES)
            else "params_heads"
        )
        out[part] += int(size)
    out["params"] = sum(out.values())
    return out


def jax_param_counts(params) -> dict[str, int]:
    flat = {
        ".".join(str(getattr(k, "key", k)) for k in path): leaf.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    return param_counts(flat)


def make_grad_fn(model, *, train: bool = True):
    """(params, batch_stats, x, y, rng) -> ((loss, new batch_stats), grads): forward + backward of
    the training loss without the saliency regulariser (beta = 0: the three heads' BCE, as the
    reference gradients), BatchNorm on batch statistics when `train`."""

    def loss_fn(params, batch_stats, x, y, rng):
        variables = {"params": params, "batch_stats": batch_stats}
        if train:
            out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"roi": rng})
            return gmic_loss(out, y, beta=0.0)[0], updates["batch_stats"]
        out = model.apply(variables, x, train=False, rngs={"roi": rng})
        return gmic_loss(out, y, beta=0.0)[0], batch_stats

    return jax.value_and_grad(loss_fn, has_aux=True)


def targets(n_images: int):
    """Fixed labels for the benchmarks: benign = 1, malignant = 0 (those of the reference gradients)."""
    return np.tile(np.array([[1.0, 0.0]], np.float32), (n_images, 1))


def benchmark_weights(config, seed: int = 0) -> tuple[dict, str]:
    """Weights both implementations load, as an original state_dict of numpy arrays: the reference
    recipe's (non-trivial BatchNorm statistics, sigmoids out of saturation) when ../shared is
    beside the repo and the local network is the original's ResNet-18, else our model's random
    initialisation mapped to the original's layout."""
    recipe = SHARED_REFERENCE / "recipe.py"
    if recipe.is_file() and config.local_net == "resnet18":
        sys.path.insert(0, str(SHARED_REFERENCE))
        try:
            import recipe as reference_recipe
        finally:
            sys.path.remove(str(SHARED_REFERENCE))
        return reference_recipe.reference_weights(seed), f"reference_weights({seed}) of {recipe}"
    variables = jax.device_get(init_variables(config, jax.random.key(seed)))
    return variables_to_state_dict(variables), f"gmic_jax.init_variables(seed={seed})"
