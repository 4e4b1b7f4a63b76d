"""Models in and out: Hugging Face folders (``hf.py``: GPT-2, and the families in ``llama.py`` (Llama, Qwen3),
``moe.py`` (Qwen3-MoE, Mixtral) and ``deepseek.py`` (DeepSeek-V3)), any ``--model`` spec turned into a ``GPT``
(``load.py``), and the tokenizer that goes with a model or a dataset (``tokenizer_match.py``)."""
