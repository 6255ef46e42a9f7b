"""Data preparation: shards round-trip, re-runs are safe, bad input gets clear errors, the BPE is standard."""

import json

import numpy as np
import pytest

from llama3.errors import Llama3Error
from llama3.train.data import (DEFAULT_SHARD_TOKENS, DataError, SampleOrder, TokenShards, TokenWindows,
                               iter_documents, prepare, token_dtype)
from train_helpers import one_thread, kjv_chapters, run_cli, run_main, train_small_bpe, write_text_folder


single_thread = pytest.fixture(autouse=True)(one_thread)

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    folder = write_text_folder(root / "texts", n_docs=12)
    tokenizer = train_small_bpe(root / "tok", kjv_chapters(12))
    return folder, tokenizer


def test_shards_round_trip_every_document(corpus, tmp_path):
    folder, tokenizer = corpus
    manifest = prepare(folder, tmp_path / "data", tokenizer, "tok", val_fraction=0.25, shard_tokens=1000,
                       progress=False)
    docs = list(iter_documents(folder))
    expected = {"train": [], "val": []}
    for i, text in enumerate(docs):  # every 4th document is held out
        ids = [tokenizer.bos_id] + tokenizer.encode(text, bos=False) + [tokenizer.eos_id]
        expected["val" if i % 4 == 3 else "train"] += ids
    assert manifest["dtype"] == "<u2" and manifest["splits"]["val"]["documents"] == 3
    assert len(manifest["splits"]["train"]["shards"]) > 1  # small shards: the reader must cross boundaries
    for split in ("train", "val"):
        shards = TokenShards(tmp_path / "data", split)
        assert shards.read(0, len(shards)).tolist() == expected[split]
    # the text comes back, document separators included
    train = TokenShards(tmp_path / "data", "train").read(0, 40).tolist()
    assert tokenizer.decode(train[1:30]) == tokenizer.decode(expected["train"][1:30])
    assert docs[0].startswith(tokenizer.decode(train[1:20]))


def test_token_dtype_follows_vocabulary_size():
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(128256) == np.dtype("<u4")


def test_rerun_is_a_no_op_and_changed_input_rewrites(corpus, tmp_path):
    folder, tokenizer = corpus
    data = tmp_path / "data"
    first = prepare(folder, data, tokenizer, "tok", progress=False)
    shard = data / first["splits"]["train"]["shards"][0]["file"]
    stamp = shard.stat().st_mtime_ns
    assert prepare(folder, data, tokenizer, "tok", progress=False) == first
    assert shard.stat().st_mtime_ns == stamp
    extra = folder.parent / "more"
    write_text_folder(extra, n_docs=20)
    second = prepare(extra, data, tokenizer, "tok", progress=False)
    assert second["splits"]["train"]["tokens"] > first["splits"]["train"]["tokens"]
    assert len(TokenShards(data, "train")) == second["splits"]["train"]["tokens"]


def test_single_document_gets_a_validation_tail(corpus, tmp_path):
    _, tokenizer = corpus
    (tmp_path / "one.txt").write_text(kjv_chapters(1)[0], encoding="utf-8")
    manifest = prepare(tmp_path / "one.txt", tmp_path / "data", tokenizer, "tok", val_fraction=0.1, progress=False)
    train, val = manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]
    assert val > 0 and abs(val - 0.1 * (train + val)) < 2


def test_jsonl_text_field(corpus, tmp_path):
    _, tokenizer = corpus
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["In the beginning.", "", "And God said."]) + "\n")
    assert list(iter_documents(path)) == ["In the beginning.", "And God said."]


def test_bad_inputs_raise_clear_errors(tmp_path, corpus):
    _, tokenizer = corpus
    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_documents(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        list(iter_documents(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="no text found"):
        prepare(tmp_path / "blank.txt", tmp_path / "out", tokenizer, "tok", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        list(iter_documents(bad))
    bad.write_text('{"text": "fine"}\n{"body": "wrong field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object with a 'text' field"):
        list(iter_documents(bad))


def test_cli_errors_are_one_line(tmp_path):
    result = run_main("prepare", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert "no such file or folder" in result.stderr


def test_windows_and_order(corpus, tmp_path):
    folder, tokenizer = corpus
    prepare(folder, tmp_path / "data", tokenizer, "tok", progress=False)
    shards = TokenShards(tmp_path / "data", "train")
    windows = TokenWindows(shards, seq_len=16)
    batch = windows.batch([0, 3])
    assert batch.tokens.shape == (2, 16)
    assert batch.tokens[1].tolist() == shards.read(48, 16).tolist()
    assert batch.targets[1].tolist() == shards.read(49, 16).tolist()  # shifted by one
    order = SampleOrder(len(windows), seed=3)
    epoch0 = [order[g] for g in range(len(windows))]
    assert sorted(epoch0) == list(range(len(windows)))  # a permutation: every window once per epoch
    assert [SampleOrder(len(windows), seed=3)[g] for g in range(5)] == epoch0[:5]  # a pure function of the seed
    assert [order[len(windows) + g] for g in range(5)] != epoch0[:5]  # the next epoch is reshuffled
    with pytest.raises(DataError, match="fewer than one window"):
        TokenWindows(shards, seq_len=len(shards))


def test_trained_bpe_matches_transformers(tmp_path):
    """Independent check: transformers reads our tokenizer folder and encodes identically."""
    import transformers  # the reference: a dev dependency, never skipped
    from llama3.tokenizer import load_tokenizer
    from llama3.train.bpe import MIN_VOCAB, train_bpe

    text = "And God said, Let there be light: and there was light. 1234 don't"
    train_bpe(kjv_chapters(5), 300, tmp_path, progress=False)
    ours = load_tokenizer(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.vocab_size == 300
    assert ours.encode(text) == reference(text)["input_ids"]  # <|begin_of_text|> first, as Llama 3
    assert ours.encode(text)[0] == ours.bos_id
    assert ours.decode(ours.encode(text, bos=False)) == text
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.render_chat(messages) == reference.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)
    with pytest.raises(Llama3Error, match="vocab-size"):
        train_bpe(["x"], MIN_VOCAB - 1, tmp_path / "small", progress=False)


def test_shard_tokens_must_be_positive(corpus, tmp_path):
    folder, tokenizer = corpus
    for bad in (0, -1):
        with pytest.raises(DataError, match=f"shard_tokens={bad}"):
            prepare(folder, tmp_path / "out", tokenizer, "tok", shard_tokens=bad, progress=False)
    manifest = prepare(folder, tmp_path / "out", tokenizer, "tok", shard_tokens=None, progress=False)
    assert manifest["settings"]["shard_tokens"] == DEFAULT_SHARD_TOKENS  # None means the default
    small = prepare(folder, tmp_path / "small", tokenizer, "tok", shard_tokens=1000, progress=False)
    assert all(s["tokens"] <= 1000 for s in small["splits"]["train"]["shards"])


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_rejects_non_positive_shard_tokens(tmp_path, value):
    (tmp_path / "a.txt").write_text("In the beginning.")
    # before the fix: -1 looped forever (a timeout here), 0 silently became the default
    result = run_cli("prepare", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                     "--shard-tokens", value, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: --shard-tokens"), result.stderr[-2000:]
    assert not (tmp_path / "o").exists()
