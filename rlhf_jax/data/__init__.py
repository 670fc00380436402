"""Data: tokenizer, user record formats, TFDS storage, batch order, batching.

Submodules are imported explicitly (``from rlhf_jax.data import batching``) so
that importing one does not pull in the others' dependencies (TFDS, SPM).

* `tokenizer`     -- SentencePiece training and the `Tokenizer` wrapper.
* `formats`       -- JSONL record kinds, validation (`DataError`), atomic writes.
* `tfds_datasets` -- records <-> TFDS `array_record` datasets, random access.
* `loader`        -- `BatchLoader`: deterministic, resumable, per-host order.
* `batching`      -- records -> padded numpy batches, `TruncationStats`.
"""
