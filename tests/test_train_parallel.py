"""Data parallelism in subprocesses (the rest of the suite keeps one device):

* the shard_map step on 4 forced CPU devices computes the single-device step on the same global
  batch (synchronised BatchNorm): from the same state, the two crop the same patches, their loss,
  BatchNorm statistics and heads' updates agree within float32 rounding and the whole update
  within what a ReLU or max at a tie can move it, while per-device BatchNorm really differs;
* two processes joined by jax.distributed on localhost, each feeding its own half of every
  global batch, train what one process on two devices trains, every parameter bit for bit;
* `gmic-jax train` started as a 2-task SLURM job would start it (faked SLURM_* variables, no
  JAX_* ones) joins the two processes by itself, each loading only its rows (window-noise draws,
  cropped and resized on the device), and trains what one process on two devices trains, bit for
  bit (its checkpoint loads in one process); one task, or GMIC_JAX_DISTRIBUTED=off, means no
  jax.distributed at all.
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
    from flax.traverse_util import flatten_dict
    from gmic_jax import GMICConfig, init_variables
    from gmic_jax.augment import AugmentConfig
    from gmic_jax.train.state import create_train_state
    from gmic_jax.train.step import local_copy, make_mesh, make_train_step, replicate, shard_batch

    # Images 128 x 96 give a 2 x 2 saliency grid and 1 x 1 windows: K=2 picks 2 of its 4 cells.
    CFG = GMICConfig(percent_t=0.1, K=2, crop_shape=(32, 32), image_shape=(128, 96), rotate_crops=False)
    VARIABLES = jax.tree.map(np.asarray, dict(init_variables(CFG, jax.random.key(0))))
    TX = optax.sgd(1e-2)  # plain SGD: the update is proportional to the gradient (Adam would hide a scale error)
    # Flips, shifts and noise, each drawn from the example's position in the global batch; no
    # rotation or zoom, which would move a lesion into another cell of the grid.
    AUG = AugmentConfig(rotation_deg=0.0, scale=(1.0, 1.0), shear_deg=0.0, translation=0.05)

    def lesion_images(rng, n=8):
        \"\"\"Noise with two bright blobs per image at the centres of two different grid cells, one
        twice the other: the freshly initialised model's saliency maps then rank the cells with
        clear gaps, so float32 rounding cannot change which patches are cropped (on plain noise
        the cells' scores nearly tie and one rounding can pick another crop).\"\"\"
        yy, xx = np.mgrid[:128, :96]
        x = rng.integers(0, 1024, (n, 128, 96, 1)).astype(np.float64)
        for i in range(n):
            for amp, cell in zip((3000, 1500), rng.permutation(4)[:2]):
                cy, cx = 32 + 64 * (cell // 2), 24 + 48 * (cell % 2)
                x[i, ..., 0] += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 128.0)
        return x.astype(np.uint16)

    _rng = np.random.default_rng(1)
    BATCHES = [{"image": lesion_images(_rng), "label": _rng.integers(0, 2, (8, 2)).astype(np.float32)}
               for _ in range(3)]

    def make_step(mesh, batch_norm):
        return make_train_step(CFG, TX, mesh, beta=1e-3, batch_norm=batch_norm, augment=AUG,
                               with_patch_locations=True)

    def apply_step(step, mesh, host_state, batch, rows=slice(None)):
        \"\"\"One step from a host state -> (new host state, metrics on the host).\"\"\"
        state, m = step(replicate(host_state, mesh), shard_batch({k: v[rows] for k, v in batch.items()}, mesh))
        return local_copy(state), jax.tree.map(np.asarray, m)

    def train(mesh, rows=slice(None)):
        \"\"\"The trajectory over BATCHES with synchronised BatchNorm -> (final host state, losses).\"\"\"
        step, host, losses = make_step(mesh, "sync"), create_train_state(VARIABLES, TX, 0), []
        for b in BATCHES:
            host, m = apply_step(step, mesh, host, b, rows)
            losses.append(float(m["loss"]))
        return host, losses

    def save_variables(path, host_state):
        flat = flatten_dict({"params": host_state.params, "batch_stats": host_state.batch_stats}, sep="/")
        np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})

    def flat(tree):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
""")

