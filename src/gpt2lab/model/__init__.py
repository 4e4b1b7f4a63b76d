"""The network: GPT-2 (``gpt.py``) and the [model] switches beside it, each a small module picked by config.

- ``config.py``: ``GPTConfig``, GPT-2's shape and every switch, checked once;
- ``gpt.py``: ``GPT`` and its ``Block``: embeddings, the block stack, the LM head, initialisation;
- ``attention.py``: causal self-attention (GPT-2's; GQA, RoPE, QK-norm); ``mla.py``: DeepSeek's latent attention;
- ``mlp.py``: GELU (GPT-2), ReLU², SwiGLU; ``moe.py``: a mixture of experts;
- ``rope.py``: rotary embeddings and their context extensions; ``ops.py``: the fused LM head + loss.

The model imports nothing of training, inference, serving or interop: no I/O, no tokenizer.
"""

from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT

__all__ = ["GPT", "GPTConfig"]
