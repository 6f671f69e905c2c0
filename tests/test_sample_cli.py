"""`python -m qwen_jax.sample` end to end on a tiny converted model with a small word-level tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_vl_tokenizer
from test_chat import write_chat_files

import qwen_jax
from qwen_jax.chat import ChatTokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chat_model_dir(built_models, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "model"
    shutil.copytree(built_models("qwen3_5_moe_per_expert").converted_dir, directory)
    write_chat_files(directory)
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return directory


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_jax.sample", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_json_reply_equals_generate(chat_model_dir):
    result = run_cli("--ckpt", str(chat_model_dir), "--prompt", "hello world", "--max-new-tokens", "8",
                     "--no-thinking", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    tokenizer = ChatTokenizer(chat_model_dir)
    prompt = tokenizer.render([{"role": "user", "content": "hello world"}], enable_thinking=False)
    stops = [tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")]
    model = qwen_jax.load(chat_model_dir)
    expected = qwen_jax.generate(model, [tokenizer.encode(prompt)], max_new_tokens=8, eos_token_id=stops)[0]
    end = next((i for i, t in enumerate(expected) if t in stops), len(expected))
    assert reply["tokens"] == expected[:end].tolist()
    assert reply["text"] == tokenizer.decode(reply["tokens"])
    assert reply["thinking"] == "" and reply["answer"] == reply["text"].strip()
    timings = reply["timings"]
    assert timings["compile_s"] > 0 and timings["prefill_tokens_per_s"] > 0


def test_streams_thinking_apart(chat_model_dir):
    result = run_cli("--ckpt", str(chat_model_dir), "--prompt", "hello", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[thinking]\n")  # the generation prompt opened <think>
    result = run_cli("--ckpt", str(chat_model_dir), "--prompt", "hello", "--max-new-tokens", "5", "--no-thinking")
    assert result.returncode == 0 and "[thinking]" not in result.stdout


def test_interactive_multi_turn_ends_at_end_of_input(chat_model_dir):
    args = ["--interactive", "--json", "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    result = run_cli("--ckpt", str(chat_model_dir), *args, stdin="hello\n\nweather in Paris\n")
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(replies) == 2 and all(1 <= len(r["tokens"]) <= 4 for r in replies)


def bad_invocation(*args: str) -> tuple[int, str, bool]:
    """Run main() in a fresh interpreter; returns (exit code, stderr, whether jax got imported)."""
    code = ("import sys; from qwen_jax.sample import main; rc = main(sys.argv[1:]); "
            "print('jax' in sys.modules); sys.exit(rc)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    return result.returncode, result.stderr, result.stdout.strip() == "True"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ckpt", "/nonexistent/model", "--prompt", "hi"], "no such directory"),
        (["--ckpt", str(REPO), "--prompt", "hi"], "not a qwen-jax model directory"),
        (["--ckpt", "CKPT", "--prompt", "   "], "empty prompt"),
        (["--ckpt", "CKPT", "--prompt-file", "LONG"], "does not fit the model's context"),
        (["--ckpt", "CKPT", "--prompt", "hi", "--top-p", "2"], "--top-p"),
        (["--ckpt", "CKPT"], "one of the arguments"),
        (["--ckpt", "CKPT", "--prompt", "hi", "--mesh", "model=2"], "mesh axis 'model' unknown"),
    ],
)
def test_bad_input_fails_with_one_line_before_importing_jax(chat_model_dir, tmp_path, args, message):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("hello " * 5000)  # the tiny model's context is 4096 tokens
    args = [{"CKPT": str(chat_model_dir), "LONG": str(long_prompt)}.get(a, a) for a in args]
    code, stderr, imported_jax = bad_invocation(*args)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert not imported_jax


@pytest.fixture(scope="module")
def vl_chat_model_dir(built_models, tmp_path_factory) -> Path:
    """The tiny Qwen3.5 vision-language model with a tokenizer whose vision tokens have the config's ids."""
    directory = tmp_path_factory.mktemp("vlcli") / "model"
    shutil.copytree(built_models("qwen3_5_vl").converted_dir, directory)
    write_vl_tokenizer(directory)
    return directory


def test_image_prompt_equals_generate_with_processed_image(vl_chat_model_dir, tmp_path):
    from PIL import Image

    from qwen_jax.processing import expand_vision_placeholders, preprocess_images

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    result = run_cli("--ckpt", str(vl_chat_model_dir), "--prompt", "what is in the picture", "--image", str(image),
                     "--max-new-tokens", "5", "--no-thinking", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    tokenizer = ChatTokenizer(vl_chat_model_dir)
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture"}]}
    pixel_values, grid = preprocess_images([image])
    prompt = expand_vision_placeholders(tokenizer.render([message], enable_thinking=False), grid)
    ids = tokenizer.encode(prompt)
    assert ids.count(290) == int(grid.prod() // 4)  # one image token per merged patch
    model = qwen_jax.load(vl_chat_model_dir)
    stop = [tokenizer.token_id("<|im_end|>")]
    expected = qwen_jax.generate(model, [ids], max_new_tokens=5, eos_token_id=stop, pixel_values=pixel_values,
                                 image_grid_thw=grid)[0]  # fmt: skip
    end = next((i for i, t in enumerate(expected) if t in stop), len(expected))
    assert reply["tokens"] == expected[:end].tolist()


def test_bad_media_fail_before_importing_jax(vl_chat_model_dir, chat_model_dir, tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG not really")
    empty = tmp_path / "frames"
    empty.mkdir()
    for args, message in [
        (["--ckpt", str(vl_chat_model_dir), "--prompt", "hi", "--image", str(corrupt)], "broken.png"),
        (["--ckpt", str(vl_chat_model_dir), "--prompt", "hi", "--video", str(empty)], "frames"),
        (["--ckpt", str(chat_model_dir), "--prompt", "hi", "--image", str(corrupt)], "vision-language checkpoint"),
    ]:
        code, stderr, imported_jax = bad_invocation(*args)
        lines = stderr.strip().splitlines()
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
        assert not imported_jax


def test_readme_first_command_samples_the_demo_model():
    """`python -m qwen_jax.sample --prompt ...` with no --ckpt continues the prompt with the embedded demo model."""
    out = subprocess.run([sys.executable, "-m", "qwen_jax.sample", "--prompt", "It was a dark night, and",
                          "--max-new-tokens", "12", "--json"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    reply = json.loads(out.stdout)
    assert 1 <= len(reply["tokens"]) <= 12 and reply["text"].strip()


def test_video_prompt_from_a_folder_of_frames(vl_chat_model_dir, tmp_path):
    """The README's `--video` command, with a folder of frames (2 fps) instead of a video file."""
    from PIL import Image

    frames = tmp_path / "clip"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(frames / f"{i:03d}.png")
    result = run_cli("--ckpt", str(vl_chat_model_dir), "--prompt", "what is in the picture", "--video", str(frames),
                     "--max-new-tokens", "4", "--no-thinking", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert 1 <= len(json.loads(result.stdout)["tokens"]) <= 4
