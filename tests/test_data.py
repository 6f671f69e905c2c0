"""The training data pipeline (packing, chat loss masks vs `transformers`, resumable iterators, the held-out split)
and the demo tokenizer (round trips, loading with `qwen_jax.chat`)."""

from __future__ import annotations

import collections
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers

from qwen_jax.chat import ChatTokenizer
from qwen_jax.errors import InputError
from qwen_jax.train import data

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpus"
SPEC = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "tools" / "build_tokenizer.py")
build_tokenizer = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(build_tokenizer)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who wrote Emma?"},
        {"role": "assistant", "content": "<think>\nAusten.\n</think>\n\nJane Austen."},
        {"role": "user", "content": "And Treasure Island?"},
        {"role": "assistant", "content": "Stevenson.", "reasoning_content": "A pirate story."},
    ],
    [  # content starting with newlines: the header's "\n" merges into the first content token
        {"role": "user", "content": "Say it"},
        {"role": "assistant", "content": "\n\n  indented, ending in space "},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"sky": "sunny"}'},
        {"role": "assistant", "content": "Sunny, café weather ☀"},
    ],
]  # fmt: skip


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """Three of the corpus's books."""
    corpus = tmp_path_factory.mktemp("corpus")
    for book in ("alice_in_wonderland", "jekyll_and_hyde", "a_christmas_carol"):
        shutil.copytree(CORPUS / book, corpus / book)
    return corpus


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, small_corpus) -> Path:
    """The demo tokenizer trained on three books (vocabulary 1024), written by the tool."""
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer.build_tokenizer(out, small_corpus, vocab_size=1024)
    return out


@pytest.fixture(scope="module")
def tokenizer(demo_dir) -> ChatTokenizer:
    return ChatTokenizer(demo_dir)


@pytest.mark.timeout(60)
def test_tokenizer_round_trips_and_is_deterministic(demo_dir, small_corpus, tmp_path):
    tok = ChatTokenizer(demo_dir)
    assert tok.tokenizer.get_vocab_size() == 1024
    ids = {t: tok.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")}
    assert ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<think>": 1022, "</think>": 1023}
    for text in [p.read_text()[:3000] for p in sorted(CORPUS.rglob("*.txt"))[::9]] + ["naïve — 日本 🙂\r\n\t x  "]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user<|im_end|><think>") == [1, *tok.encode("user"), 2, 1022]
    # Same corpus, same arguments: byte-identical files.
    build_tokenizer.build_tokenizer(tmp_path, small_corpus, vocab_size=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (demo_dir / name).read_bytes()


@pytest.mark.timeout(60)
def test_tokenizer_chat_template_matches_reference(demo_dir, tokenizer):
    reference = transformers.AutoTokenizer.from_pretrained(demo_dir)
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert tokenizer.render(messages, add_generation_prompt=prompt) == expected


@pytest.mark.timeout(60)
def test_chat_loss_mask_equals_return_assistant_tokens_mask(demo_dir, tokenizer):
    # The demo template marks assistant turns with {% generation %}, so the reference computes the mask itself.
    reference = transformers.AutoTokenizer.from_pretrained(demo_dir)
    for messages in CONVERSATIONS:
        out = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)  # fmt: skip
        ours = data.tokenize_document(tokenizer, {"messages": messages})
        assert ours["tokens"].tolist() == out["input_ids"]
        assert ours["mask"].tolist() == out["assistant_masks"]
        assert 0 < ours["mask"].sum() < len(ours["mask"])


def test_assistant_spans_worked_example():
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\nopen"
    spans = data.assistant_spans(text)
    assert [text[a:b] for a, b in spans] == ["yo<|im_end|>", "open"]
    # Token offsets: a token that straddles a span's edge counts, one that only touches it does not.
    offsets = np.array([[0, 5], [5, 10], [10, 12], [12, 20]])
    assert data.spans_to_token_mask(offsets, [(5, 11)]).tolist() == [0, 1, 1, 0]


def _documents(n: int = 40) -> list[dict]:
    """Text documents of varied lengths (a few tokens to several rows), cut from the corpus."""
    rng = np.random.default_rng(0)
    text = (CORPUS / "alice_in_wonderland" / "01.txt").read_text()
    starts = rng.integers(0, len(text) - 2000, n)
    lengths = rng.choice([3, 40, 150, 400, 1200], n)
    return [{"text": text[s : s + k], "source": f"doc{i}"} for i, (s, k) in enumerate(zip(starts, lengths))]


def _segments(batches: list[dict]) -> list[np.ndarray]:
    """Each segment's tokens; checks segment ids, positions, targets and loss masks along the way."""
    segments = []
    for batch in batches:
        assert set(batch) == set(data.BATCH_KEYS)
        assert all(v.dtype == (np.float32 if k == "loss_mask" else np.int32) for k, v in batch.items())
        for ids, seg, pos, tgt, mask in zip(*(batch[k] for k in data.BATCH_KEYS)):
            real = seg > 0
            assert not real[real.sum() :].any() and (np.diff(seg[real]) >= 0).all()  # segments, then padding
            assert seg[0] == 1 or not real.any()  # (a padding row completes the last batch)
            assert (ids[~real] == 0).all() and (pos[~real] == 0).all() and (mask[~real] == 0).all()
            for s in range(1, seg.max() + 1):
                (where,) = np.nonzero(seg == s)
                assert (np.diff(where) == 1).all() and (pos[where] == np.arange(len(where))).all()
                assert (tgt[where[:-1]] == ids[where[1:]]).all() and tgt[where[-1]] == 0
                assert (mask[where[:-1]] == 1).all() and mask[where[-1]] == 0  # text: every next token is a target
                segments.append(ids[where])
    return segments


@pytest.mark.timeout(60)
def test_packing_keeps_documents_whole(tokenizer):
    docs = _documents()
    T = 64
    batches = list(data.packed_batches(docs, tokenizer, seq_len=T, batch_size=4, seed=3, num_epochs=1))
    assert all(b["input_ids"].shape == (4, T) for b in batches)
    tokens = [tokenizer.encode(d["text"]) + [tokenizer.token_id("<|endoftext|>")] for d in docs]
    expected = collections.Counter(tuple(t[i : i + T]) for t in tokens for i in range(0, len(t), T))
    got = collections.Counter(tuple(s.tolist()) for s in _segments(batches))
    # Every segment is one whole T-piece of one document and every piece appears exactly once, so each document's
    # tokens are its pieces' concatenation: nothing mixed, lost or repeated.
    assert got == expected
    assert max(len(t) for t in tokens) > 2 * T and min(len(t) for t in tokens) < T // 4  # long and short documents


@pytest.mark.timeout(60)
def test_chat_batches_mask_only_assistant_targets(tokenizer):
    docs = [{"messages": m, "images": [], "source": f"c{i}"} for i, m in enumerate(CONVERSATIONS)]
    (batch,) = data.packed_batches(docs, tokenizer, seq_len=512, batch_size=1, shuffle=False, num_epochs=1)
    rows = [data.tokenize_document(tokenizer, d) for d in docs]
    seg = batch["segment_ids"][0]
    for s, row in enumerate(rows, 1):
        (where,) = np.nonzero(seg == s)
        assert batch["input_ids"][0, where].tolist() == row["tokens"].tolist()
        assert batch["loss_mask"][0, where].tolist() == [*row["mask"][1:].tolist(), 0]


@pytest.mark.timeout(60)
def test_iterator_state_round_trip(tokenizer):
    def pipeline():
        return data.packed_batches(_documents(), tokenizer, seq_len=48, batch_size=3, seed=7)  # repeats forever

    iterator = iter(pipeline())
    for _ in range(36):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # checkpointable as JSON
    expected = [next(iterator) for _ in range(12)]  # crosses the epoch boundary (an epoch is 42 batches here)
    resumed = iter(pipeline())
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(12)]):
        assert all((a[k] == b[k]).all() for k in data.BATCH_KEYS)
    other = next(iter(data.packed_batches(_documents(), tokenizer, seq_len=48, batch_size=3, seed=8)))
    first = next(iter(pipeline()))
    assert not (other["input_ids"] == first["input_ids"]).all()  # the seed changes the order


