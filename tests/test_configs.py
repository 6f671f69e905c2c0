"""The published-model configs in `configs/`: one Hugging Face style `config.json` per released checkpoint.

For every file (names starting with "tiny" or "demo" are skipped):
  * `qwen_jax.config.load_config` parses it;
  * the matching `transformers` config class accepts it (keys starting with "_" dropped) and reads the same
    architecture out of it as our parser does;
  * the parameter count of the shapes our config implies (`param_shapes(cfg.text)` plus
    `vision_param_shapes(cfg.vision)`, via `jax.eval_shape`, so nothing is allocated) is within +-15% of the size
    in the model's name, and for MoE models the parameters active per token are within +-25% of its "A..B" figure.

Why +-15% on the total: the name is a rounded marketing size. Our tree counts the input embedding and (when
untied) the LM head, which are large for the small models (a 248,320-token vocabulary is 0.25B of the 0.8B
model), counts the vision tower (0.1-0.6B) and leaves out the checkpoints' MTP head (0.02-1.7B) -- so the
small dense models land up to ~+14% above their names (Qwen3.5-4B: 4.54B) and the big ones within 1%.

Why +-25% on the active count, and what is counted: "A3B"-style figures are rounded too (Qwen3-30B-A3B's
technical report gives 3.3B activated). We count the parameters a *text* token runs through: every text weight
except the routed experts, plus `num_experts_per_tok / num_experts` of the routed experts, **minus the input
embedding table** (a row lookup, not compute) and **without the vision tower** (it runs once per image, not per
token). Counting those two as well puts the three "A3B" models at about +30% (Qwen3-Next-80B-A3B: 3.88B), which is a
counting-convention gap, not a config error; with this convention they are within +19%.

Where a published checkpoint's exact tensor total is known (model-inspector reports of the original safetensors,
cited in the files' `_source`), the vision-language models with no extra heads must match it exactly.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import pytest
import transformers

from qwen_jax.config import load_config
from qwen_jax.model import param_shapes
from qwen_jax.vision import vision_param_shapes

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(p for p in CONFIG_DIR.glob("*.json") if not p.name.startswith(("tiny", "demo")))
IDS = [p.stem for p in FILES]

# One file per published model of the five families.
PUBLISHED = {
    "qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b", "qwen3.5-27b",
    "qwen3.5-35b-a3b", "qwen3.5-122b-a10b", "qwen3.5-397b-a17b",
    "qwen3-next-80b-a3b",
    "qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b", "qwen3-vl-30b-a3b", "qwen3-vl-235b-a22b",
}  # fmt: skip
MODEL_TYPES = {"qwen3_5", "qwen3_5_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe"}

TOTAL_TOLERANCE = 0.15
ACTIVE_TOLERANCE = 0.25

# Total parameters of the original safetensors (vision tower included; these checkpoints carry no MTP head),
# from the tensor lists of the model-inspector reports cited in the files' `_source`.
EXACT_TOTALS = {
    "qwen3-vl-8b": 8_767_123_696,
    "qwen3-vl-30b-a3b": 31_070_754_032,
    "qwen3-vl-235b-a22b": 235_670_022_896,
}

_NAME = re.compile(r"-(\d+(?:\.\d+)?)b(?:-a(\d+(?:\.\d+)?)b)?$")


def _published_sizes(name: str) -> tuple[float, float | None]:
    """(total, active or None) in parameters, from a name like `qwen3.5-397b-a17b`."""
    m = _NAME.search(name)
    assert m, f"{name}: no size in the file name"
    return float(m.group(1)) * 1e9, (float(m.group(2)) * 1e9 if m.group(2) else None)


def _raw(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@functools.cache
def _counts(path: str) -> dict[str, int]:
    """Parameter counts of the shapes our parsed config implies."""
    cfg = load_config(path)
    text = routed = 0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg.text))[0]:
        n = math.prod(leaf.shape)
        text += n
        if any(getattr(k, "key", None) == "experts" for k in key_path):  # routed experts (not shared_expert)
            routed += n
    vision = 0
    if cfg.vision is not None:
        vision = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(vision_param_shapes(cfg.vision)))
    t = cfg.text
    active = text - routed - t.vocab_size * t.hidden_size
    if routed:
        active += routed * t.num_experts_per_tok // t.num_experts
    return {"text": text, "vision": vision, "total": text + vision, "routed": routed, "active": active}


def test_every_published_model_has_a_file():
    missing = PUBLISHED - set(IDS)
    assert not missing, f"configs/ lacks {sorted(missing)}"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_provenance_keys(path: Path):
    raw = _raw(path)
    assert isinstance(raw.get("_source"), str) and "huggingface.co/Qwen/" in raw["_source"]
    unconfirmed = raw.get("_unconfirmed")
    assert isinstance(unconfirmed, list)
    for dotted in unconfirmed:  # every listed field exists in the file
        node: Any = raw
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"_unconfirmed names a missing field {dotted!r}"
            node = node[part]


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_parses(path: Path):
    cfg = load_config(path)
    assert cfg.model_type in MODEL_TYPES
    composite = cfg.model_type != "qwen3_next"
    assert (cfg.vision is not None) == composite
    if composite:
        raw = _raw(path)
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            assert getattr(cfg, key) == raw[key]
        assert cfg.vision.out_hidden_size == cfg.text.hidden_size


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_transformers_accepts(path: Path):
    values = {k: v for k, v in _raw(path).items() if not k.startswith("_")}
    model_type = values.pop("model_type")
    hf = transformers.AutoConfig.for_model(model_type, **values)
    assert hf.model_type == model_type
    ours = load_config(path)
    hf_text = getattr(hf, "text_config", hf)
    t = ours.text
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "max_position_embeddings"):  # fmt: skip
        assert getattr(hf_text, name) == getattr(t, name), name
    assert float(hf_text.rope_parameters["rope_theta"]) == t.rope.theta
    assert bool(hf.tie_word_embeddings) == t.tie_word_embeddings
    if t.num_experts:
        assert hf_text.num_experts == t.num_experts
        assert hf_text.num_experts_per_tok == t.num_experts_per_tok
        assert hf_text.moe_intermediate_size == t.moe_intermediate_size
    elif t.intermediate_size:
        assert hf_text.intermediate_size == t.intermediate_size
    if ours.vision is not None:
        v, hv = ours.vision, hf.vision_config
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
            assert getattr(hv, name) == getattr(v, name), name
        assert tuple(getattr(hv, "deepstack_visual_indexes", ()) or ()) == v.deepstack_visual_indexes
        assert hf.image_token_id == ours.image_token_id and hf.video_token_id == ours.video_token_id


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_total_parameters_match_the_name(path: Path):
    total, _ = _published_sizes(path.stem)
    counted = _counts(str(path))["total"]
    assert abs(counted / total - 1) <= TOTAL_TOLERANCE, f"{path.stem}: {counted / 1e9:.3f}B vs {total / 1e9:g}B"


@pytest.mark.parametrize("path", [p for p in FILES if _published_sizes(p.stem)[1]], ids=lambda p: p.stem)
def test_active_parameters_match_the_name(path: Path):
    _, active = _published_sizes(path.stem)
    counts = _counts(str(path))
    assert counts["routed"] > 0, f"{path.stem} is named as MoE but has no routed experts"
    counted = counts["active"]
    assert abs(counted / active - 1) <= ACTIVE_TOLERANCE, f"{path.stem}: {counted / 1e9:.3f}B vs {active / 1e9:g}B"


@pytest.mark.parametrize("name", sorted(EXACT_TOTALS))
def test_exact_totals_of_published_checkpoints(name: str):
    assert _counts(str(CONFIG_DIR / f"{name}.json"))["total"] == EXACT_TOTALS[name]
