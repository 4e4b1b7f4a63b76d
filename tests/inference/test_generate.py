"""Sampling: filters on hand-made distributions, the decoding loop against transformers, streaming text."""

import math

import pytest
import torch

from gpt2lab.errors import Gpt2LabError
from gpt2lab.inference.generate import (
    TextStream,
    fit_context,
    generate,
    generate_ids,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT

EOT = 50256


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32) | overrides
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits so greedy choices are not near-ties
    return model


# ----------------------------------------------------------------------------- filters


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    assert kept(top_k_filter(logits, 1)) == {3}
    assert kept(top_k_filter(logits, 2)) == {3, 4}
    assert kept(top_k_filter(logits, 5)) == {0, 1, 2, 3, 4}
    assert kept(top_k_filter(logits, 50)) == {0, 1, 2, 3, 4}
    assert torch.equal(top_k_filter(logits, 2)[[3, 4]], logits[[3, 4]])  # kept logits unchanged


def test_top_k_keeps_ties_at_the_boundary_and_works_per_row():
    logits = torch.tensor([[5.0, 3.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    out = top_k_filter(logits, 2)
    assert kept(out[0]) == {0, 1, 2}
    assert kept(out[1]) == {2, 3}


def test_top_p_keeps_the_smallest_nucleus():
    logits = log_probs(0.5, 0.25, 0.125, 0.125)  # exact in binary: boundaries are exact
    assert kept(top_p_filter(logits, 0.5)) == {0}  # 0.5 >= 0.5 already
    assert kept(top_p_filter(logits, 0.7)) == {0, 1}
    assert kept(top_p_filter(logits, 0.75)) == {0, 1}
    assert kept(top_p_filter(logits, 0.8)) == {0, 1, 2, 3}  # token 3 ties with token 2
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    shuffled = log_probs(0.125, 0.25, 0.125, 0.5)
    assert kept(top_p_filter(shuffled, 0.7)) == {1, 3}


def test_top_p_tiny_p_keeps_at_least_the_top_token():
    assert kept(top_p_filter(log_probs(0.1, 0.6, 0.3), 1e-9)) == {1}
    assert kept(top_p_filter(log_probs(0.4, 0.4, 0.2), 1e-9)) == {0, 1}  # a tie at the top is kept whole
    rows = torch.stack([log_probs(0.1, 0.6, 0.3), log_probs(0.3, 0.3, 0.4)])
    out = top_p_filter(rows, 0.5)
    assert kept(out[0]) == {1} and kept(out[1]) == {0, 1, 2}


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    warper_cls = pytest.importorskip("transformers.generation.logits_process").TopPLogitsWarper
    logits = 3 * torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    expected = warper_cls(top_p=p)(None, logits.clone())
    assert torch.equal(torch.isfinite(top_p_filter(logits, p)), torch.isfinite(expected))


@pytest.mark.parametrize("k", [1, 7, 999])
def test_top_k_matches_transformers(k):
    warper_cls = pytest.importorskip("transformers.generation.logits_process").TopKLogitsWarper
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    expected = warper_cls(top_k=k)(None, logits.clone())
    assert torch.equal(torch.isfinite(top_k_filter(logits, k)), torch.isfinite(expected))


def test_sample_next_draws_from_the_tempered_filtered_distribution():
    logits = log_probs(0.1, 0.2, 0.3, 0.4).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0), torch.full((20000,), 3))

    def freqs(**kw):
        draws = sample_next(logits, generator=g, **kw)
        return torch.bincount(draws, minlength=4).float() / len(draws)

    # expected frequencies: softmax(log p / T), then renormalised over the kept tokens
    assert torch.allclose(freqs(), torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015)
    sharp = torch.tensor([0.1, 0.2, 0.3, 0.4]) ** 2
    assert torch.allclose(freqs(temperature=0.5), sharp / sharp.sum(), atol=0.015)
    assert torch.allclose(freqs(top_k=2), torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.015)
    assert torch.allclose(freqs(top_p=0.65), torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.015)


# ----------------------------------------------------------------------------- the decoding loop


@pytest.mark.parametrize("batch, new_tokens", [(1, 24), (3, 40)])  # 40: the CPU path with a copied LM head
def test_greedy_generation_equals_transformers_token_for_token(batch, new_tokens):
    transformers = pytest.importorskip("transformers")
    from gpt2lab.bench.sample import to_transformers

    model = tiny(seed=1, block_size=64)
    hf = to_transformers(model)
    prompt = [464, 2068, 7586, 21831, 18045, 625, 262]
    ours = generate_ids(model, prompt, num_samples=batch, max_new_tokens=new_tokens, temperature=0)
    idx = torch.tensor([prompt] * batch)
    theirs = hf.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens, do_sample=False, pad_token_id=EOT
    )[:, len(prompt) :].tolist()
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    assert all(EOT not in row and len(row) == new_tokens for row in theirs)  # a real comparison, no early stop
    assert ours == theirs


