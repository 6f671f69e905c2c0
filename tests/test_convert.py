"""The converter (`tools/convert.py`, `qwen_jax.checkpoint.convert`) against the raw checkpoint files and the
reference modules.

Bad input: a non-zero exit, exactly one `error:` line naming the problem, no traceback, nothing at DST and no
temporary `.DST.partial-*` sibling left behind. Good input: the files, dtypes and values the format promises, the MTP
head kept apart, vision tensors of a text-only config set aside, and the Qwen3-Next fused projections split exactly
as the reference splits their outputs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qwen_jax.checkpoint.convert import convert
from qwen_jax.checkpoint.format import restore_params, restore_tree

REPO = Path(__file__).resolve().parent.parent
MOE = "qwen3_5_moe_fused"  # Qwen3.5 MoE with fused expert tensors, a single model.safetensors and no index


def run_cli(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert.py", str(src), str(dst), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def no_partials(dst: Path) -> bool:
    return not list(dst.parent.glob(f".{dst.name}.partial-*"))


def assert_refused(result: subprocess.CompletedProcess, dst: Path, *fragments: str) -> str:
    """The CLI failed with one `error:` line containing every fragment, and left nothing behind."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not dst.exists()
    assert no_partials(dst), list(dst.parent.iterdir())
    return lines[0]


def copy_checkpoint(built_models, name: str, to: Path) -> Path:
    shutil.copytree(built_models(name).hf_dir, to)
    return to


def edit_config(src: Path, **changes) -> dict:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))
    return config


