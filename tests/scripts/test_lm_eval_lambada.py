"""scripts/lm_eval_lambada.py's pieces, without lm-eval: the task it writes scores what `gpt2lab eval lambada`
scores, its model is one `gpt2lab eval lambada` loads, and its comparison fails on a real difference."""

from __future__ import annotations

import json

import pytest
import yaml

from gpt2lab.eval.lambada import load_passages, locate
from tests.scripts.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("lm_eval_lambada")


@pytest.fixture(scope="module")
def passages(shared_data):
    return load_passages(locate(), limit=40)


def test_the_task_reads_gpt2labs_context_and_target_as_lambada_openai_does(script, passages, tmp_path):
    """lambada_openai's settings (loglikelihood, perplexity and acc) over the passages split as gpt2lab splits
    them, the target's leading space kept and no delimiter added before it."""
    folder = script.write_tasks(tmp_path / "tasks", passages)
    task = yaml.safe_load((folder / f"{script.TASK}.yaml").read_text())
    assert task["output_type"] == "loglikelihood" and task["target_delimiter"] == ""
    assert task["doc_to_text"] == "{{context}}" and task["doc_to_target"] == "{{target}}"
    assert [m["metric"] for m in task["metric_list"]] == ["perplexity", "acc"]
    rows = [json.loads(line) for line in open(task["dataset_kwargs"]["data_files"]["test"])]
    assert [(r["context"], r["target"]) for r in rows] == passages
    assert all(r["target"].startswith(" ") and not r["context"].endswith(" ") for r in rows)
    chat = yaml.safe_load((folder / f"{script.CHAT_TASK}.yaml").read_text())
    assert chat["output_type"] == "generate_until" and chat["generation_kwargs"]["until"] == ["\n"]


def test_lm_evals_joint_encoding_gives_gpt2labs_tokens_on_these_passages(script, passages):
    """lm-eval encodes context + target together, gpt2lab apart: the same tokens here (else the scores differ)."""
    assert script.token_split_differs(passages) == 0
    assert script.token_split_differs([("He", "llo")]) == 1  # a target that merges with the context's last token


def test_compare_fails_beyond_rtol_or_on_any_accuracy_difference(script):
    ref = {"acc": 0.25, "ppl": 100.0}
    assert script.compare({"a": ref, "b": {"acc": 0.25, "ppl": 100.0009}}, 1e-5)[1]
    assert not script.compare({"a": ref, "b": {"acc": 0.25, "ppl": 100.0011}}, 1e-5)[1]
    assert not script.compare({"a": ref, "b": {"acc": 0.275, "ppl": 100.0}}, 1e-5)[1]
    assert script.harness_metrics({"acc,none": 0.5, "perplexity,none": 3.0, "acc_stderr,none": 0.1}) == {
        "acc": 0.5,
        "ppl": 3.0,
    }
