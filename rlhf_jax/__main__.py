"""``python -m rlhf_jax``: the same as the ``rlhf-jax`` command."""

from rlhf_jax.main import run_cli

run_cli()
