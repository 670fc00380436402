"""Speed benchmarks of rlhf_jax's own code paths (issue 11); ``run.py`` is the command line."""
