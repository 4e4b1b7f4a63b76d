"""How a chat reply is sampled when the user leaves it out: one definition for `gpt2lab chat`, `gpt2lab serve`
and the web page, so they sample a model alike (a light module: the CLI reads it without importing torch).

A small model sampled from its whole distribution at temperature 1 strays into the long tail: its replies read
far worse than at 0.7 with top-k 50.
"""

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 50