def raw_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes as the safetensors file's own header records them."""
    with safe_open(file, "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)


def leaves(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out.update(leaves(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


# --- bad input --------------------------------------------------------------------------------------------------


def test_missing_source_directory(tmp_path):
    dst = tmp_path / "out"
    assert_refused(run_cli(tmp_path / "nope", dst), dst, str(tmp_path / "nope"), "no such directory")


def test_source_without_safetensors(built_models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(built_models(MOE).hf_dir / "config.json", src / "config.json")
    dst = tmp_path / "out"
    assert_refused(run_cli(src, dst), dst, "no *.safetensors files")


def test_truncated_safetensors(built_models, tmp_path):
    src = copy_checkpoint(built_models, MOE, tmp_path / "src")
    file = src / "model.safetensors"
    size = file.stat().st_size
    with file.open("r+b") as f:
        f.truncate(int(size * 0.6))
    dst = tmp_path / "out"
    assert_refused(run_cli(src, dst), dst, "model.safetensors: truncated")


@pytest.mark.parametrize(
    "field, value, key",
    [
        # q | k | v rows of in_proj_qkv: 2 * hk * dk + hv * dv
        ("linear_value_head_dim", 16, "model.layers.0.linear_attn.in_proj_qkv.weight"),
        # fused experts [E, 2 * moe_intermediate, hidden]
        ("moe_intermediate_size", 16, "model.layers.0.mlp.experts.gate_up_proj"),
    ],
)
def test_shape_disagreeing_with_config(built_models, tmp_path, field, value, key):
    src = copy_checkpoint(built_models, MOE, tmp_path / "src")
    config = edit_config(src, **{field: value})
    actual = raw_shapes(src / "model.safetensors")[key]
    if field == "linear_value_head_dim":
        hk, hv, dk = config["linear_num_key_heads"], config["linear_num_value_heads"], config["linear_key_head_dim"]
        implied = (2 * hk * dk + hv * value, config["hidden_size"])
    else:
        implied = (config["num_experts"], 2 * value, config["hidden_size"])
    assert actual != implied  # the edit really makes them disagree
    dst = tmp_path / "out"
    assert_refused(run_cli(src, dst), dst, key, str(list(actual)), str(list(implied)))


def test_unknown_model_type(built_models, tmp_path):
    src = copy_checkpoint(built_models, MOE, tmp_path / "src")
    edit_config(src, model_type="llama")
    dst = tmp_path / "out"
    line = assert_refused(run_cli(src, dst), dst, "unsupported model_type 'llama'")
    assert "qwen3_5_moe" in line and "qwen3_next" in line  # it lists what is supported


def test_unknown_tensor_key(built_models, tmp_path):
    src = copy_checkpoint(built_models, MOE, tmp_path / "src")
    assert not (src / "model.safetensors.index.json").exists()  # every *.safetensors file is read
    save_file({"model.layers.0.foo.weight": np.ones((2, 3), np.float32)}, src / "extra.safetensors")
    dst = tmp_path / "out"
    assert_refused(run_cli(src, dst), dst, "unknown tensor key", "model.layers.0.foo.weight")


def test_failure_while_writing_leaves_nothing(built_models, tmp_path):
    """An error found only when a tensor is read (after the temporary output exists and earlier groups are written):
    an FP8 weight in layer 2 whose block scales do not fit it. The partial output must still vanish."""
    src = copy_checkpoint(built_models, MOE, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    key = "model.layers.2.mlp.gate.weight"  # [4, 64]: one 128 x 128 block, so the scales should be [1, 1]
    tensors[key] = tensors[key].astype(ml_dtypes.float8_e4m3fn)
    tensors[key + "_scale_inv"] = np.ones((2, 2), np.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    dst = tmp_path / "out"
    assert_refused(run_cli(src, dst), dst, "block scales")


def test_existing_destination_is_refused_and_untouched(built_models, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("do not touch")
    result = run_cli(built_models(MOE).hf_dir, dst)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "already exists" in lines[0], result.stderr
    assert [p.name for p in dst.iterdir()] == ["mine.txt"] and (dst / "mine.txt").read_text() == "do not touch"
    assert no_partials(dst)


# --- good input -------------------------------------------------------------------------------------------------


def test_successful_cli_run(built_models, tmp_path):
    src = built_models(MOE).hf_dir
    dst = tmp_path / "out"
    result = run_cli(src, dst)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "qwen_jax.json", "params"} <= names
    # Every non-weight file is copied unchanged; no weight file is.
    others = [p for p in src.iterdir() if p.suffix != ".safetensors"]
    assert {p.name for p in others} >= {"config.json", "generation_config.json"}
    for p in others:
        assert (dst / p.name).read_bytes() == p.read_bytes(), p.name
    assert not list(dst.glob("*.safetensors"))
    assert names == {p.name for p in others} | {"qwen_jax.json", "params"}
    assert no_partials(dst)
    meta = json.loads((dst / "qwen_jax.json").read_text())
    assert meta["format"] == "qwen-jax" and meta["version"] == 1
    # The metadata accounts for every tensor of the source file, each once.
    sources = [s["key"] for record in meta["tensors"] for s in record["sources"]]
    assert sorted(sources) == sorted(raw_shapes(src / "model.safetensors"))
    # Values: plain copies and transposes of the file's tensors, bit for bit (no --dtype: source dtype kept).
    raw = load_file(src / "model.safetensors")
    params = restore_params(dst / "params")
    assert set(params) == {"embed_tokens", "norm", "lm_head", *(f"layers_{i}" for i in range(4))}
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], raw["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], raw["lm_head.weight"].T)
    np.testing.assert_array_equal(params["layers_3"]["self_attn"]["q_proj"]["kernel"],
                                  raw["model.layers.3.self_attn.q_proj.weight"].T)  # fmt: skip
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["experts"]["gate_up_proj"],
                                  np.swapaxes(raw["model.layers.1.mlp.experts.gate_up_proj"], 1, 2))  # fmt: skip


def is_kept_float32(path: str) -> bool:
    """Written out from the HF names: Gated DeltaNet state parameters and every RMSNorm weight."""
    norms = ("input_layernorm/weight", "post_attention_layernorm/weight", "linear_attn/norm/weight",
             "self_attn/q_norm/weight", "self_attn/k_norm/weight")  # fmt: skip
    return path.endswith(("/A_log", "/dt_bias", *norms)) or path == "norm/weight"


@pytest.mark.parametrize("name", [MOE, "qwen3_next"])
def test_bfloat16_keeps_state_and_norms_float32(built_models, tmp_path, name):
    src = built_models(name).hf_dir
    dst = tmp_path / "out"
    result = run_cli(src, dst, "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    flat = leaves(restore_params(dst / "params"))
    kept = sorted(p for p in flat if is_kept_float32(p))
    # 3 Gated DeltaNet layers (2 layer norms, A_log, dt_bias, gated norm) + 1 attention layer (2 + q/k norms) + norm
    assert len(kept) == 3 * 5 + 1 * 4 + 1, kept
    for path, value in flat.items():
        assert np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16, path
        expected = np.float32 if path in kept else ml_dtypes.bfloat16
        assert value.dtype == expected, (path, value.dtype)
    # Values: float32 leaves are the file's values exactly; bfloat16 ones its values rounded to nearest.
    raw = load_file(src / "model.safetensors")
    for path in kept:
        key = "model." + path.replace("/", ".").replace("layers_", "layers.")
        np.testing.assert_array_equal(flat[path], raw[key], err_msg=path)
    np.testing.assert_array_equal(flat["embed_tokens/embedding"],
                                  raw["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16))  # fmt: skip
    assert json.loads((dst / "qwen_jax.json").read_text())["dtype"] == "bfloat16"


def test_mtp_weights_kept_apart(built_models, tmp_path):
    src = copy_checkpoint(built_models, MOE, tmp_path / "src")
    rng = np.random.default_rng(0)
    mtp = {"mtp.fc.weight": rng.standard_normal((64, 128)).astype(np.float32),
           "mtp.norm.weight": rng.standard_normal(64).astype(np.float32)}  # fmt: skip
    save_file(mtp, src / "mtp.safetensors")
    messages: list[str] = []
    convert(src, tmp_path / "with_mtp", dtype="bfloat16", log=messages.append)
    convert(built_models(MOE).hf_dir, tmp_path / "plain", dtype="bfloat16", log=messages.append)

    tree = restore_tree(tmp_path / "with_mtp" / "mtp")
    assert set(leaves(tree)) == {"mtp/fc/weight", "mtp/norm/weight"}
    norm, fc = np.asarray(tree["mtp"]["norm"]["weight"]), np.asarray(tree["mtp"]["fc"]["weight"])
    assert norm.dtype == np.float32
    np.testing.assert_array_equal(norm, mtp["mtp.norm.weight"])
    assert fc.dtype == ml_dtypes.bfloat16 and fc.shape == (64, 128)
    np.testing.assert_array_equal(fc, mtp["mtp.fc.weight"].astype(ml_dtypes.bfloat16))
    meta = json.loads((tmp_path / "with_mtp" / "qwen_jax.json").read_text())
    assert sorted(meta["mtp"]["keys"]) == sorted(mtp)

    # The main parameters are exactly those of the same checkpoint without the MTP file.
    assert not (tmp_path / "plain" / "mtp").exists()
    with_mtp = leaves(restore_params(tmp_path / "with_mtp" / "params"))
    plain = leaves(restore_params(tmp_path / "plain" / "params"))
    assert set(with_mtp) == set(plain)
    for path, value in plain.items():
        assert with_mtp[path].dtype == value.dtype, path
        np.testing.assert_array_equal(with_mtp[path], value, err_msg=path)


def test_vision_keys(built_models, tmp_path):
    """A VL checkpoint converts its vision tower; under a text-only config its `model.visual.*` tensors are set aside
    with a logged note, and the text model still converts."""
    vl = built_models("qwen3_5_vl").hf_dir
    visual = sorted(k for k in raw_shapes(vl / "model.safetensors") if k.startswith("model.visual."))
    assert visual

    messages: list[str] = []
    convert(vl, tmp_path / "vl", log=messages.append)
    assert not any("set aside" in m for m in messages), messages
    params = restore_params(tmp_path / "vl" / "params")
    raw = load_file(vl / "model.safetensors")
    np.testing.assert_array_equal(params["visual"]["pos_embed"], raw["model.visual.pos_embed.weight"])

    src = copy_checkpoint(built_models, "qwen3_5_vl", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config["text_config"]))  # model_type qwen3_5_text
    messages = []
    convert(src, tmp_path / "text", log=messages.append)
    notes = [m for m in messages if "model.visual" in m]
    assert len(notes) == 1 and f"{len(visual)} vision tensors" in notes[0], messages
    meta = json.loads((tmp_path / "text" / "qwen_jax.json").read_text())
    assert meta["set_aside"] == visual
    text = restore_params(tmp_path / "text" / "params")
    assert "visual" not in text
    np.testing.assert_array_equal(text["embed_tokens"]["embedding"], raw["model.language_model.embed_tokens.weight"])


def test_qwen3_next_fused_projection_split(built_models):
    """x @ (our split kernels) must equal the reference's q | k | v, z, b, a (from `in_proj_qkvz` / `in_proj_ba`
    through `fix_query_key_value_ordering`), for every Gated DeltaNet layer."""
    built = built_models("qwen3_next")
    params = restore_params(built.converted_dir / "params")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 64, generator=gen)
    layers = [i for i, layer in enumerate(built.reference.model.layers) if hasattr(layer, "linear_attn")]
    assert layers == [0, 1, 2]
    for i in layers:
        la = built.reference.model.layers[i].linear_attn
        with torch.no_grad():
            q, k, v, z, b, a = la.fix_query_key_value_ordering(la.in_proj_qkvz(x), la.in_proj_ba(x))
        flat = [t.reshape(1, 5, -1).numpy() for t in (q, k, v, z, b, a)]
        expected = {"in_proj_qkv": np.concatenate(flat[:3], axis=-1), "in_proj_z": flat[3], "in_proj_b": flat[4],
                    "in_proj_a": flat[5]}  # fmt: skip
        ours = params[f"layers_{i}"]["linear_attn"]
        for name, want in expected.items():
            got = x.numpy() @ np.asarray(ours[name]["kernel"])
            # float32 dot products of 64 terms in a different summation order than torch's: ~1e-6 apart.
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"layers_{i}/{name}")


def test_bad_dtype_argument_is_one_line(tmp_path):
    result = run_cli(tmp_path / "src", tmp_path / "out", "--dtype", "float16")
    assert_refused(result, tmp_path / "out", "--dtype", "invalid choice")
