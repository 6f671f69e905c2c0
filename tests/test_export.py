"""The exporter (`tools/export.py`, `qwen_jax.checkpoint.export`) against the original Hugging Face files and
transformers itself.

Round trip: HF checkpoint -> convert (source dtypes kept) -> export reproduces every original tensor bit for bit
(same files, keys, dtypes, shapes and bytes, read back with the `safetensors` library), for per-expert and fused
experts, the official transposed Qwen3-VL-MoE experts, Qwen3-Next's fused in_proj_qkvz / in_proj_ba, and a bfloat16
sharded vision-language checkpoint with an MTP head. `--layout official`: transformers loads the output with no
missing, unexpected or mismatched keys, into exactly the reference's weights, and gives the reference's logits.
Bad input: one `error:` line, exit 1, nothing at DST.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_expert_layouts import to_legacy_layout

from qwen_jax.checkpoint.convert import convert
from qwen_jax.checkpoint.export import export

REPO = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"


def run_cli(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/export.py", str(src), str(dst), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def raw_tensors(directory: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """file -> key -> (dtype, shape, raw bytes), as the safetensors library reads them."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out[file.name] = {}
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                t = f.get_tensor(key)
                out[file.name][key] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def assert_same_files(original: Path, exported: Path) -> None:
    want, got = raw_tensors(original), raw_tensors(exported)
    assert set(got) == set(want)
    for file, tensors in want.items():
        assert set(got[file]) == set(tensors), file
        for key, (dtype, shape, data) in tensors.items():
            assert got[file][key][:2] == (dtype, shape), key
            assert got[file][key][2] == data, f"{key}: bytes differ"  # bit-identical
    for f in original.iterdir():  # config, generation config and the index, unchanged
        if f.suffix != ".safetensors":
            assert (exported / f.name).read_bytes() == f.read_bytes(), f.name
    assert {f.name for f in exported.iterdir()} == {f.name for f in original.iterdir()}


