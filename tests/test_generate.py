"""The generation engine on tiny models: cached = uncached, batch = one by one, seeds, stop ids,
stop strings, streaming of split UTF-8 characters, the context limit, and LLM.generate/chat.

Text tests use a "scripted" model whose greedy next token is a fixed function of the current
token (one-hot embeddings, attention and feed-forward switched off, the output matrix a lookup
table) and a byte-level fake tokenizer, so the generated text is known exactly.
"""

import codecs

import pytest
import torch

from conftest import make_config, make_model
from llama3.errors import Llama3Error
from llama3.generate import GenerationSettings, StopStrings, TextGeneration, generate_tokens
from llama3.llm import LLM

BOS, EOS = 256, 257


class ByteTokenizer:
    """ids 0..255 are bytes, 256 = BOS, 257 = EOS (the stop id)."""

    vocab_size, bos_id, eos_id, pad_id = 258, BOS, EOS, None
    stop_ids = [EOS]

    def encode(self, text, bos=None, eos=False, allow_special=False):
        return [BOS] + list(text.encode())

    def encode_chat(self, messages, add_generation_prompt=True):
        return self.encode("".join(f"{m['role']}:{m['content']}\n" for m in messages))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def stream_decoder(self):
        tokenizer_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        class Decoder:
            def add(self, token_id):
                return tokenizer_decoder.decode(bytes([token_id]) if token_id < 256 else b"")

            def flush(self):
                return tokenizer_decoder.decode(b"", final=True)

        return Decoder()


def scripted_model(successor: dict[int, int]):
    """A model whose greedy choice after token i is successor[i] (anything else -> EOS)."""
    config = make_config(dim=264, n_heads=2, n_kv_heads=1, vocab_size=258, hidden_dim=16, max_seq_len=64)
    model = make_model(config)
    with torch.no_grad():
        for layer in model.layers:  # blocks add nothing: the residual stream stays the embedding
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.tok_embeddings.weight.copy_(torch.eye(258, 264))  # token i -> unit vector e_i
        table = torch.zeros(258, 264)
        for i in range(258):
            table[successor.get(i, EOS), i] = 1.0                # logit of successor[i] is the largest
        model.output.weight.copy_(table)
    return model


def script(text: str) -> dict[int, int]:
    """Successor table that makes BOS -> the bytes of `text` -> EOS (its bytes must be distinct)."""
    chain = [BOS] + list(text.encode()) + [EOS]
    assert len(set(chain)) == len(chain)
    return dict(zip(chain, chain[1:]))


