"""The decoding engine: chunked and batched prefill, shared prefills, batched sampling, forced tokens.

Every check compares against the sequence decoded alone (``generate`` or a full forward pass), so a wrong mask,
position, slot or sampling row shows up as a different token or hidden state."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.inference.engine import Engine, Sequence
from gpt2lab.inference.generate import generate_ids, sample_next, top_k_filter, top_p_filter
from gpt2lab.inference.kv_cache import BatchKVCache
from gpt2lab.inference.sampling import sample_rows
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from tests.conftest import assert_close_f32

SWITCHES = (
    {},
    {"pos_embedding": "rope", "n_kv_head": 1, "norm": "rmsnorm"},
    {"attention": "mla", "pos_embedding": "rope"},
)


def tiny(seed: int = 0, block_size: int = 48, **switches) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=97, padded_vocab_size=128, n_layer=2, n_head=2, n_embd=32,
                       **switches)  # fmt: skip
    return GPT(config).eval()


@pytest.mark.parametrize("switches", SWITCHES, ids=["gpt2", "rope-gqa", "mla"])
def test_the_batch_cache_prefills_padded_chunks_in_any_slots_then_decodes_each_row_as_alone(switches):
    """Prompts of different lengths prefilled together in chunks (rows padded, slots out of order), then decoded
    together: every real position's hidden state equals its sequence's full forward pass."""
    model = tiny(**switches)
    prompts = {3: [1, 2, 3, 4, 5, 6, 7], 0: [9, 8], 2: [4, 4, 4, 4, 4]}  # slot -> prompt
    cache = BatchKVCache(model.config, 4, 32)
    done = dict.fromkeys(prompts, 0)
    with torch.no_grad():
        while any(done[s] < len(p) for s, p in prompts.items()):  # chunks of at most 3 tokens, rows padded
            slots = [s for s, p in prompts.items() if done[s] < len(p)]
            counts = [min(3, len(prompts[s]) - done[s]) for s in slots]
            idx = torch.zeros(len(slots), max(counts), dtype=torch.long)
            for i, (s, n) in enumerate(zip(slots, counts)):
                idx[i, :n] = torch.tensor(prompts[s][done[s] : done[s] + n])
            cache.plan(slots, counts)
            hidden = model.forward_hidden(idx, cache)
            for i, (s, n) in enumerate(zip(slots, counts)):
                done[s] += n
                alone = model.forward_hidden(torch.tensor([prompts[s][: done[s]]]))[0, -n:]
                assert_close_f32(hidden[i, :n], alone, msg=f"{switches} prefill slot {s}")
        assert [cache.lengths[s] for s in (0, 2, 3)] == [2, 5, 7]
        cache.copy(3, 1)  # slot 1 continues slot 3's prompt too (a second choice of one request)
        seqs = {0: prompts[0], 1: list(prompts[3]), 2: prompts[2], 3: prompts[3]}
        seqs = {s: list(p) for s, p in seqs.items()}
        for step in range(5):
            feed = [(11 * step + 5 * row + 1) % 97 for row in range(4)]
            cache.plan([0, 1, 2, 3], [1] * 4)
            hidden = model.forward_hidden(torch.tensor(feed)[:, None], cache)[:, -1]
            for row, s in seqs.items():
                s.append(feed[row])
                assert_close_f32(hidden[row], model.forward_hidden(torch.tensor([s]))[0, -1], msg=f"{switches} {row}")


def _run(engine: Engine, seqs: list[Sequence]) -> list[tuple[list[int], str]]:
    ends: dict[int, str] = {}
    for i, seq in enumerate(seqs):
        seq.emit = lambda token, reason, i=i: ends.__setitem__(i, reason) if reason else None
    engine.run(seqs)
    return [(s.tokens, ends[i]) for i, s in enumerate(seqs)]


@pytest.mark.parametrize("chunk", [1, 4, 512])
@pytest.mark.parametrize("switches", SWITCHES[:2], ids=["gpt2", "rope-gqa"])
def test_the_engine_gives_each_sequence_what_generate_gives_it_alone(chunk, switches):
    """Greedy and seeded sequences of different prompts, more than the slots, n choices sharing a prefill,
    prompts prefilled in chunks of 1, 4 or all at once: each sequence gets generate's tokens for its settings."""
    model = tiny(**switches)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [1], [3, 1, 4, 1, 5], [2, 7]]
    plan = []  # (prompt, sampling) of each sequence; the third prompt has three choices (one prefill)
    for p, prompt in enumerate(prompts):
        for c in range(3 if p == 2 else 1):
            sampling = {"temperature": 0} if p % 2 else {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": c}
            plan.append((prompt, sampling))
    seqs = [Sequence(list(prompt), 12, None, **s) for prompt, s in plan]
    engine = Engine(model, max_batch=3, prefill_chunk=chunk)
    out = _run(engine, seqs)
    for (prompt, sampling), (tokens, reason) in zip(plan, out):
        assert reason == "length" and len(tokens) == 12
        assert tokens == generate_ids(model, prompt, max_new_tokens=12, eos_id=None, **sampling)[0], (prompt, sampling)
    assert engine.prompt_tokens == sum(map(len, prompts))  # the three choices' prompt was prefilled once
    assert len({tuple(t) for t, _ in out[2:5]}) == 3  # seeds 0, 1, 2: three different samples of one prefill


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding():
    """With a budget of 4 prompt tokens per turn, a 30-token prompt arriving while two sequences decode takes 8
    turns to prefill, and the two get a token at every one of them."""
    model = tiny(block_size=64)
    arrivals: list[tuple[int, int]] = []  # (turn, sequence) of each token
    turn = [0]
    seqs = [Sequence([1, 2], 20, None, temperature=0), Sequence([3, 4], 20, None, temperature=0)]
    for i, s in enumerate(seqs):
        s.emit = lambda token, reason, i=i: arrivals.append((turn[0], i)) if token is not None else None
    engine = Engine(model, max_batch=3, prefill_chunk=4)
    engine._enqueue(seqs)
    with torch.inference_mode():
        for turn[0] in range(3):
            engine._turn()
        long = Sequence(list(range(30)), 5, lambda token, reason: None, temperature=0)
        engine._enqueue([long])
        for turn[0] in range(3, 11):
            engine._turn()
            assert {i for t, i in arrivals if t == turn[0]} == {0, 1}  # both decoded this turn
            assert long.prefilled == min(30, 4 * (turn[0] - 2))
    assert long.tokens and long.prefilled == 30


def test_batched_sampling_matches_each_row_sampled_alone():
    """Rows with different temperatures, top-k, top-p and greedy, sampled together, each equal to sample_next on
    that row alone with the same random number; and the per-row filters are the reference filters'."""
    torch.manual_seed(0)
    logits = torch.randn(6, 200) * 3
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (1.0, 50, 0.5), (0.5, 3, 0.99)]
    temperature, top_k, top_p = (torch.tensor(col) for col in zip(*settings))
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        uniform = torch.rand(6, generator=g)
        together = sample_rows(logits, temperature, top_k, top_p, uniform)
        for row, (t, k, p) in enumerate(settings):
            alone = sample_rows(logits[row : row + 1], temperature[row : row + 1], top_k[row : row + 1],
                                top_p[row : row + 1], uniform[row : row + 1])  # fmt: skip
            assert together[row] == alone[0]
            if t:  # the token is one the reference filters keep
                kept = logits[row] / t
                kept = top_p_filter(top_k_filter(kept, k) if k else kept, p)
                assert torch.isfinite(kept[together[row]])
            else:
                assert together[row] == logits[row].argmax()
    draws = sample_next(torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).expand(20000, 4), 1.0, 3, 0.6,
                        torch.Generator().manual_seed(1))  # fmt: skip
    freqs = torch.bincount(draws, minlength=4).float() / 20000  # top-3 keeps {1,2,3}; top-p 0.6 of those: {2,3}
    assert torch.allclose(freqs, torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.015)