def test_generation_past_the_context_slides_the_window():
    """Reference: a full forward over the window that the documented rule gives, at each step."""
    model = tiny(seed=2, block_size=8)
    prompt = [10, 20, 30, 40, 50]
    with pytest.warns(UserWarning, match="sliding"):
        ours = generate_ids(model, prompt, max_new_tokens=20, temperature=0, eos_id=None)[0]
    tokens, start, keep = list(prompt), 0, 8 - 8 // 2
    with torch.no_grad():
        for _ in range(20):
            if len(tokens) - start > 8:
                start = len(tokens) - keep
            logits, _ = model(torch.tensor([tokens[start:]]))
            tokens.append(int(logits[0, -1].argmax()))
    assert ours == tokens[len(prompt) :]


def test_long_prompt_keeps_its_last_block_size_tokens_with_a_warning():
    model = tiny(seed=3, block_size=16)
    prompt = list(range(100, 140))
    with pytest.warns(UserWarning) as record:
        cropped = generate_ids(model, prompt, max_new_tokens=3, temperature=0)
    messages = [str(w.message) for w in record]
    assert "keeping its last 16" in messages[0] and "sliding" in messages[1]  # 16 + 3 overflow the context
    with pytest.warns(UserWarning, match="sliding"):
        assert cropped == generate_ids(model, prompt[-16:], max_new_tokens=3, temperature=0)
    ids, notes = fit_context(prompt, 16, 0)
    assert ids == prompt[-16:] and len(notes) == 1


def test_empty_prompt_starts_from_endoftext():
    model = tiny(seed=4)
    assert fit_context([], 32, 5) == ([EOT], [])
    kw = dict(num_samples=2, max_new_tokens=6, seed=7)
    assert generate_ids(model, [], **kw) == generate_ids(model, [EOT], **kw)
    with pytest.raises(Gpt2LabError, match="empty"):
        fit_context([], 32, 5, eos_id=None)


def test_same_seed_same_samples_different_seed_different():
    model = tiny(seed=5)
    kw = dict(num_samples=3, max_new_tokens=10, top_k=100, eos_id=None)
    a = generate_ids(model, [1, 2, 3], seed=42, **kw)
    assert a == generate_ids(model, [1, 2, 3], seed=42, **kw)
    assert a != generate_ids(model, [1, 2, 3], seed=43, **kw)
    assert len({tuple(s) for s in a}) == 3  # the samples of one batch differ from each other


def test_padded_logits_are_never_sampled():
    model = tiny(seed=6, vocab_size=100, padded_vocab_size=128, block_size=64)
    with torch.no_grad():  # every hidden state becomes all-ones; padded rows then win by a mile
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[100:] = 1.0
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(top_p=0.5), dict(top_k=5)):
        for n in (8, 40):  # both LM-head paths (a copy is made for longer generations on CPU)
            samples = generate_ids(model, [1, 2], num_samples=4, max_new_tokens=n, seed=0, eos_id=None, **kw)
            assert all(0 <= t < 100 for s in samples for t in s), kw


def test_each_sample_stops_at_endoftext_and_the_loop_when_all_have():
    model = tiny(seed=7)
    with torch.no_grad():  # hidden state all-ones; <|endoftext|> gets logit c, P(eot) = 0.3 per step
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOT] = math.log(0.3 / 0.7 * (50257 - 1)) / 32
    steps = list(generate(model, [1], num_samples=8, max_new_tokens=31, seed=0))
    assert len(steps) < 31  # the loop ended when the last sample did
    assert EOT in steps[-1]
    for i in range(8):
        column = [step[i] for step in steps]
        end = column.index(EOT)  # every sample ended with <|endoftext|> ...
        assert all(t is not None and t != EOT for t in column[:end])
        assert all(t is None for t in column[end + 1 :])  # ... and yielded nothing after it
    lengths = {[step[i] for step in steps].index(EOT) for i in range(8)}
    assert len(lengths) > 1  # samples stopped at different steps while others went on


def test_invalid_sampling_arguments_are_rejected():
    model = tiny()
    for kw, match in [
        (dict(num_samples=0), "num-samples"),
        (dict(max_new_tokens=-1), "max-new-tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top-k"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
    ]:
        with pytest.raises(Gpt2LabError, match=match):
            list(generate(model, [1], **kw))
    assert list(generate(model, [1], max_new_tokens=0)) == []


# ----------------------------------------------------------------------------- text at the edges


def test_text_stream_holds_back_split_characters(tokenizer):
    text = "naïve café 😀🎉 日本語のテキスト — “quotes”\n\nend"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert "" in pieces  # some character really was split over tokens
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text == stream.text
    stream = TextStream(tokenizer)
    assert stream.push(ids[0]) + stream.push(EOT) == tokenizer.decode(ids[:1])  # <|endoftext|> is not printed


def test_auto_decoding_is_the_cuda_graph_on_cuda_and_eager_elsewhere():
    """auto = graph on CUDA (2.9-3.9x eager on an H200, same tokens: BENCHMARKS.md), eager on CPU and MPS."""
    from gpt2lab.inference.generate import resolve_decode

    assert resolve_decode("auto", "cuda") == "graph" and resolve_decode("auto", "cuda:1") == "graph"
    assert resolve_decode("auto", "cpu") == "eager" and resolve_decode("auto", "mps") == "eager"
    assert resolve_decode("static", "cuda") == "static"  # an explicit choice is kept
    model, kw = tiny(), dict(max_new_tokens=6, temperature=0.0, eos_id=None)
    assert generate_ids(model, [1, 2, 3], **kw) == generate_ids(model, [1, 2, 3], decode="eager", **kw)
