"""GGUF files: the default model's Q4_1/Q8_0 file against transformers' own GGUF loader
(logits and greedy continuations), export round trips on tiny models (read back by us and
by transformers), Llama 3.1 RoPE scaling as llama.cpp stores it, and clear errors."""

import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import make_config, make_model
from llama3.checkpoint import build_model
from llama3.checkpoint.gguf import read_gguf, write_gguf
from llama3.config import RopeScaling
from llama3.errors import Llama3Error
from llama3.llm import LLM, _smollm2_path
from llama3.model import KVCache, rope_frequencies

PROMPTS = ["The capital of France is", "def fibonacci(n):\n   ", "Once upon a time, in a small village,"]
CHATS = [[{"role": "user", "content": "What is the boiling point of water?"}],
         [{"role": "system", "content": "You are a terse assistant."},
          {"role": "user", "content": "Name three primary colours and explain why they are primary."}]]
NEW_TOKENS = 16


def transformers_from_gguf(path):
    """The independent reference: transformers dequantizes the same file with its own code
    (and undoes llama.cpp's q/k permutation itself)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(transformers_gguf):
    """transformers_from_gguf(_smollm2_path()), loaded once per session by conftest."""
    return transformers_gguf[0]


# ------------------------------------------------------------- the default model
def test_default_model_config(default_llm):
    """llama3.load() reads the GGUF through read_gguf; its config comes from the metadata."""
    config = default_llm.config
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (576, 30, 9, 3)
    assert (config.vocab_size, config.hidden_dim, config.head_dim, config.max_seq_len) == (49152, 1536, 64, 8192)
    assert config.rope_theta == 100000.0 and config.rope_scaling is None and config.tie_embeddings
    assert config.norm_eps == 1e-5  # stored as the float32 9.9999997e-06
    assert all(p.dtype == torch.float32 for p in default_llm.model.parameters())


def test_dequantized_weights_equal_transformers(default_llm, reference):
    """Tensor by tensor, before any computation: embeddings (Q8_0), q/k (Q4_1, layouts differ), norms (F32)."""
    ours = dict(default_llm.model.named_parameters())
    hf = reference.state_dict()
    torch.testing.assert_close(ours["tok_embeddings.weight"], hf["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ours["layers.3.feed_forward.w1.weight"], hf["model.layers.3.mlp.gate_proj.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(ours["norm.weight"], hf["model.norm.weight"], rtol=0, atol=0)
    # transformers rotates channel i with i + Dh/2, we rotate (2i, 2i+1): same rows, other order.
    hf_q = hf["model.layers.5.self_attn.q_proj.weight"].view(9, 2, 32, 576)       # [H, half, Dh/2, D]
    ours_q = ours["layers.5.attention.wq.weight"].view(9, 32, 2, 576)             # [H, Dh/2, pair, D]
    torch.testing.assert_close(ours_q, hf_q.transpose(1, 2), rtol=0, atol=0)


def test_logits_equal_transformers(default_llm, reference):
    tokenizer = default_llm.tokenizer
    for text in PROMPTS:
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            ours, theirs = default_llm.model(ids), reference(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-4)
        assert ours[0, -1].argmax() == theirs[0, -1].argmax()


def greedy(model, prompt: list[int], steps: int, stop_ids) -> list[int]:
    """Plain greedy decoding with a KV cache: prefill the prompt, then one token per step."""
    cache = KVCache(model.config, 1, len(prompt) + steps)
    logits = model(torch.tensor([prompt]), 0, cache)                  # [1, T, V]
    out = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
        logits = model(torch.tensor([[token]]), len(prompt) + len(out) - 1, cache)
    return out


@pytest.mark.parametrize("kind", ["raw", "chat"])
def test_greedy_continuations_equal_transformers(default_llm, reference, kind):
    tokenizer = default_llm.tokenizer
    prompts = ([tokenizer.encode(p) for p in PROMPTS] if kind == "raw"
               else [tokenizer.encode_chat(m) for m in CHATS])
    eos = reference.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    for prompt in prompts:
        with torch.no_grad():
            ours = greedy(default_llm.model, prompt, NEW_TOKENS, stop_ids)
            ids = torch.tensor([prompt])
            theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.eos_id)
        assert ours == theirs[0, len(prompt):].tolist()
        assert len(ours) >= 16, tokenizer.decode(ours)


# ------------------------------------------------------------------------ export
def tiny_llm(**overrides) -> LLM:
    config = make_config(**overrides)
    return LLM(model=make_model(config), config=config)


def logits_of(model, ids=((3, 14, 15, 92, 65, 35, 89, 79, 32, 38),)):
    with torch.no_grad():
        return model(torch.tensor(ids))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"n_kv_heads": 4},
                                       {"rope_scaling": RopeScaling(factor=32.0)}])
def test_export_round_trip_f32(tmp_path, overrides):
    llm = tiny_llm(**overrides)
    write_gguf(llm, tmp_path / "tiny.gguf")
    config, state = read_gguf(tmp_path / "tiny.gguf")
    assert config == llm.config
    model = build_model(config, state)
    for name, tensor in llm.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(logits_of(model), logits_of(llm.model))


def test_export_f16_stores_half_precision_matrices(tmp_path):
    llm = tiny_llm()
    write_gguf(llm, tmp_path / "tiny-f16.gguf", file_type="f16")
    reader = gguf.GGUFReader(tmp_path / "tiny-f16.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert reader.fields["general.file_type"].contents() == 1
    config, state = read_gguf(tmp_path / "tiny-f16.gguf")
    for name, tensor in llm.model.state_dict().items():  # exactly the float16 rounding of each weight
        expected = tensor.half().float() if tensor.dim() > 1 else tensor
        assert torch.equal(state[name], expected), name


def rewrite_matrices(source, target, quant):
    """Copy a GGUF file with every matrix stored as `quant` (BF16, Q8_0, ...), as llama.cpp's tools would."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama.") and len(field.types) == 1:
            writer.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        data = np.array(t.data)
        if data.ndim == 2:
            writer.add_tensor(t.name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("quant", ["BF16", "Q8_0"])
def test_bf16_and_quantized_tensors_load_at_any_dtype(tmp_path, quant):
    """Every dtype gets the same numbers as the gguf package's own dequantizer; a tensor already of the
    wanted dtype is the memory-mapped file itself, copy-on-write: writing to it never changes the file."""
    import llama3

    write_gguf(tiny_llm(), tmp_path / "f32.gguf")
    rewrite_matrices(tmp_path / "f32.gguf", tmp_path / "q.gguf", gguf.GGMLQuantizationType[quant])
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    expected = torch.from_numpy(gguf.quants.dequantize(stored["blk.0.ffn_down.weight"].data,
                                                       stored["blk.0.ffn_down.weight"].tensor_type))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        llm = llama3.load(tmp_path / "q.gguf", dtype=dtype)
        weight = llm.model.layers[0].feed_forward.w2.weight
        assert weight.dtype == dtype and torch.equal(weight, expected.to(dtype)), dtype
        with torch.no_grad():
            weight.add_(1.0)
        assert torch.equal(read_gguf(tmp_path / "q.gguf", dtype)[1]["layers.0.feed_forward.w2.weight"],
                           expected.to(dtype)), dtype


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}])
def test_export_loads_in_transformers(tmp_path, overrides):
    llm = tiny_llm(**overrides)
    write_gguf(llm, tmp_path / "tiny.gguf")
    theirs = transformers_from_gguf(tmp_path / "tiny.gguf")
    assert theirs.config.tie_word_embeddings == llm.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])).logits,
                                   logits_of(llm.model, ((3, 14, 15, 92, 65, 35, 89, 79),)), rtol=1e-5, atol=1e-5)


