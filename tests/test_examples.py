"""examples/inference.ipynb, executed with nbclient on tiny models: it runs, and prints what the model produced."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab.chat.base import CHAT_VOCAB_SIZE
from gpt2lab.chat.template import render_prompt
from gpt2lab.checkpoint.folder import TRAIN_STATE_KEY, save_model
from gpt2lab.inference.generate import generate_ids
from gpt2lab.interop.load import load_model
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer.bpe import get_tokenizer
from tests.conftest import REPO, SHARED_DATA
from tests.test_readme import readme_commands

NOTEBOOK = REPO / "examples" / "inference.ipynb"
CHAT_SAMPLING = {"temperature": 0.7, "top_k": 50, "seed": 1}  # as in the notebook's chat cell


def _model(vocab: int) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, vocab_size=vocab, padded_vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    return GPT(config)


def _read(path: Path = NOTEBOOK):
    import nbformat

    return nbformat.read(path, as_version=4)


def _parameters(nb) -> dict:
    """The literal values of the parameters cell (PROMPT, MAX_NEW_TOKENS), read without running it."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    tree = ast.parse(cell.source)
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }


def _stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny untrained base model and a chat model (its run config has [sft] data, as gpt2lab sft writes)."""
    root = tmp_path_factory.mktemp("models")
    save_model(_model(50257), root / "base")
    save_model(_model(CHAT_VOCAB_SIZE), root / "chat", extra={TRAIN_STATE_KEY: {"config": {"sft": {"data": "x"}}}})
    return {"base": root / "base", "chat": root / "chat"}


def _from_repo(path: Path) -> str:
    """The path relative to the repository root, as a user writes runs/shakespeare (here often via ../..)."""
    return os.path.relpath(path, REPO)


def _env(models: dict[str, Path], ipython_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GPT2LAB_MODEL": _from_repo(models["base"]),
        "GPT2LAB_CHAT_MODEL": _from_repo(models["chat"]),
        "GPT2LAB_MIRROR": str(SHARED_DATA),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(gpt2lab.__file__).parents[1]),  # the gpt2lab this test imports
        "IPYTHONDIR": str(ipython_dir),
    }


@pytest.fixture(scope="module")
def executed(models, tmp_path_factory) -> dict:
    """The notebook's cells by id, after running it in a fresh python3 kernel (ipykernel) in an empty folder."""
    from nbclient import NotebookClient

    env = {**_env(models, tmp_path_factory.mktemp("ipython")), "GPT2LAB_MIRROR": _from_repo(SHARED_DATA)}
    nb = _read()  # run where Jupyter runs it, in examples/, with paths relative to the repository root
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute(env=env)  # a cell that raises fails here, with its traceback
    return {c.id: c for c in nb.cells}


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_the_notebook_is_saved_without_outputs():
    code = [c for c in _read().cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert {"PROMPT", "MAX_NEW_TOKENS"} <= _parameters(_read()).keys()


def test_it_loads_the_model_and_streams_the_greedy_completion(executed, models, tok):
    params = _parameters(_read())
    model = load_model(str(models["base"]))
    assert _stdout(executed["load"]).startswith(f"{models['base']}: {model.num_params(non_embedding=False):,} param")
    new = generate_ids(model, tok.encode(params["PROMPT"]), max_new_tokens=params["MAX_NEW_TOKENS"], temperature=0)[0]
    assert len(new) > 0
    assert _stdout(executed["stream"]) == params["PROMPT"] + tok.decode([t for t in new if t != tok.eot]) + "\n"
    samples = _stdout(executed["samples"]).split("--- sample ")
    assert [s[:2] for s in samples[1:]] == [f"{i}\n" for i in range(3)]


def test_it_chats_two_turns_and_shows_the_prompt_the_model_reads(executed, models, tok):
    params = _parameters(_read())
    messages = ast.literal_eval(executed["messages"].outputs[0]["data"]["text/plain"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    said = "".join(f"you: {q['content']}\nassistant: {a['content']}\n" for q, a in zip(messages[1::2], messages[2::2]))
    assert _stdout(executed["chat"]) == said
    model, end = load_model(str(models["chat"])), tok.special_id("<|assistant_end|>")
    for turn in (2, 4):  # each reply is the model's own continuation of the rendered conversation
        ids = render_prompt(messages[:turn], tok)
        room = min(params["MAX_NEW_TOKENS"], model.config.block_size - len(ids))
        new = generate_ids(model, ids, max_new_tokens=room, eos_id=end, **CHAT_SAMPLING)[0]
        cut = next((i for i, t in enumerate(new) if t >= tok.eot), len(new))
        assert messages[turn]["content"] == tok.decode(new[:cut])
    ids = render_prompt(messages + [{"role": "user", "content": "And of Italy?"}], tok)
    rendered = _stdout(executed["render"])
    assert rendered == f"{len(ids)} tokens: {ids[:8]} ... {ids[-4:]}\n{tok.decode(ids)}\n"
    assert rendered.endswith("<|user_start|>And of Italy?<|user_end|><|assistant_start|>\n")


def test_the_readmes_headless_command_runs_the_notebook(models, tmp_path):
    """The README's nbconvert line, run from the repository root with the run folders it names, prints every cell."""
    line = next(c for c in readme_commands() if "nbconvert" in c)
    line = line.replace("runs/shakespeare", _from_repo(models["base"])).replace("runs/chat", _from_repo(models["chat"]))
    out = subprocess.run(line, shell=True, cwd=REPO, env=_env(models, tmp_path), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    model = load_model(str(models["base"]))
    assert f"{models['base']}: {model.num_params(non_embedding=False):,} parameters" in out.stdout
    assert "--- sample 2" in out.stdout and "you: " in out.stdout
