"""Every [perf] switch computes the same training step as the plain path (issue: speed)."""

import pytest
import torch

from gpt2lab.bench.train import RandomBatches
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.train.loop import train_step
from gpt2lab.train.optim import OptimConfig, make_optimizer
from gpt2lab.train.perf import PerfConfig, prepare_model, step_context
from tests.conftest import assert_close_f32

CFG = GPTConfig(block_size=32, vocab_size=300, padded_vocab_size=320, n_layer=2, n_head=2, n_embd=32)


def _steps(perf: PerfConfig, n: int = 3, model: torch.nn.Module | None = None):
    """Losses, grad norms and final parameters of n AdamW steps on fixed random batches."""
    torch.manual_seed(0)
    raw = GPT(CFG)
    step_model = model(raw) if model is not None else prepare_model(raw, perf, "cpu")
    opt = make_optimizer(raw, OptimConfig(lr=1e-3, decay_steps=10), "cpu")
    batches = RandomBatches(4, CFG.block_size, CFG.vocab_size, "cpu")
    context = step_context("cpu", torch.float32)
    out = [train_step(step_model, raw, opt, batches, 2, autocast=context, grad_clip=1.0)[:2] for _ in range(n)]
    return out, raw


ROWS = 2 * 4 * CFG.block_size  # the rows of one step, which every gradient sums over


def _assert_same(a, b):
    """Same losses and grad norms at every step (AdamW magnifies float noise in the weights themselves)."""
    (losses_a, norms_a), (losses_b, norms_b) = zip(*a[0]), zip(*b[0])
    assert_close_f32(losses_a, losses_b, terms=ROWS, msg="losses")  # after steps on gradients
    assert_close_f32(norms_a, norms_b, terms=ROWS, msg="grad norms")


def _grads(perf: PerfConfig) -> tuple[float, list[torch.Tensor]]:
    """Loss and gradients of one forward/backward of two micro-batches."""
    from gpt2lab.train.loop import forward_backward

    torch.manual_seed(0)
    raw = GPT(CFG)
    model = prepare_model(raw, perf, "cpu")
    batches = RandomBatches(4, CFG.block_size, CFG.vocab_size, "cpu")
    loss = forward_backward(model, batches, 2, step_context("cpu", torch.float32), ddp=False)
    return loss.item(), [p.grad for p in raw.parameters()]


PLAIN = PerfConfig(compile=False)


@pytest.mark.parametrize(
    "perf",
    [
        PerfConfig(compile=False, ce_chunk_size=24),
        PerfConfig(compile=False, activation_checkpointing=True),
        PerfConfig(compile=False, attn_backend="math"),
        PerfConfig(compile=False, ce_chunk_size=50, activation_checkpointing=True, attn_backend="math"),
    ],
    ids=["fused-ce", "activation-checkpointing", "math-attention", "all"],
)
def test_switch_computes_the_plain_loss_and_gradients(perf):
    (loss, grads), (plain_loss, plain_grads) = _grads(perf), _grads(PLAIN)
    assert_close_f32(loss, plain_loss)
    for g, pg in zip(grads, plain_grads):
        assert_close_f32(g, pg, terms=ROWS)
    _assert_same(_steps(perf), _steps(PLAIN))


def test_bad_perf_values_are_reported():
    problems = PerfConfig(compile_mode="fast", attn_backend="triton", ce_chunk_size=-1).validate()
    assert len(problems) == 3 and "perf.compile_mode" in problems[0] and "perf.attn_backend" in problems[1]


def test_compiled_training_never_recompiles_for_eval_or_sampling():
    """Eval and sampling run the raw model: the compiled step's graph is traced once and kept."""
    from torch._dynamo.testing import CompileCounter

    from gpt2lab.inference.generate import generate_ids
    from gpt2lab.train.loop import val_loss

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = _steps(PLAIN, n=2, model=lambda raw: torch.compile(raw, backend=counter))
    frames = counter.frame_count
    assert frames >= 1
    eager = _steps(PLAIN, n=2)
    _assert_same(compiled, eager)
    raw = compiled[1]
    batches = RandomBatches(4, CFG.block_size, CFG.vocab_size, "cpu")
    context = step_context("cpu", torch.float32)
    losses = [val_loss(m, ResettableBatches(batches), 2, context) for m in (raw, eager[1])]
    assert_close_f32(losses[0], losses[1])
    same = [generate_ids(m, [1, 2, 3], max_new_tokens=8, temperature=0) for m in (raw, eager[1])]
    assert same[0] == same[1]
    assert counter.frame_count == frames  # nothing was traced again


class ResettableBatches(RandomBatches):
    """A val-loader stand-in: the same batch, as often as asked."""

    batches_per_epoch = 1_000_000

    def __init__(self, other: RandomBatches):
        self.x, self.y = other.x, other.y

    def reset(self) -> None:
        pass


def test_inductor_compiled_step_equals_eager():
    """The real torch.compile (inductor, C++ kernels on CPU): the same losses as eager."""
    torch._dynamo.reset()
    _assert_same(_steps(PerfConfig(compile=True), n=2), _steps(PLAIN, n=2))


@pytest.mark.parametrize("decode", ["static", "graph"])
def test_decode_modes_generate_the_eager_tokens(decode):
    from gpt2lab.inference.generate import generate_ids

    if decode == "graph" and not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU; the static cache they replay is tested on CPU")
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    kw = dict(num_samples=3, max_new_tokens=40, top_k=20, seed=7, eos_id=None)  # 3 + 40 > 32: the window slides
    assert generate_ids(model, [5, 6, 7], decode=decode, **kw) == generate_ids(model, [5, 6, 7], **kw)


def test_graph_decoding_without_cuda_is_a_clear_error():
    from gpt2lab.errors import Gpt2LabError
    from gpt2lab.inference.generate import generate_ids

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(Gpt2LabError, match="CUDA-graph decoding needs a CUDA device"):
        generate_ids(GPT(CFG).eval(), [1], max_new_tokens=4, decode="graph")
