"""From language model to chatbot: the chat format (``template.py``), which model is a chat model (``base.py``),
the sampling defaults every chat surface shares (``defaults.py``), the terminal chat (``terminal.py``) and the
chat files of an export (``export.py``). Fine-tuning is ``gpt2lab.sft``; serving, ``gpt2lab.serve``."""
