r"""The probe job end to end with each solver, one after the other on this machine: wall time and what it found.

For each ``--solvers`` value, a fresh probe workdir under ``--out`` runs the real job (``python -m igpt_jax.main
--config.job=probe``: every layer with the C grid widened at its edges, the best layer refitted on train +
validation, concatenated layers, the raw-pixel and random-weights baselines, the config's low-data budgets) on
the checkpoint of ``--source``. With ``--features_from`` (an earlier probe workdir of the same checkpoint, data and
probe layers), its saved features (``progress/features-*.npz``) are copied in first; the job checks their
fingerprints and reuses them, so the times are the fits' alone, every other piece of the job recomputed. Without
it, each job extracts its features too. Prints one table row per solver: the job's wall time, its own
``seconds``, the time ratio against the first solver, the best layer and its test accuracy, the concatenation,
both baselines and the low-data means.

Example (bench/RESULTS.md "Linear probe: the whole job"; the VQ-VAE codes checkpoint of configs/vqvae_cifar10.py,
whose transformer is configs/cifar10_cpu.py's):
  python bench/bench_probe_job.py --config=configs/vqvae_cifar10.py --source=workdirs/vqvae_cifar10/pretrain \
      --features_from=workdirs/vqvae_cifar10/probe --out=/tmp/bench_probe_job \
      --override=--config.probe.low_data_budgets='(40,250,4000)'
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the config file of the run (model, data, probe settings)")
    p.add_argument("--source", required=True, help="the pretraining workdir to probe")
    p.add_argument("--features_from", default="", help="a probe workdir whose saved features are reused")
    p.add_argument("--out", required=True, help="a directory for one fresh probe workdir per solver")
    p.add_argument("--solvers", default="lbfgs,jax_lbfgs", help="comma-separated probe.solver values")
    p.add_argument("--override", action="append", default=[], help="an extra --config.x=y flag (repeatable)")
    return p.parse_args(argv)


def copy_features(features_from: str, workdir: pathlib.Path) -> int:
    """Copies progress/features-*.npz of an earlier probe workdir; returns how many."""
    src = pathlib.Path(features_from) / "progress"
    files = sorted(src.glob("features-*.npz"))
    if not files:
        sys.exit(f"error: --features_from={features_from}: no progress/features-*.npz there")
    (workdir / "progress").mkdir(parents=True)
    for f in files:
        shutil.copy2(f, workdir / "progress" / f.name)
    return len(files)


def run_job(args: argparse.Namespace, solver: str, workdir: pathlib.Path) -> tuple[float, dict]:
    """Runs the probe job with `solver` in `workdir`; returns (wall seconds, results.json)."""
    cmd = [sys.executable, "-m", "igpt_jax.main", f"--config={args.config}", "--config.job=probe",
           "--config.then=()", f"--workdir={workdir}", f"--config.checkpoint.source_workdir={args.source}",
           f"--config.probe.solver={solver}", *args.override]
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.time() - t
    (workdir / "job.log").write_text(done.stdout)
    if done.returncode:
        sys.exit(f"error: the probe job with solver {solver} failed (exit {done.returncode}); log: {workdir}/job.log")
    return wall, json.loads((workdir / "results.json").read_text())


def summary(results: dict) -> dict[str, str]:
    """The figures of one job for the table (percentages)."""
    last = results["checkpoints"][-1]
    base = results.get("baselines", {})

    def pct(x):
        return f"{100 * x:.2f}" if x is not None else "-"

    low = last.get("low_data", {}).get("results", [])
    return {
        "best layer": str(results["best_layer"]),
        "best test %": pct(results["test_accuracy"]),
        "concat test %": pct(last.get("concat", {}).get("test_accuracy")),
        "raw pixels %": pct(base.get("raw_pixels", {}).get("test_accuracy")),
        "random weights %": pct(base.get("random_init", {}).get("test_accuracy")),
        "low data %": " / ".join(f"{r['budget']}: {pct(r['mean_accuracy'])}" for r in low) or "-",
        "reused": str(len(results.get("reused", []))),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    rows = []
    for solver in args.solvers.split(","):
        workdir = out / solver
        if workdir.exists():
            sys.exit(f"error: --out={args.out}: {workdir} exists; pass an empty --out")
        workdir.mkdir(parents=True)
        copied = copy_features(args.features_from, workdir) if args.features_from else 0
        wall, results = run_job(args, solver, workdir)
        rows.append({"solver": solver, "features copied": str(copied), "wall (s)": f"{wall:.1f}",
                     "job seconds": f"{results['seconds']:.1f}", **summary(results)})
    first = float(rows[0]["wall (s)"])
    for r in rows:
        r["time ratio"] = f"{first / float(r['wall (s)']):.2f}x"
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] for c in cols) + " |")


if __name__ == "__main__":
    main()
