"""Side-by-side benchmark: qwen-jax against the `transformers` reference (CPU torch) on one machine, the same random
weights, float32, the same number of threads on both sides; with the machine's limits measured in the same run.

    python bench/run.py [--smoke] [--out FILE.json] [--only limits,delta,prefill,decode] [--threads 2]

Parts: `limits` (float32 matmul rate, memory bandwidth, matrix-vector read rate), `delta` (the delta rule alone at
512, 2048, 8192 tokens), `prefill` (512 and 2048 tokens, logits of the last position or of all), `decode` (batch 1
and 8; batch 1 also with bfloat16 weights). `--smoke` runs the same code on a tiny model at tiny sizes (CI). Prints
a table of rates, ratios ours/reference and fractions of the machine's limits, compile times apart, and writes the
raw figures to `--out`.

Threads: torch.set_num_threads(N); XLA:CPU sizes its intra-op (Eigen) pool from the `PJRT_NPROC` environment variable
in jax 0.10.2 (`XLA_FLAGS` has no thread-count flag), so it is set to N before jax loads, and the pool's threads are
counted and recorded (`meta.xla_eigen_threads`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qwen_jax.errors import InputError, OneLineArgumentParser  # noqa: E402  (no jax import)

PARTS = ("limits", "delta", "prefill", "decode")


def fix_threads(threads: int) -> None:
    """Both sides on `threads` threads; must run before jax or torch is imported."""
    os.environ["PJRT_NPROC"] = str(threads)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=true".strip()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


def xla_eigen_threads() -> int | None:
    """Threads of XLA:CPU's intra-op pool in this process (Linux), counted by name."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    return sum((t / "comm").read_text().startswith("tf_XLAEigen") for t in tasks.iterdir())


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def meta(smoke: bool, threads: int) -> dict:
    import jax
    import torch
    import transformers

    jax.numpy.zeros(1).block_until_ready()  # start the backend, so its thread pool exists
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": smoke,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "xla_eigen_threads": xla_eigen_threads(),
        "environment": {k: os.environ.get(k) for k in ("PJRT_NPROC", "XLA_FLAGS", "OMP_NUM_THREADS")},
        "cpu": cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "jax_backend": jax.default_backend(),
        "jax_compilation_cache": jax.config.jax_compilation_cache_dir,
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "git": git_state(),
    }


# --- targets and the table -----------------------------------------------------------------------------------------


