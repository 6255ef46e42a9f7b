"""`llama3 tokenize`: show how text becomes token ids, one token a line."""

from __future__ import annotations

import argparse
import json

from llama3.commands.text_input import add_errors_argument, argument_text, text_or_stdin

# the same symbols as llama3.inspect's token labels (␣ space, ↵ newline)
VISIBLE = {" ": "␣", "\n": "↵", "\t": "→", "\r": "␍"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Show how text becomes token ids: each token's id and its text, with whitespace made visible\n"
        "(␣ space, ↵ newline, → tab). A token that is only part of a UTF-8 character (Chinese, emoji)\n"
        "shows its raw bytes, e.g. \\xe4\\xbd.\n\n"
        "examples:\n"
        "  llama3 tokenize 'This is a test sentence.'\n"
        "  llama3 tokenize --tokenizer llama3 --chat 'Hi there'      # Meta's Llama 3 tokenizer\n"
        "  echo 'def f(x): return x' | llama3 tokenize -\n")
    parser.add_argument("text", help="the text to tokenize; '-' reads it from stdin")
    parser.add_argument("--tokenizer", "--model", "-t", dest="tokenizer", default=None, metavar="SOURCE",
                        help="a model folder, .gguf file, tokenizer.json/tokenizer.model, hf:ORG/NAME (a Hugging "
                             "Face Hub model: only its tokenizer files are fetched), a built-in name "
                             "(smollm2-135m-instruct), or llama3 for Meta's Llama 3 tokenizer; default: the default "
                             "model's (smollm2-135m-instruct), so the ids are the ones `llama3 generate` feeds it")
    parser.add_argument("--chat", action="store_true",
                        help="encode TEXT as a user message in the tokenizer's chat format (with the assistant "
                             "prompt after it); TEXT may also be a JSON list of {role, content} messages")
    parser.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend the begin-of-text token")
    parser.add_argument("--eos", action="store_true", help="append the end-of-text token")
    parser.add_argument("--allow-special", action="store_true",
                        help="let text like <|eot_id|> become the special token (by default it is plain text)")
    parser.add_argument("--ids", action="store_true", help="print only the ids, as one JSON list")
    add_errors_argument(parser)


def visible(text: str) -> str:
    """Whitespace and control characters made visible, one symbol each."""
    return "".join(VISIBLE.get(c, c if c.isprintable() else repr(c)[1:-1]) for c in text)


def show_piece(tokenizer, token_id: int) -> str:
    """What a token stands for: its text if it is whole UTF-8, else its bytes as \\x.. escapes."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return visible(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw)


def read_messages(text: str, system: str | None) -> list[dict]:
    from llama3.errors import Llama3Error

    if text.lstrip().startswith("["):
        try:
            messages = json.loads(text)
        except json.JSONDecodeError as e:
            raise Llama3Error(f"--chat TEXT starts with '[' but is not valid JSON ({e.msg} at {e.pos})") from None
    else:
        messages = [{"role": "user", "content": text}]
    return ([{"role": "system", "content": system}] if system else []) + messages


def run(args: argparse.Namespace) -> int:
    from llama3.llm import DEFAULT_MODEL
    from llama3.tokenizer import load_tokenizer

    text = text_or_stdin(args.text, "TEXT", args.errors)
    system = None if args.system is None else argument_text(args.system, "--system", args.errors)
    source = args.tokenizer or DEFAULT_MODEL
    tokenizer = load_tokenizer(source)
    if args.chat:
        ids = tokenizer.encode_chat(read_messages(text, system))
    else:
        ids = tokenizer.encode(text, bos=False if args.no_bos else None, eos=args.eos,
                               allow_special=args.allow_special)
    if args.ids:
        print(json.dumps(ids))
        return 0
    width = len(str(max(ids, default=0)))
    for i in ids:
        print(f"{i:>{width}}  {show_piece(tokenizer, i)}")
    print(f"{len(ids)} tokens, {len(text)} characters; tokenizer: {source}")
    return 0