def test_a_tool_forces_its_tokens_which_the_sequence_then_reads():
    """When the tool answers, its tokens are fed next in place of samples, marked in forced_at, and the tokens
    after them are the model's continuation of prompt + everything before (as generate gives it)."""
    model = tiny()
    calls = []

    class Tool:
        banned = ()

        def forced(self, tokens: list[int]) -> list[int]:
            calls.append(len(tokens))
            return [90, 91, 92] if len(tokens) == 2 else []

    seq = Sequence([5, 6, 7], 9, None, temperature=0, tool=Tool())
    _run(Engine(model, max_batch=2), [seq])
    assert seq.tokens[2:5] == [90, 91, 92] and seq.forced_at == [2, 3, 4]
    assert calls == [1, 2, 6, 7, 8, 9]  # asked after each sampled token, never after a forced one
    prefix = [5, 6, 7, *seq.tokens[:5]]
    assert seq.tokens[5:] == generate_ids(model, prefix, max_new_tokens=4, temperature=0, eos_id=None)[0]


def test_penalties_and_bias_apply_per_row_in_the_batch():
    """A row with a huge logit_bias on one token samples only it; its neighbour without one is unaffected."""
    model = tiny()
    biased = Sequence([1, 2, 3], 6, None, temperature=1.0, seed=3, logit_bias={42: 100.0})
    plain = Sequence([1, 2, 4], 6, None, temperature=1.0, seed=3)
    _run(Engine(model, max_batch=2), [biased, plain])
    assert biased.tokens == [42] * 6
    assert plain.tokens == generate_ids(model, [1, 2, 4], max_new_tokens=6, seed=3, eos_id=None)[0]


