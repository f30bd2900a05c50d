"""Pixel data: TFDS datasets without TensorFlow, and the Grain pipeline of palette tokens.

Modules (import them directly; this package imports nothing, so configs stay light):
  config         default_data_config(): the `config.data` fields and per-dataset presets.
  builders       TFDS builders (catalog-compatible cifar10, fashion_mnist, imagenet2012; digits; generic).
  import_data    CLI and import_dataset(): .npz archives and image folders -> array_record datasets.
  auto_import    ensure_dataset(): a prepared dataset, or one imported on first use.
  records        splits (train / validation / test, num_examples) and ImageRecords, the reader of a split's records.
  augment        per-example resize and the paper's CIFAR / ImageNet augmentations (numpy + Pillow).
  transforms     the Grain steps: this process's rows, batched read + augmentation, palette tokens, codes, raw pixels.
  palette        the k-means colour palette: fit, encode pixels to tokens, decode.
  palette_cache  load_or_fit_palette(): a config's palette, fitted on its dataset once and saved next to it.
  multihost      host_rows() (the rows of each global batch this process loads) and make_global_batch().
  iterators      make_iterator() (records -> transforms -> batches) and the Orbax args of its position.
  codes          datasets of VQ-VAE code grids: written, checked against the config, their stand-in palette.
  verify         record-by-record check of an imported dataset against its .npz archive.
  testing        small synthetic datasets for tests and benchmarks.

May import: the leaves (errors, workdir, sharding).
"""
