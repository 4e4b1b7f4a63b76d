"""Where the code runs: the distributed context (``dist.py``: rank, world size, device) and what this device can
do (``hardware.py``: precision, kernels, compile, memory), decided in one place."""
