"""Text to tokens: GPT-2's BPE through tiktoken and trained BPE tokenizers (``bpe.py``), and training your own
(``train.py``)."""
