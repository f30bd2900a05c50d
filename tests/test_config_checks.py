"""Config errors before any work (one line naming the field), --list, and settings that follow the data."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import cli_runner
import pytest

from igpt_jax.config import checks as config_checks
from igpt_jax.config import defaults as config_defaults
from igpt_jax.config import listing as config_listing
from igpt_jax.data import import_data, testing
from igpt_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _config(name: str = "demo", variant=None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _main(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "igpt_jax.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env or dict(os.environ, JAX_PLATFORMS="cpu"))


# ------------------------------------------------------------------------------------------------ the command line
CLI_ERRORS = [
    (["--config=configs/demo.py:nosuchvariant"],
     "config variant 'nosuchvariant': unknown argument 'nosuchvariant'; this config takes no variant"),
    (["--config=configs/cifar10_cpu.py:anything"],
     "config variant 'anything': unknown argument 'anything'; this config takes no variant"),
    (["--config=configs/igpt_s.py:resolution=48"],
     "config variant 'resolution=48': unknown argument 'resolution'; this config takes bert, dataset=imagenet2012, "
     "res=32, runlocal"),
    (["--config=configs/demo.py", "--config.trian.lr=1"],
     "--config.trian.lr: no such config field (did you mean 'train'?); list them with --list"),
    (["--config=configs/demo.py", "--config.train.batchsize=3"],
     "--config.train.batchsize: no such config field (did you mean 'batch_size'?); list them with --list"),
    (["--config=configs/demo.py", "--config.train.batch_size=0"], "train.batch_size=0 must be positive"),
    (["--config=configs/demo.py", "--config.train.batch_size=-4"], "train.batch_size=-4 must be positive"),
    (["--config=configs/demo.py", "--config.then=('probe', 'smaple')"],
     "config.then[1]='smaple' is not a job (did you mean 'sample'?); follow-up jobs (they read the run before "
     "them): probe, finetune, sample, evaluate, tokenize, pretrain"),
    (["--config=configs/demo.py", "--config.job=pretrian"],
     "config.job='pretrian' is not a job (did you mean 'pretrain'?); jobs: pretrain, probe, finetune, sample, "
     "evaluate, compile, vqvae, tokenize, lr_search"),
    (["--config=configs/demo.py", "--config.mesh.shape=(1, 1, 8)"],
     "model.n_head=4 cannot be split 8 ways over mesh axes ('tensor',) (mesh.shape: data=1, fsdp=1, context=1, "
     "tensor=8; rule 'heads'): choose a mesh whose tensor size divides 4"),
    (["--config=configs/demo.py", "--config.checkpoint.max_to_keep=2"],
     "probe.checkpoint_steps=(500, 1000, 1500): step(s) [500] will not be on disk when the probe runs; this run "
     "keeps steps [1000, 1500] (a checkpoint every checkpoint.every_steps=500 up to train.num_steps=1500, the "
     "last checkpoint.max_to_keep=2); ask for kept steps or raise checkpoint.max_to_keep"),
    (["--config=configs/demo.py", "--config.probe.max_iter=0"],
     "follow-up job 'probe' (config.then): probe.max_iter=0 must be positive"),
    (["--config=configs/demo.py", "--config.probe.attentive_lrs=0.03,0.01", "--config.probe.attentive_lrs=0.1,0.03"],
     "follow-up job 'probe' (config.then): probe.attentive_lrs=(0.03, 0.01, 0.1, 0.03) holds a value twice; a tuple "
     "setting given twice on the command line appends the second list to the first, so give "
     "--config.probe.attentive_lrs once"),
    (["--config=configs/igpt_s.py", "--config.model.vocab_size=256", "--config.data.n_colors=512"],
     "model.vocab_size=256 differs from data.n_colors=512: the model's vocabulary is the palette; set one of them "
     "(the other follows) or both equal"),
    (["--config=configs/demo.py", "--config.train.batch_size=abc"],
     "flag --config.train.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    (["--config=configs/nosuch.py"], "cannot load the config file: [Errno 2] No such file or directory: "
                                     "'configs/nosuch.py'"),
]


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory):
    """Each CLI_ERRORS command's (result, its workdir, its TFDS data_dir), run through main in forked processes."""
    root = tmp_path_factory.mktemp("cli_errors")
    dirs = [(root / f"{i}" / "run", root / f"{i}" / "tfds") for i in range(len(CLI_ERRORS))]
    results = cli_runner.run_commands([
        {"args": [*args, f"--workdir={workdir}"], "env": {"TFDS_DATA_DIR": str(tfds)}}  # the data_dir of a run
        for (args, _), (workdir, tfds) in zip(CLI_ERRORS, dirs)] + [
        {"args": ["--config=configs/demo.py", "--config.job=probe", f"--config.checkpoint.source_workdir={root / 'x'}",
                  f"--workdir={root / 'probe'}"], "env": {"TFDS_DATA_DIR": str(root / "tfds")}},
        {"args": ["--config=configs/demo.py", "--list"]},  # no --workdir needed
        {"args": ["--help"]},
    ])
    return list(zip(results, dirs)) + [(r, (root, None)) for r in results[len(CLI_ERRORS):]]


