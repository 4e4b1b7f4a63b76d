"""lm-evaluation-harness's ``local-completions`` scores LAMBADA through `gpt2lab serve` as `gpt2lab eval lambada`
does: the requests below are the ones its loglikelihood sends (lm_eval/models/openai_completions.py, v0.4.13:
``_create_payload(generate=False)``), read back as its ``parse_logprobs`` reads them, without lm-eval installed.
scripts/lm_eval_lambada.py runs the harness itself."""

from __future__ import annotations

import httpx
import pytest
import torch

from gpt2lab.eval.common import score_pairs
from gpt2lab.eval.lambada import encode, load_passages, locate, score_passages
from gpt2lab.tokenizer.bpe import EOT_ID
from tests.conftest import assert_close_f32
from tests.serve.conftest import serving, tiny_chat_model

BLOCK = 256  # LAMBADA's first passages take up to ~120 tokens: none is cut, as none is in the harness's run


def harness_payload(prompts: list[list[int]]) -> dict:
    """lm-eval's loglikelihood request: context + continuation ids per prompt, one greedy token, echoed."""
    return {"model": "gpt2lab", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # fmt: skip


def harness_parse(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's ``parse_logprobs``: the continuation is token_logprobs[ctxlen:-1] (the last is the generated
    token's), greedy when each of its log-probs is its top_logprobs' largest."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return res


def score_through_server(url: str, pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, greedy) per pair, in one request as lm-eval batches them."""
    r = httpx.post(url + "/v1/completions", json=harness_payload([c + x for c, x in pairs]), timeout=60)
    assert r.status_code == 200, r.text
    res = harness_parse(r.json(), [len(c) for c, _ in pairs])
    return torch.tensor([lp for lp, _ in res], dtype=torch.float64), torch.tensor([g for _, g in res])


@pytest.fixture(scope="module")
def passages(shared_data):
    return load_passages(locate(), limit=6)


def greedy_pairs(model, pairs: list, n: int = 2) -> list:
    """Each context with its model's greedy next n tokens as the continuation: whole-word matches (acc 1)."""
    out = []
    with torch.no_grad():
        for ctx, _ in pairs:
            ids = list(ctx)
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
            out.append((list(ctx), ids[len(ctx) :]))
    return out


def check_parity(model, tokenizer, passages) -> None:
    real = encode(tokenizer, passages)
    greedy = greedy_pairs(model, real)
    half = [(c, x[:1] + [(x[1] + 1) % 50000]) for c, x in greedy]  # first token greedy, second not: wrong
    pairs = real + greedy + half
    ours = score_pairs(model, pairs, "cpu")
    with serving(model, tokenizer, max_batch=4) as served:
        logprob, is_greedy = score_through_server(served.url, pairs)
    assert_close_f32(-logprob, ours.sum_loss, scale=float(ours.sum_loss.abs().max()))
    assert is_greedy.tolist() == ours.greedy.tolist()
    assert ours.greedy.tolist() == [False] * len(real) + [True] * len(greedy) + [False] * len(half)  # all cases
    lambada = score_passages(model, tokenizer, passages, "cpu")  # `gpt2lab eval lambada`'s own scoring
    assert torch.equal(lambada.sum_loss, ours.sum_loss[: len(real)])


def test_lm_eval_loglikelihood_requests_score_lambada_as_gpt2lab_eval(tokenizer, passages):
    check_parity(tiny_chat_model(BLOCK), tokenizer, passages)


def test_a_generated_end_token_keeps_its_log_prob_so_the_continuation_is_whole(tokenizer, passages):
    """lm-eval drops the last log-prob as the generated token's: when that token is <|endoftext|> the server
    must still list it (as OpenAI and vLLM do), or the continuation's last token would be dropped instead."""
    model = tiny_chat_model(BLOCK)
    with torch.no_grad():  # <|endoftext|> the most likely next token everywhere; it is never in the prompts
        u = torch.zeros(model.config.n_embd)
        u[0] = 10.0
        model.transformer.ln_f.bias.copy_(u)
        model.lm_head.weight[EOT_ID] = u
        assert int(model(torch.tensor([encode(tokenizer, passages)[0][0]]))[0][0, -1].argmax()) == EOT_ID
    check_parity(model, tokenizer, passages)
    ids = encode(tokenizer, passages)[0][0]
    with serving(model, tokenizer) as served:
        r = httpx.post(served.url + "/v1/completions", json=harness_payload([ids]) | {"max_tokens": 3}, timeout=60)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == tokenizer.decode(ids)  # no text for it
    assert choice["logprobs"]["tokens"][len(ids) :] == ["<|endoftext|>"]  # listed once, the reply ends at it
