"""Chat fine-tuning: the loss mask is exactly the assistant's tokens, packing does not leak attention,
LoRA leaves the base alone and merges exactly."""

import copy
import json

import pytest
import torch

from llama3.config import get_preset
from llama3.llm import LLM
from llama3.model import Transformer
from llama3.train.config import TrainConfig
from llama3.train.data import DataError
from llama3.train.distributed import Dist
from llama3.train.lora import LoRAConfig, LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from llama3.train.sft import IGNORE, PackedChats, read_chats, to_example, tokenize_chat
from llama3.train.trainer import train_loop
from train_helpers import kjv_chapters, one_thread, run_cli, run_main, train_small_bpe

single_thread = pytest.fixture(autouse=True)(one_thread)

CONVERSATION = [
    {"role": "system", "content": "You answer in the words of the King James Bible."},
    {"role": "user", "content": "What was in the beginning?"},
    {"role": "assistant", "content": "In the beginning God created the heaven and the earth."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": " And God said, Let there be light. "},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_small_bpe(tmp_path_factory.mktemp("tok"), kjv_chapters(8), vocab_size=400)


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    config = get_preset("tiny").replace(vocab_size=vocab_size, dim=32, hidden_dim=64)
    return Transformer(config).init_weights(seed=seed)


def chats_file(path, n=24):
    lines = []
    for i in range(n):
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Say verse {i}."},
            {"role": "assistant", "content": kjv_chapters(1)[0].splitlines()[1 + i % 20]}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    ids, trainable = tokenize_chat(tokenizer, CONVERSATION)
    assert ids == tokenizer.encode_chat(CONVERSATION, add_generation_prompt=False)
    spans, current = [], []
    for token, keep in zip(ids, trainable):
        if keep:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    # the template trims contents (as Meta's does); each turn ends with <|eot_id|>, which is learned too
    assert [tokenizer.decode(s) for s in spans] == [
        "In the beginning God created the heaven and the earth.<|eot_id|>",
        "And God said, Let there be light.<|eot_id|>"]
    masked_out = tokenizer.decode([t for t, keep in zip(ids, trainable) if not keep])
    assert "What was in the beginning?" in masked_out and "<|start_header_id|>assistant<|end_header_id|>" in masked_out
    assert "created" not in masked_out
    inputs, targets = to_example(ids, trainable)
    assert len(inputs) == len(targets) == len(ids) - 1
    assert [t for t in targets if t != IGNORE] == [t for t, keep in zip(ids, trainable) if keep]


def test_packed_examples_compute_as_if_alone(tokenizer):
    model = tiny_model(tokenizer.vocab_size).eval()
    examples = [to_example(*tokenize_chat(tokenizer, CONVERSATION[i:i + 3])) for i in (0, 1, 2)]
    T = sum(len(inputs) for inputs, _ in examples) + 5
    packed = PackedChats(examples, seq_len=T, pad_id=tokenizer.eos_id)
    assert len(packed) == 1  # all three share one row
    batch = packed.batch([0])
    assert batch.mask.shape == (1, 1, T, T)
    with torch.no_grad():
        logits = model(batch.tokens, positions=batch.positions, mask=batch.mask)[0]  # [T, V]
        at = 0
        for inputs, targets in examples:
            alone = model(torch.tensor([inputs]))[0]
            torch.testing.assert_close(logits[at:at + len(inputs)], alone, rtol=1e-4, atol=1e-4)
            assert batch.targets[0, at:at + len(inputs)].tolist() == targets
            at += len(inputs)
    assert (batch.targets[0, at:] == IGNORE).all()  # padding carries no loss
    unpacked = PackedChats(examples, seq_len=T, pad_id=tokenizer.eos_id, pack=False)
    assert len(unpacked) == 3


def test_lora_trains_only_adapters_and_merges_exactly(tokenizer, tmp_path):
    base = tiny_model(tokenizer.vocab_size)
    before = copy.deepcopy(base.state_dict())
    model = apply_lora(tiny_model(tokenizer.vocab_size), LoRAConfig(rank=4, alpha=8, targets=["wq", "wv", "w2"]))
    assert isinstance(model.layers[0].attention.wq, LoRALinear)
    assert not isinstance(model.layers[0].attention.wk, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    examples = [to_example(*tokenize_chat(tokenizer, m)) for m in read_chats(chats_file(tmp_path / "c.jsonl"))]
    data = PackedChats(examples, seq_len=64, pad_id=tokenizer.eos_id)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=5, batch_size=2, seq_len=64, lr=1e-2, warmup_steps=1,
                      eval_interval=0, checkpoint_interval=0, progress=False)
    _, result = train_loop(model, cfg, data, None, Dist())
    assert result.losses[-1] < result.losses[0]
    for name, tensor in before.items():  # the base weights did not move
        key = name.replace(".weight", ".base.weight") if any(f".{t}." in name for t in ("wq", "wv", "w2")) else name
        assert torch.equal(model.state_dict()[key], tensor), name
    assert model.layers[0].attention.wq.lora_b.abs().sum() > 0  # the adapter did
    tokens = torch.tensor([examples[0][0]])
    with torch.no_grad():
        unmerged = model(tokens)
        save_adapter(model, LoRAConfig(rank=4, alpha=8, targets=["wq", "wv", "w2"]), tmp_path / "adapter")
        reloaded = load_adapter(tiny_model(tokenizer.vocab_size), tmp_path / "adapter")
        torch.testing.assert_close(reloaded(tokens), unmerged)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(merged(tokens), unmerged, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(tokens), unmerged)  # and it differs from the base model


def test_chat_data_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                   '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_chats(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*no assistant message"):
        read_chats(bad)
    bad.write_text('{"messages": [{"role": "wizard", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: "):
        read_chats(bad)
    bad.write_text("\n\n")
    with pytest.raises(DataError, match="no conversations"):
        read_chats(bad)
    with pytest.raises(DataError, match="no such file"):
        read_chats(tmp_path / "missing.jsonl")


def test_sft_cli_lora_adapter_and_merged_folder(tokenizer, tmp_path):
    import llama3

    base_dir = tmp_path / "base"
    LLM(tiny_model(tokenizer.vocab_size), tiny_model(tokenizer.vocab_size).config, tokenizer).save(base_dir)
    data = chats_file(tmp_path / "chats.jsonl")
    out = tmp_path / "tuned"
    result = run_cli("sft", "--model", str(base_dir), "--data", str(data), "--out", str(out), "--lora-rank", "4",
                     "--merge", "--steps", "3", "--seq-len", "64", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["base_model"] == str(base_dir)
    merged = llama3.load(out)
    on_top = load_adapter(llama3.load(base_dir).model, out)
    tokens = torch.tensor([tokenizer.encode("And God said")])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(tokens), on_top(tokens), rtol=1e-5, atol=1e-5)
    bad = run_main("sft", "--model", str(base_dir), "--data", str(tmp_path / "nope.jsonl"), "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_epochs_count_the_rows_finetune_builds(tokenizer, tmp_path):
    import math

    from llama3.train.sft import build_chat_sets, finetune

    model = Transformer(get_preset("tiny").replace(vocab_size=tokenizer.vocab_size, dim=32, hidden_dim=64,
                                                   max_seq_len=48)).init_weights(seed=0)
    LLM(model, model.config, tokenizer).save(tmp_path / "base")
    data = chats_file(tmp_path / "chats.jsonl")
    # --seq-len 512 exceeds the model's context: rows are cut at 48 tokens, and the step count follows them
    train_set, _ = build_chat_sets(read_chats(data), tokenizer, 48, 0.05, True)
    assert len(train_set) != len(build_chat_sets(read_chats(data), tokenizer, 512, 0.05, True)[0])
    cfg = TrainConfig(out=str(tmp_path / "tuned"), model=str(tmp_path / "base"), data=str(data), seq_len=512,
                      batch_size=2, lr=1e-3, warmup_steps=0, eval_interval=0, checkpoint_interval=0,
                      sample_prompt=None, progress=False, lora_rank=4)
    result = finetune(cfg, epochs=1.5)
    assert result.step == len(result.losses) == math.ceil(1.5 * len(train_set) / 2)
