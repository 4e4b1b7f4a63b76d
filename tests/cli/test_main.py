"""The command line as a user meets it: `gpt2lab sample`, `export`, `bench sample`, and every clear error."""

import json
import subprocess
import sys

import pytest
import torch

import gpt2lab.tokenizer.bpe as tokmod
from gpt2lab.checkpoint.folder import WEIGHTS_NAME, save_model
from gpt2lab.cli.main import main
from gpt2lab.inference.generate import generate_ids
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, padded_vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits so greedy choices are not near-ties
    return save_model(model, tmp_path_factory.mktemp("cli") / "ckpt")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys, *argv: str) -> str:
    """The CLI's message for a user error: exit code 2, one line, no traceback."""
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_python_m_gpt2lab_help():
    result = subprocess.run([sys.executable, "-m", "gpt2lab", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("sample", "export", "bench"):
        assert command in result.stdout


def test_importing_the_cli_does_not_import_torch():
    """`gpt2lab --help` stays fast: the parser and its subcommands' builders import their stages lazily."""
    code = "import sys, gpt2lab.cli.main; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_sample_greedy_prints_prompt_and_the_model_continuation(capsys, checkpoint, tokenizer):
    code, out, err = run(
        capsys, "sample", "--model", checkpoint, "--prompt", "Hello, I'm", "--max-new-tokens", 12, "--temperature", 0
    )
    assert code == 0, err
    from gpt2lab.interop.load import load_model

    ids = generate_ids(load_model(str(checkpoint)), tokenizer.encode("Hello, I'm"), max_new_tokens=12, temperature=0)
    assert out == "Hello, I'm" + tokenizer.decode([t for t in ids[0] if t != tokenizer.eot]) + "\n"


def test_sample_several_samples_print_blocks_and_repeat_with_a_seed(capsys, checkpoint):
    argv = ["sample", "--model", checkpoint, "--prompt", "Once", "--num-samples", 3, "--max-new-tokens", 8]
    code, out, _ = run(capsys, *argv, "--top-k", 50, "--seed", 42)
    assert code == 0
    blocks = out.split("--- sample ")
    assert [b[:5] for b in blocks[1:]] == ["1 ---", "2 ---", "3 ---"]
    assert all(b.split("---\n", 1)[1].startswith("Once") for b in blocks[1:])
    assert run(capsys, *argv, "--top-k", 50, "--seed", 42)[1] == out
    assert run(capsys, *argv, "--top-k", 50, "--seed", 43)[1] != out
    assert run(capsys, *argv, "--top-p", 0.9, "--temperature", 0.7, "--seed", 1)[0] == 0


def test_sample_empty_prompt_and_long_prompt(capsys, checkpoint):
    code, out, _ = run(capsys, "sample", "--model", checkpoint, "--max-new-tokens", 5, "--seed", 0)
    assert code == 0 and out.endswith("\n")
    long_prompt = "word" + " word" * 79  # 80 tokens, more than the context of 64
    code, out, err = run(capsys, "sample", "--model", checkpoint, "--prompt", long_prompt, "--max-new-tokens", 3)
    assert code == 0
    assert "warning: the prompt has 80 tokens; keeping its last 64" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1 (got 0)"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--device", "nonsense"], "is not a device"),
    ],
)
def test_bad_sampling_arguments(capsys, checkpoint, args, message):
    assert message in error(capsys, "sample", "--model", checkpoint, *args)


def test_bad_model_arguments(capsys, tmp_path, checkpoint):
    assert f"no such folder (looked for {tmp_path / 'nope'})" in error(capsys, "sample", "--model", tmp_path / "nope")
    assert "no such folder (looked for" in error(capsys, "sample", "--model", "gpt2-mediun")  # a typo: not the hub
    assert "and not a GPT-2 name (gpt2, gpt2-medium" in error(capsys, "sample", "--model", "gpt2-mediun")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a gpt2lab checkpoint, run folder or Hugging Face folder" in error(capsys, "sample", "--model", empty)
    assert "is a file" in error(capsys, "sample", "--model", checkpoint / WEIGHTS_NAME)


