"""A speedrun plan: what each stage of the process runs, read from TOML, turned into gpt2lab commands.

The plan is plain values (``configs/speedrun/cpu.toml`` and its siblings); ``stages`` turns it into the
commands, in the order the data flows: tokenizer -> shards -> pretraining -> evaluation -> SFT -> RL ->
a conversation. Every stage is one `gpt2lab` command, so REPORT.md can list exactly what to type to
redo any of them by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from gpt2lab.config import read_toml
from gpt2lab.errors import Gpt2LabError


@dataclass
class TokenizerPlan:
    train_on: str = "shakespeare"  # a source to train a byte-level BPE on; "gpt2": GPT-2's own tokenizer
    vocab_size: int = 1024


@dataclass
class DataPlan:
    source: str = "shakespeare"  # gpt2lab data prepare SOURCE
    args: list[str] = field(default_factory=list)  # more arguments of gpt2lab data prepare: ["--max-tokens", "1e8"]


@dataclass
class PretrainPlan:
    config: str = "configs/speedrun-cpu.toml"  # the training preset (its [data] path is replaced by the shards')
    set: list[str] = field(default_factory=list)  # --set overrides of gpt2lab train
    nproc: int = 1  # processes (GPUs) of the training stages: > 1 runs them under torchrun; 0: every visible GPU


@dataclass
class EvalPlan:
    hellaswag_limit: int = 1000  # the first N HellaSwag val examples (0: all 10,042)
    loss_batches: int = 0  # batches of the val split that gpt2lab eval loss scores (0: all of it)


@dataclass
class SFTPlan:
    conversations: int = 20000  # gpt2lab data arith --n
    digits: int = 2  # digits of each operand
    thinking: float = 0.5  # share of the conversations that reason before they answer
    set: list[str] = field(default_factory=list)  # --set overrides of gpt2lab sft


@dataclass
class RLPlan:
    set: list[str] = field(default_factory=list)  # --set overrides of gpt2lab rl --task arith
    max_new_tokens: int = 96  # longest reply, thinking included (RL and its evaluations)
    eval_problems: int = 200  # held-out problems of the evaluations before and after RL
    eval_samples: int = 8  # sampled replies per problem (sampled pass@1 is the policy's mean reward)


@dataclass
class ChatPlan:
    base_prompt: str = "ROMEO:"  # the pretrained model continues this
    base_tokens: int = 80
    prompts: list[str] = field(default_factory=lambda: ["What is 23 + 45?", "What is 67 + 58?"])  # asked in turn
    max_new_tokens: int = 96


@dataclass
class Plan:
    tokenizer: TokenizerPlan = field(default_factory=TokenizerPlan)
    data: DataPlan = field(default_factory=DataPlan)
    pretrain: PretrainPlan = field(default_factory=PretrainPlan)
    eval: EvalPlan = field(default_factory=EvalPlan)
    sft: SFTPlan = field(default_factory=SFTPlan)
    rl: RLPlan = field(default_factory=RLPlan)
    chat: ChatPlan = field(default_factory=ChatPlan)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section(cls: type, table: object, where: str) -> object:
    """One [section] as its dataclass: unknown keys and wrong types are refused, naming the key."""
    if not isinstance(table, dict):
        raise Gpt2LabError(f"{where} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            raise Gpt2LabError(f"{where}: unknown setting {key}" + (f"; did you mean {close[0]}?" if close else ""))
        default = fields[key].default_factory() if callable(fields[key].default_factory) else fields[key].default
        expected = type(default)
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
        ok = ok or (expected is float and isinstance(value, int) and not isinstance(value, bool))
        if ok and expected is list:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            kind = "a list of strings" if expected is list else f"a {expected.__name__}"
            raise Gpt2LabError(f"{where}: {key} must be {kind}, got {value!r}")
    return cls(**table)


def read_plan(path: str | Path) -> Plan:
    """A plan from TOML; every problem is one error before any stage runs."""
    path = Path(path)
    values = read_toml(path, " (no such plan: the plans are configs/speedrun/*.toml, run from the repo root)")
    sections = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Plan)}
    for name in values:
        if name not in sections:
            close = difflib.get_close_matches(name, list(sections), n=1)
            hint = f"did you mean [{close[0]}]?" if close else f"the sections are {', '.join(sections)}"
            raise Gpt2LabError(f"{path}: unknown section [{name}]; {hint}")
    plan = Plan(**{name: _section(cls, values.get(name, {}), f"{path} [{name}]") for name, cls in sections.items()})
    problems = _problems(plan)
    if problems:
        raise Gpt2LabError(f"{path}: " + "; ".join(problems))
    return plan


def _problems(plan: Plan) -> list[str]:
    p = []
    if plan.tokenizer.train_on != "gpt2" and plan.tokenizer.vocab_size < 269:
        p.append("tokenizer.vocab_size must be at least 269 (256 bytes and 13 special tokens)")
    if not Path(plan.pretrain.config).is_file():
        p.append(f"pretrain.config: {plan.pretrain.config} not found (run from the repository root)")
    if plan.pretrain.nproc < 0:
        p.append("pretrain.nproc must be >= 0 (0: every visible GPU)")
    if not 0 <= plan.sft.thinking <= 1:
        p.append(f"sft.thinking must be in [0, 1] (got {plan.sft.thinking})")
    for key in ("hellaswag_limit", "loss_batches"):
        if getattr(plan.eval, key) < 0:
            p.append(f"eval.{key} must be >= 0 (0: all)")
    for name in ("sft.conversations", "rl.max_new_tokens", "rl.eval_problems", "rl.eval_samples",
                 "chat.base_tokens", "chat.max_new_tokens"):  # fmt: skip
        section, key = name.split(".")
        if getattr(getattr(plan, section), key) < 1:
            p.append(f"{name} must be >= 1")
    if not plan.chat.prompts:
        p.append("chat.prompts: give at least one question")
    return p


@dataclass
class Stage:
    """One step of the process: a gpt2lab command, what it writes, and text it reads on stdin (chat)."""

    name: str
    title: str
    argv: list[str]  # gpt2lab's arguments
    outputs: list[str]  # paths it writes (removed before a stage that stopped half-way runs again)
    stdin: str = ""
    launch: list[str] = field(default_factory=list)  # torchrun's options, for a training stage on several GPUs

    def command(self) -> str:
        """The line a user types to run this stage by hand."""
        head = " ".join(["torchrun", *self.launch, "-m", "gpt2lab"]) if self.launch else "gpt2lab"
        line = head + " " + " ".join(_quote(a) for a in self.argv)
        if not self.stdin:
            return line
        return "printf '%s\\n' " + " ".join(_quote(x) for x in self.stdin.splitlines()) + " | " + line


def _quote(arg: str) -> str:
    return shlex.quote(arg)


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def stages(plan: Plan, out: str | Path, nproc: int = 1) -> list[Stage]:
    """The commands of the whole process, in order, writing under ``out``."""
    o = Path(out)
    tokenizer, data, base, sft, rl = (str(o / k) for k in ("tokenizer", "data", "base", "sft", "rl"))
    conversations, ev = str(o / "arith.jsonl"), o / "eval"
    launch = ["--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    tok = [] if plan.tokenizer.train_on == "gpt2" else ["--tokenizer", tokenizer]
    s = []
    if tok:
        vocab = str(plan.tokenizer.vocab_size)
        argv = ["tokenizer", "train", plan.tokenizer.train_on, "--vocab-size", vocab, "--out", tokenizer]
        s.append(Stage("tokenizer", "Train a tokenizer", argv, [tokenizer]))
    argv = ["data", "prepare", plan.data.source, *plan.data.args, *tok, "--out", data]
    s.append(Stage("data", "Tokenize the corpus into shards", argv, [data]))
    argv = ["train", plan.pretrain.config, "--run-dir", base, "--set", f"data.path={data}", *_sets(plan.pretrain.set)]
    s.append(Stage("pretrain", "Pretrain", argv, [base], launch=launch))
    loss, hellaswag = str(ev / "base-loss.json"), str(ev / "base-hellaswag.json")
    batches = ["--max-batches", str(plan.eval.loss_batches)] if plan.eval.loss_batches else []
    argv = ["eval", "loss", "--model", base, "--data", data, *batches, "--json", loss]
    s.append(Stage("eval-loss", "Val loss and bits per byte", argv, [loss]))
    limit = ["--limit", str(plan.eval.hellaswag_limit)] if plan.eval.hellaswag_limit else []
    argv = ["eval", "hellaswag", "--model", base, *limit, "--json", hellaswag]
    s.append(Stage("eval-hellaswag", "HellaSwag", argv, [hellaswag]))
    argv = [
        "sample",
        "--model",
        base,
        "--prompt",
        plan.chat.base_prompt,
        "--max-new-tokens",
        str(plan.chat.base_tokens),
    ]
    s.append(Stage("sample", "A sample of the pretrained model", [*argv, "--seed", "0"], []))
    n, digits, thinking = str(plan.sft.conversations), str(plan.sft.digits), str(plan.sft.thinking)
    argv = ["data", "arith", "--out", conversations, "--n", n, "--digits", digits, "--thinking", thinking]
    s.append(Stage("sft-data", "Conversations to fine-tune on", argv, [conversations]))
    argv = ["sft", "--model", base, "--data", conversations, "--run-dir", sft, *_sets(plan.sft.set)]
    s.append(Stage("sft", "Supervised fine-tuning (SFT)", argv, [sft], launch=launch))
    s.append(_arith_eval(plan, "eval-sft", "Arithmetic after SFT", sft, ev / "sft-arith.json"))
    settings = [f"rl.digits={plan.sft.digits}", f"rl.max_new_tokens={plan.rl.max_new_tokens}", *plan.rl.set]
    argv = ["rl", "--model", sft, "--task", "arith", "--run-dir", rl, *_sets(settings)]
    s.append(Stage("rl", "Reinforcement learning (GRPO) on arithmetic", argv, [rl], launch=launch))
    s.append(_arith_eval(plan, "eval-rl", "Arithmetic after RL", rl, ev / "rl-arith.json"))
    for name, run in (("base", base), ("sft", sft), ("rl", rl)):
        s.append(Stage(f"plot-{name}", f"Curves of {name}", ["plot", run], [str(Path(run) / "curves.png")]))
    questions = "".join(f"{q}\n/reset\n" for q in plan.chat.prompts)  # one conversation per question
    argv = ["chat", "--model", rl, "--temperature", "0", "--max-new-tokens", str(plan.chat.max_new_tokens)]
    s.append(Stage("chat", "A conversation with the chatbot", argv, [], stdin=questions))
    return s


def _arith_eval(plan: Plan, name: str, title: str, model: str, result: Path) -> Stage:
    argv = ["eval", "arith", "--model", model, "--digits", str(plan.sft.digits), "--limit",
            str(plan.rl.eval_problems), "--samples", str(plan.rl.eval_samples), "--temperature", "1",
            "--max-new-tokens", str(plan.rl.max_new_tokens), "--json", str(result)]  # fmt: skip
    return Stage(name, title, argv, [str(result)])
