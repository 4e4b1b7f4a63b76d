"""Checkpoints: a folder of ``model.safetensors`` + ``config.json`` (+ the training state) in ``folder.py``, and
PyTorch's distributed checkpoint of sharded (FSDP) runs in ``dcp.py``."""