@pytest.mark.parametrize("case", range(len(CLI_ERRORS)), ids=[m.split(" ")[0][:40] for _, m in CLI_ERRORS])
def test_bad_config_is_one_line_before_any_work(cli_errors, case):
    result, (workdir, tfds) = cli_errors[case]
    assert result["returncode"] == 2, result["stderr"][-2000:]
    assert result["stderr"].splitlines() == [f"error: {CLI_ERRORS[case][1]}"]
    assert not workdir.exists() and not tfds.exists()  # no workdir, config.json or import


def test_a_missing_pretrained_source_is_one_line_and_writes_nothing(cli_errors):
    result, (root, _) = cli_errors[len(CLI_ERRORS)]
    source = root / "x"
    assert result["returncode"] == 2, result["stderr"][-2000:]
    assert "Traceback" not in result["stderr"]  # before it, only the start-up log lines
    assert result["stderr"].splitlines()[-1] == (
        f"error: no checkpoint in {source}/checkpoints and no converted model in {source}: expected a pretraining "
        "run's workdir (checkpoints/<step>) or a folder written by python -m igpt_jax.pretrained.convert "
        "(model_config.json, palette.json, params/)")
    assert not (root / "probe").exists()


def test_list_prints_jobs_and_every_field_with_its_default_and_comment(cli_errors):
    result = cli_errors[len(CLI_ERRORS) + 1][0]
    assert result["returncode"] == 0, result["stderr"][-2000:]
    out = result["stdout"]
    assert "  probe      linear probe of every layer's features of a pretraining checkpoint" in out
    assert "  train.batch_size = 64 [128]  # global, over all processes and devices\n" in out
    assert "  train.lr = 0.003  # peak learning rate (Adam)\n" in out
    assert "  model.vocab_size = 16  # number of palette colours (token ids are 0..vocab_size-1). (0: data.n_colors)" in out
    assert "  data.augment = 'shift' ['none']  # cifar | shift | imagenet | none (training only); auto:" in out
    assert "  then = ('probe', 'sample') [()]  # Jobs to run after `job`" in out
    usage = cli_errors[len(CLI_ERRORS) + 2][0]["stdout"]
    assert "--list" in usage and f"({', '.join(config_checks.JOBS)})" in usage.replace("\n", " ")


def test_every_default_field_has_a_comment():
    fields = config_listing._flat(config_defaults.base_config())  # noqa: SLF001
    comments = config_listing.field_comments()
    assert sorted(set(fields) - set(comments)) == []


# ------------------------------------------------------------------------------------------------ checks in process
def test_batch_split_and_gradient_accumulation_are_checked_against_the_devices():
    config = config_checks.resolve(_config())
    config.train.batch_size = 12
    with pytest.raises(ConfigError, match=r"^train.batch_size=12 is not divisible by the data-parallel "
                                                        r"size 8 \(the mesh axes"):
        config_checks.validate(config, num_devices=8)
    config_checks.validate(config, num_devices=4)
    config.train.grad_accum_steps = 5
    with pytest.raises(ConfigError, match=r"^train.grad_accum_steps=5 must divide train.batch_size=12"):
        config_checks.validate(config, num_devices=1)
    config = config_checks.resolve(_config())
    config.mesh.shape = (-1, 3, 1)
    with pytest.raises(ConfigError, match=r"fixed axes multiply to 3, which does not divide 8"):
        config_checks.validate(config, num_devices=8)


