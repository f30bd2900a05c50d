"""Which examples of each global batch every host of a pod loads, for every shipped pod layout (no compile).

    python bench/pod_input_layout.py            # all PODS of configs/igpt_l.py and configs/igpt_xl.py
    python bench/pod_input_layout.py --configs=configs/igpt_xl.py --pods=v4-1024

For each layout it describes the slice with libtpu (as the compile job does), builds the pretraining job's mesh on
it, and asks `igpt_jax.data.multihost.rows_by_process` which rows of the global batch each host's devices hold:
the rows that host's input pipeline reads. It prints the hosts, the rows per host, how many hosts load each row
(more than one where a model axis spans hosts, e.g. XL's batch of 64 on 128 v4 hosts), and process 0's rows.
Needs libtpu (`pip install -e '.[tpu]'`); runs on a CPU machine.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _load(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/igpt_l.py,configs/igpt_xl.py")
    parser.add_argument("--pods", default="", help="comma list of pod names (default: every entry but 'any')")
    args = parser.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from igpt_jax import sharding
    from igpt_jax.data import multihost
    from igpt_jax.jobs import compile as compile_job

    print(f"{'config':<10} {'pod':<9} {'topology':<11} {'mesh (data, fsdp, context, tensor)':<35} {'batch':>5} {'hosts':>5} "
          f"{'rows/host':>9} {'hosts/row':>9}  process 0 rows")
    for path in args.configs.split(","):
        module = _load(path)
        pods = [p for p in (args.pods.split(",") if args.pods else module.PODS) if p != "any"]
        for pod in pods:
            t0 = time.perf_counter()
            config = module.get_config(f"pod={pod}")
            devices, _ = compile_job.describe_topology(config.compile)
            rules = sharding.rules_from_config(config.mesh.rules)
            mesh = sharding.make_mesh(config.mesh.shape, devices)
            batch = int(config.train.batch_size)
            rows = multihost.rows_by_process(batch, mesh, sharding.batch_axes(rules))
            per_row = collections.Counter(r.rows for r in rows.values())
            sizes = sorted({r.size for r in rows.values()})
            sharers = sorted(set(per_row.values()))
            shape = str(tuple(mesh.shape.values()))
            print(f"{os.path.basename(path)[:-3]:<10} {pod:<9} {config.compile.topology:<11} {shape:<35} {batch:>5} "
                  f"{len(rows):>5} {'/'.join(map(str, sizes)):>9} {'/'.join(map(str, sharers)):>9}  {rows[0]}"
                  f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
