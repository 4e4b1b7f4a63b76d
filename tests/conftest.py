"""Shared test set-up: the offline mirror in ../shared/data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2LAB_MIRROR", REPO.parent / "shared" / "data")).resolve()

# Point every offline path at the mirror before gpt2lab is imported anywhere.
os.environ.setdefault("GPT2LAB_MIRROR", str(SHARED_DATA))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread_and_no_leaked_torch_state():
    """Each test runs torch on one thread, and must not leave grad mode or the thread count changed.

    Tiny models run faster on one thread, and on a shared CPU multi-threaded ops stall.
    """
    import torch

    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    leaked = (torch.is_grad_enabled(), torch.get_num_threads()) != (grad, 1)
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)
    assert not leaked, "the test left torch's grad mode or thread count changed"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "gpt2_tokenizer" / "vocab.bpe").is_file():
        pytest.fail(f"the offline data mirror is missing at {SHARED_DATA} (set GPT2LAB_MIRROR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer(shared_data):
    from gpt2lab.tokenizer import get_tokenizer

    return get_tokenizer()
