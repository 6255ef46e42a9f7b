"""`llama3 download ORG/NAME`: fetch a model from the Hugging Face Hub into its cache, print its path."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  llama3 download HuggingFaceTB/SmolLM2-360M-Instruct        a model folder (config, tokenizer, safetensors)
  llama3 download bartowski/Llama-3.2-1B-Instruct-GGUF --file Llama-3.2-1B-Instruct-Q8_0.gguf
  HF_TOKEN=hf_... llama3 download meta-llama/Llama-3.2-1B-Instruct   a gated model: accept its licence first
  llama3 generate --model hf:HuggingFaceTB/SmolLM2-360M-Instruct "Hello"   --model hf:... downloads by itself

environment (huggingface_hub's own):
  HF_TOKEN          access token for gated and private models (https://huggingface.co/settings/tokens);
                    `hf auth login` saves one too
  HF_HUB_CACHE      where models are kept (default $HF_HOME/hub, i.e. ~/.cache/huggingface/hub); shared
                    with transformers and every other tool that uses huggingface_hub
  HF_HUB_OFFLINE=1  never touch the network: use only what is already in the cache
  HF_ENDPOINT       another Hub (a mirror) instead of https://huggingface.co
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Download a model from the Hugging Face Hub through huggingface_hub (its progress bars, its cache,\n"
        "resumed if interrupted), or find it already in the cache, and print its local path.\n\n"
        "Only the files llama3 loads are fetched: of a model folder, config.json (checked first: a model\n"
        "llama3 cannot run is refused before its weights come), generation_config.json, the tokenizer files\n"
        "and the *.safetensors weights, never the repo's original/ copy, .bin pickles or other formats;\n"
        "of a GGUF repo, its one .gguf file (name it with --file when there are several); of a repo in\n"
        "Meta's format, params.json, consolidated.*.pth and tokenizer.model.\n\n"
        "The printed path works as --model PATH; --model hf:ORG/NAME does the same download by itself.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("repo", metavar="ORG/NAME",
                        help="the model's repository on huggingface.co (hf:ORG/NAME, ORG/NAME@REVISION and "
                             "ORG/NAME/FILE.gguf work too)")
    parser.add_argument("--file", default=None, metavar="FILE",
                        help="one file of the repo, e.g. a .gguf of a repo with several quantizations")
    parser.add_argument("--revision", default=None, metavar="R",
                        help="a branch, tag or commit hash (default main)")


def run(args: argparse.Namespace) -> int:
    import sys

    from llama3.checkpoint.hub import download, parse_source
    from llama3.errors import Llama3Error

    model = parse_source(args.repo)
    for flag, given, in_name in (("--file", args.file, model.file), ("--revision", args.revision, model.revision)):
        if given is not None and in_name is not None and given != in_name:
            raise Llama3Error(f"{args.repo} names {flag.removeprefix('--')} {in_name!r} and {flag} says "
                              f"{given!r}; give it once")
    file, revision = args.file or model.file, args.revision or model.revision
    path = download(model.repo_id, file=file, revision=revision)
    source = f"hf:{model.repo_id}{'@' + revision if revision else ''}{'/' + file if file else ''}"
    print(path)
    print(f"use it as --model {source} (or --model {path})", file=sys.stderr)
    return 0
