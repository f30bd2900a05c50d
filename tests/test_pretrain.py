"""The pretraining job end to end on the embedded digits: sharding, resumption, unreadable checkpoints, logs across
kills, changed settings on resume, NaN guard, multi-host. What every training job shares (resume after SIGKILL,
SIGTERM and Ctrl-C, FINISHED, a finished run relaunched) is tested once for all of them in test_training_run.py."""

import ast
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
import cli_runner
from tiny_runs import pretrain_config as tiny_config

from igpt_jax import sharding
from igpt_jax.config import checks as config_checks
from igpt_jax.config import defaults as config_defaults
from igpt_jax.data import palette_cache
from igpt_jax.jobs import pretrain
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.training import checkpoint as ckpt_lib
from igpt_jax.training import optim
from igpt_jax.training import step as train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir(digits_data_dir):
    """The session's digits data_dir (tests/conftest.py)."""
    return digits_data_dir


def restore_params(workdir: str, config, step: int | None = None):
    model_cfg = ModelConfig.from_config(config.model)
    tx = optim.make_optimizer(config.train, optim.learning_rate_schedule(1.0, warmup_steps=0, total_steps=1))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    layout = train.state_layout(model_cfg, tx, mesh, sharding.DEFAULT_RULES)
    ckpt = ckpt_lib.Checkpointer(workdir, create=False)
    state = ckpt.restore(ckpt.latest_step() if step is None else step, layout.abstract)
    ckpt.close()
    return jax.device_get(state.params)


def losses(result):
    return [h["loss"] for h in result["history"]]


def test_one_device_and_a_2x2x2_mesh_give_the_same_losses(data_dir, tmp_path):
    config = tiny_config(data_dir, num_steps=4)
    single = pretrain.run(config, str(tmp_path / "single"), devices=jax.devices()[:1])
    config.mesh.shape = (2, 2, 2)
    sharded = pretrain.run(config, str(tmp_path / "sharded"), devices=jax.devices()[:8])
    np.testing.assert_allclose(losses(sharded), losses(single), atol=1e-5, rtol=0)


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say():
    cfg = ModelConfig(vocab_size=16, n_ctx=64, d_model=32, n_head=2, n_layer=2, remat="none")
    train_cfg = config_defaults.base_config().train
    tx = optim.make_optimizer(train_cfg, optim.learning_rate_schedule(1e-3, warmup_steps=1, total_steps=10))
    mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
    layout = train.state_layout(cfg, tx, mesh, sharding.DEFAULT_RULES)
    state = train.create_state(cfg, tx, layout, mesh, sharding.DEFAULT_RULES, jax.random.key(0))
    params = state.params
    assert params["blocks"]["mlp"]["fc"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["blocks"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["blocks"]["attn"]["o"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert params["wte"].sharding.spec == P("tensor", "fsdp")
    assert params["wpe"].sharding.spec == P(None, "fsdp")
    # Each device really holds only its shard.
    fc = params["blocks"]["mlp"]["fc"]
    assert {s.data.shape for s in fc.addressable_shards} == {(2, 16, 64)}
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1
    assert adam[0].mu["blocks"]["mlp"]["fc"].sharding.spec == P(None, "fsdp", "tensor")
    assert adam[0].nu["wte"].sharding.spec == P("tensor", "fsdp")


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_gradient_accumulation_equals_the_large_batch(objective):
    cfg = ModelConfig(vocab_size=16, n_ctx=64, d_model=32, n_head=2, n_layer=2, remat="none", objective=objective)
    train_cfg = config_defaults.base_config().train
    schedule = optim.learning_rate_schedule(1e-2, warmup_steps=0, total_steps=10)
    tx = optim.make_optimizer(train_cfg, schedule)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    layout = train.state_layout(cfg, tx, mesh, sharding.DEFAULT_RULES)
    state = train.create_state(cfg, tx, layout, mesh, sharding.DEFAULT_RULES, jax.random.key(0))
    batch = {"tokens": jax.random.randint(jax.random.key(1), (16, 64), 0, 16)}

    def step(accum):
        fn = jax.jit(lambda s, b: train.train_step(s, b, model_cfg=cfg, tx=tx, schedule=schedule,
                                                  base_rng=jax.random.key(2), accum_steps=accum))
        return fn(state, batch)

    (big, big_metrics), (acc, acc_metrics) = step(1), step(4)
    np.testing.assert_allclose(acc_metrics["loss"], big_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc_metrics["grad_norm"], big_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), acc.params, big.params)
    assert np.abs(np.asarray(big.params["wtet"])).max() > 0  # the step really moved the parameters


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir, num_steps=8, lr=3e38, warmup_steps=0)
    config.checkpoint.every_steps = 1
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step (\d+); stopping") as err:
        pretrain.run(config, str(tmp_path), devices=jax.devices()[:1])
    bad_step = int(str(err.value).split(" at step ")[1].split(";")[0])
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), create=False)
    assert ckpt.all_steps() and max(ckpt.all_steps()) < bad_step
    ckpt.close()
    restore_params(str(tmp_path), config)  # restorable


