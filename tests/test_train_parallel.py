"""Data parallelism in subprocesses (the rest of the suite keeps one device):

* the shard_map step on 4 forced CPU devices equals the single-device step on the same global
  batch (synchronised BatchNorm) within 1e-5, while per-device BatchNorm really differs;
* two processes joined by jax.distributed on localhost, each feeding its own half of every
  global batch, train a few steps and agree with each other and with one process;
* `gmic-jax train` started as a 2-task SLURM job would start it (faked SLURM_* variables, no
  JAX_* ones) joins the two processes by itself, each loading only its rows, and trains what one
  process on two devices trains, bit for bit (its checkpoint loads in one process); one task, or
  GMIC_JAX_DISTRIBUTED=off, means no jax.distributed at all.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

COMMON = textwrap.dedent("""
    import json, sys
    import numpy as np
    import optax
    import jax
    from gmic_jax import GMICConfig, init_variables
    from gmic_jax.augment import AugmentConfig
    from gmic_jax.train.state import create_train_state
    from gmic_jax.train.step import make_mesh, make_train_step, replicate, shard_batch

    CFG = GMICConfig(percent_t=0.1, K=2, crop_shape=(32, 32), image_shape=(128, 96), rotate_crops=False)
    VARIABLES = jax.tree.map(np.asarray, dict(init_variables(CFG, jax.random.key(0))))
    TX = optax.sgd(1e-2)  # plain SGD: the update is proportional to the gradient (Adam would hide a scale error)
    _rng = np.random.default_rng(0)
    BATCHES = [{"image": _rng.integers(0, 4096, (8, 128, 96, 1)).astype(np.uint16),
                "label": _rng.integers(0, 2, (8, 2)).astype(np.float32)} for _ in range(2)]

    def train(mesh, batch_norm, rows=slice(None)):
        step = make_train_step(CFG, TX, mesh, beta=1e-3, batch_norm=batch_norm, augment=AugmentConfig())
        state = replicate(create_train_state(VARIABLES, TX, 0), mesh)
        losses = []
        for b in BATCHES:
            state, m = step(state, shard_batch({k: v[rows] for k, v in b.items()}, mesh))
            losses.append([float(m["loss"]), float(m["grad_norm"])])
        # Replicated: this process's own copy is the whole value.
        params = jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), state.params)
        return params, losses

    def flat(tree):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
""")

FOUR_DEVICES = COMMON.replace("import jax\n", "import jax\njax.config.update('jax_num_cpu_devices', 4)\n", 1) + textwrap.dedent("""
    assert len(jax.devices()) == 4
    p1, l1 = train(make_mesh(jax.devices()[:1]), "sync")
    p4, l4 = train(make_mesh(), "sync")
    pl, ll = train(make_mesh(), "local")
    print(json.dumps({"max_param_diff": float(np.abs(flat(p1) - flat(p4)).max()),
                      "param_change": float(np.abs(flat(p1) - flat(VARIABLES["params"])).max()),
                      "losses_1": l1, "losses_4": l4, "losses_local": ll,
                      # the one-process, one-device run the two jax.distributed processes must equal
                      "params_1": flat(p1)[::997].tolist()}))
""")


def _run(code, env_extra=None):
    """Start ``code`` in a fresh interpreter; output goes to files (a full pipe would stall a
    process that its peer waits for at a collective)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    env.pop("XLA_FLAGS", None)
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    proc.files = (out, err)
    return proc


def _result(proc, timeout=600):
    proc.wait(timeout=timeout)
    out, err = proc.files
    out.seek(0)
    err.seek(0)
    text, errors = out.read(), err.read()
    assert proc.returncode == 0, errors[-3000:]
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def four_devices():
    """FOUR_DEVICES' result: its one-device run is also the one-process reference of the
    jax.distributed test (one interpreter and one compilation fewer than a run of its own)."""
    return _result(_run(FOUR_DEVICES))


def test_four_devices_equal_one_device_with_synchronised_batch_norm(four_devices):
    r = four_devices
    assert r["param_change"] > 1e-3  # the steps really moved the parameters
    assert r["max_param_diff"] < 1e-5, r
    l1, l4 = np.array(r["losses_1"]), np.array(r["losses_4"])
    np.testing.assert_allclose(l4[:, 0], l1[:, 0], rtol=1e-5)  # loss
    np.testing.assert_allclose(l4[:, 1], l1[:, 1], rtol=1e-4)  # gradient norm: a sum of ~1e7 squares
    # Per-device statistics (batches of 2 per device) give a different loss already at step 1.
    assert abs(r["losses_local"][0][0] - r["losses_1"][0][0]) > 1e-3