FOUR_DEVICES = COMMON.replace(
    "import jax\n", "import jax\njax.config.update('jax_num_cpu_devices', 4)\n", 1
) + textwrap.dedent("""
    assert len(jax.devices()) == 4
    # The layers after every ReLU and max: their gradients are smooth functions of forward values.
    HEADS = ("attention", "classifier_linear", "fusion_dnn")
    m1, m4 = make_mesh(jax.devices()[:1]), make_mesh()
    s1, s4, s_local = make_step(m1, "sync"), make_step(m4, "sync"), make_step(m4, "local")

    def upd(new, old, modules=None):
        pick = lambda params: {k: v for k, v in params.items() if modules is None or k in modules}
        return flat(pick(new.params)) - flat(pick(old.params))

    def rel(x, y):
        return float(np.linalg.norm(x - y) / np.linalg.norm(x))

    host, records = create_train_state(VARIABLES, TX, 0), []
    for b in BATCHES:
        # Both programs start every step from the one-device trajectory's state: each step is
        # compared on its own, so rounding differences cannot compound over steps.
        (a, ma), (c, mc), (l, ml) = (apply_step(s, m, host, b) for s, m in ((s1, m1), (s4, m4), (s_local, m4)))
        records.append({
            "locations_equal": bool(np.array_equal(ma["patch_locations"], mc["patch_locations"])),
            "locations_mismatch": np.argwhere((ma["patch_locations"] != mc["patch_locations"]).any(-1)).tolist(),
            "loss_1": float(ma["loss"]), "loss_4": float(mc["loss"]), "loss_local": float(ml["loss"]),
            "grad_norm_1": float(ma["grad_norm"]), "grad_norm_4": float(mc["grad_norm"]),
            "update_rel_diff": rel(upd(a, host), upd(c, host)),
            "local_update_rel_diff": rel(upd(a, host), upd(l, host)),
            "head_update_rel_diff": rel(upd(a, host, HEADS), upd(c, host, HEADS)),
            "batch_stats_rel_diff": rel(flat(a.batch_stats), flat(c.batch_stats)),
            "update_max": float(np.abs(upd(a, host)).max())})
        host = a
    print(json.dumps({"steps": records}))
""")


def _run(code, env_extra=None, args=()):
    """Start ``code`` in a fresh interpreter; output goes to files (a full pipe would stall a
    process that its peer waits for at a collective)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    env.pop("XLA_FLAGS", None)
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, stdout=out, stderr=err, text=True
    )
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
    return _result(_run(FOUR_DEVICES))


# float32's unit roundoff is u = 2**-24 = 6e-8. A training step chains ~100 roundings in sequence
# (22 + 18 convolution layers, their BatchNorms and the heads), and the 4-device step rounds
# differently from the 1-device step (each device convolves its own 2 images; statistics and
# gradients are summed per device, then over devices). So a forward quantity -- the loss, the
# running BatchNorm statistics -- and the update of the heads after the last ReLU and max (gated
# attention, the local classifier, the fusion layer: smooth functions of forward values) have a
# relative error up to ~100 u = 6e-6; 10x that is allowed.
FORWARD_RTOL = 6e-5
# The update of the layers before a ReLU or a max rounds the same way (measured 1.9e-6 to 5.5e-6
# of its norm), except where a ReLU or max meets two inputs within rounding of each other: one
# program passes that unit's gradient and the other does not. The forward value is the same either
# way, but every earlier layer's gradient moves by that unit's share: measured 4.9e-4 of the
# update's norm (a ReLU in the global network's second stage) and 1.8e-2 (one of the four cells of
# a 2 x 2 max: a whole channel's gradient) in 2 of 13 steps on lesion images (AMD EPYC family 25
# model 17). About 5x the larger is allowed; per-device BatchNorm moves it by ~2.6, and a gradient
# that is not averaged over the devices fails the heads' tolerance above.
UPDATE_RTOL = 0.1


def test_four_devices_equal_one_device_with_synchronised_batch_norm(four_devices):
    records = four_devices["steps"]
    for i, r in enumerate(records):
        # Like is compared with like: the same patches in both programs at every step (a flip is
        # named here; the lesion images keep the saliency maps clear of near-ties).
        assert r["locations_equal"], f"step {i}: (image, patch) cropped elsewhere: {r['locations_mismatch']}"
        assert r["update_max"] > 1e-3, r  # the step really moved the parameters
        assert abs(r["loss_4"] - r["loss_1"]) <= FORWARD_RTOL * abs(r["loss_1"]), (i, r)
        assert r["batch_stats_rel_diff"] < FORWARD_RTOL, (i, r)  # running averages of the global batch's statistics
        assert r["head_update_rel_diff"] < FORWARD_RTOL, (i, r)
        assert r["update_rel_diff"] < UPDATE_RTOL, (i, r)
        # Per-device statistics (batches of 2 per device) give another loss and update.
        assert abs(r["loss_local"] - r["loss_1"]) > 10 * FORWARD_RTOL * abs(r["loss_1"]), (i, r)
        assert r["local_update_rel_diff"] > 10 * UPDATE_RTOL, (i, r)


TWO_PROCESSES = COMMON.replace(
    "import jax\n",
    "import jax\nfrom gmic_jax.train.distributed import maybe_initialize_distributed\n"
    "assert maybe_initialize_distributed()\n",
    1,
) + textwrap.dedent("""
    pid, n = jax.process_index(), jax.process_count()
    assert n == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    rows = slice(pid * 4, (pid + 1) * 4)  # this process feeds only its half of each global batch
    host, losses = train(make_mesh(), rows)
    save_variables(sys.argv[1], host)
    print(json.dumps({"pid": pid, "losses": losses,
                      "param_change": float(np.abs(flat(host.params) - flat(VARIABLES["params"])).max())}))
