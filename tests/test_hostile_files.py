"""Each hole issue 17 found in the file readers, reproduced: the damaged file must give one
line naming the file (exit status 2 from the CLI), never a MemoryError, a hang, a traceback
from the tokenizers library, or a model that loads and prints nonsense."""

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import llama3
from fuzz_corpus import build_corpus, find_field, gguf_fields, set_field
from llama3.errors import Llama3Error
from llama3.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)}  # the code under test


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile"))


def damaged(tmp_path, corpus, what, value) -> Path:
    data = corpus["gguf"].read_bytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes(set_field(data, find_field(data, what), value))
    return path


def refused(path, *fragments):
    """llama3.load(path) fails with one line that names the file (and says `fragments`)."""
    with pytest.raises(Llama3Error) as info:
        llama3.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def load_in_a_limited_process(path, timeout=120):
    """llama3.load in a child with 6 GiB of address space: the old loader built layers until killed."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    code = ("import sys, llama3\nfrom llama3.errors import Llama3Error\n"
            "try:\n    llama3.load(sys.argv[1])\nexcept Llama3Error as e:\n    print('refused:', e)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env=ENV)


# ------------------------------------------------------------------------ GGUF
def test_huge_string_lengths_are_checked_before_reading(tmp_path, corpus):
    """A tensor name (and a metadata key) claiming 2**62 bytes: was MemoryError from f.read(length)."""
    refused(damaged(tmp_path, corpus, "tensor name length", 2**62), "needs 4611686018427387904 bytes")
    refused(damaged(tmp_path, corpus, "key length", 2**62), "not a valid GGUF file")


@pytest.mark.parametrize("dim", [2**59, 7758183177292864754])  # 32 * 2**59 wraps an int64 product to 0
def test_huge_tensor_dims(tmp_path, corpus, dim):
    """was: ValueError: cannot reshape array of size 0 into shape (128, 7758183177292864754)."""
    data = corpus["gguf"].read_bytes()
    name = next(f[2] for f in gguf_fields(data) if f[2].endswith(" dim 1"))  # a [32, N] matrix
    refused(damaged(tmp_path, corpus, name, dim), "ends past the end of the file")


@pytest.mark.parametrize("offset, fragment", [(0, "overlap"), (1, "not a multiple of 32")])
def test_tensor_offsets_aligned_and_not_overlapping(tmp_path, corpus, offset, fragment):
    """A second tensor's offset set to 0 or 1 loaded silently and the model printed HHHH."""
    data = corpus["gguf"].read_bytes()
    second = [f for f in gguf_fields(data) if f[2].endswith(" offset")][1]
    path = tmp_path / "bad.gguf"
    path.write_bytes(set_field(data, second, offset))
    refused(path, fragment)


def test_absurd_block_count_is_refused_before_building(tmp_path, corpus):
    """llama.block_count = 2861673724 built layers until the process was killed."""
    path = damaged(tmp_path, corpus, "llama.block_count", 2861673724)
    done = load_in_a_limited_process(path)
    assert done.stdout.startswith(f"refused: {path}") and "2861673724" in done.stdout, done.stdout + done.stderr[-800:]
    refused(damaged(tmp_path, corpus, "llama.block_count", 40), "llama.block_count = 40 but the file has "
                                                              "tensors for 2 layers")


@pytest.mark.parametrize("merge", ["an t", "a n"])  # "an" is not a token / the merge's result is not one
def test_inconsistent_vocabulary_is_a_clean_error(tmp_path, merge):
    """was: Exception: Error while initializing BPE: Token 'an' out of vocabulary (and a Rust panic)."""
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "n", "t", "b"])
    writer.add_token_merges([merge])
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(Llama3Error, match=r"vocab\.gguf: the embedded vocabulary is inconsistent \("):
        load_tokenizer(path)


def test_non_finite_gguf_weights(tmp_path, corpus):
    path = tmp_path / "inf.gguf"
    data = bytearray(corpus["gguf"].read_bytes())
    tensor = next(t for t in gguf.GGUFReader(corpus["gguf"]).tensors if t.name == "blk.1.ffn_down.weight")
    at = bytes(data).index(tensor.data.tobytes()[:256])
    data[at:at + 4] = np.float32(np.inf).tobytes()
    path.write_bytes(bytes(data))
    refused(path, "'layers.1.feed_forward.w2.weight' holds NaN or infinite values")


# ------------------------------------------------------------------------ HF and Meta
def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture
def hf(tmp_path, corpus):
    import shutil

    return Path(shutil.copytree(corpus["hf"], tmp_path / "hf"))


def test_absurd_layer_count_in_config_json(hf):
    """num_hidden_layers = 10**9 must not build layers first; fewer tensors than layers is named."""
    edit_config(hf, num_hidden_layers=10**9)
    done = load_in_a_limited_process(hf)
    assert done.stdout.startswith("refused:") and "n_layers=1000000000" in done.stdout, done.stdout + done.stderr[-800:]
    edit_config(hf, num_hidden_layers=3000)
    refused(hf, "num_hidden_layers = 3000 but the file has tensors for 2 layers")


@pytest.mark.parametrize("eps", [1e30, math.inf, math.nan, -1e-5])
def test_absurd_rms_norm_eps(hf, eps):
    """rms_norm_eps of 1e30 or Infinity loaded and generated <|begin_of_text|> over and over."""
    edit_config(hf, rms_norm_eps=eps)
    refused(hf, "config.json", "norm_eps")


@pytest.mark.parametrize("change", [dict(rope_theta=math.inf), dict(rope_theta=0.5), dict(hidden_size=10**7),
                                    dict(vocab_size=2**40), dict(num_attention_heads=5)])
def test_config_numbers_in_real_ranges(hf, change):
    edit_config(hf, **change)
    refused(hf, "config.json")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
def test_non_finite_safetensors_weights(hf, value):
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = value
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    refused(hf, "'layers.0.feed_forward.w3.weight'")


def test_non_finite_meta_weights(tmp_path, corpus):
    import shutil

    meta = Path(shutil.copytree(corpus["meta"], tmp_path / "meta"))
    state = torch.load(meta / "consolidated.00.pth", weights_only=True)
    state["norm.weight"][0] = float("nan")
    torch.save(state, meta / "consolidated.00.pth")
    refused(meta, "'norm.weight' holds NaN")


def test_too_deep_json_is_a_clean_error(hf):
    (hf / "config.json").write_text("[" * 100000)
    refused(hf, "nested too deeply")


# ------------------------------------------------------------------------ the CLI
def test_cli_prints_one_line_naming_the_file_and_exits_2(tmp_path, corpus):
    path = damaged(tmp_path, corpus, "tensor name length", 2**62)
    done = subprocess.run([sys.executable, "-m", "llama3", "generate", "--model", str(path), "--max-new-tokens", "2",
                           "hi"], capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr  # ("loading ..." may come before)
    assert errors[0].startswith(f"error: {path}: not a valid GGUF file"), done.stderr