def test_follow_ups_run_after_pretraining_only_and_read_its_checkpoint():
    config = config_checks.resolve(_config())
    follow = config_checks.follow_up_jobs(config, "/runs/demo")
    assert [(c.job, c.checkpoint.source_workdir, w) for c, w in follow] == [
        ("probe", "/runs/demo", "/runs/demo/probe"), ("sample", "/runs/demo", "/runs/demo/sample")]
    config.job = "sample"
    assert config_checks.follow_up_jobs(config, "/runs/x") == []


# ------------------------------------------------------------------------------------------------ derived settings
def test_paper_configs_resolve_to_their_explicit_settings():
    config = config_checks.resolve(_config("igpt_l", "res=48"))
    assert (config.data.n_colors, config.model.vocab_size, config.model.n_ctx, config.data.augment) == (
        512, 512, 48 * 48, "imagenet")
    config = config_checks.resolve(_config("cifar10_cpu"))
    assert (config.data.resolution, config.model.n_ctx, config.data.augment, config.data.channels) == (
        16, 256, "cifar", 3)


@pytest.fixture(scope="module")
def gray_dataset(tmp_path_factory):
    """A 12x12 grayscale dataset imported under a new name: (data_dir, name)."""
    tmp = tmp_path_factory.mktemp("gray")
    testing.write_npz(tmp / "gray.npz", n_train=40, n_test=8, size=(12, 12), channels=1)
    import_data.import_dataset(str(tmp / "gray.npz"), "my_gray", str(tmp / "tfds"))
    return str(tmp / "tfds"), "my_gray"


def test_a_new_dataset_needs_only_its_name(gray_dataset):
    data_dir, name = gray_dataset
    config = _config("cifar10_cpu")  # a colour recipe with flips; its resolution (16) is an explicit choice
    config.data.name, config.data.data_dir = name, data_dir
    config_checks.resolve(config)
    config_checks.validate(config)
    assert (config.data.channels, config.data.n_colors, config.data.augment) == (1, 64, "none")
    assert (config.model.vocab_size, config.model.n_ctx) == (64, 256)
    config = _config("demo")
    config.data.name, config.data.data_dir = name, data_dir
    config_checks.resolve(config)
    assert (config.data.resolution, config.model.n_ctx, config.data.channels) == (12, 144, 1)


def test_explicit_settings_win_and_contradictions_are_one_line(gray_dataset, tmp_path):
    data_dir, name = gray_dataset
    config = _config("demo")
    config.data.name, config.data.data_dir, config.data.n_colors, config.data.augment = name, data_dir, 8, "cifar"
    config_checks.resolve(config)
    assert (config.model.vocab_size, config.data.augment) == (8, "cifar")
    config = _config("demo")
    config.data.name, config.data.data_dir, config.model.vocab_size = name, data_dir, 32
    config_checks.resolve(config)
    assert config.data.n_colors == 32  # the palette follows an explicit vocabulary
    config = _config("demo")
    config.data.name, config.data.data_dir, config.data.resolution, config.model.n_ctx = name, data_dir, 12, 100
    with pytest.raises(ConfigError, match=r"^data.resolution=12 gives 144 tokens per image, more than "
                                                        r"model.n_ctx=100; set model.n_ctx to 0"):
        config_checks.validate(config_checks.resolve(config))
    # Not imported yet: channels and size come from the .npz header of the auto-import source.
    arrays = testing.write_npz(tmp_path / "rgb.npz", n_train=4, n_test=2, size=(20, 20), channels=3)
    assert arrays["x_train"].shape == (4, 20, 20, 3)
    config = _config("demo")
    config.data.name, config.data.data_dir, config.data.import_source = "rgb_new", str(tmp_path), str(tmp_path / "rgb.npz")
    config_checks.resolve(config)
    assert (config.data.channels, config.data.resolution, config.data.n_colors, config.model.n_ctx) == (3, 20, 512, 400)
    assert not (tmp_path / "rgb_new").exists()  # resolving read a header, imported nothing


