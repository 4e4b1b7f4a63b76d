"""Tasks with verifiable answers: the questions a model is asked, and a program that scores its reply.

Each task implements ``scoring.Task`` (``problems``, ``parse``, ``check``, ``reward``; see ``scoring.py``).
Built in:
- ``gsm8k``: grade-school math word problems, scored on the final number (``gsm8k.py``);
- ``arith``: synthetic addition / multiplication with a difficulty knob and worked solutions (``arith.py``);
- a user's JSONL of ``{"prompt" | "messages", "answer"}`` (here): exact match of the stripped answer text, or a
  Python function ``module:function`` (or ``path/file.py:function``) called as ``f(answer_text, reference) -> float``.

``get_task(name_or_path, **options)`` builds any of them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from gpt2lab.errors import Gpt2LabError
from gpt2lab.rl.arith import Arith
from gpt2lab.rl.gsm8k import GSM8K
from gpt2lab.rl.scoring import Problem, Task, check_format_reward, check_split, final_text


def load_verifier(spec: str) -> Callable:
    """The function of 'module:function' or 'path/to/file.py:function', imported (never eval'd)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise Gpt2LabError(f"verifier {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise Gpt2LabError(f"verifier {spec}: {where}: no such file")
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Gpt2LabError:
        raise
    except Exception as e:
        raise Gpt2LabError(f"verifier {spec}: importing {where} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise Gpt2LabError(f"verifier {spec}: {where} has no function {name}")
    return fn


# ----------------------------------------------------------------------------- a resumed run's verifier


def trusted_verifiers() -> Path:
    """Where the verifier files this user's runs started with are recorded, by sha256: outside any run folder,
    so a run folder from someone else cannot vouch for its own code. $GPT2LAB_CACHE, else
    $XDG_CACHE_HOME/gpt2lab, else ~/.cache/gpt2lab (as the HellaSwag download), then verifiers/."""
    base = os.environ.get("GPT2LAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2lab"
    return Path(base) / "verifiers"


def verifier_sha256(spec: str) -> str:
    """sha256 of the file a verifier spec names (a .py path, or a module's source found without importing it);
    "" when there is none."""
    where = spec.rpartition(":")[0]
    path: str | None = where
    if not where.endswith(".py"):  # find a module's file as import would, running none of its code
        found, search = None, None
        for part in where.split("."):
            found = importlib.machinery.PathFinder.find_spec(part, search) if part else None
            if found is None:
                return ""
            search = found.submodule_search_locations
        path = found.origin if found is not None and found.has_location else None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    except OSError:
        return ""


def record_verifier(verifier: str) -> None:
    """Record the file of the verifier a run starts with (its sha256), so a resume may import it again unchanged."""
    digest = verifier_sha256(verifier) if verifier else ""
    if not digest:
        return
    folder = trusted_verifiers()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{digest}.{os.getpid()}"  # every rank writes the same: replaced atomically
    tmp.write_text(verifier + "\n")
    os.replace(tmp, folder / digest)


def check_resumed_verifier(verifier: str, named: bool, source: str) -> None:
    """Refuse to import a resumed run's saved verifier (code from its config) unless the user names it again
    (``named``) or a run of this user started with that file as it is now (its sha256 recorded)."""
    if not verifier or named:
        return
    digest = verifier_sha256(verifier)
    if digest and (trusted_verifiers() / digest).is_file():
        return
    why = "its file is not found" if not digest else "no run of yours started with that file as it is now"
    raise Gpt2LabError(
        f"{source}: the saved config names the verifier {verifier}, which a resume does not import unless you "
        f"name it ({why}); if you trust that code, resume with --set rl.verifier={verifier}"
    )


class JsonlTask(Task):
    """A user's problems: JSON lines of ``{"prompt": str | "messages": [...], "answer": ...}``.

    ``path`` is one file (every split reads it) or a folder holding train.jsonl and test.jsonl. Without a
    verifier an answer is right when its stripped text equals the reference's; a verifier is called as
    ``f(answer_text, reference) -> float | bool``, and an exception in it scores 0 (warned once).
    """

    name = "jsonl"

    def __init__(self, path: str | Path, verifier: str | None = None, format_reward: float = 0.0):
        self.path = Path(path)
        if not self.path.exists():
            raise Gpt2LabError(f"{self.path}: no such task file or folder")
        self.verifier = load_verifier(verifier) if verifier else None
        self.format_reward = check_format_reward(format_reward)
        self._warned = False

    def file(self, split: str) -> Path:
        check_split(split)
        path = self.path / f"{split}.jsonl" if self.path.is_dir() else self.path
        if not path.is_file():
            raise Gpt2LabError(f"{path}: no such file (a task folder holds train.jsonl and test.jsonl)")
        return path

    def problems(self, split: str = "test", n: int | None = None) -> list[Problem]:
        from gpt2lab.chat.template import check_conversation
        from gpt2lab.data.sources import iter_jsonl

        path, out = self.file(split), []
        for lineno, row in iter_jsonl(path):
            if n is not None and len(out) >= n:
                break
            where = f"{path}, line {lineno}"
            if "answer" not in row or not ("prompt" in row or "messages" in row):
                raise Gpt2LabError(f"{where}: a task record needs an answer and a prompt or messages")
            messages = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
            try:
                check_conversation(messages, generation=True)
            except Gpt2LabError as e:
                raise Gpt2LabError(f"{where}: {e}") from None
            out.append(Problem(list(messages), str(row["answer"]).strip(), f"{path.name}/{lineno}"))
        if not out:
            raise Gpt2LabError(f"{path}: no problems")
        return out

    def parse(self, answer_text: str) -> str | None:
        return answer_text.strip() or None

    def check(self, reply_text: str, problem: Problem) -> tuple[str | None, bool]:
        if self.verifier is None:
            return super().check(reply_text, problem)
        parsed, score = self._verify(reply_text, problem)
        return parsed, score >= 1.0

    def reward(self, reply_text: str, problem: Problem) -> float:
        """Without a verifier: as every task; with one: its value, clipped to [0, 1] (partial credit allowed)."""
        if self.verifier is None:
            return super().reward(reply_text, problem)
        parsed, score = self._verify(reply_text, problem)
        return 0.0 if parsed is None else score if score > 0 else self.format_reward

    def _verify(self, reply_text: str, problem: Problem) -> tuple[str | None, float]:
        parsed = self.parse(final_text(reply_text)) if isinstance(reply_text, str) else None
        if parsed is None:
            return None, 0.0
        try:
            score = float(self.verifier(parsed, problem.answer))
        except Exception as e:  # the model's text broke the user's function: that reply scores 0
            if not self._warned:
                warnings.warn(f"the verifier raised {type(e).__name__}: {e}; such replies score 0", stacklevel=3)
                self._warned = True
            return parsed, 0.0
        return parsed, min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0


# ----------------------------------------------------------------------------- by name

TASKS = {"gsm8k": GSM8K, "arith": Arith}


def get_task(name_or_path: str, **options) -> Task:
    """A task by name (gsm8k, arith) or a JSONL path; options set to None are left at their defaults."""
    options = {k: v for k, v in options.items() if v is not None}
    if name_or_path in TASKS:
        cls = TASKS[name_or_path]
    elif name_or_path.endswith(".jsonl") or Path(name_or_path).exists():
        cls, options = JsonlTask, {"path": name_or_path, **options}
    else:
        raise Gpt2LabError(f"unknown task {name_or_path!r}: gsm8k, arith, or a JSONL file of prompts and answers")
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise Gpt2LabError(f"task {cls.name} takes no option {', '.join(unknown)} (it takes {', '.join(accepted)})")
    return cls(**options)