def test_export_writes_llama_cpp_metadata(tmp_path):
    llm = tiny_llm()
    write_gguf(llm, tmp_path / "tiny.gguf")
    fields = gguf.GGUFReader(tmp_path / "tiny.gguf").fields
    value = lambda key: fields[key].contents()  # noqa: E731
    c = llm.config
    assert value("general.architecture") == "llama"
    assert (value("llama.embedding_length"), value("llama.block_count"), value("llama.feed_forward_length")) == (
        c.dim, c.n_layers, c.hidden_dim)
    assert (value("llama.attention.head_count"), value("llama.attention.head_count_kv")) == (c.n_heads, c.n_kv_heads)
    assert value("llama.rope.dimension_count") == c.head_dim and value("llama.context_length") == c.max_seq_len
    assert value("llama.rope.freq_base") == c.rope_theta and value("llama.vocab_size") == c.vocab_size
    assert math.isclose(value("llama.attention.layer_norm_rms_epsilon"), c.norm_eps, rel_tol=1e-6)
    assert value("tokenizer.ggml.model") == "no_vocab"  # llama.cpp's marker for "no tokenizer inside"


def test_export_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"the old file")
    llm = tiny_llm()
    monkeypatch.setattr("llama3.checkpoint.gguf._to_numpy", lambda *a: (_ for _ in ()).throw(RuntimeError("disk")))
    with pytest.raises(RuntimeError):
        write_gguf(llm, target)
    assert target.read_bytes() == b"the old file" and os.listdir(tmp_path) == ["model.gguf"]


