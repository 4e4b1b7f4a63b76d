"""Data: sources of text, tokenization into llm.c-format shards, and the batch loader.

source (``sources.py``) -> tokenizer -> shards (``shards.py``, written by ``prepare.py``)
-> ``loader.ShardLoader`` -> model. Submodules are imported directly (``from gpt2lab.data.loader
import ShardLoader``) so that tokenizer worker processes never import torch.
"""
