"""The whole process in one command: `gpt2lab speedrun` runs every stage and writes a report card.

A plan (``configs/speedrun/*.toml``) names each stage's settings; ``plan.py`` reads it and turns it into
the list of `gpt2lab` commands a user would type, ``run.py`` runs them one after another (each in its own
process, resumable: a stage done is never run again), and ``report.py`` writes REPORT.md from the files
the stages leave behind. This is nanochat's speedrun.sh + report, with the stages as gpt2lab commands.
"""
