"""``python -m rlhf_jax``: the same as the ``rlhf-jax`` command."""

from rlhf_jax.cli import run

if __name__ == "__main__":
  run()
