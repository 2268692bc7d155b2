"""Model I/O, both directions: file readers, the PyTorch layout, loaders of each model family,
the converted-model store and the tiny pipelines of the tests. ``vmc_jax.models`` never imports it."""
