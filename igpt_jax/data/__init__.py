"""Pixel data: TFDS datasets without TensorFlow, and the Grain pipeline of palette tokens.

Modules (import them directly; this package imports nothing, so configs stay light):
  config       default_data_config(): the `config.data` fields and per-dataset presets.
  builders     TFDS builders (catalog-compatible cifar10, fashion_mnist, imagenet2012; digits; generic).
  import_data  CLI and import_dataset(): .npz archives and image folders -> array_record datasets.
  augment      per-example resize and the paper's CIFAR / ImageNet augmentations (numpy + Pillow).
  palette      the k-means colour palette: fit, encode pixels to tokens, decode.
  pipeline     make_iterator(), load_or_fit_palette(), make_global_batch(), Orbax iterator args.
  codes        datasets of VQ-VAE code grids.
  verify       record-by-record check of an imported dataset against its .npz archive.
  testing      small synthetic datasets for tests and benchmarks.

May import: the leaves (errors, workdir, sharding).
"""
