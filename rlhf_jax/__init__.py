"""rlhf_jax: InstructGPT-style RLHF in JAX."""
