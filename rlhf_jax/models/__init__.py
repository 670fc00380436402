"""Flax NNX models: decoder (GPT-2 / Llama), scalar-head reward and value models, KV cache."""

from rlhf_jax.models.decoder import (DecoderConfig, Decoder, KVCache, ScalarModel, Trunk, init_cache,
                                     last_token_index, positions_from_mask, positions_from_segments,
                                     reward_head_std)

__all__ = ["DecoderConfig", "Decoder", "KVCache", "ScalarModel", "Trunk", "init_cache",
           "last_token_index", "positions_from_mask", "positions_from_segments", "reward_head_std"]
