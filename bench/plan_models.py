"""`qwen_jax.plan` for the published models on common slices, in one process of 64 simulated CPU devices: per-device
memory (parameters and cache exact, activations estimated), per-token cost and compile times, as JSON and as the
README's markdown table.

    python bench/plan_models.py [--models qwen3.5-397b-a17b,qwen3-vl-235b-a22b] [--devices 8,64]
                                [--batch 8] [--context 32768] [--out bench/results/plan_models.json]
                                [--smoke]

Meshes, for serving (weights stay in place; FSDP would gather every weight at each decode step): MoE models split
their experts over all devices (`expert=8` on an 8 x H100 node or a TPU v5p-16 / v6e-8 slice, `expert=64` on
v5p-128 / v6e-64), dense models split heads and MLPs (`tensor=8`, and `data=8,tensor=8` on 64 devices). `--smoke` plans one tiny
config on 8 devices at a short context (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEVICES = 64
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(REPO))

SMOKE_CONFIG = {  # a tiny Qwen3.5-MoE text config, for --smoke
    "model_type": "qwen3_5_moe_text", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
}  # fmt: skip


def mesh_for(config_path: Path, devices: int) -> str:
    from qwen_jax.config import load_config

    moe = load_config(config_path).text.num_experts > 0
    if moe:
        return f"expert={devices}"
    return "tensor=8" if devices == 8 else f"data={devices // 8},tensor=8"


def markdown(rows: list[dict]) -> str:
    """The README's table: per-device figures of each report."""
    gib = 2.0**30
    lines = [
        "| model | mesh | parameters | cache | activations (est.) prefill / decode | decode GFLOP / token | compile "
        "prefill / decode |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, t, c = r["per_device_bytes"], r["per_token_per_device"], r["compile_s"]
        lines.append(
            f"| {Path(r['config']).stem} | {','.join(f'{k}={v}' for k, v in r['mesh'].items() if v > 1)} "
            f"| {m['params'] / gib:.1f} GiB | {m['cache'] / gib:.1f} GiB "
            f"| {m['activations_prefill_estimate'] / gib:.1f} / {m['activations_decode_estimate'] / gib:.1f} GiB "
            f"| {t['decode_flops'] / 1e9:.1f} | {c['prefill']:.1f} s / {c['decode']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated names in configs/ (default: all)")
    p.add_argument("--devices", default="8,64", help="mesh sizes to plan on (8 and/or 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the reports (written atomically)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()

    from qwen_jax import plan

    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            smoke = Path(tmp) / "tiny-moe.json"
            smoke.write_text(json.dumps(SMOKE_CONFIG))
            paths, sizes, context = [smoke], [8], 256
        else:
            names = a.models.split(",") if a.models else sorted(q.stem for q in plan.CONFIG_DIR.glob("*.json"))
            paths = [plan.resolve_config_path(n) for n in names]
            sizes, context = [int(d) for d in a.devices.split(",")], a.context
        rows = []
        for path in paths:
            for devices in sizes:
                mesh = mesh_for(path, devices)
                start = time.perf_counter()
                report = plan.plan(path, mesh, a.batch, context, a.dtype)
                report["wall_s"] = time.perf_counter() - start
                print(plan.format_report(report), flush=True)
                rows.append(report)
    print()
    print(markdown(rows))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        partial = a.out.with_name(f".{a.out.name}.tmp")
        partial.write_text(json.dumps(rows, indent=1) + "\n")
        partial.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
