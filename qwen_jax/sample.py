"""Generate text from a converted checkpoint.

    python -m qwen_jax.sample --ckpt DIR --prompt "Why is the sky blue?"
    python -m qwen_jax.sample --ckpt DIR --interactive          # multi-turn chat on stdin, ends at end of input

Streams the reply as it is produced, thinking apart from the answer; `--json` prints tokens, thinking, answer and
timings instead. Arguments, the checkpoint directory and the prompt are validated before jax is imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qwen_jax.chat import THINK_CLOSE, THINK_OPEN, ChatTokenizer, split_thinking
from qwen_jax.errors import InputError, OneLineArgumentParser


def _bounded(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{value} is outside {bounds}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="python -m qwen_jax.sample", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ckpt", type=Path, help="converted model directory (default: the embedded demo model, which continues text)"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    source.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="an image to ask about (repeatable; vision-language checkpoints)",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="a video file, or a folder of frames at 2 fps (repeatable)",
    )
    p.add_argument("--max-new-tokens", type=_bounded(int, 1), default=None)
    p.add_argument("--temperature", type=_bounded(float, 0.0), default=None, help="0 = greedy")
    p.add_argument("--top-k", type=_bounded(int, 0), default=None)
    p.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True), default=None)
    p.add_argument("--min-p", type=_bounded(float, 0.0, 1.0), default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--repetition-penalty", type=_bounded(float, 0.0, low_open=True), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument(
        "--thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="enable or disable the model's thinking (default: the template's default)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per reply instead of streaming text")
    p.add_argument("--mesh", default=None, help='shard the model over a device mesh, e.g. "data=2,expert=4"')
    return p


# The demo model (configs/demo-train.json): a small Qwen3.5-MoE trained on the public-domain books of data/corpus.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


def _check_checkpoint(path: Path) -> Path:
    if not path.is_dir():
        raise InputError(f"--ckpt {path}: no such directory")
    from qwen_jax.checkpoint.format import read_metadata

    read_metadata(path)
    return path


class Session:
    """A loaded model, its tokenizer, and the conversation so far."""

    def __init__(self, args: argparse.Namespace, tokenizer: ChatTokenizer, config: Any):
        self.args, self.tokenizer, self.config = args, tokenizer, config
        self.context = config.text.max_position_embeddings
        self.messages: list[dict] = []
        self.model: Any = None
        self.vision, self.timestamps = self._vision_inputs()

    def _vision_inputs(self) -> tuple[dict, list]:
        """Pixel values and grids of --image / --video (they belong to the first turn and stay in the history)."""
        a = self.args
        if not a.image and not a.video:
            return {}, []
        if self.config.vision is None:
            raise InputError(f"--image / --video need a vision-language checkpoint; this is {self.config.model_type}")
        from qwen_jax.processing import ProcessorConfig, load_video, preprocess_images, preprocess_video

        settings = ProcessorConfig.from_dir(a.ckpt)
        vision: dict = {}
        if a.image:
            vision["pixel_values"], vision["image_grid_thw"] = preprocess_images(a.image, **settings.image.kwargs())
        stamps = []
        if a.video:
            clips = [preprocess_video(*load_video(path), **settings.video.kwargs()) for path in a.video]
            vision["pixel_values_videos"] = np.concatenate([c[0] for c in clips])
            vision["video_grid_thw"] = np.concatenate([c[1] for c in clips])
            stamps = [c[2] for c in clips]
        return vision, stamps

    def _user_message(self, text: str) -> dict:
        if self.messages or not self.vision:  # media go with the first turn
            return {"role": "user", "content": text}
        items = [{"type": "image"}] * len(self.args.image) + [{"type": "video"}] * len(self.args.video)
        return {"role": "user", "content": [*items, {"type": "text", "text": text}]}

    def _with_media(self, rendered: str) -> str:
        """Expand the image / video placeholders to one per vision token, as the reference processor does."""
        if not self.vision:
            return rendered
        from qwen_jax.processing import VisionTokens, expand_vision_placeholders

        if self.args.no_chat:
            tokens = VisionTokens()
            rendered = (
                "".join(
                    [tokens.vision_start + tokens.image + tokens.vision_end] * len(self.args.image)
                    + [tokens.vision_start + tokens.video + tokens.vision_end] * len(self.args.video)
                )
                + rendered
            )
        return expand_vision_placeholders(
            rendered, self.vision.get("image_grid_thw"), self.vision.get("video_grid_thw"), self.timestamps,
            self.config.vision.spatial_merge_size,
        )  # fmt: skip

    def prompt_ids(self, text: str) -> tuple[list[int], bool]:
        """Token ids of the next prompt, and whether the rendered prompt leaves a `<think>` block open."""
        if not text.strip():
            raise InputError("empty prompt")
        if self.args.no_chat:
            rendered = text
        else:
            rendered = self.tokenizer.render(
                [*self.messages, self._user_message(text)], enable_thinking=self.args.thinking
            )
        ids = self.tokenizer.encode(self._with_media(rendered))
        if len(ids) >= self.context:
            raise InputError(f"prompt of {len(ids)} tokens does not fit the model's context of {self.context}")
        opened = rendered.rstrip().endswith(THINK_OPEN) and THINK_CLOSE not in rendered[rendered.rfind(THINK_OPEN) :]
        return ids, opened

    def reply(self, text: str, write: Callable[[str], None]) -> dict:
        ids, opened = self.prompt_ids(text)
        if self.model is None:
            import qwen_jax
            from qwen_jax import runtime

            runtime.setup()
            self.model = qwen_jax.load(self.args.ckpt, mesh=self.args.mesh)
        from qwen_jax.generation import stream

        from qwen_jax.generation import read_generation_config

        a = self.args
        defaults = read_generation_config(self.model)
        max_new = a.max_new_tokens
        if max_new is None:
            max_new = min(int(defaults.get("max_new_tokens", 1024)), self.context - len(ids))
        stop = [
            t
            for t in (self.tokenizer.token_id("<|im_end|>"), self.tokenizer.token_id("<|endoftext|>"))
            if t is not None
        ]
        kwargs = dict(max_new_tokens=min(max_new, self.context - len(ids)), temperature=a.temperature, top_k=a.top_k,
                      top_p=a.top_p, min_p=a.min_p, presence_penalty=a.presence_penalty,
                      repetition_penalty=a.repetition_penalty, seed=a.seed)  # fmt: skip
        if stop and not a.no_chat:
            kwargs["eos_token_id"] = stop
        eos = kwargs.get("eos_token_id", defaults.get("eos_token_id", ()))
        stop_tokens = {eos} if isinstance(eos, int) else set(eos or ())
        timings: dict = {}
        tokens: list[int] = []
        shown = 0
        in_thinking = opened
        if in_thinking and not a.json:
            write("[thinking]\n")
        for token in stream(self.model, [ids], timings=timings, **kwargs, **self.vision):
            token = int(token[0])
            if token in stop_tokens:
                break
            tokens.append(token)
            text_so_far = self.tokenizer.decode(tokens)
            if a.json or text_so_far.endswith("\ufffd"):  # wait for a whole character
                continue
            new = text_so_far[shown:]
            shown = len(text_so_far)
            if in_thinking and THINK_CLOSE in text_so_far:
                in_thinking = False
                before, _, after = new.partition(THINK_CLOSE)
                write(f"{before}\n[answer]\n{after.lstrip()}")
            else:
                write(new)
        text_out = self.tokenizer.decode(tokens)
        thinking, answer = split_thinking(text_out, opened)
        if not a.json:
            write("\n")
        self.messages += [self._user_message(text),
                          {"role": "assistant", "content": answer, "reasoning_content": thinking or None}]  # fmt: skip
        return {"tokens": tokens, "text": text_out, "thinking": thinking, "answer": answer, "timings": timings}


def run(args: argparse.Namespace) -> int:
    if args.ckpt is None:  # the demo model was trained on plain text, not chats: it continues the prompt
        args.ckpt, args.no_chat = DEMO_MODEL, True
    ckpt = _check_checkpoint(args.ckpt)
    args.ckpt = ckpt
    if args.mesh is not None:
        from qwen_jax.mesh_spec import parse_mesh_spec

        parse_mesh_spec(args.mesh)  # a bad spec fails here, before jax starts
    from qwen_jax.config import load_config

    tokenizer = ChatTokenizer(ckpt)
    session = Session(args, tokenizer, load_config(ckpt))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.interactive:
        for line in sys.stdin:
            if not line.strip():
                continue
            if not args.json:
                write("> ")
            result = session.reply(line.rstrip("\n"), write)
            if args.json:
                print(json.dumps(result))
        return 0
    text = args.prompt if args.prompt is not None else _read_prompt_file(args.prompt_file)
    session.prompt_ids(text)  # validate before loading the model
    result = session.reply(text, write)
    if args.json:
        print(json.dumps(result))
    return 0


def _read_prompt_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise InputError(f"--prompt-file {path}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
