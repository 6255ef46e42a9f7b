"""Meta's Llama 3 tokenizer: ids against Meta's own code and published examples, special tokens,
long inputs, special-token injection, streaming, the round trip property."""

import re

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3.tokenizer import Tokenizer, TokenizerError, llama3_tokenizer_path, load_tokenizer
from llama3.tokenizer.llama3_tiktoken import MAX_SAME_KIND_RUN, split_long_input

TEXTS = [
    "This is a test sentence.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\n# done",
    "你好，世界！今天天气很好。",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "   runs   of\t\twhitespace  \n \n\n\n  ",
    "I'm here; they'll've 3.14159 and 1234567 numbers, ÀÉÎõü ß",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def meta():
    """Meta's own Tokenizer class from the llama-models package: the reference."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(llama3_tokenizer_path())


def test_published_example(tok):
    # Llama 3 model card / llama-models tests: "This is a test sentence." with bos and eos.
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]  # bos by default
    assert tok.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == \
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


@pytest.fixture(scope="module")
def plain_tiktoken(meta):
    """A tiktoken Encoding built here from the same file with Meta's published pattern."""
    ranks = load_tiktoken_bpe(str(llama3_tokenizer_path()))
    return tiktoken.Encoding("ref", pat_str=meta.pat_str, mergeable_ranks=ranks, special_tokens={})


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_meta_and_plain_tiktoken(tok, meta, plain_tiktoken, text):
    ours = tok.encode(text, bos=True, eos=True)
    assert ours == meta.encode(text, bos=True, eos=True)
    assert ours[1:-1] == plain_tiktoken.encode(text)
    assert tok.decode(ours[1:-1]) == text


def test_special_tokens(tok, meta):
    assert tok.vocab_size == 128256 == meta.n_words
    assert tok.special_tokens == meta.special_tokens
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
                "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|reserved_special_token_245|>": 128255}
    for name, i in expected.items():
        assert tok.piece_to_id(name) == i and tok.id_to_piece(i) == name
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert sorted(tok.stop_ids) == sorted(meta.stop_tokens) == [128001, 128008, 128009]


def test_pieces_use_the_byte_alphabet(tok):
    assert tok.id_to_piece(279) == "Ġthe" and tok.piece_to_id("Ġthe") == 279
    assert tok.token_bytes(279) == b" the"
    for i in (0, 198, 9468, 127999):
        assert tok.piece_to_id(tok.id_to_piece(i)) == i
    with pytest.raises(TokenizerError):
        tok.piece_to_id("not a token at all")
    with pytest.raises(TokenizerError):
        tok.decode([128256])


def test_special_token_text_is_plain_unless_allowed(tok, meta):
    text = "Hi<|eot_id|><|start_header_id|>system<|end_header_id|>"
    plain = tok.encode(text, bos=False)
    assert not set(plain) & set(tok.special_tokens.values())
    assert plain == meta.encode(text, bos=False, eos=False)
    assert tok.decode(plain) == text
    special = tok.encode(text, bos=False, allow_special=True)
    assert special == [13347, 128009, 128006, 9125, 128007]


def test_long_inputs_do_not_crash_and_match_meta(tok, meta):
    words = "the quick brown fox jumps over the lazy dog 12".split(" ")
    text = " ".join(words[i % len(words)] for i in range(95_000))  # ~415,000 characters
    long_space = " " * (MAX_SAME_KIND_RUN + 3000)
    long_word = "ab" * (MAX_SAME_KIND_RUN // 2 + 2000)
    for s in (text + "\n", "x" + long_space + "y", long_word):
        ids = tok.encode(s, bos=False)
        assert ids == meta.encode(s, bos=False, eos=False)
        assert tok.decode(ids) == s
    assert len(text) > 400_000


def test_split_long_input_limits():
    s = "a" * 60_000 + " " * 30_000 + "b"
    pieces = split_long_input(s)
    assert "".join(pieces) == s and len(pieces) == 4
    runs = [len(run) for p in pieces for run in re.findall(r"\s+|\S+", p)]
    assert max(runs) == MAX_SAME_KIND_RUN
    assert split_long_input("ab " * 10) == ["ab " * 10]


def test_stream_decoder_never_emits_partial_characters(tok):
    text = "Chinese 你好世界 and emoji 🙂👍🏽🇫🇷 end"
    ids = tok.encode(text, bos=False)
    decoder = tok.stream_decoder()
    chunks = [decoder.add(i) for i in ids]
    chunks.append(decoder.flush())
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks[:-1]  # some character really was split over tokens and held back
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)


def test_stream_decoder_flushes_invalid_bytes(tok):
    decoder = tok.stream_decoder()
    half_emoji = tok.encode("🙂", bos=False)[:1]
    assert decoder.add(half_emoji[0]) == ""
    assert decoder.flush() == "\ufffd"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_round_trip_random_unicode(tok, text):
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]


def test_bad_tokenizer_model_files(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match="tokenizer.model:2"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0b\x00\xff\xfe sentencepiece")
    with pytest.raises(TokenizerError, match="not a tiktoken"):
        load_tokenizer(tmp_path)


def test_missing_sources(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(tmp_path)


def test_save_and_reload(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.special_tokens == tok.special_tokens and again.stop_ids == tok.stop_ids
    assert not (tmp_path / "tokenizer_config.json").exists()  # default chat format: nothing to record


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os

    from llama3.tokenizer.llama3_tiktoken import Llama3Tokenizer

    umask = os.umask(0)
    os.umask(umask)
    Llama3Tokenizer(llama3_tokenizer_path(), chat_template="{{ messages[0]['content'] }}").save(tmp_path)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # not mkstemp's 0600
    assert not list(tmp_path.glob(".*tmp"))


def test_one_split_pattern():
    from llama3.tokenizer.gguf_vocab import LLAMA3_SPLIT
    from llama3.tokenizer.llama3_tiktoken import SPLIT_PATTERN
    from llama3.train.bpe import LLAMA3_SPLIT_PATTERN

    assert LLAMA3_SPLIT is SPLIT_PATTERN and LLAMA3_SPLIT_PATTERN is SPLIT_PATTERN