def test_split_by_document_is_deterministic():
    docs = [{"text": f"document {i}", "source": str(i)} for i in range(2000)]
    train, held = data.split_documents(docs, 0.1)
    assert (train, held) == data.split_documents(docs, 0.1)
    assert sorted(d["source"] for d in train + held) == sorted(d["source"] for d in docs)
    assert 150 < len(held) < 250  # binomial(2000, 0.1): mean 200, standard deviation 13
    # It depends on the index only: a prefix of the documents splits the same way.
    assert data.split_documents(docs[:500], 0.1)[1] == [d for d in held if int(d["source"]) < 500]
    assert data.split_documents(docs, 0.0)[1] == []


def test_sources_and_errors(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("one\n\n\ntwo\n \nthree")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n\n")
    docs = data.load_documents([tmp_path], delimiter=r"\n\s*\n")
    assert [d.get("text") for d in docs] == ["one", "two", "three", None]
    assert docs[3]["messages"] == CONVERSATIONS[0] and docs[3]["source"] == f"{tmp_path / 'b.jsonl'}:1"
    assert len(data.load_documents([CORPUS])) == 226

    def error(content: str) -> str:
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(InputError) as e:
            data.chat_documents([tmp_path / "bad.jsonl"])
        return str(e.value)

    assert "bad.jsonl:1: not valid JSON" in error("{oops")
    assert "expected" in error('{"text": "x"}')
    assert "contains <|im_start|>" in error(json.dumps({"messages": [{"role": "user", "content": "<|im_start|>"}]}))
    question = {"role": "user", "content": [{"type": "image"}, {"type": "image", "image": "dog.png"}]}
    with_image = {"messages": [question, {"role": "assistant", "content": "Two."}], "images": ["cat.png"]}
    (tmp_path / "img.jsonl").write_text(json.dumps(with_image))
    (image_doc,) = data.chat_documents([tmp_path / "img.jsonl"])
    assert data.image_paths(image_doc) == [str(tmp_path / "cat.png"), str(tmp_path / "dog.png")]
    with pytest.raises(InputError, match="has images, but the model has no vision tower"):
        data.packed_batches([image_doc], tokenizer, seq_len=64, batch_size=1)
    with pytest.raises(InputError, match="no such file"):
        data.load_documents([tmp_path / "missing"])


def test_build_tokenizer_cli_errors(tmp_path, capsys):
    assert build_tokenizer.main([str(tmp_path / "out"), "--vocab-size", "100"]) == 1
    assert build_tokenizer.main([str(tmp_path / "out"), "--corpus", str(tmp_path / "none")]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["error: --vocab-size must be more than 261 (the bytes and the special tokens)",
                      f"error: {tmp_path / 'none'}: no .txt files"]  # fmt: skip
    assert not (tmp_path / "out").exists()