def bfloat16_with_mtp(original: Path, to: Path) -> Path:
    """The sharded checkpoint cast to bfloat16, shard by shard, plus an MTP file named in the index."""
    shutil.copytree(original, to)
    for file in to.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    gen = torch.Generator().manual_seed(0)
    mtp = {"mtp.fc.weight": torch.randn(64, 128, generator=gen), "mtp.norm.weight": torch.randn(64, generator=gen)}
    save_file({k: v.to(torch.bfloat16) for k, v in mtp.items()}, to / "mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((to / INDEX).read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (to / INDEX).write_text(json.dumps(index, indent=2))
    return to


ROUND_TRIPS = {
    "per_expert": "qwen3_5_moe_per_expert",
    "fused": "qwen3_5_moe_fused",
    "qwen3_next_fused_qkvz": "qwen3_next",  # transformers' Qwen3-Next saves in_proj_qkvz / in_proj_ba as such
    "vl_moe_transposed": "qwen3_vl_moe",
    "bfloat16_sharded_vl_mtp": "qwen3_5_moe_vl",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", sorted(ROUND_TRIPS))
def test_round_trip_is_bit_identical(built_models, tmp_path, variant):
    built = built_models(ROUND_TRIPS[variant])
    src, converted = built.hf_dir, built.converted_dir
    if variant == "vl_moe_transposed":
        src = tmp_path / "legacy"
        shutil.copytree(built.hf_dir, src)
        to_legacy_layout(src)
    elif variant == "bfloat16_sharded_vl_mtp":
        src = bfloat16_with_mtp(built.hf_dir, tmp_path / "bf16")
    if src != built.hf_dir:
        converted = tmp_path / "converted"
        convert(src, converted, log=lambda _: None)
    keys = {k for tensors in raw_tensors(src).values() for k in tensors}
    marker = {"per_expert": "model.layers.0.mlp.experts.3.down_proj.weight",
              "fused": "model.layers.0.mlp.experts.gate_up_proj",
              "qwen3_next_fused_qkvz": "model.layers.0.linear_attn.in_proj_qkvz.weight",
              "vl_moe_transposed": "model.language_model.layers.0.mlp.experts.gate_up_proj",
              "bfloat16_sharded_vl_mtp": "mtp.norm.weight"}[variant]  # fmt: skip
    assert marker in keys  # the source really has the layout under test
    export(converted, tmp_path / "exported", log=lambda _: None)
    assert_same_files(src, tmp_path / "exported")


OFFICIAL = {
    # name: (a key and shape of the official layout, the class transformers loads it with)
    "qwen3_5_moe_per_expert": (("model.layers.1.mlp.experts.gate_up_proj", (4, 64, 64)), "AutoModelForCausalLM"),
    "qwen3_next": (("model.layers.0.mlp.experts.3.up_proj.weight", (32, 64)), "AutoModelForCausalLM"),
    "qwen3_vl_moe": (("model.language_model.layers.2.mlp.experts.gate_up_proj", (4, 64, 48)), None),
    "qwen3_5_moe_vl": (("model.language_model.layers.0.mlp.experts.down_proj", (4, 64, 32)), None),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_layout_loads_in_transformers(built_models, tmp_path, name):
    (key, shape), auto = OFFICIAL[name]
    built = built_models(name)
    dst = tmp_path / "official"
    if name == "qwen3_5_moe_per_expert":  # a model directory with no source record: official by default
        src = tmp_path / "no_record"
        shutil.copytree(built.converted_dir, src)
        (src / "qwen_jax.json").write_text(json.dumps({"format": "qwen-jax", "version": 1}))
        messages: list[str] = []
        export(src, dst, log=messages.append)
        assert any("official layout" in m for m in messages), messages
    elif name == "qwen3_next":  # through the command line, in shards of at most 100 kB
        result = run_cli(built.converted_dir, dst, "--layout", "official", "--max-shard-size", "100KB")
        assert result.returncode == 0, result.stderr
        assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1 and (dst / INDEX).exists()
        sizes = [f.stat().st_size for f in dst.glob("*.safetensors")]
        assert max(sizes) <= 100_000 + 10_000, sizes  # the limit counts tensor bytes; the header adds a little
    else:
        export(built.converted_dir, dst, layout="official", log=lambda _: None)
    assert {k: v[1] for tensors in raw_tensors(dst).values() for k, v in tensors.items()}[key] == shape

    cls = getattr(transformers, auto) if auto else type(built.reference)
    loaded, info = cls.from_pretrained(dst, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    want, got = built.reference.state_dict(), loaded.eval().state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k  # the very weights of the source model
    ids = torch.from_numpy(np.random.default_rng(0).integers(1, VOCAB - 10, size=(2, 40)))
    with torch.no_grad():
        ref, out = built.reference(input_ids=ids).logits, loaded(input_ids=ids).logits
    # Identical float32 weights and the same code: only op-order rounding could differ (none is expected).
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# --- bad input --------------------------------------------------------------------------------------------------


def assert_refused(result: subprocess.CompletedProcess, dst: Path, fragment: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert not list(dst.parent.glob(f".{dst.name}.partial-*"))


def test_source_that_is_not_a_model_directory(built_models, tmp_path):
    dst = tmp_path / "out"
    assert_refused(run_cli(built_models("qwen3_next").hf_dir, dst), dst, "not a qwen-jax model directory")
    assert not dst.exists()


def test_existing_destination_is_refused_and_untouched(built_models, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("do not touch")
    assert_refused(run_cli(built_models("qwen3_next").converted_dir, dst), dst, "already exists")
    assert [p.name for p in dst.iterdir()] == ["mine.txt"] and (dst / "mine.txt").read_text() == "do not touch"


def test_failure_while_writing_leaves_nothing(built_models, tmp_path):
    """A source record that disagrees with the stored tensor only shows when the last group is written, after the
    earlier groups are: the partial output must still vanish."""
    src = tmp_path / "src"
    shutil.copytree(built_models("qwen3_next").converted_dir, src)
    meta = json.loads((src / "qwen_jax.json").read_text())
    record = next(r for r in meta["tensors"] if r["sources"][0]["key"] == "lm_head.weight")
    record["sources"][0]["shape"] = [VOCAB + 1, 64]
    (src / "qwen_jax.json").write_text(json.dumps(meta))
    dst = tmp_path / "out"
    assert_refused(run_cli(src, dst), dst, "lm_head.weight")
    assert not dst.exists()


@pytest.mark.timeout(600)
def test_fine_tuned_demo_model_exports_and_loads_in_transformers(tmp_path):
    """Fine-tune the embedded demo model (a model directory with no source record) for two steps, export it
    (official layout), load it in transformers: the same logits as qwen-jax (issue-2 tolerance: 1e-4 of the
    largest logit)."""
    import qwen_jax
    from qwen_jax.sample import DEMO_MODEL
    from qwen_jax.train import make_recipe, train

    chats = tmp_path / "chats.jsonl"
    messages = [{"role": "user", "content": "Who wrote Emma?"}, {"role": "assistant", "content": "Jane Austen."}]
    chats.write_text(json.dumps({"messages": messages}) + "\n")
    recipe = make_recipe({"init": str(DEMO_MODEL), "data": [str(chats)], "held_out_fraction": 0.0, "seq_len": 32,
                          "batch_size": 2, "steps": 2, "warmup_steps": 0, "checkpoint_every": 2,
                          "save_dtype": "float32", "run_dir": str(tmp_path / "run"),
                          "output": str(tmp_path / "tuned")})  # fmt: skip
    tuned = train(recipe, progress=False, log=lambda _: None).output
    dst = tmp_path / "hf"
    result = run_cli(tuned, dst)
    assert result.returncode == 0, result.stderr
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32,
                                                                     output_loading_info=True)  # fmt: skip
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids = np.random.default_rng(0).integers(1, 4000, size=(2, 70))
    with torch.no_grad():
        reference = loaded.eval()(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(qwen_jax.load(tuned)(ids))
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
    # And the weights moved: this is the fine-tuned model, not the demo.
    demo = np.asarray(qwen_jax.load(DEMO_MODEL, dtype=np.float32)(ids))
    assert np.abs(ours - demo).max() > 1e-3
