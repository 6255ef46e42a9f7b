"""The Lab: a live white box of the loaded model in the browser, with causal experiments.

    llama3 lab [--model SOURCE]          a local page on http://127.0.0.1:8001/lab
    llama3 serve --lab                   the same page at /lab beside the OpenAI API

`mount_lab(app, llm, ...)` adds to a FastAPI app made by `llama3.server.create_app`:

    GET  /lab                  the page (static files from llama3/lab/static, no build step)
    GET  /lab/api/info         the model's shape
    POST /lab/api/generate     stream an answer (chat or completion), one event per token
    POST /lab/api/token        one step's views: attention, logit lens, residual stream
    POST /lab/api/head         one layer's full attention maps
    POST /lab/api/walk         one forward pass, step by step, with code and walkthrough text
    POST /lab/api/patch        activation patching;  /attribute  token attribution;  /ablate
    POST /lab/api/fidelity     max |Δ logits| against transformers (llama3 doctor's check)

The JSON endpoints follow the server's rules: the same API key as /v1 (when one is set),
OpenAI-shaped errors, 400 for bad values, 413 for oversized bodies or views too large for memory.
"""

from llama3.lab.api import mount_lab

__all__ = ["mount_lab"]