def test_stream_yields_generate_tokens_and_closing_it_early_leaves_the_engine_empty():
    """`gpt2lab chat`'s path: tokens as they come, equal to generate's; a reply stopped early (Ctrl-C) is
    dropped, and the next reply decodes alone from a clean engine."""
    model = tiny()
    engine = Engine(model, max_batch=1)
    want = generate_ids(model, [4, 5, 6], max_new_tokens=10, temperature=0.8, seed=9, eos_id=None)[0]
    assert list(engine.stream(Sequence([4, 5, 6], 10, None, temperature=0.8, seed=9))) == want
    stopped = engine.stream(Sequence([1, 2], 30, None, temperature=0))
    assert len([next(stopped) for _ in range(3)]) == 3
    stopped.close()
    assert not (engine.active or engine.prefilling or engine.waiting)
    assert list(engine.stream(Sequence([4, 5, 6], 10, None, temperature=0.8, seed=9))) == want


@pytest.mark.parametrize("switches", SWITCHES, ids=["gpt2", "rope-gqa", "mla"])
def test_the_prefix_cache_prefills_only_what_a_finished_sequence_did_not_hold(switches):
    """A conversation's next turn (the last prompt, its reply and a new message) starts from the keys and values
    the last turn left in its slot, even after other sequences came and went: only the new tokens are prefilled,
    and its tokens are generate's; without the cache the whole prompt is prefilled."""
    model = tiny(**switches)
    for prefix_cache in (True, False):
        engine = Engine(model, max_batch=3, prefix_cache=prefix_cache)
        first = Sequence([5, 6, 7, 8, 9], 6, None, temperature=0)
        others = [Sequence([1 + i, 2, 3], 4, None, temperature=0) for i in range(2)]
        _run(engine, [first, *others])
        follow = [5, 6, 7, 8, 9, *first.tokens, 40, 41]
        before = engine.prompt_tokens
        second = Sequence(follow, 6, None, temperature=0)
        _run(engine, [second])
        held = 5 + len(first.tokens) - 1  # its last token was sampled, never fed
        assert engine.prompt_tokens - before == (len(follow) - held if prefix_cache else len(follow))
        assert second.tokens == generate_ids(model, follow, max_new_tokens=6, temperature=0, eos_id=None)[0]
        unrelated = Sequence([50, 51, 52], 3, None, temperature=0)  # shares nothing: prefilled whole
        before = engine.prompt_tokens
        _run(engine, [unrelated])
        assert engine.prompt_tokens - before == 3


def test_a_tools_banned_tokens_are_never_sampled_by_its_row_only():
    """A row whose tool bans tokens never draws them (even with a +100 logit_bias towards one), and a row
    without a tool beside it still can."""
    model = tiny()

    class Banning:
        banned = (42, 43)

        def forced(self, tokens: list[int]) -> list[int]:
            return []

    banned = Sequence([1, 2, 3], 8, None, temperature=1.0, seed=0, logit_bias={42: 100.0}, tool=Banning())
    free = Sequence([1, 2, 3], 8, None, temperature=1.0, seed=0, logit_bias={42: 100.0})
    _run(Engine(model, max_batch=2), [banned, free])
    assert free.tokens == [42] * 8 and not {42, 43} & set(banned.tokens) and len(banned.tokens) == 8
