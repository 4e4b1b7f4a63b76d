"""Subcommands that run a model: `gpt2lab sample`, `export`, `consolidate`, `chat` and `serve`.

Each handler imports its module lazily, so building the parser stays light.
"""

from __future__ import annotations

import argparse

from gpt2lab.chat.defaults import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from gpt2lab.cli.options import DTYPES, TOKENIZER_HELP
from gpt2lab.errors import Gpt2LabError

# ----------------------------------------------------------------------------- sample / export


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a model, streaming tokens as they come")
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hugging Face folder, or a checkpoint")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--num-samples", type=int, default=1, help="samples drawn from the same prompt")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample (>= 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same samples (default: random)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.add_argument("--context", type=int, default=None, help="tokens the model reads (default: its block size)")
    p.add_argument(
        "--rope-scaling", default=None, choices=["none", "linear", "yarn"],
        help="RoPE models past their trained context: yarn, linear (position interpolation) or none (extrapolate)",
    )  # fmt: skip
    p.add_argument(
        "--decode", default="auto", choices=["auto", "eager", "static", "graph"],
        help="how each token step runs: eager (dynamic KV cache), static (static cache), graph (CUDA graph); "
        "auto: graph on CUDA, else eager",
    )  # fmt: skip
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from gpt2lab.inference.generate import sample_command

    return sample_command(args)


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as a Hugging Face folder (GPT-2, Llama, Qwen3, MoE, DeepSeek-V3)",
        description="Write a checkpoint as a Hugging Face folder that transformers loads. The family follows the "
        "model's [model] switches (interop.hf.export_hf): GPT-2 (the defaults), Llama (RoPE, RMSNorm, SwiGLU, no "
        "bias), Qwen3 (+ qk_norm), Qwen3-MoE or Mixtral (mixture of experts), DeepSeek-V3 (attention = mla); a "
        "model that is none of them is refused, naming the switch. With --format gguf: one .gguf file for llama.cpp "
        "and Ollama (interop.gguf: llama.cpp's gpt2, llama or qwen3 architecture), the tokenizer inside and, for a "
        "chat model, its chat template and <|assistant_end|> as end of turn.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="a gpt2lab checkpoint or run folder (or any --model spec)")
    p.add_argument("out_dir", help="the Hugging Face folder to write (--format gguf: the .gguf file)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP + " (copied)")
    p.add_argument(
        "--format", default="hf", choices=["hf", "gguf"],
        help="hf: a Hugging Face folder (transformers); gguf: one file for llama.cpp and Ollama (gpt2, llama, qwen3)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default=None, choices=DTYPES,
        help="--format gguf: the matrices' dtype (default float32; norms and biases stay float32)",
    )  # fmt: skip
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from gpt2lab.interop.hf import export_command
    from gpt2lab.interop.load import load_model
    from gpt2lab.interop.tokenizer_match import model_tokenizer

    if args.format == "hf" and args.dtype is not None:
        raise Gpt2LabError("export: --dtype applies to --format gguf (a Hugging Face folder keeps the stored dtype)")
    tokenizer = model_tokenizer(args.checkpoint, args.tokenizer, load_gpt2=False)  # None: GPT-2's, looked up there
    if args.format == "gguf":
        from gpt2lab.chat.base import is_chat_model
        from gpt2lab.chat.template import CHAT_TEMPLATE
        from gpt2lab.interop.gguf import gguf_command

        template = CHAT_TEMPLATE if is_chat_model(args.checkpoint) else None  # the HF chat export's template
        return gguf_command(args, load_model(args.checkpoint), tokenizer, template)
    code = export_command(args, load_model(args.checkpoint), tokenizer)
    from gpt2lab.chat.export import add_chat_files

    add_chat_files(args.checkpoint, args.out_dir)  # a model from gpt2lab sft: special tokens, chat_template, eos
    return code


def add_consolidate(sub) -> None:
    p = sub.add_parser("consolidate", help="gather a sharded (FSDP) checkpoint into a plain model.safetensors folder")
    p.add_argument("checkpoint", help="a gpt2lab checkpoint, or a run folder (its newest checkpoint)")
    p.add_argument("out_dir", help="the checkpoint folder to write (model.safetensors + config.json)")
    p.set_defaults(func=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> int:
    from gpt2lab.train.dcp import consolidate

    consolidate(args.checkpoint, args.out_dir)
    return 0


# ----------------------------------------------------------------------------- chat / serve (issue 13)


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a chat model in the terminal (streamed, multi-turn)")
    p.add_argument("--model", required=True, help="a run folder from gpt2lab sft, a checkpoint or an exported folder")
    p.add_argument("--system", default=None, help="the system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy (serve's default too)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same replies (default: random)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from gpt2lab.chat.terminal import chat_command

    return chat_command(args)


def add_serve(sub) -> None:
    from gpt2lab.serve.limits import ServeLimits

    d = ServeLimits()
    p = sub.add_parser("serve", help="an OpenAI-compatible API and a chat web page (http://127.0.0.1:8000)")
    p.add_argument("--model", required=True, help="a run folder from gpt2lab sft, a checkpoint or an exported folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond this machine: needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 (or GPT2LAB_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true", help="serve a non-local address without a key")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from ORIGIN (repeatable)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id in /v1/models and responses (default: the run's name)"
    )
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a slot; beyond: 503")
    p.add_argument(
        "--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step, between decoding steps"
    )
    p.add_argument(
        "--no-prefix-cache", action="store_true", help="prefill every prompt whole (no reuse of a finished reply)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=d.max_tokens, help="most new tokens per request (default: context)"
    )
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens, help="when a request gives none")
    p.add_argument("--max-n", type=int, default=d.max_n, help="most choices per request")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts, help="most prompts per /v1/completions request")
    p.add_argument("--max-top-k", type=int, default=d.max_top_k, help="largest top_k a request may ask for")
    p.add_argument("--max-messages", type=int, default=d.max_messages, help="most messages per request")
    p.add_argument("--max-message-chars", type=int, default=d.max_message_chars, help="longest message")
    p.add_argument("--max-total-chars", type=int, default=d.max_total_chars, help="all messages (or the prompt)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (else 413)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    levels = ["critical", "error", "warning", "info", "debug"]
    p.add_argument("--log-level", default="info", choices=levels, help="the server log's level")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from gpt2lab.serve.server import serve_command

    return serve_command(args)
