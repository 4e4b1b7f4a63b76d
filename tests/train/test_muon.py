"""Muon (train/muon.py) and the optimizer switches of [optim]: Newton-Schulz, the update, groups, DDP, WSD, resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2lab.checkpoint import folder as ckpt
from gpt2lab.cli.main import main
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.runtime.dist import destroy_distributed
from gpt2lab.train import muon
from gpt2lab.train.muon import NS_COEFFICIENTS, Muon, newton_schulz
from gpt2lab.train.optim import OptimConfig, lr_at, make_optimizer, muon_param_groups, set_lr
from tests.conftest import REPO, assert_close_f32, free_port, join_gloo
from tests.train.test_loop import read_metrics, shakespeare_data, write_config  # noqa: F401 (fixtures)

MUON = {"name": "muon", "muon_lr": 0.02}


def quintic(s: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """What 5 Newton-Schulz steps do to each singular value s (of G / ||G||_F): s -> a s + b s^3 + c s^5."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def reference_orthogonalize(G: torch.Tensor) -> torch.Tensor:
    """U quintic(S / ||G||_F) V^T from an SVD in float64: what Newton-Schulz computes without the iteration."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    S = quintic(S / G.double().norm(dim=(-2, -1), keepdim=True)[..., 0])
    return U @ torch.diag_embed(S) @ Vh


# ----------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (3, 48, 24)], ids=["square", "tall", "wide", "3d"])
def test_newton_schulz_is_nearly_orthogonal(shape):
    """Singular values in [0.68, 1.21] wherever the input's were >= 0.002 of its norm: the quintic's known band.

    The band comes from iterating the scalar map 5 times over [0.002, 1] (0.6818 .. 1.2024; below 0.002 a
    value has not grown to the band yet, e.g. the smallest of a random square matrix). And the output is
    exactly U quintic(S) V^T: the iteration keeps the singular vectors and maps each value by the polynomial.
    """
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == torch.float32  # float32 on the CPU
    assert_close_f32(X, reference_orthogonalize(G), ulps=128)  # 5 steps of float32 matmuls vs an SVD: ~15 here
    s_in = torch.linalg.svdvals(G.double()) / G.double().norm(dim=(-2, -1), keepdim=True)[..., 0]
    s_out = torch.linalg.svdvals(X.double())
    assert s_out.max() <= 1.21
    s_out_large = s_out.sort(descending=True).values[s_in >= 0.002]  # pair by rank: the map is monotone there
    assert s_out_large.numel() >= 0.9 * s_in.numel() and s_out_large.min() >= 0.68
    if shape != (64, 64):  # a tall/wide Gaussian matrix is well conditioned: every value is in the band
        assert s_out.min() >= 0.68


def test_newton_schulz_in_bfloat16_stays_in_a_band():
    """The CUDA path's precision, run on the CPU: bf16 rounding (2^-8 ~ 0.4 % a value) widens the band a little."""
    torch.manual_seed(0)
    G = torch.randn(96, 32)
    X = newton_schulz(G, dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    s = torch.linalg.svdvals(X.double())
    assert 0.6 <= s.min() and s.max() <= 1.3
    assert (X.double() - reference_orthogonalize(G)).abs().max() < 0.05  # vs float32's ~1e-6


def test_newton_schulz_band_is_the_scalar_maps():
    s = torch.linspace(0.002, 1, 100_001, dtype=torch.float64)
    out = quintic(s)
    assert 0.68 < out.min() < 0.69 and 1.20 < out.max() < 1.21


# ----------------------------------------------------------------------------- the update


def test_muon_update_matches_a_direct_reference():
    """3 steps on a 2-D wide, a 2-D tall and a 3-D matrix == momentum + Nesterov + SVD + scale, in a few lines."""
    torch.manual_seed(0)
    shapes = [(8, 16), (24, 8), (2, 6, 4)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    lr, m, wd = 0.05, 0.9, 0.1
    opt = Muon([dict(params=params, lr=lr, momentum=m, weight_decay=wd)])
    ref = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):  # the reference, in float64
            g = g.double()
            bufs[i] = m * bufs[i] + (1 - m) * g
            nesterov = (1 - m) * g + m * bufs[i]
            scale = max(1, g.shape[-2] / g.shape[-1]) ** 0.5  # modded-nanogpt's convention
            ref[i] = ref[i] * (1 - lr * wd) - lr * scale * reference_orthogonalize(nesterov)
    for p, r in zip(params, ref):
        assert_close_f32(p.detach(), r)


def test_adamw_groups_match_torch_adamw():
    """The groups with use_muon=False are torch.optim.AdamW, step for step."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(betas=(0.8, 0.95), eps=1e-8)
    opt = Muon([dict(params=ours, use_muon=False, lr=3e-3, weight_decay=0.1)], **kw)
    ref = torch.optim.AdamW(theirs, lr=3e-3, weight_decay=0.1, foreach=False, **kw)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert_close_f32(a.detach(), b.detach())
        assert not torch.equal(a.detach(), torch.zeros_like(a))


# ----------------------------------------------------------------------------- which parameter goes where


def param_names(model: torch.nn.Module, params: list) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for p in params)


def test_groups_on_gpt2_send_the_block_matrices_to_muon():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, **MUON, muon_momentum=0.9, muon_weight_decay=0.01)
    muon_group, decay, no_decay = muon_param_groups(model, cfg)
    matrices = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    expected = sorted(f"transformer.h.{i}.{m}.weight" for i in range(2) for m in matrices)
    assert param_names(model, muon_group["params"]) == expected
    assert muon_group["use_muon"] and muon_group["momentum"] == 0.9 and muon_group["weight_decay"] == 0.01
    assert param_names(model, decay["params"]) == ["transformer.wpe.weight", "transformer.wte.weight"]  # wte: the head
    assert not decay["use_muon"] and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 2 * 8 + 2
    opt = make_optimizer(model, cfg, "cpu")
    assert isinstance(opt, Muon)
    set_lr(opt, 5e-4)  # the schedule at half the peak: both kinds of groups at half their base lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 5e-4, 5e-4], rel=1e-12)


def test_groups_with_experts_and_an_untied_head():
    """MoE experts' 3-D weights and the router go to Muon (each expert a matrix); the untied head to AdamW."""
    cfg = GPTConfig(
        block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, pos_embedding="rope", norm="rmsnorm",
        mlp="swiglu", bias=False, tie_embeddings=False, n_experts=4, experts_per_token=2, moe_layers="1",
    )  # fmt: skip
    model = GPT(cfg)
    muon_group, decay, no_decay = muon_param_groups(model, OptimConfig(**MUON))
    names = param_names(model, muon_group["params"])
    assert "transformer.h.1.mlp.experts.gate_up_proj" in names and "transformer.h.1.mlp.gate.weight" in names
    assert all(n.startswith("transformer.h.") for n in names)
    assert param_names(model, decay["params"]) == ["lm_head.weight", "transformer.wte.weight"]
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert sum(len(g["params"]) for g in (muon_group, decay, no_decay)) == len(list(model.parameters()))


def test_adamw_is_still_the_default():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    assert type(make_optimizer(model, OptimConfig(), "cpu")) is torch.optim.AdamW


# ----------------------------------------------------------------------------- DDP: each rank its share


def _shared_problem() -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    torch.manual_seed(0)
    shapes = [(8, 16), (24, 8), (16, 16), (2, 6, 4), (12, 8)]  # 5 matrices: ranks 0 and 1 get 3 and 2
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]  # the same all-reduced grads on every rank
    return params, grads


