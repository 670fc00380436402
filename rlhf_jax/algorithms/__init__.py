"""Algorithms: each stage kind's config keys, its jitted step(s), and how it turns data or rollouts into batches.

One module per kind (``lm`` for pretrain and sft, ``reward``, ``ppo``). Modules here
use models only through the core layer (``rollout``, ``scoring``, ``state``) and
never import the pipeline (``rlhf_jax.stages``).
"""
