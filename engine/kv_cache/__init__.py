"""Paged KV-cache bookkeeping for the scheduler: block_pool (blocks, free queue, prefix-cache map),
block_hash (chained prefix-cache keys), manager (per-request block tables). No tensors live here."""