def _steps(counts: list[int]) -> list[torch.Tensor]:
    params, grads = _shared_problem()
    opt = Muon([dict(params=params, lr=0.05, weight_decay=0.1)])
    real = muon.newton_schulz

    def counted(G, steps):
        counts.append(1)
        return real(G, steps)

    muon.newton_schulz = counted  # count this rank's Newton-Schulz calls
    try:
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
    finally:
        muon.newton_schulz = real
    return [p.detach() for p in params]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    join_gloo(rank, 2, port)
    try:
        counts: list[int] = []
        params = _steps(counts)
        torch.save({"params": params, "calls": len(counts)}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while its peer still talks to it (gloo aborts: CI saw it)
    finally:
        destroy_distributed()


def test_two_ranks_share_the_newton_schulz_work_and_agree_exactly(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single_counts: list[int] = []
    single = _steps(single_counts)
    assert len(single_counts) == 2 * 5
    assert [r["calls"] for r in ranks] == [2 * 3, 2 * 2]  # round-robin: matrices 0, 2, 4 and 1, 3
    for r in ranks:  # the same float32 kernels on the same inputs: bit-identical to one process
        for got, expected in zip(r["params"], single):
            assert torch.equal(got, expected)


def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path, shakespeare_data):  # noqa: F811
    """2 gloo ranks x micro-batch 2 == 1 process accumulating 2 micro-batches of 2, with Muon, after 3 steps."""
    cfg = write_config(
        tmp_path, shakespeare_data, optim=MUON, eval={"val_every": 3},
        train={"max_steps": 3, "total_batch": 128, "micro_batch": 2, "save_every": 0},
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2lab",
         "train", str(cfg), "--run-dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stdout[-1500:] + ddp.stderr[-3000:]  # how far each rank got, and why it stopped
    assert "2 x cpu, grad accumulation 1" in ddp.stdout
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "one")]) == 0
    one, two = ckpt.find_latest(tmp_path / "one"), ckpt.find_latest(tmp_path / "ddp")
    w1, w2 = (ckpt.load_state_dict(p / ckpt.WEIGHTS_NAME) for p in (one, two))
    for name, w in w1.items():  # all-reduced halves vs accumulated halves: equal up to float32 rounding
        assert_close_f32(w2[name], w, ulps=256, msg=name)
    loss1, loss2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ddp")
    assert sorted(loss2) == [1, 2, 3]
    assert_close_f32([loss2[s] for s in sorted(loss1)], [loss1[s] for s in sorted(loss1)], ulps=256)


