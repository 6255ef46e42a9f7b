"""Independent reference tokenizers for the tokenizer tests, built once per test session.

Loading these through transformers is slow (10-20 s each on a busy CPU), so each is
cached here and shared by every test module that imports it.
"""

from functools import lru_cache
from pathlib import Path

# Llama 3 8B Instruct's chat template as published in its tokenizer_config.json.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

VARIED_TEXTS = [
    "Hello world 12345",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # recursion\n\n\n",
    "你好，世界！今天天气很好。",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "   runs   of\t\twhitespace  \n \n\n\n  ",
    "I'm here; they'll've 3.14159 and ÀÉÎõü ß",
    "<|im_start|> looks special <|endoftext|>",
]


def smollm2_gguf() -> Path:
    from llama3.llm import BUILTIN_MODELS

    return Path(BUILTIN_MODELS["smollm2-135m-instruct"]())


@lru_cache(maxsize=None)
def transformers_gguf_tokenizer(path: str):
    """transformers' own GGUF tokenizer loader (AutoTokenizer with gguf_file)."""
    from transformers import AutoTokenizer

    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@lru_cache(maxsize=1)
def transformers_llama3_tokenizer():
    """Meta's tokenizer.model converted by transformers' TikTokenConverter (not our code),
    with the Llama 3 Jinja chat template."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama3.tokenizer import llama3_tokenizer_path
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(llama3_tokenizer_path())
    backend = TikTokenConverter(vocab_file=str(llama3_tokenizer_path()), pattern=meta.pat_str,
                                extra_special_tokens=list(meta.special_tokens)).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", chat_template=LLAMA3_JINJA)


def write_sentencepiece_gguf(path: Path, corpus: list[str]) -> Path:
    """A tiny SentencePiece-style ("llama") GGUF vocabulary: <unk> <s> </s>, 256 byte tokens,
    then pieces learned by a `tokenizers` BPE trainer with scores = -merge rank."""
    import json

    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    singles = sorted(t for t in model["vocab"] if len(t) == 1)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for i, ch in enumerate(singles):
        tokens.append(ch), types.append(1), scores.append(-1000.0 - i)
    for rank, merge in enumerate(merges):
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged), types.append(1), scores.append(-float(rank))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128), writer.add_embedding_length(8), writer.add_block_count(1)
    writer.add_feed_forward_length(16), writer.add_head_count(2), writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens), writer.add_token_scores(scores), writer.add_token_types(types)
    writer.add_bos_token_id(1), writer.add_eos_token_id(2), writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


def write_vocab_gguf(path: Path, vocab: dict) -> Path:
    """A GGUF file holding only the metadata of a `tokenizer.gguf_vocab()` dict."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(vocab["model"]), writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"]), writer.add_token_types(vocab["token_types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos_id"]), writer.add_eos_token_id(vocab["eos_id"])
    if vocab["pad_id"] is not None:
        writer.add_pad_token_id(vocab["pad_id"])
    writer.add_add_bos_token(vocab["add_bos"]), writer.add_chat_template(vocab["chat_template"])
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path
