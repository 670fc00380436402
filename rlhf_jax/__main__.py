"""``python -m rlhf_jax``: the same as the ``rlhf-jax`` command."""

from rlhf_jax.main import run_cli

if __name__ == "__main__":
  run_cli()