TWO_PROCESSES = COMMON.replace("import jax\n", "import jax\nfrom gmic_jax.train.distributed import maybe_initialize_distributed\n"
                               "assert maybe_initialize_distributed()\n", 1) + textwrap.dedent("""
    pid, n = jax.process_index(), jax.process_count()
    assert n == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    rows = slice(pid * 4, (pid + 1) * 4)  # this process feeds only its half of each global batch
    p, l = train(make_mesh(), "sync", rows)
    print(json.dumps({"pid": pid, "params": flat(p)[::997].tolist(), "checksum": float(flat(p).astype(np.float64).sum()),
                      "losses": l}))
""")

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_agree(four_devices):
    port = _free_port()
    procs = [_run(TWO_PROCESSES, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                  "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        results = [_result(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    a, b = sorted(results, key=lambda r: r["pid"])
    # The replicas in the two processes are identical ...
    assert a["params"] == b["params"] and a["checksum"] == b["checksum"] and a["losses"] == b["losses"]
    # ... and equal the one-process run (on one device) on the same global batches.
    np.testing.assert_allclose(a["params"], four_devices["params_1"], atol=1e-5)
    np.testing.assert_allclose(np.array(a["losses"])[:, 0], np.array(four_devices["losses_1"])[:, 0], rtol=1e-5)


def _slurm_env(task, ntasks, port):
    """What `srun --ntasks=N` sets (the variables JAX's SLURM detection reads), on localhost."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(ntasks),
            "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_STEP_NUM_NODES": "1",
            "JAX_COORDINATOR_PORT": str(port)}


DECISION = textwrap.dedent("""
    import json, jax
    from gmic_jax.train.distributed import detected_cluster, maybe_initialize_distributed
    print(json.dumps({"cluster": detected_cluster(), "multi": maybe_initialize_distributed(),
                      "processes": jax.process_count()}))
""")


def test_one_slurm_task_or_the_switch_off_means_one_process():
    r = _result(_run(DECISION, _slurm_env(0, 1, _free_port())))
    assert r == {"cluster": ["slurm", 1], "multi": False, "processes": 1}
    r = _result(_run(DECISION, {**_slurm_env(0, 2, _free_port()), "GMIC_JAX_DISTRIBUTED": "off"}))
    assert r == {"cluster": ["slurm", 2], "multi": False, "processes": 1}
    r = _result(_run(DECISION))
    assert r == {"cluster": None, "multi": False, "processes": 1}


def test_distributed_switch_and_variables_are_checked():
    from gmic_jax.train.distributed import maybe_initialize_distributed

    with pytest.raises(RuntimeError, match="GMIC_JAX_DISTRIBUTED='maybe'"):
        maybe_initialize_distributed({"GMIC_JAX_DISTRIBUTED": "maybe"})
    with pytest.raises(RuntimeError, match=r"\['JAX_PROCESS_ID'\] are not"):
        maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


TRAIN = ["--config", "configs/synthetic_tiny.py", "--config.data.image_shape=(128, 96)",
         "--config.model.image_shape=(128, 96)", "--config.model.crop_shape=(32, 32)", "--config.model.K=2",
         "--config.data.num_train=16", "--config.data.num_val=8", "--config.batch_size=4",
         "--config.num_epochs=1", "--config.eval.batch_size=8", "--config.progress_bar=False",
         "--config.batch_norm=sync", "--config.data.balanced_sampling=False", "--config.data.workers=1",
         # crop rotation draws per device (the step folds the roi key with the device index)
         "--config.model.rotate_crops=False"]


def _train(workdir, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"JAX_PLATFORMS": "cpu", **env_extra})
    log = open(f"{workdir}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "gmic_jax.cli", "train", *TRAIN, "--workdir", str(workdir)],
                            cwd=REPO, env=env, stdout=log, stderr=log, text=True)


@pytest.fixture(scope="module")
def srun_runs(tmp_path_factory):
    """The same tiny training as two SLURM-style tasks (jax.distributed found by itself) and as one
    process on two forced CPU devices -- the same per-device program, so the same numbers bit for
    bit: (workdir of two, workdir of one, log of two, log of one)."""
    tmp_path = tmp_path_factory.mktemp("srun")
    port = _free_port()
    two = tmp_path / "two"
    procs = [_train(two, _slurm_env(i, 2, port)) for i in range(2)]
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = Path(f"{two}.log").read_text()
    assert codes == [0, 0], log[-3000:]
    one = tmp_path / "one"
    assert _train(one, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}).wait(timeout=900) == 0, \
        Path(f"{one}.log").read_text()[-3000:]
    return two, one, log, Path(f"{one}.log").read_text()


def test_srun_style_two_task_training_equals_one_process(srun_runs):
    """Two tasks, each loading only its half of every global batch, train exactly what one process
    with two devices trains (a one-device process sums in another order: 4 forced devices == 1
    device within float rounding is test_four_devices_equal_one_device_with_synchronised_batch_norm;
    with Adam such rounding grows to ~1e-3 in a few steps, so only the same device count is
    compared digit for digit)."""
    import jax

    from gmic_jax import load_checkpoint

    two, one, log, one_log = srun_runs
    assert "slurm runs 2 tasks" in log
    assert "2 cpu device(s) in 1 process(es)" in one_log
    # Process 0 wrote the records; every number in them is the one process's, digit for digit.
    a = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4]
    assert a == b
    # The checkpoint two processes saved loads in this one process (a fallback for shardings over
    # devices it does not have), and holds the one process's weights bit for bit.
    pa, pb = (jax.tree.leaves(load_checkpoint(d)[1]) for d in (two, one))
    assert len(pa) == len(pb) > 0
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)
