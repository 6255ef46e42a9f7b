"""Coverage-guided fuzzing of the file readers with atheris (optional: pip install 'llama3[fuzz]').

    python tests/fuzz_atheris.py gguf        [-max_total_time=600] [-rss_limit_mb=4096] [corpus_dir]
    python tests/fuzz_atheris.py config.json                          (or safetensors, tokenizer.json, params.json)

Each input replaces one file of the tiny model of tests/fuzz_corpus.py and is loaded with
`llama3.load`; a `Llama3Error` is the expected outcome for damaged input, anything else
(another exception, a crash, a timeout, the RSS limit) is reported by libFuzzer with the
input that caused it (crash-<sha1> in the working directory).  Not part of the test suite;
the fixed-seed fuzzer in tests/test_fuzz_files.py is.  See docs/fuzzing.md.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).parent))

with atheris.instrument_imports(include=["llama3"]):  # only modules imported here are instrumented: every reader, eagerly
    import llama3
    import llama3.checkpoint.gguf
    import llama3.checkpoint.gguf_file
    import llama3.checkpoint.hf
    import llama3.checkpoint.meta
    import llama3.tokenizer.gguf_vocab
    import llama3.tokenizer.hf
    from llama3.errors import Llama3Error

from fuzz_corpus import build_corpus  # noqa: E402

TARGETS = {"gguf": ("gguf", ""), "config.json": ("hf", "config.json"), "safetensors": ("hf", "model.safetensors"),
           "tokenizer.json": ("hf", "tokenizer.json"), "params.json": ("meta", "params.json")}


def main():
    which = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in TARGETS else "gguf"
    fmt, file = TARGETS[which]
    root = Path(tempfile.mkdtemp(prefix="llama3-fuzz-"))
    corpus = build_corpus(root / "corpus")
    source = corpus[fmt]
    target = root / "case" / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.parent.mkdir(parents=True)
    damaged = target / file if file else target
    seed = root / "seed"
    seed.mkdir()
    (seed / "original").write_bytes((source / file if file else source).read_bytes())

    def one_input(data: bytes) -> None:
        damaged.write_bytes(data)
        try:
            llama3.load(target)
        except Llama3Error as e:
            if "\n" in str(e):
                raise AssertionError(f"error message of more than one line: {e!r}") from None

    if not any(not a.startswith("-") for a in sys.argv[1:]):
        sys.argv.append(str(seed))  # start from the valid file
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
