"""Supervised fine-tuning: conversations rendered, packed and masked into batches (``data.py``) and
``gpt2lab sft``, which runs the one training loop on them (``command.py``)."""
