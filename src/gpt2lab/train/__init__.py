"""Training: the loop (``loop.py``), AdamW or Muon and the LR schedule (``optim.py``, ``muon.py``), FSDP2
(``fsdp.py``), the speed switches (``perf.py``), the run log and stop signals (``runlog.py``), a preset's
reference figures (``reference.py``), ``gpt2lab train`` (``command.py``) and ``gpt2lab ablate`` (``ablate.py``)."""
