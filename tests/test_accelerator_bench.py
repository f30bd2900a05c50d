"""bench/accelerator.py runs on the CPU with tiny shapes, so that the accelerator command cannot rot: its JSON holds
the train, sampling and prefill rows with TFLOP/s per device from the shared FLOP accounting, and a spent time
budget skips what is left and says so. The Hugging Face peer's rows (measured in child processes; torch and
transformers imported, a few steps of the port) take too long for the default suite:
`pytest -m slow -n 0 tests/test_accelerator_bench.py`."""

import json

import pytest

from igpt_jax.training import mfu


@pytest.fixture(scope="module")
def accelerator(bench_script):
    return bench_script("accelerator")


def _tiny(accelerator, out, *flags):
    return accelerator.run(accelerator.parse_args(["--size=tiny", "--attention=dense", "--remat=none", "--steps=1",
                                                   "--devices=1", f"--out={out}", *flags]))


def test_tiny_run_on_cpu_writes_the_report(accelerator, tmp_path, capsys):
    out = tmp_path / "accelerator.json"
    report = _tiny(accelerator, out, "--sample_batches=1", "--peer=off")
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (report["platform"], report["devices"], report["peak_flops_per_device"]) == ("cpu", 1, None)
    assert [r["what"] for r in report["rows"]] == ["train", "sample", "prefill"] and report["skipped"] == []
    train, sample, prefill = report["rows"]
    assert (train["attention"], train["remat"], train["dtype"], train["batch"]) == ("dense", "none", "bfloat16", 2)
    assert train["tokens_per_s"] == pytest.approx(2 * 64 / train["step_s"])
    cfg = accelerator.model_config(accelerator.SIZES["tiny"], "dense", "none", "bfloat16")
    flops = mfu.model_flops_per_token(cfg)["total"]
    assert train["tflops_per_device"] == pytest.approx(train["tokens_per_s"] * flops / 1e12)
    assert "mfu" not in train and train["planned_bytes"] > 0  # no known peak on a CPU
    assert (sample["batch"], prefill["batch"]) == (1, 4)
    assert sample["tokens_per_s"] == pytest.approx(64 / sample["seconds"])
    assert prefill["tokens_per_s"] == pytest.approx(4 * 64 / prefill["seconds"])
    assert report["peer_note"] == "--peer=off" and report["ratios"] == {} and not report["isolated"]
    table = capsys.readouterr().out
    assert "TFLOP/s/dev" in table and "peer: --peer=off" in table


@pytest.mark.slow
def test_the_hugging_face_peer_rows_and_ratios(accelerator, tmp_path):
    pytest.importorskip("transformers")
    # In child processes, one after the other, as on a GPU (where JAX's memory would otherwise starve torch).
    report = _tiny(accelerator, tmp_path / "accelerator.json", "--sample_batches=1", "--isolate=yes")
    assert report["isolated"] and sorted(p.name for p in tmp_path.iterdir()) == ["accelerator.json"]
    train = report["rows"][0]
    peers = [r for r in report["rows"] if r["what"] == "peer"]
    assert [p["attention"] for p in peers] == ["HF eager", "HF sdpa"] and report["peer_note"] == ""
    for p in peers:
        assert p["batch"] == train["batch"] and p["tokens_per_s"] > 0
        assert report["ratios"][p["attention"]] == pytest.approx(train["tokens_per_s"] / p["tokens_per_s"])


def test_a_spent_budget_skips_the_rest_and_says_so(accelerator, tmp_path):
    out = tmp_path / "accelerator.json"
    report = accelerator.run(accelerator.parse_args(["--size=tiny", "--budget_s=0", f"--out={out}"]))
    assert report["rows"] == [] and report["ratios"] == {}
    assert report["skipped"] == ["train remat none", "train remat dots", "sampling at batch 4", "sampling at batch 1",
                                 "prefill at batch 4", "Hugging Face port (eager)", "Hugging Face port (sdpa)"]
    assert json.loads(out.read_text())["skipped"] == report["skipped"]
