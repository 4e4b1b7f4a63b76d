"""Reinforcement learning with verifiable rewards.

- ``tasks``: what the policy is asked and how a reply is scored (GSM8K, synthetic arithmetic, a user's JSONL);
  ``get_task(name_or_path, **options)`` builds one. ``gpt2lab eval gsm8k|arith`` and ``gpt2lab rl`` both use them.
"""
