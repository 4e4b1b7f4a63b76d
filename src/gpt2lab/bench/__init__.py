"""Benchmarks behind `gpt2lab bench ...`: one module per subcommand, each printing a table.

On a shared CPU only ratios measured within one run mean something; BENCHMARKS.md records
each table with its command, device and date.
"""
