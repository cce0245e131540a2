"""`mlxtune generate` (one prompt, streamed) and `mlxtune chat` (the interactive multi-turn loop)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import DTYPES

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model: a HF model dir or a .gguf file (default: from --adapter's run dir)")
    p.add_argument("--adapter", help="an adapter dir or a training run dir (its config.yaml supplies the model)")
    p.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: as stored / as trained)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate per reply (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--system", default=None, help="system prompt")


def register(sub: Any) -> None:
    """Add the `generate` and `chat` subcommands."""
    from ..chat_repl import CHAT_HELP

    p = sub.add_parser("generate", help="generate a completion for one prompt (streamed)",
                       description="Generate a completion for one prompt, streamed to stdout; tokens/s on stderr. The prompt is "
                                   "rendered with the template the --adapter run was trained with (data.template), "
                                   "else the model's chat template.")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    p.add_argument("--raw", action="store_true", help="use the prompt as plain text, without a template")
    _add_sampling_args(p, 256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (streamed)",
                       description=f"Interactive chat under the run's template (without a run: the model's chat template). {CHAT_HELP}")
    _add_model_args(p)
    _add_sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream the completion to stdout; the token counts and speeds to stderr."""
    from ..generation import check_sampling, has_chat_template, load_for_inference, stream

    check_sampling(args.max_tokens, args.temperature, args.top_p, flags=True)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tok, r = load_for_inference(args.model, args.adapter, args.dtype)
    raw = args.raw
    if not raw and r.style is None and not has_chat_template(tok):
        print("note: the tokenizer has no chat template; using the prompt as plain text (--raw)", file=sys.stderr)
        raw = True
    last = None
    for last in stream(model, tok, prompt, args.max_tokens, args.temperature, args.top_p, seed=args.seed,
                       system=args.system, raw=raw, style=r.style):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None and last.finish_reason == "length":
        print(f"[cut at {last.generation_tokens} tokens: --max-tokens]", file=sys.stderr)
    if last is not None:
        print(f"[prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
              f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | stop: {last.finish_reason}]",
              file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Load the model and run the chat loop on the terminal."""
    from ..chat_repl import chat
    from ..generation import check_sampling, load_for_inference

    check_sampling(args.max_tokens, args.temperature, args.top_p, flags=True)
    model, tok, r = load_for_inference(args.model, args.adapter, args.dtype)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    chat(model, tok, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
         top_p=args.top_p, seed=args.seed, style=r.style)
    return 0
