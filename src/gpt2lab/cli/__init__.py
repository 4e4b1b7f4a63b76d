"""The ``gpt2lab`` command: ``main.py`` parses and dispatches, each handler importing its stage lazily."""
