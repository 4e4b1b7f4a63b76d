"""gpt2lab.runtime.hardware: one place decides what the device can do; runs are checked before any work."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt2lab.cli.main import main
from gpt2lab.errors import Gpt2LabError
from gpt2lab.runtime import hardware
from tests.conftest import REPO

TINY = {
    "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "padded_vocab_size": 50304},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "decay_steps": 8},
    "train": {"max_steps": 2, "total_batch": 512, "micro_batch": 4, "save_every": 2, "device": "cpu"},
    "eval": {"val_every": 0},
    "log": {"tensorboard": False},
}
CPU = hardware.Capabilities("cpu", "cpu", True, True, True, False, False, False, False)
A100 = hardware.Capabilities("cuda", "NVIDIA A100", True, True, True, True, True, True, True, cc_major=8)
T4 = replace(A100, name="Tesla T4", bf16=False, tf32=False, cc_major=7)
MPS = hardware.Capabilities("mps", "Apple MPS", True, True, False, False, False, False, False)


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data) -> Path:
    from gpt2lab.data.prepare import Settings, prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare(Settings("shakespeare", shard_size=10_000_000), out, workers=1)
    return out


def _config(folder: Path, data: Path, **train) -> Path:
    values = {**TINY, "data": {"path": str(data)}, "train": {**TINY["train"], **train}}
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items()) for s, t in values.items())
    path = folder / "tiny.toml"
    path.write_text(text)
    return path


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, never a traceback
    return err


# ----------------------------------------------------------------------------- what auto picks


def test_auto_precision_per_device():
    """The README's Hardware table: bf16 on CUDA with it, fp16 + scaler without, bf16/fp32 on MPS, fp32 on CPU."""
    pick = hardware.autocast_dtype
    assert pick("auto", A100) == torch.bfloat16 and not hardware.needs_grad_scaler(torch.bfloat16, A100)
    assert pick("auto", T4) == torch.float16 and hardware.needs_grad_scaler(torch.float16, T4)
    assert pick("auto", MPS) == torch.bfloat16 and pick("auto", replace(MPS, bf16=False)) == torch.float32
    assert not hardware.needs_grad_scaler(torch.float16, MPS)  # no GradScaler on MPS
    assert pick("auto", CPU) == torch.float32 and pick("float16", CPU) == torch.float16
    perf = type("Perf", (), {"compile": None})
    hardware._compile_problem.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torch.utils._triton.has_triton", lambda: True)
        assert hardware.use_compile(perf, A100) and not hardware.use_compile(perf, MPS)  # MPS: off unless asked
        hardware._compile_problem.cache_clear()
        mp.setattr("torch.utils._triton.has_triton", lambda: False)  # CUDA without Triton: eager
        assert replace(A100).compile == "Triton is not installed" and not hardware.use_compile(perf, replace(A100))
    hardware._compile_problem.cache_clear()


def test_this_cpu_and_the_one_place_that_decides(monkeypatch):
    caps = hardware.capabilities("cpu")
    assert (caps.device_type, caps.fused_adamw, caps.pin_memory, caps.nccl) == ("cpu", False, False, False)
    assert hardware.resolve_device("auto") in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(Gpt2LabError, match="no CUDA GPU is available"):
            hardware.resolve_device("cuda")
    # NCCL missing (Windows) -> gloo; the same GPU with NCCL -> nccl
    monkeypatch.setattr(hardware, "capabilities", lambda device: replace(A100, nccl=False))
    assert hardware.dist_backend("cuda:0") == "gloo"
    monkeypatch.setattr(hardware, "capabilities", lambda device: A100)
    assert hardware.dist_backend("cuda:0") == "nccl"