def test_new_dataset_trains_from_its_name_alone_and_starts_quietly(gray_dataset, tmp_path):
    """A real run: no override but the name (and a tiny model); no libtpu start-up lines on this CPU machine."""
    data_dir, name = gray_dataset
    # As a user's shell: no JAX_PLATFORMS and no fake devices (XLA's optimisation level stays at the session's 0).
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    result = _main("--config=configs/demo.py", f"--workdir={tmp_path / 'run'}", f"--config.data.name={name}",
                   f"--config.data.data_dir={data_dir}", "--config.then=()", "--config.model.d_model=32",
                   "--config.model.n_head=2", "--config.model.n_layer=1", "--config.train.batch_size=8",
                   "--config.train.num_steps=2", "--config.train.warmup_steps=1", "--config.train.eval_every=0",
                   "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=false", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vocabulary 64" in result.stderr and "context 144" in result.stderr
    noise = [line for line in result.stderr.splitlines() if "tpu" in line.lower()]
    assert noise == []
    # Resuming it with another architecture: one line naming the field and both values, no traceback.
    again = _main("--config=configs/demo.py", f"--workdir={tmp_path / 'run'}", f"--config.data.name={name}",
                  f"--config.data.data_dir={data_dir}", "--config.then=()", "--config.model.d_model=32",
                  "--config.model.n_head=2", "--config.model.n_layer=2", "--config.train.batch_size=8",
                  "--config.train.num_steps=4", "--config.train.warmup_steps=1", "--config.train.eval_every=0",
                  "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=false", env=env)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert again.stderr.splitlines()[-1].startswith(
        f"error: cannot resume {tmp_path / 'run'} (checkpoint step 2) with model.n_layer=2: the checkpoint was "
        "trained with model.n_layer=1"), again.stderr[-3000:]


@pytest.mark.parametrize("field,value,message", [
    ("probe.solver", "lbgfs", r"^probe.solver='lbgfs', expected one of \('auto', 'jax_lbfgs', 'lbfgs', 'sgd'\)$"),
    ("probe.layers", "4;8", r"^probe.layers='4;8': expected 'all' or comma-separated layer ids"),
    ("probe.pooling", "quadrant", r"^probe.pooling='quadrant': expected one of \['mean', 'quadrants'\]$"),
    ("data.fold_val", True, r"^data.fold_val=True puts the validation split into 'train'"),
    ("sample.given_rows", 9, r"^sample.given_rows=9 must be -1 \(the top half\) or a number of rows in \[0, 8\]"),
    ("finetune.objective", "gen", r"^finetune.objective='gen' is not one of gen\+clf, clf \(did you mean 'gen\+clf'\?\)$"),
])
def test_follow_up_job_settings_are_checked_before_pretraining(field, value, message):
    config = config_checks.resolve(_config())
    section, name = field.split(".")
    config[section][name] = value
    job = {"probe": "probe", "data": "probe", "sample": "sample", "finetune": "finetune"}[section]
    config.then = (job,)
    config_checks.validate(config)  # pretraining alone does not read these settings
    (follow_config, _), = config_checks.follow_up_jobs(config, "/runs/x")
    with pytest.raises(ConfigError, match=message):
        config_checks.validate(follow_config)


def test_quiet_start_leaves_an_explicit_platform_choice_alone(monkeypatch):
    from igpt_jax import quiet_start

    assert not quiet_start.skip_absent_tpu({"JAX_PLATFORMS": "tpu,cpu"})
    assert not quiet_start.skip_absent_tpu({"JAX_FORCE_TPU_INIT": "1"})
    monkeypatch.setattr(quiet_start, "tpu_attached", lambda: True)
    environ = {}
    assert not quiet_start.skip_absent_tpu(environ) and environ == {}


def test_a_dataset_that_is_missing_with_nothing_to_import_is_a_config_error(tmp_path, gray_dataset):
    config = config_checks.resolve(_config())
    config.data.name, config.data.data_dir = "not_here", str(tmp_path)
    with pytest.raises(ConfigError, match=r"^data.name='not_here' is not in .* and there is nothing to "
                                                        r"import it from; import it with python -m igpt_jax"):
        config_checks.check_data_available(config)
    config.data.name = "Not-Here"
    with pytest.raises(ConfigError, match=r"^data.name='Not-Here': Invalid dataset name"):
        config_checks.check_data_available(config)
    config.data.name, config.data.data_dir = gray_dataset[1], gray_dataset[0]
    config_checks.check_data_available(config)  # imported: fine
    config.data.name, config.data.data_dir = "digits", str(tmp_path)
    config_checks.check_data_available(config)  # importable from scikit-learn