def _row(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def targets(results: dict) -> list[dict]:
    """Issue 6's targets, evaluated at the largest sizes measured: (what, value, threshold, met)."""
    out = []

    def check(what: str, value: float | None, threshold: float) -> None:
        if value is not None:
            out.append({"what": what, "value": value, "threshold": threshold, "met": value >= threshold})

    prefill = results.get("prefill", [])
    if prefill:
        row = _row(prefill, tokens=max(r["tokens"] for r in prefill), logits="last")
        check(f"prefill {row['tokens']} last-token: fraction of matmul", row.get("ours_fraction_of_matmul"), 0.6)
        check(f"prefill {row['tokens']} last-token: ours / reference", row["ratio"], 1.0)
    for batch, ratio in ((1, 2.5), (8, 2.5)):
        row = _row(results.get("decode", []), batch=batch, weights="float32")
        if row is not None:
            if batch == 1:
                check("decode batch 1: fraction of bandwidth", row.get("ours_fraction_of_bandwidth"), 0.6)
            check(f"decode batch {batch}: ours / reference", row["ratio"], ratio)
    delta = results.get("delta_rule", [])
    if delta:
        row = delta[-1]
        check(f"delta rule {row['tokens']}: our chunked / our recurrent", row["ours_chunked_over_recurrent"], 3.0)
        check(f"delta rule {row['tokens']}: our chunked / reference chunked", row["chunked_ratio"], 1.0)
    return out


def _rate(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def table(results: dict) -> str:
    """The human-readable summary."""
    lines = [f"{'measurement':<44}{'ours':>14}{'reference':>14}{'ours/ref':>10}   of the machine's limit"]

    def line(name: str, ours, reference=None, ratio=None, fraction=None, limit="") -> None:
        ratio_s = "-" if ratio is None else f"{ratio:.2f}x"
        fraction_s = "" if fraction is None else f"{100 * fraction:.1f}% of {limit}"
        lines.append(f"{name:<44}{ours:>14}{reference or '-':>14}{ratio_s:>10}   {fraction_s}")

    if "limits" in results:
        lim = results["limits"]
        line(f"machine: float32 matmul {lim['matmul_size']}^3", _rate(lim["matmul_flops_per_s"], "FLOP/s"))
        line(f"machine: stream over {lim['copy_bytes'] >> 20} MiB", _rate(lim["bandwidth_bytes_per_s"], "B/s"))
        read = lim["matvec_read_bytes_per_s"]
        line(f"machine: matrix-vector over {lim['matvec_bytes'] >> 20} MiB, read", _rate(read, "B/s"),
             fraction=read / lim["bandwidth_bytes_per_s"], limit="bandwidth")  # fmt: skip
    for r in results.get("prefill", []):
        what = "last-token logits" if r["logits"] == "last" else "all logits"
        line(f"prefill {r['tokens']} tokens, {what}", _rate(r["ours_tokens_per_s"], "tok/s"),
             _rate(r["reference_tokens_per_s"], "tok/s"), r["ratio"], r.get("ours_fraction_of_matmul"), "matmul")  # fmt: skip
    for r in results.get("decode", []):
        name = f"decode batch {r['batch']}, {r['weights']} weights"
        if r["weights"] == "float32":
            line(name, _rate(r["ours_tokens_per_s"], "tok/s"), _rate(r["reference_tokens_per_s"], "tok/s"),
                 r["ratio"], r.get("ours_fraction_of_bandwidth"), "bandwidth")  # fmt: skip
        else:
            line(name, _rate(r["ours_tokens_per_s"], "tok/s"), None, None, r.get("ours_fraction_of_bandwidth"),
                 "bandwidth")  # fmt: skip
            if "speedup_over_float32" in r:
                lines.append(f"{'':<44}{r['speedup_over_float32']:.2f}x our float32 decode")
    for r in results.get("delta_rule", []):
        for form in ("chunked", "recurrent"):
            line(f"delta rule {r['tokens']} tokens, {form}", _rate(r[f"ours_{form}_tokens_per_s"], "tok/s"),
                 _rate(r[f"reference_{form}_tokens_per_s"], "tok/s"), r[f"{form}_ratio"])  # fmt: skip
        lines.append(
            f"{'':<44}our chunked form (chunk {r['ours_chunk']}; reference chunk {r['reference_chunk']}): "
            f"{r['ours_chunked_over_recurrent']:.2f}x our recurrent form"
        )
    if results.get("compile_s"):
        lines.append("\ncompile time (ours; warm-up call minus the median call), s:")
        lines += [f"  {name:<42}{s:>8.2f}" for name, s in results["compile_s"].items()]
    if results.get("targets"):
        lines.append("\ntargets (issue 6):")
        for t in results["targets"]:
            mark = "met" if t["met"] else "NOT met"
            lines.append(f"  {t['what']:<58}{t['value']:>8.3f} (>= {t['threshold']})  {mark}")
    return "\n".join(lines)


# --- the command line ----------------------------------------------------------------------------------------------


def parse_parts(text: str) -> tuple[str, ...]:
    import argparse

    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none)'}; choose from {PARTS}")
    return tuple(p for p in PARTS if p in parts)


def write_json(path: Path, results: dict) -> None:
    """Write atomically: a temporary sibling, then a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model at tiny sizes, in seconds (CI)")
    parser.add_argument("--out", type=Path, default=None, help="write the raw figures to this JSON file")
    parser.add_argument("--only", type=parse_parts, default=PARTS, help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--threads", type=int, default=2, help="threads on both sides (default 2)")
    args = parser.parse_args(argv)
    try:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        if args.out is not None and not args.out.parent.is_dir():
            raise InputError(f"{args.out.parent}: no such directory for --out")
        if args.out is not None and args.out.is_dir():
            raise InputError(f"--out {args.out} is a directory")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fix_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness
    import transformers

    transformers.logging.set_verbosity_error()
    results = {"meta": meta(args.smoke, args.threads)}
    results["meta"]["parts"] = list(args.only)
    if results["meta"]["xla_eigen_threads"] not in (None, args.threads):
        print(f"warning: XLA runs {results['meta']['xla_eigen_threads']} intra-op threads, not {args.threads}",
              file=sys.stderr)  # fmt: skip
    results.update(harness.run(harness.SMOKE if args.smoke else harness.FULL, args.only))
    results["targets"] = targets(results)
    results["meta"]["load_average_at_end"] = list(os.getloadavg())
    bad = [k for k, v in _numbers(results) if not math.isfinite(v)]
    print(table(results))
    if args.out is not None:
        write_json(args.out, results)
        print(f"\nraw figures: {args.out}")
    if bad:
        print(f"error: non-finite figures: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _numbers(node, prefix: str = ""):
    """(dotted path, value) of every number in a JSON-like tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{prefix}{i}.")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix.rstrip("."), float(node)


if __name__ == "__main__":
    sys.exit(main())
