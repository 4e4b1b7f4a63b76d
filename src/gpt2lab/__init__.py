"""gpt2lab: reproduce GPT-2 from scratch, then go past it."""

__version__ = "0.1.0"
