"""Vocabularies embedded in GGUF files, checked against transformers' own GGUF tokenizer loader:
the default model's byte-level BPE (SmolLM2, "gpt2" type) and a SentencePiece-style ("llama") one."""

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3.tokenizer import TokenizerError, load_tokenizer
from llama3.checkpoint.gguf_file import read_metadata
from tokenizer_refs import (VARIED_TEXTS, smollm2_gguf, transformers_gguf_tokenizer, write_sentencepiece_gguf,
                            write_vocab_gguf)

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there, general kenobi",
          "tokenizers split words into pieces and pieces into bytes"] * 20


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smol_ref():
    return transformers_gguf_tokenizer(str(smollm2_gguf()))


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory):
    return write_sentencepiece_gguf(tmp_path_factory.mktemp("sp") / "tiny-sp.gguf", CORPUS)


def test_smollm2_metadata(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (1, 2, 2)
    assert smol.id_to_piece(2) == "<|im_end|>" and smol.piece_to_id("<|im_start|>") == 1
    assert smol.stop_ids == [2, 0]  # <|im_end|> (eos), <|endoftext|>
    assert smol.add_bos is False  # tokenizer.ggml.add_bos_token = False
    assert smol.encode("Hi") == smol.encode("Hi", bos=False) and smol.encode("Hi", bos=True)[0] == 1


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_smollm2_ids_equal_transformers(smol, smol_ref, text):
    expected = smol_ref.encode(text, add_special_tokens=False)
    assert smol.encode(text, allow_special=True) == expected
    assert smol.decode(expected) == smol_ref.decode(expected) == text
    plain = smol.encode(text)
    assert plain == smol_ref.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert smol.decode(plain) == text


def test_smollm2_digits_are_single_tokens(smol):
    # SmolLM2 ("smollm" pre-tokenizer) gives every digit its own token, as its tokenizer.json does.
    pieces = [smol.id_to_piece(i) for i in smol.encode("year 2024")]
    assert pieces == ["year", "Ġ", "2", "0", "2", "4"]


# SmolLM2's vocabulary lacks 21 byte values (some control characters, and the UTF-8 lead bytes
# C0 C1 F1 F2 F5-FF, i.e. code points from U+40000): text needing them cannot round-trip (transformers
# drops those bytes too, see test_smollm2_missing_bytes_dropped_like_transformers).
ROUND_TRIP_CHARS = st.characters(blacklist_categories=("Cs", "Cc"), max_codepoint=0x3FFFF)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=ROUND_TRIP_CHARS, max_size=60))
def test_smollm2_round_trip_random_unicode(smol, text):
    assert smol.decode(smol.encode(text)) == text


def test_smollm2_missing_bytes_dropped_like_transformers(smol, smol_ref):
    text = "a\U00040000b\x04c"
    assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False)


def test_smollm2_stream_decoder(smol):
    text = "你好世界 🙂👍🏽 done"
    decoder = smol.stream_decoder()
    chunks = [decoder.add(i) for i in smol.encode(text)] + [decoder.flush()]
    assert "".join(chunks) == text and all("\ufffd" not in c for c in chunks) and "" in chunks


def test_metadata_reader_agrees_with_gguf_package(sp_gguf):
    ours = read_metadata(sp_gguf)
    reader = gguf.GGUFReader(sp_gguf)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "general.architecture"):
        assert ours[key] == pytest.approx(reader.fields[key].contents()), key


SP_TEXTS = ["the quick brown fox", "hello  world", " leading space", "Zürich 你好 🙂 (bytes)", "\nnew\nlines",
            "unknownwords zzz qqq"]


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_gguf_equals_transformers(sp_gguf, text):
    ours, ref = load_tokenizer(sp_gguf), transformers_gguf_tokenizer(str(sp_gguf))
    assert ours.add_bos is True
    expected = ref.encode(text)  # with <s>, as the file asks
    assert ours.encode(text) == expected
    assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=False)
    plain = ours.encode(text, bos=False)
    assert plain == ref.encode(text, add_special_tokens=False)
    # SentencePiece decoding drops the space it added in front, and with it a leading space of the text
    assert ours.decode(plain) == ref.decode(plain) == (text[1:] if text.startswith(" ") else text)


def test_sentencepiece_byte_fallback_pieces(sp_gguf):
    tok = load_tokenizer(sp_gguf)
    ids = tok.encode("你", bos=False)
    assert [tok.id_to_piece(i) for i in ids][-3:] == ["<0xE4>", "<0xBD>", "<0xA0>"]
    assert b"".join(tok.token_bytes(i) for i in ids).strip() == "你".encode()


def test_gguf_tokenizer_save_reload_and_transformers_reads_it(smol, tmp_path):
    smol.save(tmp_path)
    again = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "Hi <|im_end|> there"}]
    for text in VARIED_TEXTS:
        assert again.encode(text) == smol.encode(text)
        assert again.encode(text, allow_special=True) == smol.encode(text, allow_special=True)
    assert again.encode_chat(messages) == smol.encode_chat(messages)
    assert (again.bos_id, again.eos_id, again.stop_ids, again.add_bos) == (1, 2, [2, 0], False)
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tmp_path)
    assert ref.encode(VARIED_TEXTS[1], add_special_tokens=False) == smol.encode(VARIED_TEXTS[1])
    assert ref.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) \
        == smol.render_chat([{"role": "user", "content": "Hi"}])


def test_corrupt_gguf(tmp_path, sp_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(TokenizerError, match="not a valid GGUF file .no GGUF magic number"):
        load_tokenizer(bad)
    bad.write_bytes(sp_gguf.read_bytes()[:2000])
    with pytest.raises(TokenizerError, match="truncated"):
        load_tokenizer(bad)


@pytest.mark.parametrize("source", ["smollm2-135m-instruct", None])
def test_gguf_vocab_export_round_trip(source, tmp_path):
    """tokenizer.gguf_vocab() (what the GGUF writer stores) loads back as the same tokenizer."""
    original = load_tokenizer(source)
    vocab = original.gguf_vocab()
    assert vocab["pre"] == ("smollm" if source else "llama-bpe")
    again = load_tokenizer(write_vocab_gguf(tmp_path / "vocab.gguf", vocab))
    for text in VARIED_TEXTS:
        assert again.encode(text) == original.encode(text)
        assert again.encode(text, allow_special=True) == original.encode(text, allow_special=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    assert again.encode_chat(messages) == original.encode_chat(messages)
    assert sorted(again.stop_ids) == sorted(original.stop_ids)


def test_gguf_without_vocabulary(tmp_path):
    from llama3.tokenizer import find_tokenizer

    writer = gguf.GGUFWriter(str(tmp_path / "novocab.gguf"), "llama")
    writer.add_tokenizer_model("no_vocab")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    assert find_tokenizer(tmp_path / "novocab.gguf") is None
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "novocab.gguf")