def test_hub_name_offline_is_a_clear_error(capsys, monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert "could not fetch 'gpt2'" in error(capsys, "sample", "--model", "gpt2")


def test_broken_checkpoint_files(capsys, tmp_path, checkpoint):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", WEIGHTS_NAME):
        (broken / name).write_bytes((checkpoint / name).read_bytes())
    data = (checkpoint / WEIGHTS_NAME).read_bytes()
    (broken / WEIGHTS_NAME).write_bytes(data[:1000])
    err = error(capsys, "sample", "--model", broken)
    assert str(broken / WEIGHTS_NAME) in err and "truncated or corrupt" in err

    (broken / WEIGHTS_NAME).write_bytes(data)
    config = json.loads((checkpoint / "config.json").read_text())
    config["model"]["n_embd"] = 64
    (broken / "config.json").write_text(json.dumps(config))
    err = error(capsys, "sample", "--model", broken)
    assert str(broken / WEIGHTS_NAME) in err and "has shape" in err and "the config needs" in err

    (broken / "config.json").write_text("{broken")
    assert "config.json: not valid JSON" in error(capsys, "export", broken, tmp_path / "out")


def test_no_tokenizer_files_offline(capsys, monkeypatch, tmp_path, checkpoint):
    monkeypatch.delenv("GPT2LAB_MIRROR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokmod, "_online", lambda *a, **k: False)
    err = error(capsys, "sample", "--model", checkpoint)
    assert "tokenizer files are not available offline" in err and "TIKTOKEN_CACHE_DIR" in err
    assert "no encoder.json" in error(capsys, "sample", "--model", checkpoint, "--tokenizer", tmp_path)
    code, out, err = run(capsys, "export", checkpoint, tmp_path / "hf")  # export still works, without them
    assert code == 0 and "without tokenizer files" in out and "warning: tokenizer files not exported" in err


def test_bench_sample_runs_and_agrees_with_transformers(capsys, checkpoint):
    pytest.importorskip("transformers")
    argv = ["bench", "sample", "--model", checkpoint, "--new-tokens", 4, "--batch-sizes", 1, 2]
    code, out, err = run(capsys, *argv, "--warmup", 0, "--repeats", 1, "--compare")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.lstrip("│ ").split(" ")[0] in ("1", "2")]
    # one row per batch size and implementation (eager, static, transformers): greedy outputs all identical
    assert len(rows) == 6 and all("yes" in row for row in rows)
    assert sum("gpt2lab static" in row for row in rows) == 2
    # per batch: eager and static against transformers, static against eager, each with its interval
    verdicts = [line for line in out.splitlines() if line.startswith("batch ") and "interval" in line]
    assert len(verdicts) == 6 and "batch 2: gpt2lab static vs gpt2lab eager: " in out
    progress = [line for line in err.splitlines() if line.startswith("batch ")]  # one per timed call, on stderr
    assert len(progress) == 6 and "batch 2, transformers: run 1/1 (timed)" in err
    assert "--new-tokens" in error(capsys, *argv, "--repeats", 0)


def test_hub_name_loads_from_the_hugging_face_cache_offline(capsys, monkeypatch, tmp_path):
    """`--model gpt2` goes through huggingface_hub: here a cache laid out as the hub leaves it."""
    transformers = pytest.importorskip("transformers")
    import huggingface_hub.constants as hub_constants

    from gpt2lab.interop.load import load_model

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / commit
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    reference = transformers.GPT2LMHeadModel(hf_config).eval()
    reference.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    model = load_model("gpt2")
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        from tests.conftest import assert_close_f32

        assert_close_f32(model(x)[0], reference(x).logits)
    code, out, err = run(capsys, "sample", "--model", "gpt2", "--prompt", "Hello", "--max-new-tokens", 5, "--seed", 1)
    assert code == 0, err
    assert out.startswith("Hello") and len(out) > len("Hello\n")


def test_warnings_come_before_the_text_on_their_own_stderr_line(capsys, monkeypatch, checkpoint):
    """On a terminal stdout and stderr share the screen: a warning must not land inside the sample."""
    import io

    argv = ["sample", "--model", checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 70, "--seed", 0]
    code, out, err = run(capsys, *argv)  # 70 new tokens overflow the context of 64
    assert code == 0 and out.startswith("ROMEO:") and "warning" not in out
    assert err.startswith("warning: prompt + new tokens exceed the context of 64") and err.count("\n") == 1
    screen = io.StringIO()  # both streams into one, in the order they are written
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    assert main([str(a) for a in argv]) == 0
    assert screen.getvalue() == err + out


def test_graph_decoding_on_cpu_fails_before_any_output(capsys, checkpoint):
    argv = ["sample", "--model", checkpoint, "--prompt", "hi", "--decode", "graph", "--device", "cpu"]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")  # not even the prompt
    assert err == "error: CUDA-graph decoding needs a CUDA device (use --decode eager or static)\n"


def test_version(capsys):
    import gpt2lab

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"gpt2lab {gpt2lab.__version__}\n"


def test_help_shows_every_default():
    """Each option of every subcommand has a help line, and it shows the default where there is one."""
    import argparse

    from gpt2lab.cli.main import build_parser

    def parsers(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    checked = 0
    for name, parser in parsers(build_parser(), "gpt2lab"):
        text = " ".join(parser.format_help().split())  # undo the line wrapping
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest}: no help text"
            default = action.default
            if default not in (None, False, "", []) and "default" not in action.help:
                assert f"(default: {default})" in text, f"{name} --help does not show {action.dest}'s default"
                checked += 1
    assert checked > 30  # a real sweep over the commands' options


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False), ("3", False)])
def test_under_torchrun_only_rank_0_prints_the_error(capsys, monkeypatch, tmp_path, rank, printed):
    """torchrun sets RANK in every process; they all meet the same error, and one line says it."""
    monkeypatch.setenv("RANK", rank)
    code, out, err = run(capsys, "sample", "--model", tmp_path / "nope")
    assert code == 2 and out == ""  # every rank still fails
    if printed:
        assert err.startswith(f"error: {tmp_path / 'nope'}: no such folder") and err.count("\n") == 1
    else:
        assert err == ""


def test_export_help_names_every_family_it_writes(capsys):
    """gpt2lab.interop.hf.export_hf writes GPT-2, Llama, Qwen3, Qwen3-MoE, Mixtral or DeepSeek-V3, as the model is."""
    with pytest.raises(SystemExit):
        main(["--help"])
    summary = " ".join(capsys.readouterr().out.split())  # the command list's one line
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for family in ("GPT-2", "Llama", "Qwen3", "Qwen3-MoE", "Mixtral", "DeepSeek-V3"):
        assert family in text, f"export --help does not name {family}"
    assert "GPT-2 folder" not in summary  # not GPT-2 only
