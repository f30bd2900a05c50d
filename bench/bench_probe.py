r"""The linear probe's cost on this machine: feature extraction per split, and scikit-learn against the JAX solver.

On one pretraining checkpoint (or, without ``--source``, the same architecture with random weights):
  1. input pipeline alone: the time to read and tokenise each split (no model);
  2. feature extraction per split (`igpt_jax.probing.features.FeatureExtractor`, every layer of ``probe.layers``); the
     model's share is the extraction time minus the pipeline's;
  3. the probe of every layer (C chosen on validation, the best layer refitted on train + validation) and of the
     concatenated layers, on the same features, with scikit-learn ('lbfgs') and with the JAX solver ('jax_lbfgs'):
     wall time, best-layer and concatenation test accuracy, the largest per-layer difference in validation and test
     accuracy, and the time ratio. JAX's time includes its compilations.

Example (the CIFAR-10 recipe, random weights, the first 5,000 examples of each split to keep it short):
  python bench/bench_probe.py --config=configs/cifar10_cpu.py --data_dir=/tmp/tfds-probe --max_train=5000 \
      --max_eval=5000
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import jax
import numpy as np

from igpt_jax import sharding
from igpt_jax.data import iterators, palette_cache, records
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import fitting, linear_probe


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10_cpu.py", help="a config file (model, data, probe grid)")
    p.add_argument("--source", default="", help="pretraining workdir; empty: random weights")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("--data_dir", default="", help="TFDS directory (default: the config's)")
    p.add_argument("--max_train", type=int, default=0, help="training examples (0: the whole split)")
    p.add_argument("--max_eval", type=int, default=0, help="validation and test examples each (0: whole splits)")
    p.add_argument("--solvers", default="lbfgs,jax_lbfgs", help="comma-separated probe.solver values")
    return p.parse_args(argv)


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv=None) -> None:
    args = parse_args(argv)
    config = load_config(args.config)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = sharding.rules_from_config(config.mesh.rules)
    if args.source:
        config.checkpoint.source_workdir = args.source
        config.checkpoint.step = args.step
        loaded = features_lib.load_pretrained(config, "unused", mesh, rules)
        model_cfg, palette, params, layout = loaded.model_cfg, loaded.palette, loaded.params, loaded.layout
        what = f"checkpoint {loaded.directory}/{loaded.step}"
    else:
        from igpt_jax.models.igpt import ModelConfig  # noqa: PLC0415

        model_cfg = ModelConfig(**config.model.to_dict())
        palette = palette_cache.load_or_fit_palette(config.data)
        layout = features_lib.param_layout(model_cfg, mesh, rules)
        params = features_lib.random_params(model_cfg, layout, mesh, rules, jax.random.key(0))
        what = "random weights"
    layers = features_lib.resolve_layers(config.probe.layers, model_cfg.n_layer)
    batch = int(config.probe.batch_size or config.train.eval_batch_size or config.train.batch_size)
    extractor = features_lib.FeatureExtractor(model_cfg, layout, mesh, rules, config.data, palette, layers,
                                              batch_size=batch)
    print(f"# {config.data.name}, {what}: {len(layers)} layers x {model_cfg.d_model}, {model_cfg.n_ctx} tokens per "
          f"image, batch {batch}, {jax.device_count()} device(s)")

    rows, splits = [], {}
    for split in records.SPLITS:
        limit = args.max_train if split == "train" else args.max_eval
        t0 = time.time()
        seen = 0
        for local in iterators.make_iterator(config.data, split, batch_size=batch, train=False, seed=0,
                                             palette=palette):
            seen += int(np.sum(local["mask"]))
            if limit and seen >= limit:
                break
        t_input = time.time() - t0
        t0 = time.time()
        splits[split] = extractor.extract(params, split, max_examples=limit)
        t_total = time.time() - t0
        n = splits[split].n
        rows.append((split, n, t_input, t_total, n * model_cfg.n_ctx / t_total))
    print("\n| split | examples | input pipeline alone (s) | extraction (s) | model share (s) | tokens/s |")
    print("|---|---|---|---|---|---|")
    for split, n, t_input, t_total, tps in rows:
        print(f"| {split} | {n} | {t_input:.1f} | {t_total:.1f} | {max(t_total - t_input, 0):.1f} | {tps:,.0f} |")

    num_classes = records.num_classes(config.data)
    results = {}
    for solver in args.solvers.split(","):
        pcfg = config.probe.copy_and_resolve_references()
        pcfg.solver = solver
        settings = linear_probe.ProbeSettings.from_config(pcfg)
        t0 = time.time()
        res = fitting.probe_splits(splits, settings, num_classes=num_classes, layers=layers,
                                     n_layer=model_cfg.n_layer, concat_layers=int(config.probe.concat_layers))
        results[solver] = (time.time() - t0, res)
    print("\n| solver | probe time (s) | best layer | best-layer test % | concat test % | "
          "max per-layer |val diff| | max per-layer |test diff| | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ref_solver = args.solvers.split(",")[0]
    ref_time, ref = results[ref_solver]
    for solver, (seconds, res) in results.items():
        dval = max(abs(a["val_accuracy"] - b["val_accuracy"]) for a, b in zip(res["layers"], ref["layers"]))
        dtest = max(abs(a["test_accuracy"] - b["test_accuracy"]) for a, b in zip(res["layers"], ref["layers"]))
        concat = f"{100 * res['concat']['test_accuracy']:.2f}" if "concat" in res else "-"
        print(f"| {solver} | {seconds:.1f} | {res['best_layer']} | {100 * res['best']['test_accuracy']:.2f} | "
              f"{concat} | {100 * dval:.2f} | {100 * dtest:.2f} | {ref_time / seconds:.2f}x |")


if __name__ == "__main__":
    main()