""")

# One process with two devices: the per-device program of each of the two processes. (A 2-device
# mesh inside a process of 4 devices is not: XLA splits the host's threads over its devices, so
# the convolutions round differently.)
TWO_DEVICES = COMMON.replace(
    "import jax\n", "import jax\njax.config.update('jax_num_cpu_devices', 2)\n", 1
) + textwrap.dedent("""
    assert len(jax.devices()) == 2
    host, losses = train(make_mesh())
    save_variables(sys.argv[1], host)
    print(json.dumps({"losses": losses}))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_equal_one_process_with_two_devices(tmp_path):
    """Each process runs the per-device program of one process with two devices, on the same rows;
    only the transport of the collectives differs, so every parameter and running statistic is
    equal bit for bit in both processes and in the one-process run."""
    port = _free_port()
    outs = [tmp_path / f"process_{i}.npz" for i in range(2)]
    one = _run(TWO_DEVICES, args=[tmp_path / "one_process.npz"])
    procs = [
        _run(
            TWO_PROCESSES,
            {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
            args=[outs[i]],
        )
        for i in range(2)
    ]
    try:
        results = [_result(p) for p in procs]
    finally:
        for p in [*procs, one]:
            if p.poll() is None:
                p.kill()
    assert sorted(r["pid"] for r in results) == [0, 1]
    assert results[0]["param_change"] > 1e-3  # the three steps really trained
    assert results[0]["losses"] == results[1]["losses"] == _result(one)["losses"]
    reference = dict(np.load(tmp_path / "one_process.npz"))
    for out in outs:
        got = dict(np.load(out))
        assert sorted(got) == sorted(reference)
        assert any(k.startswith("batch_stats/") for k in got) and any(k.startswith("params/") for k in got)
        for k in reference:
            np.testing.assert_array_equal(got[k], reference[k], err_msg=f"{out.name}: {k}")


def _slurm_env(task, ntasks, port):
    """What `srun --ntasks=N` sets (the variables JAX's SLURM detection reads), on localhost."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(task),
        "SLURM_LOCALID": str(task),
        "SLURM_STEP_NUM_NODES": "1",
        "JAX_COORDINATOR_PORT": str(port),
    }


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


TRAIN = [
    "--config",
    "configs/synthetic_tiny.py",
    "--config.data.image_shape=(128, 96)",
    "--config.model.image_shape=(128, 96)",
    "--config.model.crop_shape=(32, 32)",
    "--config.model.K=2",
    "--config.data.source=cache",  # a window-noise cache (train_cache, val_cache: srun_runs)
    "--config.data.window_noise=True",
    "--config.batch_size=4",
    "--config.num_epochs=1",
    "--config.eval.batch_size=8",
    "--config.progress_bar=False",
    "--config.batch_norm=sync",
    "--config.data.balanced_sampling=False",
    "--config.data.workers=1",
    # crop rotation draws per device (the step folds the roi key with the device index)
    "--config.model.rotate_crops=False",
]


def _train(workdir, env_extra, extra_args=()):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"JAX_PLATFORMS": "cpu", **env_extra})
    log = open(f"{workdir}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "gmic_jax.cli", "train", *TRAIN, *extra_args, "--workdir", str(workdir)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=log,
        text=True,
    )


@pytest.fixture(scope="module")
def srun_runs(tmp_path_factory):
    """The same tiny training as two SLURM-style tasks (jax.distributed found by itself) and as one
    process on two forced CPU devices -- the same per-device program, so the same numbers bit for
    bit: (workdir of two, workdir of one, log of two, log of one)."""
    from gmic_jax.data.testing import window_noise_cache

    tmp_path = tmp_path_factory.mktemp("srun")
    # Trained on fresh window-noise draws each epoch: each process ships its rows' context regions,
    # the step crops and resizes them on the device.
    cache = window_noise_cache(tmp_path / "data", 4, (128, 96))
    data = [f"--config.data.train_cache={cache}", f"--config.data.val_cache={cache}"]
    port = _free_port()
    two = tmp_path / "two"
    procs = [_train(two, _slurm_env(i, 2, port), data) for i in range(2)]
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = Path(f"{two}.log").read_text()
    assert codes == [0, 0], log[-3000:]
    one = tmp_path / "one"
    assert _train(one, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, data).wait(timeout=900) == 0, Path(
        f"{one}.log"
    ).read_text()[-3000:]
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
    a = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4]
    assert a == b
    # The checkpoint two processes saved loads in this one process (a fallback for shardings over
    # devices it does not have), and holds the one process's weights bit for bit.
    pa, pb = (jax.tree.leaves(load_checkpoint(d)[1]) for d in (two, one))
    assert len(pa) == len(pb) > 0
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)
