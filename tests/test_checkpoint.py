"""Checkpoints: HF and Meta folders load, save, round-trip, merge shards, and fail clearly on bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama3
from llama3.checkpoint import build_model, detect_format, load_checkpoint, read_config, save_checkpoint
from llama3.checkpoint.meta import _config as meta_config
from llama3.config import PRESETS, RopeScaling
from llama3.errors import CheckpointError, ConfigError
from llama3.llm import LLM

from conftest import make_config, make_model


def tiny_llm(**overrides) -> LLM:
    config = make_config(**overrides)
    return LLM(model=make_model(config), config=config)


def logits(llm, seed=0):
    tokens = torch.randint(0, llm.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return llm.model(tokens)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", ["hf", "meta"])
@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tmp_path, fmt, tied):
    llm = tiny_llm(tie_embeddings=tied, rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=16))
    llm.save(tmp_path / "m", format=fmt)
    assert detect_format(tmp_path / "m") == fmt
    back = llama3.load(tmp_path / "m")
    assert back.config == llm.config
    assert same_weights(back.model, llm.model)
    if tied:
        assert back.model.output.weight is back.model.tok_embeddings.weight
    torch.testing.assert_close(logits(back), logits(llm), atol=0, rtol=0)


def test_hf_to_meta_to_hf_is_exact(tmp_path):
    """Start from a folder written by transformers itself; go to Meta and back; every tensor identical."""
    import transformers  # the reference: a dev dependency, never skipped
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=101, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    save_checkpoint(load_checkpoint(tmp_path / "hf"), tmp_path / "meta", format="meta")
    save_checkpoint(load_checkpoint(tmp_path / "meta"), tmp_path / "hf2", format="hf")
    original, again = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name


@pytest.mark.parametrize("tied", [False, True])
def test_exported_hf_folder_loads_in_transformers(tmp_path, tied):
    import transformers  # the reference: a dev dependency, never skipped
    llm = tiny_llm(tie_embeddings=tied, n_kv_heads=1,
                   rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16))
    llm.save(tmp_path, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.randint(0, llm.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(tokens).logits - llm.model(tokens)).abs().max().item() <= 1e-4


def test_sharded_hf_folder_from_transformers(tmp_path):
    import transformers  # the reference: a dev dependency, never skipped
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=101)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    llm = llama3.load(tmp_path)
    tokens = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert (hf(tokens).logits - llm.model(tokens)).abs().max().item() <= 1e-4


def test_our_sharded_hf_writer(tmp_path):
    from llama3.checkpoint.hf import write_hf

    llm = tiny_llm()
    write_hf(llm, tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert same_weights(llama3.load(tmp_path).model, llm.model)


def split_like_fairscale(state: dict, n: int) -> list[dict]:
    """Meta's model-parallel layout, written independently: ColumnParallelLinear and
    VocabParallelEmbedding split dim 0, RowParallelLinear (wo, w2) dim 1, norms copied."""
    shards = [{} for _ in range(n)]
    for name, w in state.items():
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            pieces = w.chunk(n, dim=1)
        elif name.endswith("norm.weight"):
            pieces = [w] * n
        else:
            pieces = w.chunk(n, dim=0)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


def test_sharded_meta_checkpoint_merges(tmp_path):
    llm = tiny_llm(vocab_size=100)
    llm.save(tmp_path, format="meta")
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    (tmp_path / "consolidated.00.pth").unlink()
    for k, shard in enumerate(split_like_fairscale(state, 2)):
        torch.save(shard, tmp_path / f"consolidated.{k:02d}.pth")
    back = llama3.load(tmp_path)
    assert same_weights(back.model, llm.model)


def test_meta_vocab_and_tying_come_from_the_tensors(tmp_path):
    llm = tiny_llm(tie_embeddings=True)
    llm.save(tmp_path, format="meta")
    params = json.loads((tmp_path / "params.json").read_text())
    params["vocab_size"] = -1  # as in Meta's Llama 2 files
    (tmp_path / "params.json").write_text(json.dumps(params))
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    state.pop("output.weight")  # tied models may lack the head entirely
    torch.save(state, tmp_path / "consolidated.00.pth")
    back = llama3.load(tmp_path)
    assert back.config.vocab_size == 101 and back.config.tie_embeddings


def test_meta_use_scaled_rope_constants():
    """params.json says only use_scaled_rope: factor 8 (Meta's constant), 32 for the Llama 3.2 1B/3B shapes."""
    def params_of(preset):
        c = PRESETS[preset]
        return {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                "vocab_size": c.vocab_size, "multiple_of": 256 if "3.2" in preset else 1024,
                "ffn_dim_multiplier": {"llama-3.2-1b": 1.5, "llama-3.2-3b": 1.0}.get(preset, 1.3),
                "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}

    def shapes_only(c, tied):
        state = {"tok_embeddings.weight": torch.zeros(1, 1).expand(c.vocab_size, c.dim)}  # no memory
        return state if tied else {**state, "output.weight": torch.ones(1, 1).expand(c.vocab_size, c.dim)}

    for preset, tied in (("llama-3.1-8b", False), ("llama-3.2-1b", True), ("llama-3.2-3b", True)):
        config = meta_config(params_of(preset), shapes_only(PRESETS[preset], tied))
        assert config == PRESETS[preset], preset


def test_dtype_and_device(tmp_path):
    llm = tiny_llm()
    llm.model.to(torch.bfloat16)
    llm.save(tmp_path, format="hf")
    assert llama3.load(tmp_path).dtype == torch.float32  # default: float32, widened exactly
    assert load_checkpoint(tmp_path, dtype="auto").dtype == torch.bfloat16
    half = llama3.load(tmp_path, dtype="float16", device="cpu")
    assert half.dtype == torch.float16 and half.device.type == "cpu"
    assert same_weights(llama3.load(tmp_path, dtype="bfloat16").model, llm.model)


def test_tokenizer_travels_with_the_folder(tmp_path):
    tokenizer = llama3.load_tokenizer()
    llm = tiny_llm(vocab_size=tokenizer.vocab_size, dim=32, n_heads=2, n_kv_heads=1, n_layers=1)
    llm.tokenizer = tokenizer
    for fmt in ("hf", "meta"):
        llm.save(tmp_path / fmt, format=fmt)
        back = llama3.load(tmp_path / fmt)
        assert back.tokenizer is not None
        assert back.tokenizer.encode("Hello, world!") == tokenizer.encode("Hello, world!")
    assert llama3.load(tmp_path / "hf").tokenizer.vocab_size == tokenizer.vocab_size
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.stop_ids and 128009 in tokenizer.stop_ids
    llm.tokenizer = None
    llm.save(tmp_path / "bare", format="hf")
    assert llama3.load(tmp_path / "bare").tokenizer is None


def test_read_config_reads_only_the_config(tmp_path):
    llm = tiny_llm()
    llm.save(tmp_path, format="hf")
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    assert read_config(tmp_path) == llm.config


# ------------------------------------------------------------------------ atomic saving
def test_saving_into_an_existing_folder_keeps_other_files(tmp_path):
    from llama3.checkpoint.hf import write_hf

    write_hf(tiny_llm(), tmp_path, max_shard_bytes=30_000)  # sharded first
    (tmp_path / "train_log.txt").write_text("keep me")
    llm = LLM(model=make_model(make_config(), seed=1), config=make_config())
    llm.save(tmp_path, format="hf")  # now one file: the old shards and index must go
    assert (tmp_path / "train_log.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert same_weights(llama3.load(tmp_path).model, llm.model)


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    llm = tiny_llm()
    llm.save(tmp_path / "m", format="hf")
    before = sorted(p.name for p in tmp_path.rglob("*"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError):
        LLM(model=make_model(make_config(), seed=3), config=make_config()).save(tmp_path / "m", format="hf")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no temp files left either
    assert same_weights(llama3.load(tmp_path / "m").model, llm.model)


# ------------------------------------------------------------------------ bad input
@pytest.fixture
def hf_folder(tmp_path):
    tiny_llm().save(tmp_path / "hf", format="hf")
    return tmp_path / "hf"


@pytest.fixture
def meta_folder(tmp_path):
    tiny_llm().save(tmp_path / "meta", format="meta")
    return tmp_path / "meta"


def edit_tensors(folder, edit):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def expect_error(path, *fragments, error=CheckpointError):
    with pytest.raises(error) as info:
        llama3.load(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_folder(tmp_path):
    with pytest.raises(llama3.Llama3Error, match="no such file or folder"):
        llama3.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_folder_without_a_checkpoint(tmp_path):
    expect_error(tmp_path, "neither a Hugging Face folder")
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "params.json").write_text("{}")
    expect_error(tmp_path, "original", "pass that folder")


def test_hf_weights_missing(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    expect_error(hf_folder, "no model.safetensors")


def test_hf_config_missing_or_corrupt(hf_folder):
    text = (hf_folder / "config.json").read_text()
    (hf_folder / "config.json").write_text(text[:40])
    expect_error(hf_folder, "config.json", "not valid JSON")
    (hf_folder / "config.json").unlink()
    expect_error(hf_folder, "neither a Hugging Face folder")


def test_truncated_safetensors(hf_folder):
    file = hf_folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    expect_error(hf_folder, "model.safetensors", "truncated or corrupt")


def test_garbage_safetensors(hf_folder):
    (hf_folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    expect_error(hf_folder, "model.safetensors", "not a readable safetensors file")


def test_hf_missing_tensor(hf_folder):
    edit_tensors(hf_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(hf_folder, "lacks tensor 'layers.1.feed_forward.w3.weight'")


def test_hf_unexpected_tensor(hf_folder):
    edit_tensors(hf_folder, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(2)}))
    expect_error(hf_folder, "unexpected tensor 'model.layers.7.mlp.up_proj.weight'")


def test_hf_wrong_shape(hf_folder):
    edit_tensors(hf_folder, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 95)}))
    expect_error(hf_folder, "'layers.0.feed_forward.w2.weight'", "[64, 95]", "[64, 96]")
    edit_tensors(hf_folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    expect_error(hf_folder, "k_proj", "[16, 64]", "[32, 64]")


def test_config_contradicts_weights(hf_folder):
    edit_config(hf_folder, lambda c: c.update(vocab_size=100))
    expect_error(hf_folder, "'tok_embeddings.weight'", "[101, 64]", "[100, 64]", "contradicts")


def test_unknown_config_key(hf_folder):
    edit_config(hf_folder, lambda c: c.update(num_experts=8))
    expect_error(hf_folder, "unknown keys ['num_experts']", error=ConfigError)


def test_tied_config_with_a_different_head(hf_folder):
    edit_config(hf_folder, lambda c: c.update(tie_word_embeddings=True))
    expect_error(hf_folder, "tie_word_embeddings", "differs")


def test_untied_config_without_head(hf_folder):
    edit_tensors(hf_folder, lambda t: t.pop("lm_head.weight"))
    expect_error(hf_folder, "lacks tensor 'output.weight'")


def test_missing_shard(tmp_path):
    from llama3.checkpoint.hf import write_hf

    write_hf(tiny_llm(), tmp_path, max_shard_bytes=30_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_error(tmp_path, shard.name, "missing")


def test_pickle_weights_only(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    (hf_folder / "pytorch_model.bin").write_bytes(b"")
    expect_error(hf_folder, "safetensors", "safe_serialization")


def test_corrupt_and_truncated_pth(meta_folder):
    file = meta_folder / "consolidated.00.pth"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    expect_error(meta_folder, "consolidated.00.pth", "truncated or corrupt")
    file.write_bytes(b"\x80\x04garbage")
    expect_error(meta_folder, "consolidated.00.pth", "not a readable PyTorch checkpoint")


def test_meta_shard_gap_and_mismatch(meta_folder):
    shutil.copy(meta_folder / "consolidated.00.pth", meta_folder / "consolidated.02.pth")
    expect_error(meta_folder, "consolidated.01.pth is missing")
    state = torch.load(meta_folder / "consolidated.00.pth", weights_only=True)
    state.pop("norm.weight")
    torch.save(state, meta_folder / "consolidated.01.pth")
    (meta_folder / "consolidated.02.pth").unlink()
    expect_error(meta_folder, "consolidated.01.pth", "'norm.weight'", "only some of the shards")


def test_meta_params_problems(meta_folder):
    params = json.loads((meta_folder / "params.json").read_text())
    (meta_folder / "params.json").write_text(json.dumps({**params, "moe": True}))
    expect_error(meta_folder, "unknown keys ['moe']", error=ConfigError)
    (meta_folder / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    expect_error(meta_folder, "params.json: n_layers = 3 but the file has tensors for 2 layers")
    (meta_folder / "params.json").write_text(json.dumps({**params, "dim": 48}))
    expect_error(meta_folder, "shape", "contradicts")


def test_meta_unexpected_tensor(meta_folder):
    state = torch.load(meta_folder / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.wqkv.weight"] = torch.zeros(3)
    torch.save(state, meta_folder / "consolidated.00.pth")
    expect_error(meta_folder, "unexpected tensor 'layers.0.attention.wqkv.weight'")


def test_build_model_is_strict():
    config = make_config(tie_embeddings=True)
    state = make_model(make_config()).state_dict()  # untied: has output.weight
    with pytest.raises(CheckpointError, match="unexpected tensor 'output.weight'.*ties"):
        build_model(config, state)
    state.pop("output.weight")
    model = build_model(config, state)
    assert model.output.weight is model.tok_embeddings.weight


def test_unknown_save_format(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'onnx'"):
        save_checkpoint(tiny_llm(), tmp_path, format="onnx")


def test_write_json_is_atomic_and_read_json_takes_an_error_class(tmp_path):
    import os

    from llama3.checkpoint.files import read_json, write_json
    from llama3.tokenizer import TokenizerError

    target = tmp_path / "config.json"
    target.write_text('{"old": 1}')
    os.link(target, tmp_path / "reader.json")  # a reader holding the old file
    write_json(target, {"new": 2})
    assert read_json(target) == {"new": 2}
    assert read_json(tmp_path / "reader.json") == {"old": 1}  # replaced, not overwritten in place
    assert not list(tmp_path.glob(".*tmp"))
    target.write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="expected a JSON object"):
        read_json(target, TokenizerError)
    (tmp_path / "bad.json").write_bytes(b"\xff{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_figures_get_ordinary_permissions(tmp_path):
    import os

    from llama3.inspect.figures import new_figure, save_figure

    umask = os.umask(0)
    os.umask(umask)
    fig = new_figure(1, 1)
    fig.add_subplot().plot([0, 1])
    path = save_figure(fig, tmp_path / "plot.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert not list(tmp_path.glob(".*tmp"))


# ------------------------------------------------------------------------ memory
LOAD_RSS = """
import ctypes, gc, json, pathlib, sys
import torch, llama3

def status():
    lines = pathlib.Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) * 1024 for k, _, v in (l.partition(":") for l in lines) if v.strip().endswith("kB")}

warmup, path, dtype = sys.argv[1:4]
llama3.load(warmup, dtype=dtype)  # imports and first-use set-up, outside the measurement
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
before = status()["VmRSS"]
pathlib.Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := RSS now
llm = llama3.load(path, dtype=dtype)
loaded = sum(p.numel() * p.element_size() for p in llm.model.parameters())
print(json.dumps({"growth": status()["VmHWM"] - before, "loaded": loaded}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_holds_one_copy_of_the_weights(tmp_path, dtype):
    """Peak RSS growth while loading a ~36 MB float32 safetensors folder, in a fresh process:
    at most 1.5x the file kept as float32 (its mapped pages are the parameters), at most
    1.5x the result cast to bfloat16 (each float32 source released once cast).  A loader
    that copies every tensor, or keeps the sources of its casts, needs 2x / 3x."""
    config = make_config(dim=512, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=1024, vocab_size=4096,
                         tie_embeddings=True)
    LLM(model=make_model(config), config=config).save(tmp_path / "model", format="hf")
    LLM(model=make_model(make_config()), config=make_config()).save(tmp_path / "warmup", format="hf")
    file_bytes = (tmp_path / "model" / "model.safetensors").stat().st_size
    done = subprocess.run([sys.executable, "-c", LOAD_RSS, str(tmp_path / "warmup"), str(tmp_path / "model"), dtype],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    bound = 1.5 * (file_bytes if dtype == "float32" else result["loaded"])
    assert result["growth"] <= bound, f"RSS grew {result['growth'] / 1e6:.1f} MB loading {file_bytes / 1e6:.1f} MB"