def test_bad_mesh_and_batch_settings_fail_with_the_numbers(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"mesh.shape=\(3, 1, 1\) has 3 devices but 8 are available"):
        sharding.resolve_mesh_shape((3, 1, 1), 8)
    with pytest.raises(ValueError, match=r"the fixed axes multiply to 3, which does not divide 8"):
        sharding.resolve_mesh_shape((-1, 3, 1), 8)
    config = tiny_config(data_dir, batch_size=12)
    config.mesh.shape = (8, 1, 1)
    with pytest.raises(ValueError, match=r"train.batch_size=12 is not divisible by the data-parallel size 8"):
        pretrain.run(config, str(tmp_path), devices=jax.devices()[:8])
    config = tiny_config(data_dir, grad_accum_steps=3)
    with pytest.raises(ValueError, match=r"train.grad_accum_steps=3 must divide train.batch_size=16"):
        pretrain.run(config, str(tmp_path), devices=jax.devices()[:1])


# ------------------------------------------------------------------------- faults and changed settings on resume

def _truncate_largest_state_file(step_dir: Path) -> None:
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)


CORRUPTIONS = {  # fault -> (how, the item the one-line report names)
    "truncated data file": (_truncate_largest_state_file, "state"),
    "deleted manifest": (lambda step_dir: (step_dir / "state" / "manifest.ocdbt").unlink(), "state"),
    "deleted data iterator state": (lambda step_dir: (step_dir / "data" / "process_0-of-1.json").unlink(), "data"),
}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """(result, workdir) of the 6-step tiny run without interruption."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return pretrain.run(tiny_config(data_dir), workdir, devices=jax.devices()[:1]), workdir


@pytest.fixture(scope="module")
def stopped_at_step_4(data_dir, tmp_path_factory) -> Path:
    """The workdir of the tiny run stopped at step 4 (checkpoints at steps 2 and 4); copy it before changing it."""
    workdir = tmp_path_factory.mktemp("stopped_at_4")
    pretrain.run(tiny_config(data_dir), str(workdir), devices=jax.devices()[:1], stop_at_step=4)
    return workdir


def test_the_run_learns_and_its_checkpoint_carries_the_config_and_the_palette(uninterrupted):
    full, full_dir = uninterrupted
    assert full["finished"] and losses(full)[-1] < losses(full)[0]
    # The checkpoint carries the config and the palette, so later jobs need only the workdir.
    ckpt = ckpt_lib.Checkpointer(full_dir, create=False)
    assert ckpt.restore_config(6).model.d_model == 32
    assert ckpt.restore_palette(6).shape == (16, 1)
    ckpt.close()


@pytest.mark.parametrize("fault", sorted(CORRUPTIONS))
def test_unreadable_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous_one(
        fault, data_dir, tmp_path, uninterrupted, stopped_at_step_4, capsys, caplog):
    full, full_dir = uninterrupted
    config = tiny_config(data_dir)
    tmp_path = tmp_path / "run"
    shutil.copytree(stopped_at_step_4, tmp_path)
    corrupt, item = CORRUPTIONS[fault]
    corrupt(tmp_path / "checkpoints" / "4")
    capsys.readouterr()
    caplog.clear()
    resumed = pretrain.run(config, str(tmp_path), devices=jax.devices()[:1])
    (report,) = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert report.startswith(f"checkpoint step 4 is unreadable ({item}: ") and report.endswith("resuming from step 2")
    assert "\n" not in report and "Traceback" not in capsys.readouterr().err
    (moved,) = (tmp_path / "checkpoints_unreadable").iterdir()
    assert moved.name.startswith("4-") and str(moved) in report and (moved / "state").is_dir()  # kept, not deleted
    assert resumed["start_step"] == 2 and resumed["finished"]
    assert losses(resumed) == losses(full)[2:]  # bit-exact with the uninterrupted run
    jax.tree.map(np.testing.assert_array_equal, restore_params(str(tmp_path), config), restore_params(full_dir, config))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_no_readable_checkpoint_starts_from_scratch_and_keeps_every_bad_step(data_dir, tmp_path, uninterrupted,
                                                                              stopped_at_step_4):
    full, _ = uninterrupted
    shutil.copytree(stopped_at_step_4, tmp_path / "run")
    for step in (2, 4):
        (tmp_path / "run" / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    resumed = pretrain.run(tiny_config(data_dir), str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not resumed["resumed"] and resumed["start_step"] == 0 and losses(resumed) == losses(full)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "checkpoints_unreadable").iterdir()) == ["2", "4"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_resume_refuses_a_changed_architecture_and_needs_the_flag_to_change_the_learning_rate(data_dir, tmp_path):
    one = jax.devices()[:1]
    pretrain.run(tiny_config(data_dir), str(tmp_path), devices=one, stop_at_step=2)
    wider = tiny_config(data_dir)
    wider.model.d_model = 64
    with pytest.raises(ValueError, match=r"with model.d_model=64: the checkpoint was trained with model.d_model=32,"
                       ) as err:
        pretrain.run(wider, str(tmp_path), devices=one)
    assert "\n" not in str(err.value) and "strict" not in str(err.value)
    lower = tiny_config(data_dir, lr=1e-3)
    with pytest.raises(ValueError, match=r"would change train.lr from 0.003 to 0.001: set "
                       r"--config.checkpoint.allow_changes=True"):
        pretrain.run(lower, str(tmp_path), devices=one)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 3e-3  # nothing changed yet
    assert not (tmp_path / "config_history.jsonl").exists() and not (tmp_path / "checkpoints_unreadable").exists()
    lower.checkpoint.allow_changes = True
    resumed = pretrain.run(lower, str(tmp_path), devices=one)
    assert resumed["start_step"] == 2 and resumed["finished"]
    np.testing.assert_allclose(resumed["history"][0]["learning_rate"], 1e-3, rtol=1e-6)  # step 3: warmup is over
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["field"], h["old"], h["new"]) for h in history] == [
        (2, "checkpoint.allow_changes", False, True), (2, "train.lr", 3e-3, 1e-3)]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 1e-3


# ------------------------------------------------------------------------- real processes

def _main_command(workdir, data_dir, *extra):
    return [
        sys.executable, "-m", "igpt_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}", "--config.model.d_model=32", "--config.model.n_head=2",
        "--config.model.n_layer=2", "--config.train.batch_size=16", "--config.train.eval_every=0",
        "--config.train.log_every=1", "--config.train.warmup_steps=2", "--config.then=()", *extra,
    ]


def _config_like_main(command: list[str]):
    """The config that `command` (a `_main_command`) runs, built in this process as main builds it: the config file,
    then each --config.FIELD=VALUE override, then resolved (for a reference run in this process, on its 8 devices)."""
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    for arg in command:
        if arg.startswith("--config."):
            field, value = arg.removeprefix("--config.").split("=", 1)
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # a string, e.g. a path
            config.update_from_flattened_dict({field: value})
    return config_checks.resolve(config)


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")  # other flags stay
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_for_line(proc, needle: str, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return line
    proc.kill()
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(seen[-30:])}")


def _metrics(workdir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_and_two_process_losses(data_dir, tmp_path, common: list[str]) -> tuple[list[float], list[float]]:
    """Runs the demo with `common` flags in this process on 8 devices and through main in two processes with 4 each."""
    palette_cache.load_or_fit_palette(tiny_config(data_dir).data)
    pretrain.run(_config_like_main(_main_command(tmp_path / "one", data_dir, *common)), str(tmp_path / "one"))
    port = _free_port()
    env = {"XLA_FLAGS": _env(4)["XLA_FLAGS"]}
    results = cli_runner.run_commands([
        {"args": _main_command(tmp_path / "two", data_dir, *common, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}")[3:], "env": env}
        for i in range(2)], parallel=True)
    for result in results:
        assert result["returncode"] == 0, result["stderr"][-3000:]
    return _metrics(tmp_path / "one"), _metrics(tmp_path / "two")


def test_two_processes_with_four_devices_each_match_one_process_with_eight(data_dir, tmp_path):
    one, two = _one_and_two_process_losses(
        data_dir, tmp_path, ["--config.train.num_steps=4", "--config.mesh.shape=(2,2,2)",
                             "--config.checkpoint.every_steps=2"])
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    assert len(one) == 4


def test_two_processes_sharing_examples_match_one_process(data_dir, tmp_path):
    # A batch of 3 on 2 processes x 4 devices, the mesh all model axis: every process loads the same 3 examples
    # (what a pod with more hosts than examples per step does) and the run equals one process with 8 devices.
    one, two = _one_and_two_process_losses(
        data_dir, tmp_path, ["--config.train.num_steps=3", "--config.mesh.shape=(1,1,8)", "--config.model.n_head=8",
                             "--config.train.batch_size=3", "--config.checkpoint.every_steps=3"])
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    assert len(one) == 3


def test_logs_after_two_sigkills_hold_every_step_once(data_dir, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.plugin_event_accumulator")
    tensor_util = pytest.importorskip("tensorboard.util.tensor_util")
    palette_cache.load_or_fit_palette(tiny_config(data_dir).data)
    steps = 30
    cmd = _main_command(tmp_path, data_dir, f"--config.train.num_steps={steps}", "--config.checkpoint.every_steps=4")
    kills = []
    for until in (" 9/30 |", " 19/30 |"):  # killed after logging steps past its last checkpoint, twice
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(8), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        _wait_for_line(proc, until)
        proc.kill()
        proc.wait(timeout=60)
        ckpt = ckpt_lib.Checkpointer(str(tmp_path), create=False)
        kills.append((json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"], ckpt.latest_step()))
        ckpt.close()
    finished = subprocess.run(cmd, cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert any(logged > saved for logged, saved in kills)  # steps logged after the last checkpoint were redone
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert len(list((tmp_path / "tensorboard").glob("*tfevents*"))) == 3  # one event file per segment
    for purge in (False, True):
        acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=purge,
                                                 size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        scalars = acc.Tensors("train/loss")
        assert [e.step for e in scalars] == list(range(1, steps + 1))
        assert [tensor_util.make_ndarray(e.tensor_proto).item() for e in scalars] == [
            float(np.float32(r["loss"])) for r in records]


def test_the_leftover_errors_of_an_abandoned_restore_are_dropped_and_nothing_else():
    seen = []
    hook = ckpt_lib._DropAbandonedRestoreErrors(seen.append)

    def unraisable(err, filename="x.py"):
        code = compile("raise err", filename, "exec")
        try:
            exec(code, {"err": err})
        except Exception as raised:  # noqa: BLE001
            tb = raised.__traceback__
        return types.SimpleNamespace(exc_type=type(err), exc_value=err, exc_traceback=tb, err_msg=None, object=None)

    hook(unraisable(RuntimeError("Event loop is closed")))
    hook(unraisable(Exception("Encountered error while reading array index"),
                    os.path.join("site-packages", "orbax", "checkpoint", "_src", "serialization.py")))
    kept = [unraisable(RuntimeError("Event loop is closed soon")), unraisable(ValueError("Event loop is closed")),
            unraisable(Exception("Encountered error"), os.path.join("site-packages", "other", "x.py"))]
    for u in kept:
        hook(u)
    assert seen == kept
