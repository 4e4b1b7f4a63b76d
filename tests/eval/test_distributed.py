"""Two gloo processes on localhost split the examples and reduce to the single-process result."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2lab.runtime.dist import destroy_distributed
from tests.conftest import assert_close_f32, free_port, join_gloo

WORLD = 2


def _evaluate_all(model_dir: str, data_dir: str, rank: int, world_size: int) -> dict:
    from gpt2lab.eval import hellaswag as H
    from gpt2lab.eval import lambada as L
    from gpt2lab.eval import wikitext as W
    from gpt2lab.eval.common import mirror_file
    from gpt2lab.eval.loss import evaluate_loss
    from gpt2lab.interop.load import load_model
    from gpt2lab.tokenizer.bpe import get_tokenizer

    model, tok = load_model(model_dir), get_tokenizer()
    examples = H.load_examples(mirror_file(H.MIRROR_PATH), 7)  # odd: the ranks get 4 and 3
    passages = L.load_passages(mirror_file(L.MIRROR_PATH), 5)
    ids = tok.encode_ordinary(" ".join(ex.ctx for ex in examples))
    return {
        "hellaswag": H.evaluate_hellaswag(model, tok, examples, "cpu", 2, rank, world_size),
        "lambada": L.evaluate_lambada(model, tok, passages, "cpu", 2, rank, world_size),
        "wikitext": W.evaluate_ids(model, ids, tok.eot, "cpu", 32, 16, 2, rank, world_size),
        "loss": evaluate_loss(model, data_dir, "val", "cpu", 2, 16, rank=rank, world_size=world_size),
    }


def _worker(rank: int, port: int, model_dir: str, data_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_gloo(rank, WORLD, port)
    try:
        result = _evaluate_all(model_dir, data_dir, rank, WORLD)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()  # no rank tears the group down while its peer still talks to it (gloo may abort)
    finally:
        destroy_distributed()


def test_two_gloo_ranks_equal_one_process(tiny_checkpoint, tmp_path):
    from tests.eval.test_loss import make_dataset

    rng = np.random.default_rng(1)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # 8 chunks of 16 tokens: 4 batches of 2 in one process, 2 global batches of 2 x 2 ranks; none dropped
    make_dataset(data_dir, [rng.integers(0, 50257, 16 * 8 + 1).astype(np.uint16)])
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(free_port(), str(tiny_checkpoint), str(data_dir), str(out)), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single = _evaluate_all(str(tiny_checkpoint), str(data_dir), 0, 1)

    assert ranks[0] == ranks[1]  # every rank ends with the reduced totals
    got = ranks[0]
    for key in ("correct", "correct_norm", "count", "acc", "acc_norm"):
        assert got["hellaswag"][key] == single["hellaswag"][key]
    assert got["hellaswag"]["count"] == 7
    for key in ("correct", "count", "acc"):
        assert got["lambada"][key] == single["lambada"][key]
    # other batches per rank, so other GEMM shapes: the float32 losses agree up to their rounding
    assert_close_f32(math.log(got["lambada"]["ppl"]), math.log(single["lambada"]["ppl"]))
    assert got["wikitext"]["tokens"] == single["wikitext"]["tokens"]
    assert_close_f32(got["wikitext"]["nll"], single["wikitext"]["nll"])
    assert got["loss"]["tokens"] == single["loss"]["tokens"] == 8 * 16
    assert_close_f32(got["loss"]["loss"], single["loss"]["loss"])
