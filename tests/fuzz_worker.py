"""Runs file-fuzzer cases in a process of its own (started by tests/test_fuzz_files.py).

    python tests/fuzz_worker.py CASES.json

CASES.json: [{"name", "path", "format"}, ...].  For each case it prints `START i`, then one
`RESULT {...}` line: "ok" with a digest of what the model computed, "error" with the
Llama3Error message, or "traceback" / "hang" / "nonfinite" (the fuzzer's failures).  A crash
(a signal, the memory limit) ends the process; the parent knows the case from the last START.
"""

import hashlib
import json
import resource
import signal
import sys
import traceback

CASE_SECONDS = 20           # one load + forward of the tiny model takes ~50 ms
MEMORY_BYTES = 6 << 30      # address space: torch itself maps ~2 GiB; a hostile allocation stops here


class Hang(BaseException):
    pass


def run_case(case, llama3, torch):
    from fuzz_corpus import PROMPT

    llm = llama3.load(case["path"])
    ids = llm.tokenizer.encode(PROMPT) if llm.tokenizer is not None else [1, 2, 3]
    ids = [i for i in ids if i < llm.config.vocab_size][:llm.config.max_seq_len] or [0]
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))
    if not torch.isfinite(logits).all():
        return {"result": "nonfinite"}
    text = llm.tokenizer.decode(ids) if llm.tokenizer is not None else ""
    digest = hashlib.sha256(json.dumps([ids, text, logits.double().round(decimals=4).tolist()]).encode())
    if case["format"] == "gguf":  # the quantized loader reads the same file through the same reader
        from llama3.fast.gguf_quantized import load_gguf_quantized

        quantized = load_gguf_quantized(case["path"], "int8")
        with torch.no_grad():
            if not torch.isfinite(quantized.model(torch.tensor([ids]))).all():
                return {"result": "nonfinite", "where": "int8"}
    return {"result": "ok", "digest": digest.hexdigest()}


def main():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    import torch

    import llama3
    from llama3.errors import Llama3Error

    torch.set_num_threads(1)

    def alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    cases = json.loads(open(sys.argv[1]).read())
    for i, case in enumerate(cases):
        print(f"START {i}", flush=True)
        signal.alarm(CASE_SECONDS)
        try:
            result = run_case(case, llama3, torch)
        except Llama3Error as e:
            result = {"result": "error", "message": str(e)}
        except Hang:
            result = {"result": "hang"}
        except BaseException as e:  # noqa: BLE001 -- exactly what the fuzzer looks for
            result = {"result": "traceback", "message": "".join(traceback.format_exception(e))[-3000:]}
        finally:
            signal.alarm(0)
        print("RESULT " + json.dumps({"i": i, **result}), flush=True)


if __name__ == "__main__":
    main()
