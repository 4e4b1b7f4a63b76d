"""Option choices and help texts that several subcommands share (no torch imported here)."""

from __future__ import annotations

DTYPES = ["float32", "bfloat16", "float16"]  # --dtype's choices (gpt2lab.interop.load.DTYPES, without importing torch)
TOKENIZER_HELP = "default: the model's own; or gpt2, a folder holding tokenizer.json, or encoder.json + vocab.bpe"
