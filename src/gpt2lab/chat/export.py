"""`gpt2lab export` of a chat model: the Hugging Face folder of ``gpt2lab.interop.hf``, plus what makes it a chat model.

For a model fine-tuned by ``gpt2lab sft`` the folder also gets
- the special tokens as added tokens of the tokenizer (``added_tokens_decoder`` in tokenizer_config.json and
  the added tokens of tokenizer.json, at the ids ``gpt2lab.tokenizer.bpe`` gives them, or a trained tokenizer's
  own ids, already in its tokenizer.json), so transformers never splits them and never makes them from text other
  than their exact strings;
- ``chat_template``: ``gpt2lab.chat.template.CHAT_TEMPLATE``, the same rendering as ``render`` (tests compare
  ``apply_chat_template(..., add_generation_prompt=True)`` with gpt2lab's ids). One difference is
  transformers' own: a message holding a special token's exact string (``<|user_end|>``) becomes that token
  there, as transformers splits text at added tokens; gpt2lab keeps it text;
- generation_config.json whose ``eos_token_id`` lists <|endoftext|> and <|assistant_end|>, so ``generate``
  stops at the end of the assistant's turn (a base export's lists <|endoftext|> alone: gpt2lab.interop.hf).
"""

from __future__ import annotations

import json
from pathlib import Path

from gpt2lab.chat.template import CHAT_TEMPLATE
from gpt2lab.data.shards import write_json
from gpt2lab.errors import Gpt2LabError
from gpt2lab.interop.hf import generation_config
from gpt2lab.tokenizer.bpe import EOT_ID, EOT_TOKEN, SPECIAL_IDS, SPECIAL_TOKENS, TOKENIZER_JSON, TrainedTokenizer


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
            "special": True}  # fmt: skip


def write_chat_files(out_dir: str | Path) -> None:
    """Add the chat's special tokens, template and stopping rule to an exported folder (tokenizer files there).

    With a trained tokenizer (tokenizer.json there, no vocab.json) the ids are that tokenizer's own: tokenizer.json
    already holds <|endoftext|> and SPECIAL_TOKENS as special added tokens (``gpt2lab.tokenizer.train``). With
    GPT-2's (vocab.json there) they are added to its tokenizer.json at SPECIAL_IDS.
    """
    out_dir = Path(out_dir)
    path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(path.read_text()) if path.is_file() else {}
    eot, ids = EOT_ID, SPECIAL_IDS
    if (out_dir / "vocab.json").is_file():
        if (out_dir / TOKENIZER_JSON).is_file():
            add_special_tokens(out_dir / TOKENIZER_JSON)
    elif (out_dir / TOKENIZER_JSON).is_file():
        tok = TrainedTokenizer(out_dir)
        eot, ids = tok.eot, {token: tok.special_id(token) for token in SPECIAL_TOKENS}
    tok_config["added_tokens_decoder"] = {str(eot): _added(EOT_TOKEN)} | {
        str(i): _added(token) for token, i in ids.items()
    }
    tok_config["extra_special_tokens"] = list(ids)
    tok_config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(tok_config, indent=2) + "\n")
    write_json(out_dir / "generation_config.json", generation_config(eot, [eot, ids["<|assistant_end|>"]]))


def add_special_tokens(path: Path) -> None:
    """SPECIAL_TOKENS added to GPT-2's tokenizer.json (50,257 tokens), so they take SPECIAL_IDS: 50257, 50258, ..."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    got = {token: tok.token_to_id(token) for token in SPECIAL_TOKENS}
    if got != SPECIAL_IDS:  # a tokenizer.json other than GPT-2's beside GPT-2's vocab.json
        raise Gpt2LabError(f"{path}: the chat tokens would take ids {list(got.values())}, not GPT-2's {SPECIAL_IDS}")
    path.write_text(tok.to_str(pretty=True))


def add_chat_files(spec: str, out_dir: str | Path) -> None:
    """After `gpt2lab export SPEC OUT_DIR`: for a chat model, write the chat files (GPT-2's or a trained tokenizer)."""
    from gpt2lab.chat.base import is_chat_model

    if not is_chat_model(spec):
        return
    if not (Path(out_dir) / "tokenizer_config.json").is_file():
        print(f"warning: {spec} is a chat model, but no tokenizer files were exported: no chat template written")
        return
    write_chat_files(out_dir)
    print(f"chat model: special tokens, chat_template and <|assistant_end|> as eos written to {out_dir}")
