"""Sampling a batch of rows at once, each row with its own settings: one draw and one host transfer per step.

``sample_rows`` takes the step's logits (B, V) and per-row tensors: temperature (0 = greedy), top-k (0 = no
limit), top-p (1 = no limit), and one uniform number in [0, 1) per row. Greedy rows take the argmax. Unfiltered
rows walk the vocabulary in id order. Filtered rows, as Hugging Face's warpers filter (temperature, then top-k
keeping ties with the k-th value, then top-p over what top-k kept: the fewest most likely tokens whose
probabilities sum to >= p, plus ties with the last one kept), walk their candidates from the most likely down:
the ``max(top_k)`` largest logits (``torch.topk``) when every filtered row has a top-k, else the whole vocabulary
sorted. Then inverse transform sampling: the row's number picks the token where its cumulative probability
crosses it (``torch.searchsorted``). A row's token depends on its own logits, settings and number only.

Why uniforms rather than ``torch.multinomial``: each row's number comes from its own ``torch.Generator`` (on the
CPU, so a seed gives the same tokens on every device), a seeded request draws the same numbers alone or batched
with others, and the batch needs one searchsorted instead of B multinomial calls (16 rows of GPT-2's 50,257 tokens
on the 2-core CPU: 2.9 ms, 1.2 ms with a top-k, against 19-21 ms). Top-p over top-k's candidates sorts K values, not
the vocabulary (a full sort of 16 rows took 32-39 ms there).
"""

from __future__ import annotations

import torch


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """One token id per row of logits (B, V), each row drawn with its own settings (CPU tensors, (B,) each).

    temperature 0 is greedy (the argmax); top_k 0 and top_p 1 leave the row unfiltered; uniform in [0, 1).
    A row's draw depends on its own logits, settings and number only, never on the other rows: an unfiltered
    row walks the vocabulary in id order, a filtered one its candidates from the most likely down.
    """
    sampled = temperature > 0
    tokens = logits.argmax(dim=-1) if not bool(sampled.all()) else torch.empty_like(logits[:, 0], dtype=torch.long)
    plain = sampled & (top_k == 0) & (top_p >= 1)
    for rows, filtered in ((plain, False), (sampled & ~plain, True)):
        if not bool(rows.any()):
            continue
        every = bool(rows.all())
        index = rows.nonzero()[:, 0]
        part = logits if every else logits[index.to(logits.device)]
        scaled = part.float() / temperature[index].to(logits.device)[:, None]
        if filtered:
            drawn = _draw_filtered(scaled, top_k[index], top_p[index], uniform[index])
        else:  # all of the vocabulary, in id order: cdf of exp(x - max), no normalisation needed
            cdf = torch.exp(scaled - scaled.max(dim=-1, keepdim=True).values).cumsum_(dim=-1)
            drawn = _pick(cdf, uniform[index])
        if every:
            return drawn
        tokens[index.to(logits.device)] = drawn
    return tokens


def _pick(cdf: torch.Tensor, uniform: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse transform sampling: per row of cumulative weights (R, K), the first position whose cdf passes
    uniform x total (the weights need not sum to 1); ``last`` (R, 1): the last position with any weight."""
    target = uniform.to(cdf.device, torch.float32)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True)  # (R, 1)
    # float rounding can put target at the total: never pick past the last token with weight
    pick = pick.clamp(max=cdf.size(-1) - 1) if last is None else torch.minimum(pick, last)
    return pick[:, 0]


def _draw_filtered(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor):
    """Rows with a top-k or a top-p: their candidates sorted from the most likely, filtered, then drawn."""
    device, V = scaled.device, scaled.size(-1)
    limited = top_k > 0
    if bool(limited.all()):  # every row keeps at most max(top_k) tokens: filter among those only
        candidates, ids = torch.topk(scaled, min(int(top_k.max()), V), dim=-1)  # (R, K), sorted
    else:  # a row takes a nucleus of the whole vocabulary: sort it
        candidates, ids = torch.sort(scaled, dim=-1, descending=True)
    K = candidates.size(-1)
    k = torch.where(limited, top_k.clamp(max=K), K).to(device)
    kth = candidates.gather(-1, (k - 1)[:, None])  # (R, 1): sorted, so each row's k-th largest
    probs = torch.softmax(candidates.masked_fill(candidates < kth, float("-inf")), dim=-1)  # ties with it stay
    before = probs.cumsum(dim=-1) - probs  # the mass of the more likely candidates
    n_keep = (before < top_p.to(device, torch.float32)[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = probs.gather(-1, n_keep - 1)  # the nucleus: the fewest with mass >= p, plus ties with the last
    probs = probs.masked_fill(probs < threshold, 0.0)
    last = (probs > 0).sum(dim=-1, keepdim=True) - 1  # sorted: the kept ones come first
    return ids.gather(-1, _pick(probs.cumsum(dim=-1), uniform, last)[:, None])[:, 0]


def draw_uniform(generator: torch.Generator | None, n: int = 1) -> torch.Tensor:
    """n numbers in [0, 1) from a CPU generator (None: torch's global one): the randomness of n rows' next tokens."""
    return torch.rand(n, generator=generator, dtype=torch.float64).float()


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from the OS's entropy when None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
