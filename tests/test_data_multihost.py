"""multihost: which rows of a global batch each process loads, and the global arrays made of them, on the 8 fake CPU
devices of one process and with two real JAX processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from igpt_jax.data import import_data, iterators, multihost, palette_cache, testing

flags.FLAGS.mark_as_parsed()
tfds.display_progress_bar(False)

WORKER = textwrap.dedent('''
    import json, sys
    port, pid, data_dir, palette_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    import jax.numpy as jnp
    import numpy as np
    jax.config.update('jax_num_cpu_devices', 2)
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid,
                               initialization_timeout=60)
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from jax.experimental import multihost_utils
    from igpt_jax.data import iterators, multihost, testing

    cfg = testing.small_config('mh', data_dir, resolution=8, channels=1, n_colors=4)
    cfg.palette_path = palette_path
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 2), ('data', 'fsdp'), axis_types=auto)
    masked_sum = jax.jit(lambda t, m: jnp.sum(jnp.where(m[:, None], t, 0)))
    out = {'eval': [], 'train': []}
    for batch in iterators.make_iterator(cfg, 'test', batch_size=4, train=False):
      g = multihost.make_global_batch(batch, mesh)
      assert g['tokens'].shape == (8, 64), g['tokens'].shape
      assert g['tokens'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
      out['eval'].append({'local_index': batch['index'].tolist(),
                          'global_index': multihost_utils.process_allgather(g['index'], tiled=True).tolist(),
                          'sum': int(masked_sum(g['tokens'], g['mask']))})
    it = iterators.make_iterator(cfg, 'train', batch_size=4, train=True, seed=0)
    for _ in range(3):
      batch = next(it)
      g = multihost.make_global_batch(batch, mesh, batch_axes=('data',))
      out['train'].append({'local_index': batch['index'].tolist(),
                           'global_index': multihost_utils.process_allgather(g['index'], tiled=True).tolist()})
    # Shared rows: the batch is not split (a model axis spans both processes), so each process loads all 3 rows
    # of every global batch: fewer examples per step than processes x devices.
    shared_mesh = jax.make_mesh((1, 1, 4), ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rows = multihost.host_rows(3, shared_mesh)
    out['shared_rows'] = str(rows)
    out['shared_train'], out['shared_eval'] = [], []
    it = iterators.make_iterator(cfg, 'train', batch_size=rows.size, train=True, seed=0, rows=rows)
    for _ in range(3):
      g = multihost.make_global_batch(next(it), shared_mesh, rows=rows)
      assert g['tokens'].shape == (3, 64), g['tokens'].shape
      out['shared_train'].append({'index': multihost_utils.process_allgather(g['index'], tiled=True).tolist(),
                                  'sum': int(jax.jit(jnp.sum)(g['tokens']))})
    for batch in iterators.make_iterator(cfg, 'test', batch_size=rows.size, train=False, rows=rows):
      g = multihost.make_global_batch(batch, shared_mesh, rows=rows)
      out['shared_eval'].append({'index': multihost_utils.process_allgather(g['index'], tiled=True).tolist(),
                                 'sum': int(masked_sum(g['tokens'], g['mask']))})
    # Alternating rows: the mesh puts the processes' devices in turn along the batch axis (as a topology-aware
    # TPU mesh can), so process 0 holds rows 0 and 2 of every batch of 4, process 1 rows 1 and 3.
    devs = sorted(jax.devices(), key=lambda d: (d.id % 2, d.process_index))  # p0, p1, p0, p1
    alt_mesh = jax.sharding.Mesh(np.asarray(devs).reshape(1, 4, 1), ('data', 'fsdp', 'tensor'),
                                 axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rows = multihost.host_rows(4, alt_mesh)
    out['alt_rows'] = str(rows)
    it = iterators.make_iterator(cfg, 'train', batch_size=rows.size, train=True, seed=0, rows=rows)
    out['alt_train'] = []
    for _ in range(2):
      g = multihost.make_global_batch(next(it), alt_mesh, rows=rows)
      out['alt_train'].append(multihost_utils.process_allgather(g['index'], tiled=True).tolist())
    print('RESULT ' + json.dumps(out), flush=True)
    jax.distributed.shutdown()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_shard_and_build_global_batches(tmp_path):
    testing.write_npz(tmp_path / 'mh.npz', n_train=20, n_test=13, size=(8, 8), channels=1)
    data_dir = str(tmp_path / 'tfds')
    import_data.import_dataset(str(tmp_path / 'mh.npz'), 'mh', data_dir)
    cfg = testing.small_config('mh', data_dir, resolution=8, channels=1, n_colors=4)
    palette = palette_cache.load_or_fit_palette(cfg)
    palette_path = palette_cache.default_palette_path(cfg)

    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop('XLA_FLAGS', None)  # conftest's 8 fake devices: each worker sets its own 2
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), data_dir, palette_path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
            line = next(l for l in out.splitlines() if l.startswith('RESULT '))
            results.append(json.loads(line[len('RESULT '):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    # Evaluation: 13 test records -> shards of 7 and 6, two steps of 4 per process.
    local = [[i for step in r['eval'] for i in step['local_index'] if i >= 0] for r in results]
    assert not set(local[0]) & set(local[1])
    assert sorted(local[0] + local[1]) == list(range(13))
    assert len(results[0]['eval']) == len(results[1]['eval']) == 2
    for s0, s1 in zip(results[0]['eval'], results[1]['eval']):
        assert s0['global_index'] == s1['global_index'] == s0['local_index'] + s1['local_index']
        assert s0['sum'] == s1['sum']
    # The global masked sums equal the same shards read in this single process.
    expected = [0, 0]
    for shard in range(2):
        for step, b in enumerate(iterators.make_iterator(cfg, 'test', batch_size=4, train=False, palette=palette,
                                                         shard_index=shard, shard_count=2)):
            expected[step] += int(b['tokens'][b['mask']].sum())
    assert [s['sum'] for s in results[0]['eval']] == expected

    # Training: the global batches do not depend on the number of processes. The two local halves of each global
    # batch are disjoint and together are exactly the batch a single process reads.
    single = iterators.make_iterator(cfg, 'train', batch_size=8, train=True, seed=0, palette=palette,
                                     shard_index=0, shard_count=1)
    for s0, s1 in zip(results[0]['train'], results[1]['train']):
        assert s0['global_index'] == s1['global_index'] == s0['local_index'] + s1['local_index']
        assert not set(s0['local_index']) & set(s1['local_index'])
        assert s0['global_index'] == next(single)['index'].tolist()


    # Shared rows: both processes hold the whole batch of 3, and it is the batch one process reads alone.
    assert results[0]['shared_rows'] == results[1]['shared_rows'] == '0:3'
    assert results[0]['shared_train'] == results[1]['shared_train']
    alone = iterators.make_iterator(cfg, 'train', batch_size=3, train=True, seed=0, palette=palette,
                                    shard_index=0, shard_count=1)
    for step in results[0]['shared_train']:
        b = next(alone)
        assert step['index'] == b['index'].tolist() and step['sum'] == int(b['tokens'].sum())
    # Alternating rows: each process loads every other row; the global batch is the one a single process reads.
    assert sorted([results[0]['alt_rows'], results[1]['alt_rows']]) == ['0:1,2:3', '1:2,3:4']
    alone = iterators.make_iterator(cfg, 'train', batch_size=4, train=True, seed=0, palette=palette,
                                    shard_index=0, shard_count=1)
    for index in results[0]['alt_train']:
        assert index == next(alone)['index'].tolist()
    # Evaluation with rows: global batches of the split in order, the last padded; every record exactly once.
    assert results[0]['shared_eval'] == results[1]['shared_eval']
    seen = [i for step in results[0]['shared_eval'] for i in step['index'] if i >= 0]
    assert seen == list(range(13)) and len(results[0]['shared_eval']) == 5
    whole = next(iterators.make_iterator(cfg, 'test', batch_size=13, train=False, palette=palette,
                                         shard_index=0, shard_count=1))
    assert sum(step['sum'] for step in results[0]['shared_eval']) == int(whole['tokens'].sum())


def _mesh(devices, shape):
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), ('data', 'fsdp', 'tensor'), axis_types=auto)


def test_rows_by_process_when_hosts_share_examples():
    devices = jax.devices()[:8]
    # 8 hosts of one device, batch split 4 ways, a 2-way model axis spanning host pairs (XL's batch of 64 on 128
    # v4 hosts, scaled down): hosts 2k and 2k+1 both load row k.
    rows = multihost.rows_by_process(4, _mesh(devices, (1, 4, 2)), process_of=lambda d: d.id)
    assert {p: r.rows for p, r in rows.items()} == {p: (p // 2,) for p in range(8)}
    # 4 hosts of two devices that hold both halves of the model axis: disjoint rows, two each of a batch of 8.
    rows = multihost.rows_by_process(8, _mesh(devices, (1, 4, 2)), process_of=lambda d: d.id // 2)
    assert {p: r.rows for p, r in rows.items()} == {p: (2 * p, 2 * p + 1) for p in range(4)}
    assert str(rows[1]) == '2:4'
    # 2 hosts whose devices alternate along the batch axes (as a topology-aware TPU mesh can place them): each
    # holds every other row.
    rows = multihost.rows_by_process(8, _mesh(devices, (4, 2, 1)), process_of=lambda d: d.id % 2)
    assert rows[0].rows == (0, 2, 4, 6) and str(rows[1]) == '1:2,3:4,5:6,7:8'
    assert rows[1].local_slice(5, 6) == slice(2, 3)
    with pytest.raises(ValueError, match=r'needs rows 4:6 but this process loaded rows 1:2,3:4'):
        rows[1].local_slice(4, 6)
    with pytest.raises(ValueError, match=r'Global batch 6 does not divide over the 4 shards'):
        multihost.rows_by_process(6, _mesh(devices, (1, 4, 2)))


def test_global_batch_on_a_single_process_mesh():
    n = len(jax.devices())  # 8 fake CPU devices under tests/conftest.py
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((n,), ('tensor',), axis_types=(auto,))
    with pytest.raises(ValueError, match='None of the batch axes'):
        multihost.make_global_batch({'tokens': np.zeros((2, 4), np.int32)}, mesh)
    mesh = jax.make_mesh((n,), ('data',), axis_types=(auto,))
    local = {'tokens': np.arange(8 * n, dtype=np.int32).reshape(2 * n, 4), 'mask': np.ones(2 * n, bool)}
    out = multihost.make_global_batch(local, mesh)  # 'fsdp' is not in this mesh: skipped
    assert out['tokens'].sharding.spec == jax.sharding.PartitionSpec(('data',))
    assert len(out['tokens'].addressable_shards) == n
    np.testing.assert_array_equal(np.asarray(out['tokens']), local['tokens'])
    if n > 1:
        with pytest.raises(ValueError, match=rf'does not divide over {n} shards'):
            multihost.make_global_batch({'tokens': np.zeros((n + 1, 4), np.int32)}, mesh)



def test_host_rows_and_global_batches_on_eight_devices():
    devices = jax.devices()[:8]
    mesh = _mesh(devices, (2, 2, 2))  # the batch splits 4 ways over (data, fsdp); 'tensor' replicates it
    rows = multihost.host_rows(8, mesh)
    assert rows.rows == tuple(range(8)) and str(rows) == '0:8' and rows.size == 8
    local = {'tokens': np.arange(32, dtype=np.int32).reshape(8, 4), 'mask': np.arange(8) % 3 > 0}
    out = multihost.make_global_batch(local, mesh, rows=rows)
    assert out['tokens'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
    for key in local:
        np.testing.assert_array_equal(np.asarray(out[key]), local[key])
    for shard in out['tokens'].addressable_shards:  # each device holds its quarter of the rows
        np.testing.assert_array_equal(np.asarray(shard.data), local['tokens'][shard.index[0]])
    with pytest.raises(ValueError, match=r'Batch field .tokens.: 4 rows, expected rows 0:8 of the global batch of 8'):
        multihost.make_global_batch({'tokens': local['tokens'][:4]}, mesh, rows=rows)
    half = multihost.HostRows(8, (0, 1, 2, 3))  # rows this process did not load cannot be placed
    with pytest.raises(ValueError, match=r'needs rows 4:6 but this process loaded rows 0:4'):
        multihost.make_global_batch({'tokens': local['tokens'][:4]}, mesh, rows=half)
    with pytest.raises(ValueError, match='Process 1 has no device'):
        multihost.host_rows(8, mesh, process_index=1)


def test_training_batches_are_the_same_for_any_number_of_shards(tmp_path):
    testing.write_npz(tmp_path / 'aug.npz', n_train=40, n_test=4, size=(8, 8), channels=3)
    data_dir = str(tmp_path / 'tfds')
    import_data.import_dataset(str(tmp_path / 'aug.npz'), 'aug', data_dir)
    cfg = testing.small_config('aug', data_dir, resolution=8, channels=3, n_colors=8)
    cfg.augment = 'cifar'  # random crops and flips: they must follow the example, not the shard
    palette = palette_cache.load_or_fit_palette(cfg)
    one = iterators.make_iterator(cfg, 'train', batch_size=12, train=True, seed=3, palette=palette,
                                  shard_index=0, shard_count=1)
    three = [iterators.make_iterator(cfg, 'train', batch_size=4, train=True, seed=3, palette=palette,
                                     shard_index=i, shard_count=3) for i in range(3)]
    for _ in range(5):  # crosses an epoch boundary (40 records, 12 per step)
        whole = next(one)
        parts = [next(it) for it in three]
        for key in ('tokens', 'label', 'index'):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