def greedy_uncached(model, ids, n):
    """The reference: recompute the whole sequence for every new token, no cache."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def run_ids(model, prompts, stop_ids=(), **settings):
    gen = generate_tokens(model, prompts, GenerationSettings(**settings), stop_ids)
    for _ in gen:
        pass
    return gen


# ------------------------------------------------------------------ token level
def test_cached_equals_uncached(tiny_model):
    prompt = [5, 17, 3, 99, 42, 8]
    gen = run_ids(tiny_model, [prompt], max_new_tokens=12)
    assert gen.tokens[0] == greedy_uncached(tiny_model, prompt, 12)
    assert gen.finish_reasons == ["length"]


def test_chunked_prefill_changes_nothing(tiny_model, monkeypatch):
    import llama3.generate

    prompts = [list(range(1, 30)), [5, 6, 7]]
    whole = list(generate_tokens(tiny_model, prompts, GenerationSettings(max_new_tokens=3), return_logits=True))
    monkeypatch.setattr(llama3.generate, "PREFILL_CHUNK", 4)
    chunked = list(generate_tokens(tiny_model, prompts, GenerationSettings(max_new_tokens=3), return_logits=True))
    for a, b in zip(whole, chunked):
        assert a.tokens == b.tokens
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_step_logits_equal_the_uncached_model(tiny_model):
    prompt = [1, 2, 3, 4]
    gen = generate_tokens(tiny_model, [prompt], GenerationSettings(max_new_tokens=5), return_logits=True)
    steps = list(gen)
    full = torch.tensor([prompt + gen.tokens[0]])
    with torch.no_grad():
        expected = tiny_model(full)[0, len(prompt) - 1:-1]            # [5, V]
    torch.testing.assert_close(torch.stack([s.logits[0] for s in steps]), expected, atol=1e-5, rtol=1e-5)


def test_batch_equals_one_by_one(tiny_model):
    prompts = [[7, 3, 9], list(range(10, 22)), [50], [4, 4, 4, 4, 4, 4, 4]]
    batch = run_ids(tiny_model, prompts, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        alone = run_ids(tiny_model, [prompt], max_new_tokens=10)
        assert batch.tokens[row] == alone.tokens[0], f"row {row}"


def test_batch_logits_equal_one_by_one(tiny_model):
    prompts = [[7, 3, 9], list(range(10, 22))]
    batch = list(generate_tokens(tiny_model, prompts, GenerationSettings(max_new_tokens=4), return_logits=True))
    for row, prompt in enumerate(prompts):
        alone = list(generate_tokens(tiny_model, [prompt], GenerationSettings(max_new_tokens=4), return_logits=True))
        for b_step, a_step in zip(batch, alone):
            torch.testing.assert_close(b_step.logits[row], a_step.logits[0], atol=1e-5, rtol=1e-5)


def test_batch_rows_stop_independently(tiny_model):
    prompts = [[7, 3, 9], list(range(10, 22))]
    free = run_ids(tiny_model, prompts, max_new_tokens=8)
    stop = free.tokens[0][-1]                # row 0 stops where this token first appears
    gen = run_ids(tiny_model, prompts, stop_ids=[stop], max_new_tokens=8)
    for row in range(2):
        alone = free.tokens[row]
        if stop in alone:
            assert gen.tokens[row] == alone[:alone.index(stop)] and gen.finish_reasons[row] == "stop"
        else:
            assert gen.tokens[row] == alone and gen.finish_reasons[row] == "length"
    assert gen.finish_reasons[0] == "stop"


def test_seeded_sampling_is_reproducible(tiny_model):
    def sampled(seed):
        return run_ids(tiny_model, [[1, 2, 3]], max_new_tokens=20, temperature=1.5, seed=seed).tokens[0]

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


def test_repetition_penalty_and_filters_run_in_batches(tiny_model):
    gen = run_ids(tiny_model, [[1, 2], [3, 4, 5, 6]], max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9,
                  min_p=0.05, repetition_penalty=1.3, seed=0)
    assert [len(t) for t in gen.tokens] == [6, 6]


def test_prompt_longer_than_context(tiny_model):
    context = tiny_model.config.max_seq_len
    too_long = list(range(1, 100)) * 2   # 198 tokens > 128
    with pytest.raises(Llama3Error, match="context"):
        generate_tokens(tiny_model, [too_long], GenerationSettings(max_new_tokens=10))
    gen = run_ids(tiny_model, [too_long], max_new_tokens=10, truncate=True)
    assert gen.prompts[0] == too_long[-(context - 10):] and len(gen.tokens[0]) == 10


def test_max_new_tokens_is_capped_by_the_context(tiny_model):
    context = tiny_model.config.max_seq_len
    gen = run_ids(tiny_model, [[3] * (context - 4)], max_new_tokens=100)
    assert len(gen.tokens[0]) == 4 and gen.finish_reasons == ["length"]


@pytest.mark.parametrize("prompts", [[], [[]], [[1, 500]], [[-1]]])
def test_bad_prompts_raise(tiny_model, prompts):
    with pytest.raises(Llama3Error):
        generate_tokens(tiny_model, prompts, GenerationSettings())


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(stop=[""])])
def test_invalid_settings_raise(bad):
    with pytest.raises(Llama3Error):
        GenerationSettings(**bad)


# ------------------------------------------------------------------- text level
TEXT = "aé→Z</s>b"   # distinct bytes; é and → are 2 and 3 bytes long


def text_run(stop=(), max_new_tokens=50, text=TEXT):
    run = TextGeneration(scripted_model(script(text)), ByteTokenizer(), [[BOS]],
                         GenerationSettings(max_new_tokens=max_new_tokens, stop=stop))
    pieces = [piece for _, piece in run]
    return pieces, run.completions()[0]


def test_scripted_model_writes_its_script():
    pieces, done = text_run()
    assert "".join(pieces) == done.text == TEXT
    assert done.finish_reason == "stop" and done.token_ids == list(TEXT.encode())


def test_stream_never_splits_a_character():
    pieces, _ = text_run()
    assert "\ufffd" not in "".join(pieces)
    assert "é" in pieces and "→" in pieces   # each arrives whole, once its last byte is generated


@pytest.mark.parametrize("stop, expected", [
    ("</s>", "aé→Z"), ("Z<", "aé→"), ("→", "aé"), ("a", ""), ("</x>", TEXT), (("s>", "é→"), "a"),
])
def test_stop_strings_cut_exactly(stop, expected):
    pieces, done = text_run(stop=stop)
    assert done.text == expected == "".join(pieces)
    assert done.finish_reason == "stop"


def test_text_that_may_start_a_stop_string_is_held_back():
    pieces, _ = text_run(stop="</s>")
    assert not any("<" in p for p in pieces)


def test_length_finish_reason_and_partial_character():
    _, done = text_run(max_new_tokens=2)     # "a" and the first byte of "é"
    assert done.finish_reason == "length" and done.token_ids == list(TEXT.encode()[:2])
    assert done.text.startswith("a")


def test_stop_strings_class():
    cutter = StopStrings(("STOP",))
    assert cutter.add("abc ST") == ("abc ", False)
    assert cutter.add("O") == ("", False)
    assert cutter.add("x") == ("STOx", False)
    assert cutter.add("STO") == ("", False)
    assert cutter.add("P tail") == ("", True)


# ------------------------------------------------------------ LLM.generate/chat
@pytest.fixture
def scripted_llm():
    model = scripted_model(script(TEXT))
    return LLM(model=model, config=model.config, tokenizer=ByteTokenizer())


def test_llm_generate_forms(scripted_llm):
    assert scripted_llm.generate("") == TEXT      # the prompt is just BOS for the byte tokenizer
    assert scripted_llm.generate(["", ""], stop="</s>") == ["aé→Z", "aé→Z"]
    assert "".join(scripted_llm.generate("", stream=True)) == TEXT
    assert sorted(scripted_llm.generate(["", ""], stream=True, max_new_tokens=1)) == [(0, "a"), (1, "a")]


def test_llm_chat(tiny_model):
    llm = LLM(model=tiny_model, config=tiny_model.config, tokenizer=TinyByteTokenizer())
    conversation = [{"role": "user", "content": "hi"}]
    a = llm.chat(conversation, seed=1, max_new_tokens=5)
    assert a == llm.chat(conversation, seed=1, max_new_tokens=5)
    assert llm.chat([conversation, conversation], temperature=0, max_new_tokens=5) == [
        llm.chat(conversation, temperature=0, max_new_tokens=5)] * 2


class TinyByteTokenizer(ByteTokenizer):
    """The byte tokenizer squeezed into the tiny model's 101-token vocabulary (ASCII < 101 only)."""

    stop_ids = [100]

    def encode(self, text, bos=None, eos=False, allow_special=False):
        return [b % 100 for b in text.encode()]


