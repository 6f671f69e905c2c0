"""Train the demo model's byte-level BPE tokenizer on a text corpus and write it as a model directory's tokenizer.

    python tools/build_tokenizer.py OUT_DIR [--corpus data/corpus] [--vocab-size 4096]

OUT_DIR gets `tokenizer.json` and `tokenizer_config.json` (with the chat template, `data/chat_template.jinja` by
default), the files `qwen_jax.chat.ChatTokenizer` and `transformers.AutoTokenizer` read from a checkpoint. The
vocabulary is `vocab_size` tokens: ids 0-2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (special), the last two
are `<think>`, `</think>` (added, not special, so they survive `skip_special_tokens` as in Qwen's tokenizers), and
the rest are the 256 byte tokens and the learned merges. Text is split as Qwen's tokenizers split it, with no
normalizer, so `decode(encode(text)) == text` for every string. The result depends only on the corpus files (read
in sorted path order) and the arguments.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
# Qwen's pre-tokenization: contractions, words with at most one leading non-letter, single digits, punctuation runs
# (with the newlines after them), newline runs, and whitespace (a run's last space goes with the next word).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def corpus_files(corpus: str | Path) -> list[Path]:
    """The `.txt` files of a corpus directory (recursively) or the file itself, in sorted order."""
    from qwen_jax.errors import InputError

    corpus = Path(corpus)
    files = sorted(corpus.rglob("*.txt")) if corpus.is_dir() else [corpus]
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"{corpus}: no .txt files")
    return files


def train_tokenizer(files: list[Path], vocab_size: int = 4096):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab_size` tokens trained on `files`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from qwen_jax.errors import InputError

    minimum = 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    if vocab_size <= minimum:
        raise InputError(f"--vocab-size must be more than {minimum} (the bytes and the special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    texts = (f.read_text(encoding="utf-8") for f in files)  # whole documents, so merges can span line ends
    tokenizer.train_from_iterator(texts, trainer, length=len(files))
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    if tokenizer.get_vocab_size() != vocab_size:
        raise InputError(f"the corpus is too small for {vocab_size} tokens ({tokenizer.get_vocab_size()} learned)")
    return tokenizer


def tokenizer_config(chat_template: str) -> dict:
    """`tokenizer_config.json`: the chat model's special tokens (its turns end with `<|im_end|>`) and template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "chat_template": chat_template,
    }


def build_tokenizer(
    out: str | Path,
    corpus: str | Path = ROOT / "data" / "corpus",
    vocab_size: int = 4096,
    chat_template: str | Path = ROOT / "data" / "chat_template.jinja",
) -> None:
    """Train on `corpus` and write `tokenizer.json` + `tokenizer_config.json` into `out` (created, or an existing
    directory whose two files are replaced); each file appears whole (written aside, then renamed)."""
    from qwen_jax.errors import InputError

    template_file = Path(chat_template)
    if not template_file.is_file():
        raise InputError(f"{template_file}: no such chat template")
    tokenizer = train_tokenizer(corpus_files(corpus), vocab_size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    config = json.dumps(tokenizer_config(template_file.read_text()), indent=2, ensure_ascii=False) + "\n"
    for name, text in (("tokenizer.json", tokenizer.to_str(pretty=True)), ("tokenizer_config.json", config)):
        with tempfile.NamedTemporaryFile("w", dir=out, prefix=f".{name}.", delete=False, encoding="utf-8") as f:
            f.write(text)
        os.chmod(f.name, 0o644)
        Path(f.name).replace(out / name)


def main(argv: list[str] | None = None) -> int:
    from qwen_jax.errors import InputError, OneLineArgumentParser

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write tokenizer.json and tokenizer_config.json into")
    parser.add_argument("--corpus", default=str(ROOT / "data" / "corpus"), help="a .txt file or a directory of them")
    parser.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary size (default 4096)")
    parser.add_argument("--chat-template", default=str(ROOT / "data" / "chat_template.jinja"), help="a Jinja file")
    args = parser.parse_args(argv)
    try:
        build_tokenizer(args.out, args.corpus, args.vocab_size, args.chat_template)
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json ({args.vocab_size} tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