def test_train_never_imports_config():
    """The import circle config <-> train is gone: train/loop.py names gpt2lab.config nowhere, not even lazily."""
    tree = ast.parse((REPO / "src" / "gpt2lab" / "train" / "loop.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "gpt2lab.config" not in imported
    code = "import sys, gpt2lab.train.loop; assert 'gpt2lab.config' not in sys.modules, 'config imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ----------------------------------------------------------------------------- preflight


def test_cuda_kernel_on_cpu_is_one_error_and_no_run_folder(tmp_path, data, capsys):
    cfg = _config(tmp_path, data)
    run = tmp_path / "run"
    err = _error(capsys, ["train", str(cfg), "--run-dir", str(run), "--set", "perf.attn_backend=cudnn"])
    assert "perf.attn_backend=cudnn is a CUDA kernel and this run is on cpu" in err
    assert not run.exists()


def test_compile_without_a_compiler_falls_back_once(tmp_path, data, capsys, monkeypatch):
    """No C++ compiler (a Dynamo traceback before): one notice, then an eager run that trains."""
    monkeypatch.setattr(hardware, "_cpp_compiler_problem", lambda: "no working C++ compiler (g++ or clang++)")
    hardware._compile_problem.cache_clear()
    hardware.capabilities.cache_clear()
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    try:
        cfg = _config(tmp_path, data)
        assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--set", "perf.compile=true"]) == 0
    finally:
        hardware._compile_problem.cache_clear()
        hardware.capabilities.cache_clear()
    err = capsys.readouterr().err
    assert err.count("note: perf.compile: torch.compile cannot run here (no working C++ compiler") == 1


# ----------------------------------------------------------------------------- memory


def test_gpt2_124m_on_a_small_machine_is_refused_before_allocating(capsys, monkeypatch):
    """Was: killed by the kernel after 84 s at 24 GB (rc 137, no message)."""
    monkeypatch.setattr(hardware, "available_bytes", lambda device: 24 * 2**30)
    config = str(REPO / "configs" / "gpt2-124m.toml")
    err = _error(capsys, ["bench", "train", "--config", config, "--steps", "20", "--set", "perf.ce_chunk_size=0"])
    assert "needs about" in err and "24.0 GiB available" in err
    for knob in ("train.micro_batch (now 64; or auto)", "perf.ce_chunk_size", "perf.activation_checkpointing"):
        assert knob in err


def test_presets_that_fit_pass_the_memory_check(monkeypatch):
    from gpt2lab.config import load_config

    monkeypatch.setattr(hardware, "available_bytes", lambda device: 2 * 2**30)  # a small laptop's spare memory
    assert hardware.preflight(load_config(REPO / "configs" / "shakespeare.toml"), "cpu") == []


def test_a_benchmark_counts_every_model_it_holds(monkeypatch):
    """bench train --compare holds two models with their AdamW state at once: the check counts both."""
    from gpt2lab.config import load_config

    cfg = load_config(REPO / "configs" / "gpt2-124m.toml", ["train.micro_batch=1", "perf.ce_chunk_size=1024"])
    one = hardware.estimate_train_bytes(cfg.model, 1, cfg.model.block_size, torch.float32, cfg.perf)
    monkeypatch.setattr(hardware, "available_bytes", lambda device: one + 2**30)  # room for one, not two
    assert hardware.preflight(cfg, "cpu") == []
    with pytest.raises(Gpt2LabError, match="needs about"):
        hardware.preflight(cfg, "cpu", models=2)


def test_memory_estimate_is_calibrated_against_real_steps():
    """The estimate is within [0.8, 1.5] x the peak resident memory two real steps add (fresh process)."""
    code = """
import torch
from gpt2lab.runtime.hardware import estimate_train_bytes
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.train.optim import OptimConfig, make_optimizer
from gpt2lab.train.perf import PerfConfig
torch.set_num_threads(1)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM): import-time peaks must not count
base = rss()
cfg = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, padded_vocab_size=50304)
model = GPT(cfg)
opt = make_optimizer(model, OptimConfig(decay_steps=10), "cpu")
x = torch.randint(0, 50257, (8, 64))
for _ in range(2):
    opt.zero_grad(set_to_none=True)
    model(x, x)[1].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
status = open("/proc/self/status").read()
peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
print(estimate_train_bytes(cfg, 8, 64, torch.float32, PerfConfig()) / (peak - base))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert 0.8 <= float(out.stdout) <= 1.5, out.stdout


def test_micro_batch_auto_fits_the_memory_keeps_total_batch_and_is_stored(tmp_path, data, capsys, monkeypatch):
    from gpt2lab.checkpoint import folder as ckpt
    from gpt2lab.config import load_config
    from gpt2lab.train.perf import PerfConfig

    model = load_config(_config(tmp_path, data)).model
    need = {b: hardware.estimate_train_bytes(model, b, 32, torch.float32, PerfConfig()) for b in (4, 8)}
    budget = (need[4] + need[8]) / 2 / 0.7  # 4 sequences fit in the auto budget, 8 do not
    monkeypatch.setattr(hardware, "available_bytes", lambda device: int(budget))
    cfg, run = _config(tmp_path, data, micro_batch="auto"), tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--set", "train.max_steps=1"]) == 0
    out, err = capsys.readouterr()
    assert "note: train.micro_batch=auto: 4 (estimated to fit" in err and "gradient accumulation 4" in err
    assert "grad accumulation 4, 512 tokens per step" in out  # 16 sequences of 32 per step, as configured
    assert "micro_batch = 4" in (run / "config.toml").read_text()
    state = ckpt.read_json(ckpt.find_latest(run) / "config.json")["train_state"]
    assert state["config"]["train"]["micro_batch"] == 4 and state["loader"]["batch_size"] == 4
    # a resume with more memory keeps the micro-batch of the run (the loader's layout must not change)
    monkeypatch.setattr(hardware, "available_bytes", lambda device: 64 * 2**30)
    assert main(["train", str(cfg), "--run-dir", str(run), "--set", "train.max_steps=1"]) == 0  # finished: no-op
    assert "nothing to do" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=2"]) == 0
    assert ckpt.read_json(ckpt.find_latest(run) / "config.json")["train_state"]["loader"]["batch_size"] == 4


def test_an_older_gpu_gets_float16_and_fallbacks_with_one_notice_each(monkeypatch):
    """A T4 (no bf16, no flash kernel, no Triton): auto picks float16 + scaler; flash and compile fall back."""
    from gpt2lab.config import build_config

    t4 = replace(T4)
    object.__setattr__(t4, "compile", "Triton is not installed")  # the cached_property's slot, set by hand
    monkeypatch.setattr(hardware, "capabilities", lambda device: t4)
    monkeypatch.setattr(hardware, "attention_available", lambda name, *a: name in ("math", "efficient"))
    monkeypatch.setattr(hardware, "available_bytes", lambda device: 15 * 2**30)
    cfg = build_config({**TINY, "perf": {"attn_backend": "flash"}}, "t4")
    notes = hardware.preflight(cfg, "cuda:0")
    assert notes == [
        "train.dtype=auto: Tesla T4 has no bfloat16; float16 autocast with a gradient scaler",
        "perf.compile: torch.compile cannot run here (Triton is not installed); running eager",
        "perf.attn_backend=flash: not available on Tesla T4 with float16 and head size 16; PyTorch picks the kernel "
        "(auto)",
    ]
    assert hardware.attention_backend(cfg.perf, "cuda:0", torch.float16, 16) == "auto"  # what prepare_model sets
    assert hardware.attention_backend(replace(cfg.perf, attn_backend="efficient"), "cuda:0", torch.float16, 16) == (
        "efficient"
    )