# ----------------------------------------------------------------------------- WSD, config errors


def test_wsd_schedule_at_key_steps():
    cfg = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, decay_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # warmup as with the cosine
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert [lr_at(s, cfg) for s in (10, 50, 79, 80)] == [1e-3] * 4  # stable, until the last 20 % of 100 steps
    assert lr_at(90, cfg) == pytest.approx(5.5e-4)  # halfway down the line from 1e-3 to 1e-4
    assert lr_at(99, cfg) == pytest.approx(1e-3 - 0.95 * 9e-4)
    assert lr_at(100, cfg) == lr_at(150, cfg) == pytest.approx(1e-4)  # flat after
    whole = OptimConfig(lr=1e-3, warmup_steps=10, decay_steps=100, schedule="wsd", decay_fraction=1.0)
    assert lr_at(55, whole) == pytest.approx(5.5e-4)  # the decay never starts before the warmup ends


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("name", "sgd", "optim.name must be one of adamw, muon (got 'sgd')"),
        ("schedule", "linear", "optim.schedule must be one of cosine, wsd (got 'linear')"),
        ("muon_lr", "0", "optim.muon_lr must be > 0 (got 0.0)"),
        ("muon_momentum", "1", "optim.muon_momentum must be in [0, 1) (got 1.0)"),
        ("muon_weight_decay", "-0.1", "optim.muon_weight_decay must be >= 0 (got -0.1)"),
        ("muon_momentum_start", "1", "optim.muon_momentum_start in [0, 1) (got 0, 1.0)"),
        ("muon_momentum_warmup", "-1", "optim.muon_momentum_warmup must be >= 0 and"),
        ("decay_fraction", "0", "optim.decay_fraction must be in (0, 1] (got 0.0)"),
    ],
)
def test_bad_values_are_one_error_naming_the_key(tmp_path, capsys, key, value, message):
    cfg = write_config(tmp_path, tmp_path / "unused")
    assert main(["train", str(cfg), "--set", f"optim.{key}={value}", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- end to end, resume


def test_shakespeare_preset_trains_with_muon(tmp_path, shakespeare_data, capsys):  # noqa: F811
    run = tmp_path / "run"
    tiny = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.total_batch=256",
            "train.micro_batch=8", "train.max_steps=10", "optim.warmup_steps=2", "eval.val_every=10",
            "eval.sample_every=0", "log.tensorboard=false", "optim.name=muon", "optim.schedule=wsd"]  # fmt: skip
    sets = [arg for kv in tiny + [f"data.path={shakespeare_data}"] for arg in ("--set", kv)]
    assert main(["train", str(REPO / "configs" / "shakespeare.toml"), "--run-dir", str(run), *sets]) == 0
    val = read_metrics(run, "val_loss")
    assert sorted(val) == [0, 10] and val[10] < val[0] - 0.5  # 10.82 -> 9.92 here
    state = torch.load(ckpt.find_latest(run) / ckpt.OPTIMIZER_NAME, weights_only=True)
    assert [g["use_muon"] for g in state["param_groups"]] == [True, False, False]
    assert sum("momentum_buffer" in s for s in state["state"].values()) == 2 * 4  # the blocks' 8 matrices


STEPS = 8


@pytest.mark.parametrize("choices", [{}, {"muon_split": True, "muon_momentum_warmup": 6}], ids=["plain", "split"])
def test_resume_with_muon_gives_bit_identical_losses(tmp_path, shakespeare_data, choices):  # noqa: F811
    """8 steps straight == 4 steps, resume, 4 steps: every loss, val loss, norm and lr equal exactly."""
    cfg = write_config(
        tmp_path, shakespeare_data, optim={**MUON, "schedule": "wsd", "decay_steps": STEPS, **choices},
        train={"max_steps": STEPS, "save_every": 0},
    )  # fmt: skip
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "straight")]) == 0
    run = str(tmp_path / "run")
    assert main(["train", str(cfg), "--run-dir", run, "--set", f"train.max_steps={STEPS // 2}"]) == 0
    assert main(["train", "--resume", run, "--set", f"train.max_steps={STEPS}"]) == 0
    keys = ("train_loss", "val_loss", "grad_norm", "lr")
    resumed, straight = ({k: read_metrics(tmp_path / d, k) for k in keys} for d in ("run", "straight"))
    assert sorted(resumed["train_loss"]) == list(range(1, STEPS + 1))
    assert resumed == straight
    groups = torch.load(ckpt.find_latest(run) / ckpt.OPTIMIZER_NAME, weights_only=True)["param_groups"]
    assert [g.get("split") for g in groups if g["use_muon"]][1:] == ([(32, 32, 32)] if choices else [])
