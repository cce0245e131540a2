"""Data parallel training over mx.distributed, with real processes: `mlx.launch --backend ring -n 2` on loopback.

Invariants: 2 processes give the adapters, losses and grad norms of 1 process on the same global batch (LoRA
dropout on, so the per-micro-batch RNG must not depend on the rank), also when k is not a multiple of W and
when a process has no micro-batch in a step; a 2-process CLI run killed with SIGKILL resumes with 1 process,
and a 1-process checkpoint resumes with 2; process 1 never touches its run dir and prints nothing; a failed
checkpoint write on process 0 stops every process instead of leaving one waiting on a collective. Then the
pieces in-process: backend detection, the bucketed all-reduce, broadcast.

A tiny model with a 512-token BPE trained here keeps every run to seconds; the two launches dominate the time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_bpe_model_dir
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).with_name("mlx.launch")
TOL = 1e-5

DRIVER = '''
import json, sys
from mlxtune.distributed import maybe_init
from mlxtune.trainer import train

world = maybe_init()
assert world is not None and world.size() == 2 and world.backend == "ring", world
results = {}
for s in json.loads(open(sys.argv[1]).read()):
    # process 1 gets another output_dir: it must never create it (process 0 alone owns the run dir)
    out = s["out"] if world.rank() == 0 else s["out"] + "-rank" + str(world.rank())
    try:
        r = train(s["config"], resume=s.get("resume"), quiet=True, world=world, output_dir=out)
        results[s["name"]] = {"steps": r.steps, "metrics": r.metrics}
    except Exception as e:
        results[s["name"]] = {"error": type(e).__name__ + ": " + str(e)}
with open(sys.argv[2] + "/rank" + str(world.rank()) + ".json", "w") as f:
    json.dump(results, f)
'''


# --------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny model, its data, single-process references


@pytest.fixture(scope="module")
def assets(tmp_path_factory, alpaca_seed_dir):
    """(model dir, data dir): a random 2-layer Llama with a 512-token byte-level BPE trained on the seed data."""
    root = tmp_path_factory.mktemp("dist")
    lines = (alpaca_seed_dir / "train.jsonl").read_text().splitlines()
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[24:30]) + "\n")
    texts = [v for line in lines for v in json.loads(line).values() if isinstance(v, str)]
    make_bpe_model_dir(root / "model", texts)
    return root / "model", data


def _config(where: Path, assets, name: str, **train) -> Path:
    model_dir, data_dir = assets
    # adam_eps: Adam divides by sqrt(v) + eps, so where a gradient element is near eps it turns float noise into
    # update noise: summing 4 micro-batches as (0+2)+(1+3) instead of ((0+1)+2)+3 moves the adapters by up to
    # 6e-4 (relative) after 4 steps at eps 1e-8 -- in one process too. At 1e-4 order noise stays below 1e-6,
    # while any real mismatch (a micro-batch dropped or repeated, rank-dependent dropout) is above 1e-3.
    t = {"max_steps": 4, "batch_size": 2, "grad_accumulation": 4, "learning_rate": 1e-2, "adam_eps": 1e-4,
         "save_every": 2, "eval_every": 2, "log_every": 1, "keep_last": 10, "seed": 3, **train}
    cfg = {"model": {"path": str(model_dir)}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
           "data": {"train": str(data_dir), "max_length": 128, "packing": True},
           "train": t, "output_dir": str(where / name)}
    p = where / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


SCENARIOS = {  # name: train overrides; every one is run by 1 process (reference) and by 2
    "k4": {},  # 2 micro-batches per process per step
    "k3": {"grad_accumulation": 3, "max_steps": 3},  # 2 + 1
    "k1": {"grad_accumulation": 1, "max_steps": 3, "eval_every": 1},  # process 1 has nothing to run: zeros
}


@pytest.fixture(scope="module")
def refs(tmp_path_factory, assets):
    """Single-process runs in this process: {scenario: run dir}."""
    from mlxtune.trainer import train

    where = tmp_path_factory.mktemp("ref")
    out = {}
    for name, over in SCENARIOS.items():
        res = train(_config(where, assets, name, **over), quiet=True)
        out[name] = res.run_dir
    return out


def _free_port_pair() -> int:
    for _ in range(50):
        base = int(np.random.default_rng().integers(20000, 60000))
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port pair on 127.0.0.1")


def _launch(cmd: list[str], **kw) -> subprocess.Popen:
    """`mlx.launch --backend ring -n 2` on loopback; its own session so the whole group can be killed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}
    full = [str(LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()), "--", sys.executable, *cmd]
    return subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True, **kw)


