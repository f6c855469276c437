"""Command line: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import ast
import json
import shlex
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
    demo.add_argument("--methods", type=_methods, default=None,
                      help="comma-separated, options after colons (default: full,offload,kvpr,freekv:budget=1024,"
                           "freekv:budget=1024:page_size=8:scorer=lowbit:rest=lowbit:tau=0.9,specache)")
    demo.add_argument("--context", type=int, default=3000, help="prompt length in tokens")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--device", default=None)
    demo.add_argument("--dtype", default=None)
    demo.add_argument("--out", default="runs/demo.json")

    prof = sub.add_parser("profile", help="measure host->device bandwidth and matmul rate (KVPR's cost model), "
                          "cached per machine")
    prof.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    prof.add_argument("--dtype", default=None, help="matmul dtype (default: bfloat16 on CUDA, float32 on CPU)")
    prof.add_argument("--hidden-size", type=int, default=4096, help="hidden size of the recompute GEMM")
    prof.add_argument("--kv-width", type=int, default=4096, help="num_kv_heads * head_dim of the recompute GEMM")
    prof.add_argument("--out", type=Path, default=None, help="also write the profile as JSON here")
    prof.add_argument("--force", action="store_true", help="measure again even when a cached profile exists")
    bench = sub.add_parser("bench", help="decode speed, memory, aten ops and host syncs per step of every method "
                           "beside Hugging Face's caches, on a random-weight model of a real shape or the "
                           "embedded model")
    bench.add_argument("--model-config", default=None, help="real shapes: llama-3.1-8b, llama-2-7b, qwen2.5-7b "
                       "(need --random-weights); CPU harness checks: tiny-llama, tiny-mha")
    bench.add_argument("--model", default=None, help="embedded: the embedded SmolLM2-135M, its own weights, with "
                       "real prose as the prompt (instead of --model-config; contexts up to its 8192 positions)")
    bench.add_argument("--random-weights", action="store_true",
                       help="build the shape with random weights (nothing is ever downloaded)")
    bench.add_argument("--contexts", default="1k", type=_list, help="prompt lengths: 8k,32k")
    bench.add_argument("--batch", default="1", type=lambda t: [int(x) for x in _list(t)], help="batch sizes: 1,4")
    bench.add_argument("--methods", default=None, help="comma-separated kvtier specs and hf-dynamic, hf-offload "
                       "(default: full,offload,kvpr,freekv,specache,hf-dynamic,hf-offload)")
    bench.add_argument("--decode-steps", type=int, default=16, help="timed decode steps")
    bench.add_argument("--warmup", type=int, default=4, help="untimed decode steps before them")
    bench.add_argument("--count-steps", type=int, default=2, help="untimed decode steps after them on which aten "
                       "ops and host syncs are counted (0: none)")
    bench.add_argument("--prefill-chunk", type=int, default=None, help="prefill chunk in tokens (default 2048)")
    bench.add_argument("--profile", default=None, help="hardware profile JSON (from kvtier profile --out); "
                       "default: the cached or freshly measured one")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    bench.add_argument("--out", default="runs/bench", help="folder for the JSON and PNG")
    ev = sub.add_parser("eval", help="fidelity against full: needle grid, RULER-style tasks, decode perplexity, "
                        "next-token fidelity, budget sweep, report")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    methods_help = "comma-separated, options after colons: full,freekv:budget=512"
    needle = ev_sub.add_parser("needle", help="passphrase at lengths x depths; success and agreement with full")
    needle.add_argument("--methods", required=True, help=methods_help)
    needle.add_argument("--lengths", default="1k,2k", type=_list)
    needle.add_argument("--depths", default="0,0.25,0.5,0.75,1", type=lambda t: [float(x) for x in _list(t)])
    needle.add_argument("--seed", type=int, default=0)
    needle.add_argument("--max-new-tokens", type=int, default=24)
    needle.add_argument("--kinds", default="single", type=_list, help="single, multikey or both: single,multikey")
    needle.add_argument("--keys", type=int, default=4, help="passphrases per multikey prompt (one is asked)")
    ruler = ev_sub.add_parser("ruler", help="RULER-style variable tracking (vt) and common-word extraction (cwe)")
    ruler.add_argument("--methods", required=True, help=methods_help)
    ruler.add_argument("--tasks", default="vt,cwe", type=_list)
    ruler.add_argument("--lengths", default="1k", type=_list)
    ruler.add_argument("--samples", type=int, default=2, help="prompts per task and length")
    ruler.add_argument("--seed", type=int, default=0)
    ruler.add_argument("--max-new-tokens", type=int, default=32)
    ruler.add_argument("--task-option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                       help="vt_hops=2, vt_chains=1, cwe_common=3, cwe_share=0.3; repeatable")
    fid = ev_sub.add_parser("fidelity", help="top-1 agreement and KL(full || method) along full's greedy generations")
    fid.add_argument("--methods", required=True, help=methods_help)
    fid.add_argument("--texts", default="prose,code", type=_list, help="prose, code, or file paths")
    fid.add_argument("--lengths", default="1k", type=_list)
    fid.add_argument("--prompts", type=int, default=1, help="windows per text and length")
    fid.add_argument("--new-tokens", type=int, default=64)
    fid.add_argument("--seed", type=int, default=0)
    ppl = ev_sub.add_parser("ppl", help="decode-mode perplexity after a long context, delta vs full")
    ppl.add_argument("--methods", required=True, help=methods_help)
    ppl.add_argument("--texts", default="prose,code", type=_list, help="prose, code, or file paths")
    ppl.add_argument("--text-file", action="append", default=[], help="a text file to score (repeatable)")
    ppl.add_argument("--context", default="2k")
    ppl.add_argument("--targets", type=int, default=256, help="target tokens per window")
    ppl.add_argument("--windows", type=_positive, default=1,
                     help="disjoint context + targets windows per text, spread over it; their tokens are pooled")
    sweep = ev_sub.add_parser("sweep", help="one method over a list of budgets: needle success and ppl delta")
    sweep.add_argument("--method", default="freekv")
    sweep.add_argument("--option", default="budget", help="the option to sweep (budget, bits, ...)")
    sweep.add_argument("--values", required=True, type=lambda t: [int(x) for x in _list(t)])
    sweep.add_argument("--lengths", default="2k", type=_list)
    sweep.add_argument("--depths", default="0.1,0.5,0.9", type=lambda t: [float(x) for x in _list(t)])
    sweep.add_argument("--context", default="2k")
    sweep.add_argument("--targets", type=int, default=256, help="ppl target tokens per window")
    sweep.add_argument("--windows", type=_positive, default=1, help="ppl windows per text (see eval ppl)")
    report = ev_sub.add_parser("report", help="README.md (tables) and summary.png from the JSONs in a folder")
    report.add_argument("--dir", required=True, help="the folder the eval commands wrote to")
    report.add_argument("--title", default="kvtier: approximate methods against full")
    report.add_argument("--note", default=None, help="a paragraph for the README, under the command")
    report.add_argument("--command", dest="report_command", default=None,
                        help="the command that produced the folder, for the README")
    for p in (needle, ruler, fid, ppl, sweep):
        p.add_argument("--model", default=None)
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default=None)
        p.add_argument("--out", default="runs/eval")
    return parser


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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


def cmd_profile(args) -> int:
    from kvtier import profile

    hw = profile.load_profile(None, device=args.device, dtype=args.dtype, hidden_size=args.hidden_size,
                              kv_width=args.kv_width, force=args.force)
    path = profile.cache_file(args.device, args.dtype, args.hidden_size, args.kv_width)
    origin = {"cache": f"read from the cache {path} (--force measures again)",
              "measured": f"measured now; cached at {path}"}.get(hw.source, hw.source)
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
        profile.save(hw, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    import kvtier
    from kvtier import eval as kv_eval

    if args.eval_command == "report":
        result = kv_eval.report(args.dir, title=args.title, command=args.report_command, note=args.note)
        print(f"wrote {result['readme']}" + (f" and {result['plot']}" if result["plot"] else ""))
        return 0
    model, tokenizer = kvtier.load(args.model, device=args.device, dtype=args.dtype)
    if args.eval_command == "needle":
        result = kv_eval.needle_grid(model, tokenizer, args.methods, lengths=args.lengths, depths=args.depths,
                                     seed=args.seed, max_new_tokens=args.max_new_tokens, kinds=args.kinds,
                                     keys=args.keys, out_dir=args.out)
        print(f"{'method':<28} {'kind':<9} {'needle found':>12} {'same as full':>12}")
        for label, row in result["summary"].items():
            for kind, k in row["kinds"].items():
                print(f"{label:<28} {kind:<9} {k['success_rate']:>12.0%} {k['agreement_with_full']:>12.0%}")
    elif args.eval_command == "ruler":
        result = kv_eval.ruler(model, tokenizer, args.methods, tasks=args.tasks, lengths=args.lengths,
                               samples=args.samples, seed=args.seed, max_new_tokens=args.max_new_tokens,
                               out_dir=args.out, **dict(args.task_option))
        print(f"{'method':<28} {'task':<5} {'score':>6} {'same as full':>12}")
        for label, row in result["summary"].items():
            for task, t in row.items():
                print(f"{label:<28} {task:<5} {t['score']:>6.0%} {t['agreement_with_full']:>12.0%}")
    elif args.eval_command == "fidelity":
        result = kv_eval.fidelity(model, tokenizer, args.methods, texts=args.texts, lengths=args.lengths,
                                  prompts=args.prompts, new_tokens=args.new_tokens, seed=args.seed, out_dir=args.out)
        print(f"{'method':<28} {'top-1 = full':>12} {'mean KL':>10} {'max KL':>10}")
        for label, row in result["summary"].items():
            print(f"{label:<28} {row['top1_agreement']:>12.0%} {row['kl_mean']:>10.3g} {row['kl_max']:>10.3g}")
    elif args.eval_command == "ppl":
        result = kv_eval.perplexity(model, tokenizer, args.methods, texts=args.texts + args.text_file,
                                    context=args.context, targets=args.targets, windows=args.windows,
                                    out_dir=args.out)
        print(f"{'method':<28} {'text':<10} {'ppl':>9} {'delta vs full':>14} {'95% CI':>20}")
        for row in result["rows"]:
            low, high = row["ppl_delta_ci95"]
            print(f"{row['method']:<28} {row['text'][:10]:<10} {row['ppl']:>9.3f} {row['ppl_delta_vs_full']:>+14.4f} "
                  f"{f'[{low:+.4f}, {high:+.4f}]':>20}")
    else:
        result = kv_eval.budget_sweep(model, tokenizer, args.method, budgets=args.values, option=args.option,
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

    if args.model is None and args.model_config is None:
        raise ValueError("give --model-config (a random-weight shape) or --model embedded")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handlers = {"info": cmd_info, "generate": cmd_generate, "demo": cmd_demo, "profile": cmd_profile,
                "eval": cmd_eval, "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except (ValueError, NotImplementedError, FileNotFoundError) as err:
        print(f"kvtier {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