TEXTS = ["Hello world! 2024 naïve café 🤖\n\n  spaces", "<|im_start|>user\nHi<|im_end|>", "def f(x):\n\treturn x**2"]


def llm_with_tokenizer(name: str) -> LLM:
    """A tiny random model around a real tokenizer (the embedding is vocab x 32)."""
    from llama3.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(name)
    config = make_config(vocab_size=tokenizer.vocab_size, dim=32, n_heads=2, n_kv_heads=1, hidden_dim=48)
    return LLM(model=make_model(config), config=config, tokenizer=tokenizer)


@pytest.mark.parametrize("tokenizer_name", ["smollm2-135m-instruct", "llama3"])
def test_export_with_tokenizer(tmp_path, tokenizer_name):
    """The vocabulary travels inside the file, and LLM.save / llama3.load get it back.  For
    SmolLM2, transformers' GGUF tokenizer (an independent reader of the same metadata) must
    agree too; for Llama 3 the original is tiktoken itself, a different BPE implementation
    from the `tokenizers` pipeline rebuilt from the written tokens and merges."""
    import llama3

    llm = llm_with_tokenizer(tokenizer_name)
    tokenizer = llm.tokenizer
    llm.save(tmp_path / "tok.gguf", format="gguf")
    loaded = llama3.load(tmp_path / "tok.gguf", plain=True)  # exact: the same kernels as the model it came from
    assert torch.equal(logits_of(loaded.model), logits_of(llm.model))
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == tokenizer.encode(text)
        assert loaded.tokenizer.encode(text, allow_special=True) == tokenizer.encode(text, allow_special=True)
    assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)
    assert set(loaded.tokenizer.stop_ids) == set(tokenizer.stop_ids)
    chat = [{"role": "user", "content": "Hi there"}]
    assert loaded.tokenizer.encode_chat(chat) == tokenizer.encode_chat(chat)
    if tokenizer_name.startswith("smollm2"):  # (transformers takes minutes to convert Llama 3's 280k merges)
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
        for text in TEXTS:
            assert theirs.encode(text, add_special_tokens=False, split_special_tokens=True) == tokenizer.encode(text)