def _finish(p: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"launched run did not finish in {timeout}s (a process waiting on a collective?):\n{out}")
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory, assets, refs):
    """One `mlx.launch` of 2 processes running every scenario through the Python API, then: resuming the k4
    reference's step-2 checkpoint (1 → 2 processes), and a run whose checkpoint dir process 0 cannot create."""
    where = tmp_path_factory.mktemp("two")
    spec = [{"name": n, "config": str(_config(where, assets, n, **over)), "out": str(where / n)} for n, over in SCENARIOS.items()]
    spec.append({"name": "resume_1_to_2", "config": str(_config(where, assets, "resume_1_to_2")),
                 "out": str(where / "resume_1_to_2"), "resume": str(refs["k4"] / "checkpoints" / "step_000002")})
    (where / "bad_write").mkdir()
    (where / "bad_write" / "checkpoints").write_text("a file where the checkpoint dir should be\n")
    spec.append({"name": "bad_write", "config": str(_config(where, assets, "bad_write")), "out": str(where / "bad_write")})
    (where / "spec.json").write_text(json.dumps(spec))
    (where / "driver.py").write_text(DRIVER)
    t = time.perf_counter()
    out = _finish(_launch([str(where / "driver.py"), str(where / "spec.json"), str(where)]), timeout=400)
    results = []
    for r in (0, 1):
        f = where / f"rank{r}.json"
        assert f.is_file(), f"process {r} wrote no results (mlx.launch exits 0 whatever happened):\n{out}"
        results.append(json.loads(f.read_text()))
    return {"where": where, "results": results, "out": out, "seconds": time.perf_counter() - t}


def _wait_for_lock_holder_to_die(run: Path, timeout: float = 30.0) -> None:
    """After kill -9 of the launcher's process group, its processes take a moment to be gone: wait for the run lock's
    holder to die (as a user re-running the command would), so that --resume sees a stale lock, not a live one."""
    from mlxtune import fsio

    lock = run / ".mlxtune-run.lock"
    if not lock.exists():
        return
    pid = int(json.loads(lock.read_text())["pid"])
    deadline = time.time() + timeout
    while fsio.pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)


