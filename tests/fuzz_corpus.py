"""Small valid model files and the ways the file fuzzer damages them (tests/test_fuzz_files.py).

`build_corpus(root)` writes one tiny Llama (2 layers, 300-token byte-level BPE) as a GGUF
file, a Hugging Face folder and a Meta folder, all three with their tokenizer.  `mutants`
yields (case name, files to write) for a fixed seed: byte flips, overwritten fields (every
length, count, type, shape and offset of the GGUF header; hostile values for JSON keys),
truncation and extension.  `gguf_fields` lists the header's fields by position, which the
targeted tests (tests/test_hostile_files.py) use to plant one bad value.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

# A byte-level BPE small enough to load in milliseconds, with merges (the GGUF "gpt2" kind).
TEXTS = ["the quick brown fox jumps over the lazy dog. Hello world! 1234 and an ant ran."] * 40
PROMPT = "the lazy fox ran"


def build_corpus(root: Path) -> dict[str, Path]:
    """{"gguf": file, "hf": folder, "meta": folder} of the same tiny model and tokenizer."""
    from conftest import make_config, make_model

    from llama3.llm import LLM
    from llama3.tokenizer import load_tokenizer
    from llama3.train.bpe import train_bpe

    tokenizer = load_tokenizer(train_bpe(TEXTS, 300, root / "tokenizer", progress=False))
    config = make_config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=304,
                         max_seq_len=64)
    llm = LLM(model=make_model(config), config=config, tokenizer=tokenizer)
    llm.save(root / "tiny.gguf", format="gguf")
    llm.save(root / "hf", format="hf")
    llm.save(root / "meta", format="meta")
    return {"gguf": root / "tiny.gguf", "hf": root / "hf", "meta": root / "meta"}


# ----------------------------------------------------------------------------- GGUF fields
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_fields(data: bytes) -> list[tuple[int, str, str]]:
    """(position, struct format, what) of every field of a valid GGUF file's header: counts,
    string lengths, value types, scalar values, array lengths, tensor dims, types and offsets."""
    fields, pos = [], 4

    def take(fmt, what):
        nonlocal pos
        fields.append((pos, fmt, what))
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string(what):
        nonlocal pos
        n = take("<Q", f"{what} length")
        text = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return text

    def value(kind, what, depth=0):
        nonlocal pos
        if kind in _SCALAR:
            take(_SCALAR[kind], what)
        elif kind == 8:
            string(what)
        else:
            item, n = take("<I", f"{what} item type"), take("<Q", f"{what} array length")
            if item in _SCALAR:
                for i in range(n):
                    if i < 3:
                        take(_SCALAR[item], f"{what}[{i}]")
                    else:
                        pos += struct.calcsize(_SCALAR[item])
            else:
                for i in range(n):
                    value(item, f"{what}[{i}]", depth + 1) if i < 3 else _skip(item)

    def _skip(kind):
        nonlocal pos
        if kind == 8:
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
        else:
            value(kind, "skipped")

    take("<I", "version")
    n_tensors, n_keys = take("<Q", "tensor count"), take("<Q", "key count")
    for _ in range(n_keys):
        key = string("key")
        value(take("<I", f"{key} type"), key)
    for _ in range(n_tensors):
        name = string("tensor name")
        n_dims = take("<I", f"{name} n_dims")
        for d in range(n_dims):
            take("<Q", f"{name} dim {d}")
        take("<I", f"{name} type")
        take("<Q", f"{name} offset")
    return fields


def set_field(data: bytes, field: tuple[int, str, str], value) -> bytes:
    pos, fmt, _ = field
    out = bytearray(data)
    struct.pack_into(fmt, out, pos, value)
    return bytes(out)


def find_field(data: bytes, what: str) -> tuple[int, str, str]:
    return next(f for f in gguf_fields(data) if f[2] == what)


# ----------------------------------------------------------------------------- mutations
# Numbers that break naive readers: zero, one, negatives, around the integer widths, huge.
NASTY_INTS = [0, 1, 2, 3, 7, 31, 33, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**62, 2**63 - 1,
              2**64 - 1, 2861673724, 7758183177292864754]
NASTY_JSON = [0, -1, 1, 3, 2**31, 2**63, 10**30, 1e9, 1e30, -1e30, 1e-300, 0.5, float("nan"), float("inf"),
              float("-inf"), True, None, "", "x" * 1000, [], [1, 2], {}, {"a": {"b": [None]}}]


def _nasty_for(fmt: str, rng: random.Random):
    if fmt in ("<f", "<d"):
        return rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30, 1e-30])
    bits = struct.calcsize(fmt) * 8
    signed = fmt[1].islower()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if fmt == "<?":
        return rng.choice([True, False])
    return min(hi, max(lo, rng.choice(NASTY_INTS) * rng.choice([1, -1] if signed else [1])))


def flip(data: bytes, rng: random.Random, start: int = 0) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        i = rng.randrange(start, len(out))
        out[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.choice([0, 1, 4, 8, 23, rng.randrange(len(data)), rng.randrange(min(len(data), 4096))])]


def extend(data: bytes, rng: random.Random) -> bytes:
    tail = rng.choice([b"\0" * rng.randrange(1, 4096), bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))])
    return data + tail


def header_region(data: bytes, kind: str) -> int:
    """How many leading bytes are the header (where a flip is most interesting)."""
    if kind == "safetensors":
        return 8 + struct.unpack_from("<Q", data, 0)[0]
    if kind == "gguf":
        pos, fmt, _ = gguf_fields(data)[-1]
        return pos + struct.calcsize(fmt)
    return len(data)


def mutate_binary(data: bytes, kind: str, rng: random.Random) -> tuple[str, bytes]:
    how = rng.choice(["flip-header", "flip-header", "flip-any", "field", "field", "field", "truncate", "extend"])
    if how == "field" and kind == "gguf":
        field = rng.choice(gguf_fields(data))
        value = _nasty_for(field[1], rng)
        return f"field {field[2]}={value}", set_field(data, field, value)
    if how == "field" and kind == "safetensors":
        return mutate_safetensors_header(data, rng)
    if how == "field" or how == "flip-header":
        return "flip-header", flip(data[:header_region(data, kind)], rng) + data[header_region(data, kind):]
    if how == "flip-any":
        return "flip-any", flip(data, rng)
    if how == "truncate":
        return "truncate", truncate(data, rng)
    return "extend", extend(data, rng)


def mutate_safetensors_header(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Rewrite one entry of the JSON header: dtype, shape or data_offsets."""
    n = struct.unpack_from("<Q", data, 0)[0]
    header = json.loads(data[8:8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    key = rng.choice(["dtype", "shape", "data_offsets"])
    value = {"dtype": lambda: rng.choice(["F64", "I64", "BOOL", "U8", "F8_E4M3", "XX", 3]),
             "shape": lambda: rng.choice([[], [0], [2**40, 2**40], [-1, 4], [1] * 9, "x"]),
             "data_offsets": lambda: rng.choice([[0, 0], [0, 2**62], [1, 3], [5, 2], [0], None])}[key]()
    header[name][key] = value
    raw = json.dumps(header).encode()
    return f"safetensors {name}.{key}={value}", struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def mutate_json(text: str, rng: random.Random) -> tuple[str, str]:
    """Overwrite, delete or add a key of a JSON object file (or damage its text)."""
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    how = rng.choice(["overwrite", "overwrite", "overwrite", "delete", "add", "text"])
    if not isinstance(obj, dict) or not obj or how == "text":
        cut = rng.randrange(len(text) + 1)
        return "json text", rng.choice([text[:cut], text[:cut] + "\x00\xff" + text[cut:], "[" * 5000, "nul\ud800l"])
    key = rng.choice(sorted(obj))
    if how == "delete":
        del obj[key]
        return f"json del {key}", json.dumps(obj)
    if how == "add":
        obj[rng.choice(["num_experts", "moe", "x", key + "_"])] = 1
        return "json add", json.dumps(obj)
    if isinstance(obj[key], dict) and obj[key] and rng.random() < 0.5:  # one level down
        inner = rng.choice(sorted(obj[key]))
        obj[key][inner] = rng.choice(NASTY_JSON)
        return f"json {key}.{inner}={str(obj[key][inner])[:20]}", json.dumps(obj)
    obj[key] = rng.choice(NASTY_JSON)
    return f"json {key}={str(obj[key])[:20]}", json.dumps(obj)


# What each format's files are, and how they are damaged.
TARGETS = [  # (format, file inside the corpus entry ("" = the entry itself), kind, weight)
    ("gguf", "", "gguf", 6),
    ("hf", "config.json", "json", 3),
    ("hf", "model.safetensors", "safetensors", 3),
    ("hf", "tokenizer.json", "json", 2),
    ("hf", "tokenizer_config.json", "json", 1),
    ("hf", "generation_config.json", "json", 1),
    ("meta", "params.json", "json", 2),
    ("meta", "consolidated.00.pth", "pth", 2),
]


def mutants(corpus: dict[str, Path], n: int, seed: int = 0):
    """n cases: (name, source format, {relative file: new bytes}) for a fixed seed."""
    rng = random.Random(seed)
    originals = {}
    for fmt, file, _, _ in TARGETS:
        path = corpus[fmt] / file if file else corpus[fmt]
        originals[fmt, file] = path.read_bytes()
    weights = [t[3] for t in TARGETS]
    for i in range(n):
        fmt, file, kind, _ = rng.choices(TARGETS, weights)[0]
        data = originals[fmt, file]
        if kind == "json":
            what, text = mutate_json(data.decode("utf-8"), rng)
            new = text.encode("utf-8", "surrogatepass")
        else:
            what, new = mutate_binary(data, kind, rng)
        yield f"{i:04d} {fmt}/{file or corpus[fmt].name}: {what}", fmt, {file: new}
