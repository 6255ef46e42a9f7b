"""Run by tests/test_tp.py as one of 2 ranks (started by hand, without torchrun, so that nothing else
kills the survivor): the real CLI, with one rank made to die on cue.

    tp_die.py follower MODEL   `generate --tp 2`; rank 1 dies at its 3rd forward, rank 0 must stop with an error
    tp_die.py leader MODEL     `chat --tp 2`; rank 0 answers the first message, then dies while rank 1 waits
                               for its engine's next step: rank 1 must stop
"""

import os
import sys

import llama3.parallel.tp as tp
from llama3.cli import main

scenario, model = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
load_tp = tp.load_tp

if scenario == "follower" and rank == 1:
    def load_and_die_later(*args, **kwargs):
        llm = load_tp(*args, **kwargs)
        calls = []

        def count(module, inputs):
            calls.append(1)
            if len(calls) == 3:
                os._exit(3)
        llm.model.tok_embeddings.register_forward_pre_hook(count)
        return llm
    tp.load_tp = load_and_die_later

if scenario == "leader" and rank == 0:
    import llama3.commands.chat as chat

    answer = chat.answer

    def answer_then_die(*args, **kwargs):  # rank 1 is then waiting for the engine's next step
        answer(*args, **kwargs)
        sys.stdout.flush()
        os._exit(3)
    chat.answer = answer_then_die

common = ["--model", model, "--tp", "2", "--max-new-tokens", "8"]
argv = ["generate", *common, "the lazy"] if scenario == "follower" else ["chat", *common, "--temperature", "0"]
sys.exit(main(argv))
