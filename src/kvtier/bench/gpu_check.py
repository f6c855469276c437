"""The summary of `scripts/gpu_check.sh` (issue 14): one JSON that says what ran on the GPU and how it went.

The script runs its stages (environment, CUDA tests, benchmark runs) into one folder; this module reads that
folder and writes `<device>-<date>.json` beside them: the machine and versions, each test run's counts, and
every benchmark row (with its time against `full` and `hf-offload` of the same run, and whether its decode
steps passed under `torch.cuda.set_sync_debug_mode("error")`). Stages that did not run (out of time, or a
failure before them) are listed as such, so a partial run still says what it covers.

    python -m kvtier.bench.gpu_check OUT_DIR [--stage NAME=STATUS ...] [--command TEXT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

ROW_FIELDS = ("method", "context", "batch", "status", "decode_ms_per_token", "ms_vs_full", "prefill_s",
              "device_kv_bytes", "peak_device_bytes", "h2d_bytes_per_token", "aten_ops_per_step",
              "host_syncs_per_step", "sync_debug")
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def count_tests(log_text: str) -> dict[str, int]:
    """pytest's final tally ("3 passed, 1 skipped in 2.1s") as {"passed": 3, "skipped": 1}; {} where none."""
    tally = [line for line in log_text.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped)\b", line)
             and " in " in line]
    if not tally:
        return {}
    counts: dict[str, int] = {}
    for number, word in _COUNT.findall(tally[-1]):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def _beside(rows: list[dict], row: dict, method: str) -> float | None:
    """The decode ms/token of `method` at the same context and batch in the same run."""
    for other in rows:
        if (other.get("method") == method and other.get("context") == row.get("context")
                and other.get("batch") == row.get("batch")):
            return other.get("decode_ms_per_token")
    return None


def bench_rows(path: Path) -> list[dict]:
    """The rows of one `kvtier bench` JSON, each with the run's file name and `hf_offload_ms` beside it."""
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    out = []
    for row in rows:
        item = {key: row.get(key) for key in ROW_FIELDS}
        item["full_ms"] = _beside(rows, row, "full")
        item["hf_offload_ms"] = _beside(rows, row, "hf-offload")
        item["run"] = path.name
        out.append(item)
    return out


def summarize(out_dir: Path, stages: dict[str, str], command: str = "", environment: dict | None = None) -> Path:
    """Write `<device>-<date>.json` into out_dir from its test logs (`tests-*.log`) and bench JSON (`bench-*.json`,
    in out_dir or out_dir/bench); returns its path."""
    out_dir = Path(out_dir)
    if environment is None:
        from ..models import environment_summary

        environment = environment_summary()
    tests = {}
    for log in sorted(out_dir.glob("tests-*.log")):
        text = log.read_text(errors="replace")
        tests[log.stem.removeprefix("tests-")] = {"counts": count_tests(text), "log": log.name}
    runs = sorted([*out_dir.glob("bench-*.json"), *out_dir.glob("bench/bench-*.json")])
    rows = [row for run in runs for row in bench_rows(run)]
    device = str(environment.get("device", "unknown"))
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"
    date = datetime.date.today().isoformat()
    summary = {
        "device": device,
        "date": date,
        "command": command,
        "environment": environment,
        "stages": stages,
        "tests": tests,
        "bench_runs": [run.name for run in runs],
        "rows": rows,
        "sync_debug": {f"{r['method']} {r['context']}x{r['batch']}": r["sync_debug"] for r in rows},
    }
    path = out_dir / f"{slug}-{date}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--stage", action="append", default=[], metavar="NAME=STATUS",
                        help="a stage of the script and how it ended (ran, failed (rc N), skipped: ...)")
    parser.add_argument("--command", default="")
    args = parser.parse_args(argv)
    stages = {}
    for item in args.stage:
        name, sep, status = item.partition("=")
        if not sep:
            parser.error(f"--stage takes NAME=STATUS, got {item!r}")
        stages[name] = status
    print(summarize(args.out_dir, stages, args.command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
