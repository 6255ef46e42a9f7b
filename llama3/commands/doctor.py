"""`llama3 doctor SOURCE`: identify a checkpoint, check its settings, optionally compare with transformers."""

from __future__ import annotations

import argparse
import contextlib


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Identify a checkpoint (Hugging Face folder, Meta folder or GGUF file) and its version-specific "
        "settings: RoPE theta and scaling factor, tied output head, vocabulary size, chat template, stop "
        "tokens. Warns about known mismatches, e.g. a Llama 3.2 1B/3B checkpoint with the Llama 3.1 scaling "
        "factor 8 instead of 32. With --reference transformers it also runs one prompt through our model and "
        "transformers' and reports, stage by stage, max |Δ| and cosine similarity of the hidden states and "
        "the first layer where they diverge. Exit status 1 when anything is flagged.")
    parser.add_argument("source", nargs="?", default=None,
                        help="HF/Meta folder, .gguf file, hf:ORG/NAME[/FILE.gguf] (from the Hugging Face Hub) or "
                             "built-in name (default: the embedded model)")
    parser.add_argument("--reference", choices=["transformers"], default=None,
                        help="also compare hidden states with this independent implementation")
    parser.add_argument("--prompt", default="The capital of France is",
                        help="text for the comparison (a model without tokenizer uses ids 0..7)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="a stage diverges when some token's hidden state differs by more than this fraction "
                             "of its length, ||Δ|| / ||reference|| (default 1e-3)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


@contextlib.contextmanager
def quiet_progress_bars():
    """No progress bars while transformers loads the reference: its 'Loading weights' and 'Converting and
    de-quantizing GGUF tensors' bars would land in the middle of doctor's report.  transformers' own switch
    covers the bars it makes through its logging module; the GGUF converter calls tqdm.auto directly, so
    tqdm itself is told `disable=True` for the duration (and restored after)."""
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    def disabled(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "disable": True})

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    was_active = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if hf_logging is not None:
        hf_logging.disable_progress_bar()
    tqdm.std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original
        if was_active:
            hf_logging.enable_progress_bar()


def run(args) -> int:
    import json

    from llama3.inspect.doctor import compare_with_transformers, diagnose, load_transformers_reference, render_diagnosis

    from llama3.fast.plan import choose_plan

    diagnosis = diagnose(args.source)
    diagnosis.settings["decoding plan"] = choose_plan(fuse=True).describe() + " (generate/chat/serve on this CPU)"
    if args.reference == "transformers":
        import llama3
        from llama3.llm import resolve_source

        # The reference first: a Meta folder or a missing transformers is a one-line error
        # before our own copy of the model is loaded.
        with quiet_progress_bars():
            reference = load_transformers_reference(resolve_source(args.source))
        llm = llama3.load(args.source, dtype="float32")
        ids = (llm.tokenizer.encode(args.prompt) if llm.tokenizer is not None
               else list(range(min(8, llm.config.vocab_size))))
        diagnosis.comparison = compare_with_transformers(llm, reference, ids, tolerance=args.tolerance)
    print(json.dumps(diagnosis.to_dict(), indent=1, ensure_ascii=False) if args.json else render_diagnosis(diagnosis))
    flagged = diagnosis.warnings or (diagnosis.comparison and diagnosis.comparison.first_divergence)
    return 1 if flagged else 0
