"""Command line: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Long-context inference with the KV cache in "
                                     "host memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from a prompt file through one method")
    gen.add_argument("--model", default=None, help="embedded name, Hugging Face id, directory or .gguf path "
                     "(default: the embedded smollm2-135m)")
    gen.add_argument("--method", default="full")
    gen.add_argument("--prompt-file", required=True, type=Path)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--budget", type=int, default=None, help="token budget (methods that have one)")
    gen.add_argument("--option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                     help="a method option; repeatable")
    gen.add_argument("--raw", action="store_true", help="feed the file as-is instead of as a chat message")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None)
    gen.add_argument("--json", action="store_true", help="print the result as JSON")

    sub.add_parser("info", help="versions, device and the available methods")

    demo = sub.add_parser("demo", help="the quickstart job: a long needle prompt through every method")
    demo.add_argument("--model", default=None)
    demo.add_argument("--methods", type=_methods, default=None, help="comma-separated (default: all)")
    demo.add_argument("--context", type=int, default=3000, help="prompt length in tokens")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--device", default=None)
    demo.add_argument("--dtype", default=None)
    demo.add_argument("--out", default="runs/demo.json")
    return parser


def cmd_info(args) -> int:
    import kvtier
    from kvtier.models import environment_summary

    env = environment_summary()
    for key, value in env.items():
        print(f"{key:>12}: {value}")
    print(f"{'methods':>12}: {', '.join(kvtier.METHODS)}")
    return 0


def cmd_generate(args) -> int:
    import kvtier

    if not args.prompt_file.is_file():
        raise SystemExit(f"prompt file not found: {args.prompt_file}")
    text = args.prompt_file.read_text()
    if not text.strip():
        raise SystemExit(f"prompt file is empty: {args.prompt_file}")
    options = dict(args.option)
    if args.budget is not None:
        options["budget"] = args.budget
    model, tokenizer = kvtier.load(args.model, device=args.device, dtype=args.dtype)
    if args.raw or tokenizer.chat_template is None:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True, return_tensors="pt")
        if not hasattr(ids, "shape"):
            ids = ids["input_ids"]
    cache = kvtier.KVCache(model, method=args.method, **options)
    out = kvtier.generate(model, ids.to(model.device), cache=cache, max_new_tokens=args.max_new_tokens,
                          progress=True)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    stats = cache.stats()
    if args.json:
        print(json.dumps({"answer": answer, "prompt_tokens": int(ids.shape[1]), "stats": stats}, indent=2))
    else:
        print(answer)
        print(f"\n[{args.method}] prompt {ids.shape[1]} tokens | " +
              " | ".join(f"{k} {v}" for k, v in stats.items() if k != "method"), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from kvtier import demo

    result = demo.run(args.model, methods=args.methods, context_tokens=args.context,
                      max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype, out=args.out)
    print(demo.format_table(result))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"info": cmd_info, "generate": cmd_generate, "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except (ValueError, NotImplementedError, FileNotFoundError) as err:
        print(f"kvtier {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