def test_llm_errors(tiny_model):
    llm = LLM(model=tiny_model, config=tiny_model.config, tokenizer=None)
    with pytest.raises(Llama3Error, match="tokenizer"):
        llm.generate("hi")
    llm.tokenizer = TinyByteTokenizer()
    with pytest.raises(Llama3Error, match="top_p"):
        llm.generate("hi", top_p=1.5)
    with pytest.raises(Llama3Error, match="temperature"):
        llm.chat([{"role": "user", "content": "hi"}], temperature=-1)


# ------------------------------------------------- the real model vs transformers
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHATS = [[{"role": "user", "content": "What is the tallest mountain in the world?"}],
         [{"role": "system", "content": "You answer in French."},
          {"role": "user", "content": "Describe a cat in two sentences."}]]


@pytest.fixture(scope="module")
def transformers_reference(transformers_gguf):
    """transformers' own GGUF loader and tokenizer on the same file (conftest's, shared): the
    independent reference, with a generation config of its own that never stops early."""
    import copy

    model, tokenizer = transformers_gguf
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # no early stop: compare every token
    return model, tokenizer, config


def test_greedy_matches_transformers_token_for_token(default_llm, transformers_reference):
    hf_model, hf_tokenizer, hf_config = transformers_reference
    ours = default_llm.tokenizer
    prompts = [ours.encode(p) for p in RAW_PROMPTS] + [ours.encode_chat(c) for c in CHATS]
    theirs = [hf_tokenizer(p).input_ids for p in RAW_PROMPTS] + [
        list(hf_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
        for c in CHATS]
    assert prompts == theirs, "our tokenizer and transformers' disagree on the prompts"

    n = 16
    gen = run_ids(default_llm.model, prompts, stop_ids=(), max_new_tokens=n)   # all five as one batch
    for row, ids in enumerate(prompts):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), generation_config=hf_config, max_new_tokens=n, do_sample=False,
                                     pad_token_id=0)
        assert gen.tokens[row] == out[0, len(ids):].tolist(), f"prompt {row}"


def test_real_model_chat_stops_at_end_of_turn(default_llm):
    answer = TextGeneration(default_llm.model, default_llm.tokenizer, [default_llm.tokenizer.encode_chat(CHATS[0])],
                            GenerationSettings(max_new_tokens=100))
    done = answer.run()[0]
    assert done.finish_reason == "stop" and "<|im_end|>" not in done.text and "Everest" in done.text
