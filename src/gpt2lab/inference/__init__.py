"""Decoding: KV caches (``kv_cache.py``), sampling and generation with CUDA graphs (``generate.py``), and the
continuous-batching engine that serving decodes through (``engine.py``)."""
