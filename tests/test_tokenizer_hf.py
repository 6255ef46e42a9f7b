"""Hugging Face tokenizer.json folders, plain trained vocabularies, the `llama3 tokenize` command."""

import json

import pytest

from llama3.cli import main
from llama3.tokenizer import TokenizerError, load_tokenizer
from tokenizer_refs import LLAMA3_JINJA, VARIED_TEXTS, transformers_llama3_tokenizer, write_sentencepiece_gguf


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer()


@pytest.fixture(scope="module")
def hf_llama3_folder(tmp_path_factory):
    """Meta's vocabulary as a Hugging Face folder, written by transformers (not by us)."""
    folder = tmp_path_factory.mktemp("hf-llama3")
    transformers_llama3_tokenizer().save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    return folder


def test_hf_llama3_folder_equals_tiktoken(llama3, hf_llama3_folder):
    hf = load_tokenizer(hf_llama3_folder)
    assert type(hf).__name__ == "HFTokenizer"
    assert hf.vocab_size == llama3.vocab_size and hf.special_tokens == llama3.special_tokens
    assert (hf.bos_id, hf.eos_id) == (llama3.bos_id, llama3.eos_id)
    assert sorted(hf.stop_ids) == sorted(llama3.stop_ids)  # eos + generation_config.json
    ref = transformers_llama3_tokenizer()
    for text in VARIED_TEXTS + ["Hi<|eot_id|>there"]:
        assert hf.encode(text, bos=False) == llama3.encode(text, bos=False)
        assert hf.encode(text, bos=False, allow_special=True) == llama3.encode(text, bos=False, allow_special=True)
        assert hf.encode(text, allow_special=True) == ref.encode(text)  # bos default as transformers does it
        assert hf.decode(hf.encode(text, bos=False)) == text
    for i in (0, 279, 128009):
        assert hf.id_to_piece(i) == llama3.id_to_piece(i) and hf.token_bytes(i) == llama3.token_bytes(i)
    assert hf.chat_template == LLAMA3_JINJA
    assert hf.gguf_vocab()["pre"] == "llama-bpe"  # recognised from tokenizer.json's split regex
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert hf.encode_chat(messages) == llama3.encode_chat(messages)
    # Injected control text stays text (the template path cuts the text at it, as transformers'
    # sanitize_control_tokens does, so the ids differ from Meta's whole-content encoding).
    injected = hf.encode_chat([{"role": "user", "content": "Hello <|eot_id|>"}])
    assert injected.count(hf.special_tokens["<|eot_id|>"]) == 1 and hf.decode(injected).count("<|eot_id|>") == 2


def test_hf_save_reload(hf_llama3_folder, tmp_path):
    hf = load_tokenizer(hf_llama3_folder)
    hf.save(tmp_path)
    again = load_tokenizer(tmp_path)
    for text in VARIED_TEXTS:
        assert again.encode(text) == hf.encode(text)
    assert again.chat_template == hf.chat_template and again.add_bos == hf.add_bos
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def train_plain_tokenizer(folder, special=()):
    """A tiny byte-level BPE trained here, saved as a bare tokenizer.json (what `train-tokenizer` makes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox 123"] * 50, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_plain_tokenizer_json_without_chat_format(tmp_path):
    tok = load_tokenizer(train_plain_tokenizer(tmp_path / "plain"))
    assert tok.decode(tok.encode("hello 世界")) == "hello 世界"
    assert tok.bos_id is None and tok.add_bos is False and tok.stop_ids == []
    assert tok.gguf_vocab()["pre"] == "gpt2"
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="no begin-of-text"):
        tok.encode("x", bos=True)


def test_plain_tokenizer_with_chatml_tokens_defaults_to_chatml(tmp_path):
    folder = train_plain_tokenizer(tmp_path / "chatml", special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = load_tokenizer(folder)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.stop_ids == [tok.piece_to_id("<|im_end|>"), tok.piece_to_id("<|endoftext|>")]


def test_corrupt_hf_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        load_tokenizer(tmp_path)
    train_plain_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="no such token"):
        load_tokenizer(tmp_path)


def test_stream_decoder_sentencepiece_spaces(tmp_path):
    tok = load_tokenizer(write_sentencepiece_gguf(tmp_path / "sp.gguf", ["hello world the fox"] * 20))
    ids = tok.encode("hello world 你好 fox", bos=False)
    decoder = tok.stream_decoder()
    chunks = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(chunks) == tok.decode(ids) == "hello world 你好 fox"
    assert all("\ufffd" not in c for c in chunks)


# ------------------------------------------------------------------ CLI
def test_cli_tokenize(capsys):
    assert main(["tokenize", "This is a test sentence.\n\tx", "-t", "llama3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["128000", "<|begin_of_text|>"]
    assert out[2].split() == ["374", "␣is"] and out[-3].split() == ["627", ".↵"] and out[-2].split() == ["10436", "→x"]
    assert out[-1] == "8 tokens, 27 characters; tokenizer: llama3"


def test_cli_tokenize_chat_stdin_and_ids(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi"))
    assert main(["tokenize", "-", "--chat", "--ids", "--tokenizer", "smollm2-135m-instruct"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == load_tokenizer("smollm2-135m-instruct").encode_chat([{"role": "user", "content": "Hi"}])
    assert main(["tokenize", "🙂", "--no-bos", "-t", "llama3"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[:-1]] == ["\\xf0\\x9f", "\\x99\\x82"]


def test_cli_errors(capsys, tmp_path):
    assert main(["tokenize", "x", "--tokenizer", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["tokenize", "--chat", "[{\"role\": \"wizard\", \"content\": \"x\"}]"]) == 2
    assert "unknown role 'wizard'" in capsys.readouterr().err


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    tok = load_tokenizer(train_plain_tokenizer(tmp_path / "plain"))
    tok.save(tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # not mkstemp's 0600


def test_generation_config_errors_are_tokenizer_errors(tmp_path):
    train_plain_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="generation_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