def _adapter(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _assert_adapters_close(a_path: Path, b_path: Path) -> None:
    a, b = _adapter(a_path), _adapter(b_path)
    assert a.keys() == b.keys()
    for k in a:
        err = float(np.abs(a[k] - b[k]).max() / (np.abs(b[k]).max() + 1e-12))
        assert err <= TOL, (k, err)


def _records(run: Path, key: str) -> dict:
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


def _assert_same_curves(a: Path, b: Path, keys=("train_loss", "grad_norm", "lr", "trained_tokens", "val_loss")) -> None:
    for key in keys:
        ra, rb = _records(a, key), _records(b, key)
        assert ra.keys() == rb.keys() and ra, key
        for s in ra:
            assert ra[s] == pytest.approx(rb[s], rel=TOL, abs=1e-9), (key, s, ra[s], rb[s])


# --------------------------------------------------------------------------------------------------------------
# Launched: 2 processes == 1


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one(name, launched, refs):
    """Adapters (final and every checkpoint), losses, grad norms and val losses equal a single process's."""
    res0, res1 = (r[name] for r in launched["results"])
    assert "error" not in res0 and "error" not in res1, (res0, res1, launched["out"])
    assert res0 == res1  # same steps and val metrics on both processes
    run, ref = launched["where"] / name, refs[name]
    _assert_adapters_close(run / "adapters.safetensors", ref / "adapters.safetensors")
    cps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert cps == sorted(p.name for p in (ref / "checkpoints").iterdir())
    for cp in cps:
        _assert_adapters_close(run / "checkpoints" / cp / "adapters.safetensors", ref / "checkpoints" / cp / "adapters.safetensors")
    assert json.loads((run / "checkpoints" / cps[-1] / "state.json").read_text())["world_size"] == 2
    _assert_same_curves(run, ref)
    assert not Path(str(run) + "-rank1").exists()  # process 1 never created its run dir


def test_resume_one_process_checkpoint_with_two(launched, refs):
    res0, res1 = (r["resume_1_to_2"] for r in launched["results"])
    assert "error" not in res0 and "error" not in res1, (res0, res1, launched["out"])
    run = launched["where"] / "resume_1_to_2"
    _assert_adapters_close(run / "adapters.safetensors", refs["k4"] / "adapters.safetensors")
    assert sorted(_records(run, "train_loss")) == [3, 4]  # a new run dir resumed from another run's checkpoint
    ref = _records(refs["k4"], "train_loss")
    for s, v in _records(run, "train_loss").items():
        assert v == pytest.approx(ref[s], rel=TOL)
    assert not Path(str(run) + "-rank1").exists()


def test_failed_write_on_process_0_stops_every_process(launched):
    """Process 0 cannot create checkpoints/: it raises its error, process 1 raises too instead of waiting."""
    res0, res1 = (r["bad_write"] for r in launched["results"])
    assert "checkpoints" in res0.get("error", ""), res0
    assert res1.get("error", "").startswith("DistributedError: process 1: stopping because process 0 failed"), res1


def test_launched_processes_print_once(launched):
    out = launched["out"]
    assert "Traceback" not in out, out
    # one per run that reads its data, from process 0 only: every scenario and resume_1_to_2 (bad_write's dir holds a
    # file that is not mlxtune's, so it is refused before its data is read)
    assert out.count("train.jsonl: skipped") == len(SCENARIOS) + 1


# --------------------------------------------------------------------------------------------------------------
# Launched through the CLI: kill -9 a 2-process run after its step-2 checkpoint, resume with 1 process


def test_killed_two_process_run_resumes_with_one(tmp_path, assets, refs):
    from mlxtune.trainer import train

    cfg = _config(tmp_path, assets, "k4")
    run = tmp_path / "k4"
    p = _launch(["-m", "mlxtune", "train", "-c", str(cfg)])
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_000002").is_dir():
        if p.poll() is not None or time.time() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"no step-2 checkpoint:\n{p.communicate()[0]}")
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and both processes
    out, _ = p.communicate(timeout=30)
    _wait_for_lock_holder_to_die(run)
    assert not (run / "adapters.safetensors").exists()
    assert out.count("LoRA rank 4") == 1 and out.count("over 2 processes") == 1, out
    assert out.count("step 1/4 |") == 1, out  # reports come from process 0 only

    res = train(cfg, resume=True, quiet=True)
    assert res.steps == 4
    state = json.loads((run / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["world_size"] == 1 and state["micro_index"] == 16
    assert json.loads((run / "checkpoints" / "step_000002" / "state.json").read_text())["world_size"] == 2
    _assert_adapters_close(run / "adapters.safetensors", refs["k4"] / "adapters.safetensors")
    _assert_same_curves(run, refs["k4"])  # trained_tokens too: the resume state carries it and the report window


# --------------------------------------------------------------------------------------------------------------
# In-process pieces


def test_launched_backend_from_environment(tmp_path):
    from mlxtune.distributed import launched_backend, maybe_init

    assert launched_backend({}) is None
    assert launched_backend({"MLX_HOSTFILE": "/tmp/h", "MLX_RANK": "0"}) == "ring"
    assert launched_backend({"NCCL_HOST_IP": "10.0.0.1", "NCCL_PORT": "12345", "MLX_WORLD_SIZE": "2", "MLX_RANK": "1"}) == "nccl"
    assert launched_backend({"MLX_IBV_DEVICES": "/tmp/d", "MLX_JACCL_COORDINATOR": "10.0.0.1:32323", "MLX_RANK": "0"}) == "jaccl"
    assert launched_backend({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert maybe_init(env={}) is None  # not launched: nothing initialized
    blank = tmp_path / "hosts"
    blank.write_text("\n")  # what `mlx.launch -n 1` writes for one host
    assert maybe_init(env={"MLX_HOSTFILE": str(blank), "MLX_RANK": "0"}) is None


def test_unavailable_backend_is_a_clear_error():
    from mlxtune.distributed import DistributedError, maybe_init

    if mx.distributed.is_available("nccl"):
        pytest.skip("this MLX build has NCCL")
    with pytest.raises(DistributedError, match="nccl backend, which this MLX build lacks"):
        maybe_init(env={"NCCL_HOST_IP": "127.0.0.1", "MLX_WORLD_SIZE": "2", "MLX_RANK": "0"})


def test_bucketed_all_reduce_keeps_the_tree():
    """On a one-process group the sum is the identity: structure, dtypes and values survive the buckets."""
    from mlxtune.distributed import World, make_all_reduce

    world = World(mx.distributed.init())
    tree = ({"a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": [mx.ones((4,), dtype=mx.bfloat16), mx.array(2.5)],
             "c": {"d": mx.arange(3, dtype=mx.int32), "e": mx.full((3, 1), -1.0)}}, mx.array(7.0))
    for bucket in (1, 16, 1 << 30):
        out = mx.compile(make_all_reduce(world, bucket_bytes=bucket))(tree)
        assert isinstance(out, tuple) and isinstance(out[0]["b"], list)
        for (ka, va), (kb, vb) in zip(_flat(out), _flat(tree)):
            assert ka == kb and va.dtype == vb.dtype and va.shape == vb.shape and mx.array_equal(va, vb).item()


def test_broadcast_round_trip():
    from mlxtune.distributed import SingleProcess, World

    world = World(mx.distributed.init())
    obj = ({"w": mx.ones((2, 2)), "step": mx.array(3, dtype=mx.uint64)}, [1, "x", None, np.float32(0.5)], Path("/tmp/r"))
    out = world.broadcast(obj)
    assert isinstance(out, tuple) and out[1] == [1, "x", None, 0.5] and out[2] == Path("/tmp/r")
    assert out[0]["step"].dtype == mx.uint64 and mx.array_equal(out[0]["w"], obj[0]["w"]).item()
    assert world.on_main(lambda: {"a": 1}) == {"a": 1}
    with pytest.raises(ZeroDivisionError):
        world.on_main(lambda: 1 / 0)
    one = SingleProcess()
    assert one.broadcast(obj) is obj and one.sum_scalars([1, 2]) == [1.0, 2.0] and one.any(True)


def test_shard_warning():
    from mlxtune.distributed import shard_warning

    assert shard_warning(4, 2) is None and shard_warning(1, 1) is None
    assert "not a multiple of 2" in shard_warning(3, 2)
    assert "1 process(es) will idle" in shard_warning(1, 2)


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
