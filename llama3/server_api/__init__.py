"""The parts of OpenAI's API beyond plain text generation, kept out of server.py:

    fields.py    request fields: n, penalties, logit_bias, logprobs / top_logprobs, echo, token-id prompts
    jobs.py      what the worker runs for one request (echoed prompt log-probabilities, n choices)
    reply.py     the response objects (choices, logprobs, usage, tool_calls), whole or streamed
    tools.py     tools / tool_choice / parallel_tool_calls (the work is in llama3/tools.py)
    tokenize.py  POST /tokenize, POST /detokenize
    metrics.py   GET /metrics (Prometheus, through prometheus-client)
"""

from llama3.server_api.fields import RequestError

__all__ = ["RequestError"]