def test_tokenizer_larger_than_model_is_refused(tmp_path):
    from llama3.tokenizer import load_tokenizer

    llm = tiny_llm()
    llm.tokenizer = load_tokenizer("smollm2-135m-instruct")
    with pytest.raises(Llama3Error, match="the tokenizer has 49152 tokens but the model only 101 embeddings"):
        write_gguf(llm, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_load_gguf_without_vocabulary(tmp_path):
    import llama3

    llm = tiny_llm()
    llm.save(tmp_path / "tiny.gguf", format="gguf")
    loaded = llama3.load(tmp_path / "tiny.gguf", plain=True)  # exact: the same kernels as the model it came from
    assert loaded.tokenizer is None and torch.equal(logits_of(loaded.model), logits_of(llm.model))


# ------------------------------------------------------------ RoPE scaling (3.1)
def llama_cpp_rope_factors(head_dim, theta, scaling: RopeScaling) -> list[float]:
    """`rope_freqs` exactly as llama.cpp's convert_hf_to_gguf.py (LlamaModel) computes it."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return factors


SCALINGS = [(dict(dim=64, n_heads=4), RopeScaling(factor=32.0)),                  # Llama 3.2's constants
            (dict(dim=128, n_heads=2, n_kv_heads=1), RopeScaling(factor=8.0)),     # Llama 3.1's
            (dict(dim=128, n_heads=2, n_kv_heads=1),                                # other constants: fitted
             RopeScaling(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=4096))]


@pytest.mark.parametrize("shape,scaling", SCALINGS)
def test_rope_freqs_as_llama_cpp_writes_them(tmp_path, shape, scaling):
    llm = tiny_llm(**shape, rope_scaling=scaling)
    write_gguf(llm, tmp_path / "scaled.gguf")
    stored = next(t for t in gguf.GGUFReader(tmp_path / "scaled.gguf").tensors if t.name == "rope_freqs.weight")
    expected = llama_cpp_rope_factors(llm.config.head_dim, llm.config.rope_theta, scaling)
    np.testing.assert_allclose(stored.data, expected, rtol=1e-6)
    config, _ = read_gguf(tmp_path / "scaled.gguf")
    torch.testing.assert_close(rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling),
                               rope_frequencies(config.head_dim, config.rope_theta, scaling), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------ errors
def write_tiny_gguf(path, arch="llama", tensors=None, **metadata):
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        writer.add_uint32(key, value)
    for name, array in (tensors or {"token_embd.weight": np.zeros((8, 4), np.float32)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_non_llama_architecture_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(Llama3Error, match=r"gpt2\.gguf: GGUF architecture is 'gpt2'; only 'llama'"):
        read_gguf(path)


def test_mixture_of_experts_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "moe.gguf", **{"llama.expert_count": 8})
    with pytest.raises(Llama3Error, match="moe.gguf: this is a mixture-of-experts model"):
        read_gguf(path)


def test_unknown_tensor_is_refused(tmp_path):
    llm = tiny_llm()
    write_gguf(llm, tmp_path / "ok.gguf")
    reader = gguf.GGUFReader(tmp_path / "ok.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "bias.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama.") and len(field.types) == 1:
            writer.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    writer.add_tensor("blk.0.attn_q.bias", np.zeros(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(Llama3Error, match=r"bias.gguf: tensor 'blk.0.attn_q.bias' is not part of a Llama 3 model"):
        read_gguf(tmp_path / "bias.gguf")


@pytest.mark.parametrize("damage", ["garbage", "empty", "header", "half"])
def test_corrupt_files_give_clear_errors(tmp_path, damage):
    good = tmp_path / "good.gguf"
    write_gguf(tiny_llm(), good)
    data = good.read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes({"garbage": bytes(range(256)) * 8, "empty": b"", "header": data[:40],
                     "half": data[:len(data) // 2]}[damage])
    with pytest.raises(Llama3Error, match=rf"{damage}\.gguf: not a valid GGUF file .*corrupt or truncated"):
        read_gguf(bad)


def test_missing_file_and_bad_file_type(tmp_path):
    with pytest.raises(Llama3Error, match="nothing.gguf: no such file"):
        read_gguf(tmp_path / "nothing.gguf")
    with pytest.raises(Llama3Error, match="unknown GGUF file type 'q4_0'"):
        write_gguf(tiny_llm(), tmp_path / "x.gguf", file_type="q4_0")


def test_save_as_gguf_follows_the_model_dtype(tmp_path):
    """A float16 model saved with format="gguf" is written as F16 (matrices), float32 as F32."""
    import gguf

    llm = tiny_llm()
    llm.save(tmp_path / "f32.gguf", format="gguf")
    llm.model.half()
    llm.save(tmp_path / "f16.gguf", format="gguf")
    types = {name: {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / name).tensors}
             for name in ("f32.gguf", "f16.gguf")}
    assert types["f32.gguf"]["blk.0.attn_q.weight"] == "F32"
    assert types["f16.gguf"]["blk.0.attn_q.weight"] == "F16"
    assert types["f16.gguf"]["blk.0.attn_norm.weight"] == "F32"  # norms stay float32


@pytest.mark.parametrize("which", ["embedded-q4_1", "ours-f16", "quantized-q8_0-bf16"])
def test_our_gguf_reader_reads_what_the_gguf_package_reads(tmp_path, which):
    """open_gguf (our header parser + one memory map) against gguf.GGUFReader: the same
    metadata values, tensor names, shapes, types and bytes."""
    from llama3.checkpoint.gguf_file import open_gguf

    if which == "embedded-q4_1":
        path = _smollm2_path()
    else:
        path = tmp_path / f"{which}.gguf"
        llm = tiny_llm(tie_embeddings=False)
        if which == "ours-f16":
            write_gguf(llm, path, file_type="f16")
        else:  # Q8_0 blocks written by the gguf package's own quantizer
            writer = gguf.GGUFWriter(str(path), "llama")
            writer.add_uint32("llama.block_count", 2)
            writer.add_string("tokenizer.ggml.model", "gpt2")
            writer.add_array("tokenizer.ggml.tokens", ["a", "b", "ü"])
            weight = llm.model.layers[0].attention.wq.weight.detach().numpy()
            writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            wk = llm.model.layers[0].attention.wk.weight.detach().numpy()
            writer.add_tensor("blk.0.attn_k.weight", gguf.quants.quantize(wk, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
            writer.add_tensor("output_norm.weight", np.arange(64, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert ours.metadata.keys() == theirs.fields.keys() - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, value in ours.metadata.items():
        want = theirs.fields[key].contents()
        assert value == pytest.approx(want) if isinstance(value, float) else value == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.shape == tuple(int(n) for n in reference.shape), mine.name
        assert mine.tensor_type == reference.tensor_type
        assert mine.data.shape == reference.data.shape and mine.data.dtype == reference.data.dtype
        assert np.array_equal(mine.data, reference.data), mine.name


def test_a_tensor_past_the_end_of_the_file_is_reported(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(tiny_llm(), good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(Llama3Error, match=r"cut\.gguf: not a valid GGUF file \(tensor '[\w.]+' ends past the end"):
        read_gguf(cut)
