"""`llama3 chat`: a multi-turn conversation in the terminal, answers streamed as they are made.

Each turn appends your message to the conversation, renders the whole
conversation with the model's chat template (tokenizer.encode_chat) and
generates until the model's end-of-turn token, through the model's engine
(`llm.engine`), whose prefix cache keeps the KV blocks of the conversation so
far: turn N reads only its new tokens, not turns 1..N-1 again.  With stdin piped, each input
line is one user message and each answer is printed on its own line(s), with
no prompts or banners.
"""

from __future__ import annotations

import argparse
import sys

from llama3.commands.common import add_model_arguments, add_speed_arguments
from llama3.commands.generate import (add_sampling_arguments, cli_wording, load_model, prefill_progress,
                                     settings_from_args)
from llama3.commands.text_input import argument_text
from llama3.parallel.launch import add_tp_argument

HELP = ("/reset clears the conversation, /explain explains the last answer, /exit or Ctrl-D leaves, "
        "Ctrl-C stops an answer")

EXAMPLES = """\
examples:
  llama3 chat
  llama3 chat --system "You are a pirate." --temperature 0.9
  printf 'Hi!\\nWhat did I just say?\\n' | llama3 chat --temperature 0
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Talk to a chat (instruct) model. Type a message and press Enter; the answer streams "
                          f"back. {HELP}. Works with piped stdin too: one message per line.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    add_speed_arguments(parser)
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="a system message that sets the assistant's behaviour for the whole conversation")
    add_sampling_arguments(parser, temperature=0.7, top_p=0.9, max_new_tokens=512)
    parser.add_argument("--explain", action="store_true",
                        help="after each answer, show the prompt's tokens and ids, each step's top candidates "
                             "with probabilities, the newest token's attention per head, and what ended it")
    add_tp_argument(parser)  # --tp N under torchrun: llama3/parallel/launch.py


def answer(llm, messages: list[dict], settings, out=None, record: dict | None = None) -> str:
    """Stream the assistant's reply to `messages` to `out`; return its text.
    Ctrl-C stops the reply early and returns what was said so far.
    `record`, if given, receives prompt_ids, answer_ids and finish_reason (for /explain): exactly what
    ended it, "stop token", "stop string", "length" or "interrupted" (Ctrl-C)."""
    import signal
    import threading

    out = out or sys.stdout  # looked up now, not when the module was imported
    prompt_ids = llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
    # through the engine: its prefix cache still holds the conversation so far (the earlier turns'
    # prompts and answers), so only the new message and the answer are computed
    generation = llm.engine.stream([prompt_ids], settings)
    pieces = []
    # Ctrl-C sets a flag that the loop checks after each piece: a KeyboardInterrupt raised at an
    # arbitrary point can be swallowed (e.g. inside a finaliser) and the answer would run on.
    interrupted = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if in_main_thread else None
    try:
        with prefill_progress(generation):  # a long conversation's prefill says so on stderr
            for event in generation:
                if event[0] != "text":
                    continue
                piece = event[2]
                pieces.append(piece)
                out.write(piece)
                out.flush()
                if interrupted:
                    break
    except KeyboardInterrupt:
        interrupted.append(True)
    finally:
        generation.cancel()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        print(" [stopped]", end="", file=out)
    out.write("\n")
    out.flush()
    if record is not None:
        result = generation.results[0]
        answer_ids = list(result.token_ids)
        record.update(prompt_ids=prompt_ids, answer_ids=answer_ids, cached_tokens=result.cached_tokens,
                      finish_reason=ending(llm.tokenizer, answer_ids, result.finish_reason, settings.stop,
                                           bool(interrupted)))
    return "".join(pieces)


def ending(tokenizer, answer_ids: list[int], finish_reason: str | None, stops, interrupted: bool) -> str:
    """What ended an answer, exactly: "interrupted", "length", "stop string" or "stop token".
    The generator says "stop" for both of the last two; a stop string is in the decoded answer
    (the stop token, never appended to the answer's ids, is not)."""
    if interrupted:
        return "interrupted"
    if finish_reason == "stop":
        text = tokenizer.decode(answer_ids)
        return "stop string" if any(s and s in text for s in stops) else "stop token"
    return finish_reason or "length"


def explain(llm, record: dict, out=None) -> None:
    """Print llama3.inspect.explain's account of the answer in `record`."""
    from llama3.inspect.explain import explain_answer

    out = out or sys.stdout
    if not record:
        print("(nothing to explain yet: ask something first)", file=sys.stderr)
        return
    text = explain_answer(llm, record["prompt_ids"], record["answer_ids"], record["finish_reason"]).render()
    print(text, file=out, flush=True)


def run(args: argparse.Namespace) -> int:
    from llama3.errors import Llama3Error

    settings = settings_from_args(args)  # check the values before the slow load
    if sys.stdin is None:
        raise Llama3Error("standard input is closed, so chat has no messages to read; run it in a terminal "
                          "or pipe the messages in, one per line")
    system = None if args.system is None else argument_text(args.system, "--system")
    if args.tp is not None:  # tensor parallel: only rank 0 returns (and chats); the other ranks follow its engine
        from llama3.parallel.launch import lead_engine

        llm = lead_engine(args)
    else:
        llm = load_model(args)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"chatting with {args.model or 'smollm2-135m-instruct'}; {HELP}", file=sys.stderr)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    last: dict = {}
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, keep chatting
            print(file=sys.stderr)
            continue
        except UnicodeDecodeError as e:  # a strict stdin decoder met bytes that are not UTF-8
            raise Llama3Error(f"standard input is not valid UTF-8 ({e.reason} at byte {e.start} of a line); "
                              "send UTF-8 text") from None
        text = argument_text(line, "standard input").strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            if interactive:
                print("(conversation cleared)", file=sys.stderr)
            continue
        if text == "/explain":
            explain(llm, last)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = answer(llm, messages, settings, record=last)
        except Llama3Error as e:  # e.g. the conversation outgrew the context: say so, keep the session
            messages.pop()
            print(f"error: {cli_wording(e, truncate_flag=False)} (/reset starts over)", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})
        if args.explain:
            explain(llm, last)
    if interactive:
        print(file=sys.stderr)
    return 0
