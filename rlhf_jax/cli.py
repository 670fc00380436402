"""The ``rlhf-jax`` / ``python -m rlhf_jax`` entry point: host memory set up (``host_memory``), then ``main``."""

from rlhf_jax import host_memory


def run() -> None:
  """Console-script entry point: re-executes once with huge-page malloc if needed, then runs the command line."""
  host_memory.reexec_with_hugepages()
  from rlhf_jax.main import run_cli  # after the re-exec: its imports (JAX, Flax, TFDS) would run twice

  run_cli()
