"""Command line: argument parsing, checking and printing only; the work is done by the library.

Every command checks all of its arguments (method specs, lengths, output paths, the model name, the device)
before it loads a model or does any work. A user's mistake ends with exit code 2 and one line on stderr that
names the bad value and what to do; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path


class UsageError(ValueError):
    """A mistake in the command's arguments: reported in one line, exit code 2."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kvtier")
    except Exception:  # a source tree that is not installed
        from kvtier import __version__

        return __version__


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and adds "(default: ...)" to options whose default is worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.nargs != 0
                and action.default not in (None, False, [], argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (what is wrong, and where to look), not the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: syntax only (no imports of torch); meaning is checked in check_* below ------------------
def _parse_option(text: str) -> tuple[str, object]:
    from kvtier.methods import parse_value

    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_nonnegative = _int_at_least(0)


def _length(item: str) -> str:
    """A length in tokens, 2048 or 2k, kept as text (kvtier.evaluation parses it)."""
    if not re.fullmatch(r"(\d+|\d*\.?\d+k)", item.lower()) or float(item.lower().rstrip("k")) <= 0:
        raise argparse.ArgumentTypeError(f"{item!r} is not a length (a positive number of tokens: 2048, 2k)")
    return item


def _depth(item: str) -> float:
    try:
        value = float(item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r} is not a depth (a number in [0, 1])") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"depth {item} is outside [0, 1] (0 = start of the text, 1 = end)")
    return value


def _integer(item: str) -> int:
    try:
        return int(item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r} is not an integer") from None


def _items(what: str, convert=None):
    """An argparse type: a non-empty comma-separated list of `what`, each item through `convert`."""

    def parse(text: str):
        items = _list(text)
        if not items:
            raise argparse.ArgumentTypeError(f"is empty; give one or more {what}, comma-separated")
        return [convert(item) for item in items] if convert else items

    return parse


_methods = _items("methods (full,offload,freekv:budget=512)")


EXAMPLES = {
    "generate": """examples:
  kvtier generate --prompt-file doc.txt --method freekv --budget 512
  kvtier generate --prompt-file - --method offload --max-new-tokens 32 < doc.txt
  kvtier generate --prompt-file doc.txt --model path/to/model.gguf --option page_size=8 --json""",
    "chat": """examples:
  kvtier chat --document contract.txt --method offload
  kvtier chat --document doc.txt --question "Who signs it?" --question "When does it end?"
  kvtier chat --document doc.txt --method freekv --budget 1024 --save-cache doc.kvc --question "Summarize it."
  kvtier chat --load-cache doc.kvc --question "What is the notice period?" --json""",
    "demo": """examples:
  kvtier demo
  kvtier demo --methods full,freekv:budget=512 --context 2000 --out runs/small.json""",
    "profile": """examples:
  kvtier profile
  kvtier profile --device cpu --out runs/profile.json --force""",
    "bench": """examples:
  kvtier bench --model-config tiny-llama --contexts 1k --decode-steps 4
  kvtier bench --model embedded --contexts 2k --methods full,freekv,hf-dynamic
  kvtier bench --model-config llama-3.1-8b --random-weights --contexts 8k,32k --batch 1,4 --out bench/results""",
    "needle": """examples:
  kvtier eval needle --methods full,freekv:budget=0.25 --lengths 1k,2k --depths 0.25,0.75 --out runs/eval
  kvtier eval needle --methods specache --kinds single,multikey --keys 4 --out runs/eval --overwrite""",
    "ruler": """examples:
  kvtier eval ruler --methods full,specache --tasks vt,cwe --lengths 1k --samples 2 --out runs/eval
  kvtier eval ruler --methods freekv:budget=512 --tasks vt --task-option vt_hops=3 --out runs/eval""",
    "fidelity": """examples:
  kvtier eval fidelity --methods full,freekv:budget=512 --texts prose,code --lengths 2k --out runs/eval""",
    "ppl": """examples:
  kvtier eval ppl --methods specache:bits=2 --texts prose --context 2k --targets 256 --windows 4 --out runs/eval
  kvtier eval ppl --methods offload --texts '' --text-file notes.txt --context 1k --out runs/eval""",
    "sweep": """examples:
  kvtier eval sweep --method freekv --values 256,512,1024 --out runs/eval
  kvtier eval sweep --method specache:group_size=32 --option topk --values 16,64 --out runs/eval""",
    "plan": """examples:
  kvtier plan --model-config llama-3.1-8b --context 32k,128k --batch 1,4 --device-memory 80GiB
  kvtier plan --model-config qwen2.5-7b --context 128k --device-memory 24GiB --bandwidth 25GB/s --json plan.json
  kvtier plan --model embedded --context 3000 --device-memory 1GiB --utilization 1""",
    "report": '''examples:
  kvtier eval report --dir runs/eval --title "my run" --command "bash run.sh"''',
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvtier", description="Long-context inference with the KV cache in host memory.",
                     epilog="Run `kvtier COMMAND --help` for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"kvtier {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # every command takes --debug after its name too; SUPPRESS keeps the top-level value when it is absent
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, text: str, examples: str | None = None):
        return parent.add_parser(name, help=text, description=text, parents=[common], epilog=examples)

    def shape_or_model(p, shape_help: str, model_help: str):
        """A model by its shape alone (--model-config) or a model (--model): bench and plan take either."""
        p.add_argument("--model-config", default=None, help=shape_help)
        p.add_argument("--model", default=None, help=model_help)

    def model_options(p):
        p.add_argument("--model", default=None, help="the embedded smollm2-135m (the default), a model folder, a "
                       ".gguf file, or a Hugging Face id already in the local cache (nothing is downloaded)")
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
        p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bfloat16 on CUDA, "
                       "float32 on CPU)")

    gen = command(sub, "generate", "generate from a prompt file through one method", EXAMPLES["generate"])
    gen.add_argument("--prompt-file", required=True, help="a UTF-8 text file, or - to read standard input")
    gen.add_argument("--method", default="full", help="full, offload, kvpr, freekv, specache, or auto (with "
                     "--device-memory: the method that fits)")
    gen.add_argument("--device-memory", default=None, help="device bytes the KV state may take (6GiB, 40MiB, 2GB): "
                     "--method auto chooses within it, any other method is checked against it")
    gen.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate")
    gen.add_argument("--budget", type=_positive, default=None, help="token budget (methods that have one: freekv)")
    gen.add_argument("--option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                     help="a method option, such as page_size=8; repeatable")
    gen.add_argument("--raw", action="store_true", help="feed the file as-is instead of as a chat message")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")
    model_options(gen)

    chat = command(sub, "chat", "read a document once, then answer questions about it (each from a fork of the "
                   "prefilled cache); interactive without --question", EXAMPLES["chat"])
    chat.add_argument("--document", default=None, help="a UTF-8 text file, or - to read standard input (required "
                      "unless --load-cache gives the document)")
    chat.add_argument("--question", action="append", default=[], metavar="Q",
                      help="answer Q and exit instead of asking interactively; repeatable")
    chat.add_argument("--method", default=None, help="full, offload, kvpr, freekv, specache, or auto (with "
                      "--device-memory) (default: full; with --load-cache, the file's)")
    chat.add_argument("--device-memory", default=None, help="device bytes the KV state may take (6GiB, 40MiB): "
                      "--method auto chooses within it, any other method is checked against it")
    chat.add_argument("--budget", type=_positive, default=None, help="token budget (methods that have one: freekv)")
    chat.add_argument("--option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                      help="a method option, such as page_size=8; repeatable")
    cache_file = chat.add_mutually_exclusive_group()
    cache_file.add_argument("--save-cache", default=None, metavar="P",
                            help="after the prefill, save the document's cache to file P (replaced if it exists)")
    cache_file.add_argument("--load-cache", default=None, metavar="P",
                            help="load the document's cache from file P instead of prefilling it")
    chat.add_argument("--max-new-tokens", type=_positive, default=256, help="most tokens per answer")
    chat.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    chat.add_argument("--temperature", type=float, default=None, help="with --do-sample (default: 1.0)")
    chat.add_argument("--top-k", type=_nonnegative, default=None, help="with --do-sample (default: 50; 0: off)")
    chat.add_argument("--top-p", type=float, default=None, help="with --do-sample (default: 1.0)")
    chat.add_argument("--seed", type=int, default=None, help="with --do-sample: reproducible draws")
    chat.add_argument("--raw", action="store_true", help="no chat template: the document, a blank line, the question")
    chat.add_argument("--json", action="store_true", help="print the answers and their stats as JSON at the end "
                      "(no streaming)")
    model_options(chat)

    command(sub, "info", "versions, device and the available methods")

    demo = command(sub, "demo", "the quickstart job: a long needle prompt through every method", EXAMPLES["demo"])
    demo.add_argument("--methods", type=_methods, default=None,
                      help="comma-separated, options after colons (default: full,offload,kvpr,freekv:budget=1024,"
                           "freekv:budget=1024:page_size=8:scorer=lowbit:rest=lowbit:tau=0.9,specache)")
    demo.add_argument("--context", type=_positive, default=3000, help="prompt length in tokens")
    demo.add_argument("--max-new-tokens", type=_positive, default=24, help="tokens to generate per method")
    demo.add_argument("--out", default="runs/demo.json", help="the JSON file to write (replaced if it exists)")
    model_options(demo)

    prof = command(sub, "profile", "measure host->device bandwidth and matmul rate (KVPR's cost model), cached "
                   "per machine", EXAMPLES["profile"])
    prof.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    prof.add_argument("--dtype", default=None, help="matmul dtype (default: bfloat16 on CUDA, float32 on CPU)")
    prof.add_argument("--hidden-size", type=_positive, default=4096, help="hidden size of the recompute GEMM")
    prof.add_argument("--kv-width", type=_positive, default=4096,
                      help="num_kv_heads * head_dim of the recompute GEMM")
    prof.add_argument("--out", type=Path, default=None, help="also write the profile as JSON to this file")
    prof.add_argument("--force", action="store_true", help="measure again even when a cached profile exists")

    bench = command(sub, "bench", "decode speed, memory, aten ops and host syncs per step of every method beside "
                    "Hugging Face's caches, on a random-weight model of a real shape or the embedded model",
                    EXAMPLES["bench"])
    shape_or_model(bench, "real shapes: llama-3.1-8b, llama-2-7b, qwen2.5-7b (need --random-weights); CPU harness "
                   "checks: tiny-llama, tiny-mha", "embedded: the embedded SmolLM2-135M, its own weights, with real "
                   "prose as the prompt (instead of --model-config; contexts up to its 8192 positions)")
    bench.add_argument("--random-weights", action="store_true",
                       help="build the shape with random weights (nothing is ever downloaded)")
    bench.add_argument("--contexts", default="1k", type=_items("lengths", _length), help="prompt lengths: 8k,32k")
    bench.add_argument("--batch", default="1", type=_items("batch sizes", _positive), help="batch sizes: 1,4")
    bench.add_argument("--methods", default=None, type=lambda t: ",".join(_methods(t)),
                       help="comma-separated kvtier specs and hf-dynamic, hf-offload "
                            "(default: full,offload,kvpr,freekv,specache,hf-dynamic,hf-offload)")
    bench.add_argument("--decode-steps", type=_positive, default=16, help="timed decode steps")
    bench.add_argument("--warmup", type=_nonnegative, default=4, help="untimed decode steps before them")
    bench.add_argument("--count-steps", type=_nonnegative, default=2, help="untimed decode steps after them on "
                       "which aten ops and host syncs are counted (0: none)")
    bench.add_argument("--prefill-chunk", type=_positive, default=None,
                       help="prefill chunk in tokens (default: 2048)")
    bench.add_argument("--profile", default=None, help="hardware profile JSON (from kvtier profile --out); "
                       "default: the cached or freshly measured one")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    bench.add_argument("--out", default="runs/bench", help="folder for the JSON and PNG")

    plan = command(sub, "plan", "device KV, host KV and bytes moved per decode step of every method for a model "
                   "shape, whether each fits a device's memory, and what --method auto picks (no weights are loaded)",
                   EXAMPLES["plan"])
    shape_or_model(plan, "a named shape: llama-3.1-8b, llama-2-7b, qwen2.5-7b, tiny-llama, tiny-mha",
                   "instead of --model-config: embedded, a model folder, a .gguf file, or a Hugging Face id in the "
                   "local cache (its config is read, not its weights)")
    plan.add_argument("--context", default="32k", type=_items("lengths", _length), help="prompt lengths: 32k,128k")
    plan.add_argument("--new-tokens", type=_positive, default=256, help="tokens generated after each prompt")
    plan.add_argument("--batch", default="1", type=_items("batch sizes", _positive), help="batch sizes: 1,4")
    plan.add_argument("--device-memory", required=True, help="the device's memory: 24GiB, 80GiB (weights and "
                      "activations are taken out of it)")
    plan.add_argument("--utilization", type=float, default=0.9, help="share of --device-memory kvtier may use (the "
                      "rest: CUDA context, workspaces, fragmentation)")
    plan.add_argument("--dtype", default="bfloat16", help="float32, float16 or bfloat16")
    plan.add_argument("--device", default="cuda", help="the device planned for: cuda (Triton kernels) or cpu")
    plan.add_argument("--bandwidth", default=None, help="host->device link bandwidth, such as 25GB/s (default: "
                      "measured here on CUDA, else 25GB/s assumed)")
    plan.add_argument("--host-memory", default=None, help="host RAM to check against (default: this machine's)")
    plan.add_argument("--json", default=None, help="also write the plan as JSON to this file")

    ev = command(sub, "eval", "fidelity against full: needle grid, RULER-style tasks, decode perplexity, "
                 "next-token fidelity, budget sweep, report")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVALUATION")
    methods_help = "comma-separated, options after colons: full,freekv:budget=512 (full always runs first)"
    lengths, depths = _items("lengths (2048, 2k)", _length), _items("depths in [0, 1]", _depth)
    needle = command(ev_sub, "needle", "passphrase at lengths x depths; success and agreement with full",
                     EXAMPLES["needle"])
    needle.add_argument("--methods", required=True, type=_methods, help=methods_help)
    needle.add_argument("--lengths", default="1k,2k", type=lengths, help="prompt lengths in tokens: 1k,2k or 1500")
    needle.add_argument("--depths", default="0,0.25,0.5,0.75,1", type=depths,
                        help="needle depths in [0, 1] (0 = start of the text)")
    needle.add_argument("--seed", type=int, default=0)
    needle.add_argument("--max-new-tokens", type=_positive, default=24, help="tokens per answer")
    needle.add_argument("--kinds", default="single", type=_items("kinds (single, multikey)"),
                        help="single, multikey or both: single,multikey")
    needle.add_argument("--keys", type=int, default=4, help="passphrases per multikey prompt, 1..16 (one is asked)")
    ruler = command(ev_sub, "ruler", "RULER-style variable tracking (vt) and common-word extraction (cwe)",
                    EXAMPLES["ruler"])
    ruler.add_argument("--methods", required=True, type=_methods, help=methods_help)
    ruler.add_argument("--tasks", default="vt,cwe", type=_items("tasks (vt, cwe)"), help="vt, cwe or both")
    ruler.add_argument("--lengths", default="1k", type=lengths, help="prompt lengths in tokens: 1k,2k")
    ruler.add_argument("--samples", type=_positive, default=2, help="prompts per task and length")
    ruler.add_argument("--seed", type=int, default=0)
    ruler.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens per answer")
    ruler.add_argument("--task-option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                       help="vt_hops=2, vt_chains=1, cwe_common=3, cwe_share=0.3; repeatable")
    fid = command(ev_sub, "fidelity", "top-1 agreement and KL(full || method) along full's greedy generations",
                  EXAMPLES["fidelity"])
    fid.add_argument("--methods", required=True, type=_methods, help=methods_help)
    fid.add_argument("--texts", default="prose,code", type=_items("texts (prose, code, file paths)"),
                     help="prose, code, or file paths")
    fid.add_argument("--lengths", default="1k", type=lengths, help="context lengths in tokens")
    fid.add_argument("--prompts", type=_positive, default=1, help="windows per text and length")
    fid.add_argument("--new-tokens", type=_positive, default=64, help="steps of full's continuation compared")
    fid.add_argument("--seed", type=int, default=0)
    ppl = command(ev_sub, "ppl", "decode-mode perplexity after a long context, delta vs full", EXAMPLES["ppl"])
    ppl.add_argument("--methods", required=True, type=_methods, help=methods_help)
    ppl.add_argument("--texts", default="prose,code", type=_list, help="prose, code, or file paths ('' for none)")
    ppl.add_argument("--text-file", action="append", default=[], help="a text file to score (repeatable)")
    ppl.add_argument("--context", default="2k", type=_length, help="context length in tokens")
    ppl.add_argument("--targets", type=_positive, default=256, help="target tokens per window")
    ppl.add_argument("--windows", type=_positive, default=1,
                     help="disjoint context + targets windows per text, spread over it; their tokens are pooled")
    sweep = command(ev_sub, "sweep", "one method over a list of values of one option: needle success and ppl delta",
                    EXAMPLES["sweep"])
    sweep.add_argument("--method", default="freekv", help="the method; options held at every point after colons")
    sweep.add_argument("--option", default="budget", help="the option to sweep (budget, bits, ...)")
    sweep.add_argument("--values", required=True, type=_items("values (integers)", _integer),
                       help="the option's values: 256,512,1024")
    sweep.add_argument("--lengths", default="2k", type=lengths, help="needle prompt lengths")
    sweep.add_argument("--depths", default="0.1,0.5,0.9", type=depths, help="needle depths in [0, 1]")
    sweep.add_argument("--context", default="2k", type=_length, help="perplexity context length")
    sweep.add_argument("--targets", type=_positive, default=256, help="ppl target tokens per window")
    sweep.add_argument("--windows", type=_positive, default=1, help="ppl windows per text (see eval ppl)")
    report = command(ev_sub, "report", "README.md (tables) and summary.png from the JSONs in a folder",
                     EXAMPLES["report"])
    report.add_argument("--dir", required=True, help="the folder the eval commands wrote to")
    report.add_argument("--title", default="kvtier: approximate methods against full", help="the README's title")
    report.add_argument("--note", default=None, help="a paragraph for the README, under the command")
    report.add_argument("--command", dest="report_command", default=None,
                        help="the command that produced the folder, for the README")
    for p in (needle, ruler, fid, ppl, sweep):
        model_options(p)
        p.add_argument("--out", default="runs/eval", help="the results folder (evaluations may share one)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace this evaluation's earlier results in --out (refused otherwise)")
    return parser


# -- checks before any work: everything that needs no model ---------------------------------------------------
def _check_model_args(args) -> None:
    """--model, --device and --dtype, without loading anything."""
    from kvtier.models import resolve_device, resolve_dtype, resolve_model

    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    resolve_model(args.model)


def _read_prompt(name: str, flag: str = "--prompt-file") -> str:
    """The prompt file's text (`-`: standard input); UsageError naming the file for anything unreadable."""
    if name == "-":
        label = "standard input"
        if sys.stdin is None:
            raise UsageError(f"{flag} -: there is no standard input to read")
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    else:
        path = Path(name).expanduser()
        label = str(path)
        if not path.exists():
            raise UsageError(f"{flag} {path}: file not found")
        if not path.is_file():
            raise UsageError(f"{flag} {path} is not a file; give a text file, or - for standard input")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise UsageError(f"{flag} {path} cannot be read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {label} is not UTF-8 text (byte {err.start}: {err.reason}); give a plain "
                         "text file") from None
    if "\x00" in text:
        raise UsageError(f"{flag} {label} holds NUL bytes: it looks binary; give a plain text file")
    if not text.strip():
        raise UsageError(f"{flag} {label} is empty")
    return text


def _method_options(args) -> dict:
    from kvtier.methods import METHOD_REGISTRY, method_class
    from kvtier.sizes import parse_bytes

    options = dict(args.option)
    given = [key for key, _ in args.option]
    if twice := sorted({key for key in given if given.count(key) > 1}):
        raise UsageError(f"--option {', '.join(twice)} given more than once; give each option once")
    if args.budget is not None and "budget" in options:
        raise UsageError(f"--budget {args.budget} and --option budget={options['budget']!r} both give the budget; "
                         "give it once")
    if args.device_memory is not None:
        parse_bytes(args.device_memory, "--device-memory")
    if args.method == "auto":
        if args.device_memory is None:
            raise UsageError("--method auto needs --device-memory (the device bytes the KV state may take: 6GiB)")
        if options or args.budget is not None:
            raise UsageError("--method auto chooses the method's options itself; leave out --budget and --option")
        return options
    if args.budget is not None:
        if args.method in METHOD_REGISTRY and "budget" not in METHOD_REGISTRY[args.method].defaults:
            with_budget = [n for n, c in METHOD_REGISTRY.items() if "budget" in c.defaults]
            raise UsageError(f"--budget: method {args.method!r} has no token budget; methods with one: "
                             f"{', '.join(with_budget)}")
        options["budget"] = args.budget
    method_class(args.method).check_values(options)  # before the model loads
    return options


def _result_files(args) -> list[str]:
    """The files an evaluation writes into --out (the ones --overwrite is about)."""
    if args.eval_command == "sweep":
        from kvtier.methods import parse_methods

        method = parse_methods(args.method)[0].method
        return [f"sweep_{method}_{args.option}.json", f"sweep_{method}_{args.option}.png"]
    return [f"{args.eval_command}.json"]


def _check_eval(args) -> None:
    from kvtier.evaluation.common import check_existing, check_output_dir
    from kvtier.methods import parse_methods
    from kvtier.evaluation.fidelity import check_fidelity
    from kvtier.evaluation.needle import check_grid
    from kvtier.evaluation.ppl import check_ppl
    from kvtier.evaluation.ruler import check_ruler
    from kvtier.evaluation.sweep import check_sweep

    name = args.eval_command
    if name == "report":
        folder = Path(args.dir).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--dir {folder}: " + ("not a folder" if folder.exists() else "folder not found") +
                             "; give the folder the eval commands wrote to")
        return
    if name == "sweep":
        check_sweep(args.method, args.option, args.values)
        check_grid(args.lengths, args.depths, "single")
        check_ppl(["prose", "code"], args.context, args.targets, args.windows)
    else:
        parse_methods(args.methods)
    if name == "needle":
        check_grid(args.lengths, args.depths, args.kinds, args.keys)
    elif name == "ruler":
        check_ruler(args.tasks, args.lengths, args.samples, dict(args.task_option))
    elif name == "fidelity":
        check_fidelity(args.texts, args.lengths, args.prompts, args.new_tokens)
    elif name == "ppl":
        if not args.texts + args.text_file:
            raise UsageError("--texts and --text-file give no text to score; give prose, code or file paths")
        check_ppl(args.texts + args.text_file, args.context, args.targets, args.windows)
    check_output_dir(args.out, "--out")
    check_existing(args.out, _result_files(args), args.overwrite)
    _check_model_args(args)


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

    options = _method_options(args)
    _check_model_args(args)
    text = _read_prompt(args.prompt_file)
    model, tokenizer = kvtier.load(args.model, device=args.device, dtype=args.dtype)
    if args.raw or tokenizer.chat_template is None:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True, return_tensors="pt")
        if not hasattr(ids, "shape"):
            ids = ids["input_ids"]
    limit = model.config.max_position_embeddings
    if ids.shape[1] + args.max_new_tokens > limit:  # before the cache, which would name a max_length not given here
        raise UsageError(f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {args.max_new_tokens} that "
                         f"exceeds the model's maximum of {limit} positions: shorten it, or ask for fewer new tokens")
    planned = {}
    if args.device_memory is not None:  # the cache plans for this prompt and the new tokens
        planned = {"device_memory": args.device_memory, "max_length": int(ids.shape[1]) + args.max_new_tokens}
    cache = kvtier.KVCache(model, method=args.method, **planned, **options)
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


def _check_chat(args) -> tuple[str | None, dict]:
    """Everything `kvtier chat` can check before loading a model; returns (document text or None, options)."""
    from kvtier import __version__, cachefile

    if args.document is None and args.load_cache is None:
        raise UsageError("give the document: --document FILE (or --load-cache P, a cache saved with --save-cache)")
    if args.document == "-" and not args.question:
        raise UsageError("--document - reads the document from standard input, so the questions cannot come from "
                         "there too: give them with --question")
    if any(not q.strip() for q in args.question):
        raise UsageError("--question is empty; give the question's text")
    for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
                        ("--seed", args.seed)):
        if value is not None and not args.do_sample:
            raise UsageError(f"{flag} is for sampling: add --do-sample (answers are greedy without it)")
    if args.temperature is not None and not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    options = {}
    if args.load_cache is not None:
        info = cachefile.read_info(args.load_cache, kvtier_version=__version__)  # ours, whole, this version
        if args.method is not None and args.method != info["method"]:
            raise UsageError(f"--load-cache {args.load_cache} holds a {info['method']!r} cache, not "
                             f"{args.method!r}; leave out --method or prefill again with --document")
        if args.option or args.budget is not None or args.device_memory is not None:
            raise UsageError(f"--load-cache {args.load_cache}: the file fixes the method and its options "
                             f"({info['method']}); leave out --option, --budget and --device-memory")
    else:
        args.method = args.method or "full"
        options = _method_options(args)
    if args.save_cache is not None:
        target = Path(args.save_cache).expanduser()
        if target.is_dir():
            raise UsageError(f"--save-cache {target} is a folder; give a file name")
        if not target.parent.is_dir():
            raise UsageError(f"--save-cache {target}: folder {target.parent} does not exist")
    document = None if args.document is None else _read_prompt(args.document, "--document")
    _check_model_args(args)
    return document, options


def cmd_chat(args) -> int:
    import time

    import kvtier
    from kvtier.chat import DocumentChat, mib, stats_line

    document, options = _check_chat(args)
    started = time.perf_counter()
    model, tokenizer = kvtier.load(args.model, device=args.device, dtype=args.dtype)
    log = (lambda text: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    if args.load_cache is not None:
        chat = DocumentChat.load(args.load_cache, model, tokenizer, method=args.method, document=document,
                                 raw=args.raw)
        log(f"document: {chat.ids.shape[1]:,} tokens, loaded from {args.load_cache} in {chat.seconds:.2f} s "
            f"({chat.cache.method.name}; no prefill)")
    else:
        chat = DocumentChat.prefill(model, tokenizer, document, method=args.method, raw=args.raw, progress=True,
                                    max_new_tokens=args.max_new_tokens, device_memory=args.device_memory,
                                    **options)
        log(f"document: {chat.ids.shape[1]:,} tokens, prefilled once in {chat.seconds:.2f} s "
            f"({chat.cache.method.name})")
    saved = None
    if args.save_cache is not None:
        start = time.perf_counter()
        saved = chat.save(args.save_cache)
        log(f"saved the document's cache to {saved} ({mib(saved.stat().st_size)}) in "
            f"{time.perf_counter() - start:.2f} s")
    sampling = {"do_sample": args.do_sample, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed}
    answers = []

    def ask(question: str) -> None:
        streamer = None
        if not args.json:
            from transformers import TextStreamer

            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        answer = chat.ask(question, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
        answers.append(answer)
        log(stats_line(chat, answer))

    if args.question:
        for question in args.question:
            ask(question)
    else:
        interactive = sys.stdin is not None and sys.stdin.isatty()
        if interactive:
            log("ask about the document, one question per line; /exit or Ctrl-D ends")
        while True:
            if interactive:
                print("question> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline() if sys.stdin is not None else ""
            if not line or line.strip() in ("/exit", "/quit"):  # end of input, or asked to stop
                break
            if not line.strip():
                continue
            try:
                ask(line.strip())
            except (*USER_ERRORS, KeyboardInterrupt) as err:
                if not interactive:  # a script's questions: the first that fails ends the run, with its error
                    raise
                # at the prompt, one bad or interrupted question does not cost the document's prefill: each answer
                # comes from a fork of the document's cache, which stays as it was
                what = "interrupted" if isinstance(err, KeyboardInterrupt) else f"error: {_one_line(err)}"
                print(f"kvtier chat: {what}; ask again, or /exit", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    if args.json:
        print(json.dumps({"method": chat.cache.method.name, "options": chat.cache.method.options,
                          "document_tokens": int(chat.ids.shape[1]), "document_prefills": chat.prefills,
                          "prefill_seconds" if chat.prefills else "load_seconds": chat.seconds,
                          "saved_cache": str(saved) if saved else None,
                          "answers": [a.as_dict() for a in answers], "total_seconds": total}, indent=2))
    else:
        log(f"{len(answers)} answer(s) from {chat.prefills} prefill(s) of the document; {total:.1f} s in all "
            "(model load included)")
    return 0


def cmd_demo(args) -> int:
    from kvtier import demo
    from kvtier.evaluation.common import check_output_file
    from kvtier.methods import parse_methods

    if args.methods is not None:
        parse_methods(args.methods)
    check_output_file(args.out, "--out")
    _check_model_args(args)
    result = demo.run(args.model, methods=args.methods, context_tokens=args.context,
                      max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype, out=args.out)
    print(demo.format_table(result))
    return 0


def cmd_profile(args) -> int:
    from kvtier import hardware
    from kvtier.evaluation.common import check_output_file

    if args.out is not None:
        check_output_file(args.out, "--out")
    path = hardware.cache_file(args.device, args.dtype, args.hidden_size, args.kv_width)  # checks device, dtype
    hw = hardware.load_profile(None, device=args.device, dtype=args.dtype, hidden_size=args.hidden_size,
                               kv_width=args.kv_width, force=args.force)
    origin = {"cache": f"read from the cache {path} (--force measures again)",
              "measured": f"measured now; cached at {path}" if _cached(path, hw) else
                          f"measured now; NOT cached: {path} could not be written (see the warning above)"}
    origin = origin.get(hw.source, hw.source)
    shape = " x ".join(str(n) for n in hw.shape)
    print(f"{'device':>14}: {hw.device}")
    print(f"{'dtype':>14}: {hw.dtype}")
    print(f"{'host->device':>14}: {hw.h2d_bytes_per_s / 1e9:.2f} GB/s")
    print(f"{'matmul':>14}: {hw.matmul_flops_per_s / 1e12:.3f} TFLOP/s  (tokens x hidden x kv_width = {shape})")
    print(f"{'measured at':>14}: {hw.measured_at}")
    print(f"{'source':>14}: {origin}")
    if hw.device.startswith("cpu"):
        print("These are CPU numbers: host and device are both main memory. They exercise the scheduler; "
              "they are not speed results.")
    if args.out is not None:
        hardware.save(hw, args.out)
        print(f"wrote {args.out}")
    return 0


def _cached(path: Path, hw) -> bool:
    """Whether the cache file at `path` now holds this very measurement."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("measured_at") == hw.measured_at and saved.get("h2d_bytes_per_s") == hw.h2d_bytes_per_s


def cmd_eval(args) -> int:
    import kvtier
    from kvtier import evaluation

    _check_eval(args)
    if args.eval_command == "report":
        result = evaluation.report(args.dir, title=args.title, command=args.report_command, note=args.note)
        print(f"wrote {result['readme']}" + (f" and {result['plot']}" if result["plot"] else
                                             " (no summary.png: no plottable results, or matplotlib is missing)"))
        return 0
    model, tokenizer = kvtier.load(args.model, device=args.device, dtype=args.dtype)
    if args.eval_command == "needle":
        result = evaluation.needle_grid(model, tokenizer, args.methods, lengths=args.lengths, depths=args.depths,
                                        seed=args.seed, max_new_tokens=args.max_new_tokens, kinds=args.kinds,
                                        keys=args.keys, out_dir=args.out)
        print(f"{'method':<28} {'kind':<9} {'needle found':>12} {'same as full':>12}")
        for label, row in result["summary"].items():
            for kind, k in row["kinds"].items():
                print(f"{label:<28} {kind:<9} {k['success_rate']:>12.0%} {k['agreement_with_full']:>12.0%}")
    elif args.eval_command == "ruler":
        result = evaluation.ruler(model, tokenizer, args.methods, tasks=args.tasks, lengths=args.lengths,
                                  samples=args.samples, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                  out_dir=args.out, **dict(args.task_option))
        print(f"{'method':<28} {'task':<5} {'score':>6} {'same as full':>12}")
        for label, row in result["summary"].items():
            for task, t in row.items():
                print(f"{label:<28} {task:<5} {t['score']:>6.0%} {t['agreement_with_full']:>12.0%}")
    elif args.eval_command == "fidelity":
        result = evaluation.fidelity(model, tokenizer, args.methods, texts=args.texts, lengths=args.lengths,
                                     prompts=args.prompts, new_tokens=args.new_tokens, seed=args.seed, out_dir=args.out)
        print(f"{'method':<28} {'top-1 = full':>12} {'mean KL':>10} {'max KL':>10}")
        for label, row in result["summary"].items():
            print(f"{label:<28} {row['top1_agreement']:>12.0%} {row['kl_mean']:>10.3g} {row['kl_max']:>10.3g}")
    elif args.eval_command == "ppl":
        result = evaluation.perplexity(model, tokenizer, args.methods, texts=args.texts + args.text_file,
                                       context=args.context, targets=args.targets, windows=args.windows,
                                       out_dir=args.out)
        print(f"{'method':<28} {'text':<10} {'ppl':>9} {'delta vs full':>14} {'95% CI':>20}")
        for row in result["rows"]:
            low, high = row["ppl_delta_ci95"]
            print(f"{row['method']:<28} {row['text'][:10]:<10} {row['ppl']:>9.3f} {row['ppl_delta_vs_full']:>+14.4f} "
                  f"{f'[{low:+.4f}, {high:+.4f}]':>20}")
    else:
        result = evaluation.budget_sweep(model, tokenizer, args.method, budgets=args.values, option=args.option,
                                         lengths=args.lengths, depths=args.depths, context=args.context,
                                         targets=args.targets, windows=args.windows, out_dir=args.out)
        print(f"full: needle {result['full']['needle_success']:.0%}")
        print(f"{args.option:>8} {'needle':>7} {'=full':>6} {'max ppl delta':>14}")
        for point in result["points"]:
            print(f"{point[args.option]:>8} {point['needle_success']:>7.0%} "
                  f"{point['needle_agreement_with_full']:>6.0%} {point['ppl_delta_max']:>+14.4f}")
    print(f"JSON: {result['json']}")
    return 0


def cmd_bench(args) -> int:
    from kvtier import bench
    from kvtier.evaluation.common import check_output_dir
    from kvtier.models import resolve_device

    if args.model is None and args.model_config is None:
        raise UsageError("give --model-config (a random-weight shape) or --model embedded")
    device = resolve_device(args.device)
    if args.dtype is not None:
        from kvtier.models import resolve_dtype

        resolve_dtype(args.dtype, device)
    if args.profile is not None and not Path(args.profile).expanduser().is_file():
        raise UsageError(f"--profile {args.profile}: file not found (write one with kvtier profile --out FILE)")
    check_output_dir(args.out, "--out")
    result = bench.run(args.model_config, model=args.model, count_steps=args.count_steps,
                       contexts=args.contexts, batches=args.batch,
                       methods=args.methods or bench.DEFAULT_METHODS, decode_steps=args.decode_steps,
                       warmup=args.warmup, dtype=args.dtype, device=args.device, out=args.out,
                       random_weights=args.random_weights, seed=args.seed, prefill_chunk=args.prefill_chunk,
                       profile=args.profile, command=shlex.join(["kvtier", *args.argv]))
    print(bench.format_table(result))
    print(f"JSON: {result['json']}")
    if result["plot"]:
        print(f"PNG: {result['plot']}")
    return 1 if any(row["status"] == "error" for row in result["rows"]) else 0


def _bandwidth(text: str) -> float:
    """"25GB/s" (or "25GB", "2.5e10") -> bytes per second."""
    from kvtier.sizes import parse_bytes

    body = text.strip()
    body = body[:-2] if body.lower().endswith("/s") else body
    try:
        return float(parse_bytes(body, "--bandwidth"))
    except ValueError:
        try:
            value = float(body)
        except ValueError:
            raise UsageError(f"--bandwidth {text!r} is not a bandwidth; give bytes per second such as 25GB/s") from None
        if value <= 0:
            raise UsageError(f"--bandwidth must be positive, got {text!r}")
        return value


def cmd_plan(args) -> int:
    from kvtier import plan
    from kvtier.evaluation.common import check_output_file, parse_length
    from kvtier.models import resolve_dtype, resolve_model
    from kvtier.sizes import parse_bytes

    if (args.model is None) == (args.model_config is None):
        raise UsageError("give either --model-config (a named shape such as llama-3.1-8b) or --model")
    if args.model_config is not None:
        from kvtier.bench.shapes import SHAPES

        if args.model_config not in SHAPES:
            raise UsageError(f"--model-config {args.model_config!r} is unknown; valid: {', '.join(SHAPES)}")
    else:
        resolve_model(None if args.model == "embedded" else args.model)  # a missing model: before any work
    device_memory = parse_bytes(args.device_memory, "--device-memory")
    host_memory = None if args.host_memory is None else parse_bytes(args.host_memory, "--host-memory")
    bandwidth = None if args.bandwidth is None else _bandwidth(args.bandwidth)
    if not 0 < args.utilization <= 1:
        raise UsageError(f"--utilization must be in (0, 1], got {args.utilization}")
    if args.device not in ("cuda", "cpu"):
        raise UsageError(f"--device {args.device!r}: plan for cuda or cpu")
    import torch

    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    if args.json is not None:
        check_output_file(args.json, "--json")
    contexts = [parse_length(c) for c in args.context]
    model = None if args.model == "embedded" else args.model
    config, name = plan.load_config(args.model_config, model)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max(contexts) + args.new_tokens > positions:
        raise UsageError(f"--context {max(contexts)} + --new-tokens {args.new_tokens} exceeds {name}'s {positions} "
                         "positions")
    source, profile = "given", None
    if bandwidth is None:
        if args.device == "cuda" and torch.cuda.is_available():
            from kvtier.hardware import load_profile

            profile = load_profile(None, device="cuda", dtype=dtype)  # also kvpr's cost model (multi-head models)
            bandwidth, source = profile.h2d_bytes_per_s, "measured here"
        else:
            bandwidth, source = plan.ASSUMED_BANDWIDTH, "assumed: no GPU here; give --bandwidth"
    shape = plan.model_shape(args.model_config, model, dtype, args.device, config=config)
    result = plan.plan(shape, contexts, args.batch, device_memory, new_tokens=args.new_tokens, bandwidth=bandwidth,
                       host_memory=host_memory, utilization=args.utilization, profile=profile)
    print(plan.format_plan(result, source))
    if args.json is not None:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2) + "\n")
        print(f"JSON: {path}")
    return 0


# What a user's mistake raises, reported in one line with exit code 2 (OSError: a file that cannot be read or
# written); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, NotImplementedError, OSError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv=None) -> int:
    from .hardware import steady_cpu_gemm

    steady_cpu_gemm()  # before any matmul of this process
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handlers = {"info": cmd_info, "generate": cmd_generate, "chat": cmd_chat, "demo": cmd_demo,
                "profile": cmd_profile, "eval": cmd_eval, "bench": cmd_bench, "plan": cmd_plan}
    name = args.command + (f" {args.eval_command}" if args.command == "eval" else "")
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"kvtier {name}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"kvtier {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
