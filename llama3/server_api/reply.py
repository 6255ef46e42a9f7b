"""The response objects of one request, in OpenAI's shapes, built as its text arrives.

Choices: prompt p's n choices are indices p*n .. p*n+n-1.  With logprobs, each choice carries the
log-probabilities of its tokens (chat: `logprobs.content[]`; completions: `tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`); with `echo` (completions) the prompt's text and
its log-probabilities come first (the first token's logprob is null).  Streamed, each chunk carries
the entries of the tokens whose text it brings; the first chunk of an echoed choice brings the prompt.
"""

from __future__ import annotations

import time
import uuid

from llama3.logprobs import chat_logprobs, completion_logprobs, covering


class Reply:
    def __init__(self, model: str, chat: bool, prompt_ids: list[list[int]], *, tokenizer=None, job=None,
                 n: int = 1, echo_texts: list[str] | None = None, timer=None, tools=None):
        self.model, self.chat, self.n = model, chat, n
        self.tools = tools                  # server_api.tools.ToolPlan: answers parsed into tool_calls
        self.tokenizer, self.job, self.timer = tokenizer, job, timer    # timer: metrics.RequestTimer or None
        self.logprobs = job is not None and job.settings.logprobs is not None
        self.prompt_ids = prompt_ids
        self.prompt_tokens = [len(ids) for ids in prompt_ids]
        self.echo_texts = echo_texts
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        choices = len(prompt_ids) * n
        self.texts = [""] * choices
        self.finish: list[str | None] = [None] * choices
        self.completion_tokens = self.cached_tokens = 0
        self.sent = [0] * choices            # logprob entries already streamed, per choice
        self.offset = [0] * choices          # text_offset of the next streamed token, per choice
        self.opened = [False] * choices      # the first chunk (role / echoed prompt) was sent
        self.call_streams = [tools.stream() for _ in range(choices)] if tools else None

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens)     # a prompt counts once, however many choices share it
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    # ------------------------------------------------------------ logprobs
    def _entries(self, index: int, text: str):
        return covering(self.tokenizer, self.job.generated_logprobs(index), text)

    def _echo(self, index: int) -> tuple[str, dict | None, int]:
        """(echoed text, its completions logprobs or None, the text offset after it) for a choice."""
        if not self.echo_texts:
            return "", None, 0
        prompt = self.job.prompt_of(index)
        text, ids = self.echo_texts[prompt], self.prompt_ids[prompt]
        if not self.logprobs:
            return text, None, len(text)
        logprobs, _ = completion_logprobs(self.tokenizer, self.job.prompt_entries[prompt], ids)
        return text, logprobs, len(text)

    def _logprobs(self, entries, start: int) -> tuple[dict, int]:
        if self.chat:
            return chat_logprobs(self.tokenizer, entries), start
        return completion_logprobs(self.tokenizer, entries, [e.token for e in entries], start)

    # ------------------------------------------------------------ responses
    def whole(self) -> dict:
        """The non-streamed response: every choice's full text, finish reason, logprobs and usage."""
        choices = []
        for i, (text, finish) in enumerate(zip(self.texts, self.finish)):
            echoed, echo_logprobs, start = self._echo(i) if not self.chat else ("", None, 0)
            logprobs = None
            if self.logprobs:
                logprobs, _ = self._logprobs(self._entries(i, text), start)
                if echo_logprobs is not None:
                    logprobs = {name: echo_logprobs[name] + logprobs[name] for name in logprobs}
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": echoed + text}
            if self.tools:  # a call cut by max_tokens is dropped, and finish_reason stays "length"
                content, calls = self.tools.parse(text, cut=finish == "length")
                body["message"] = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
                finish = "tool_calls" if calls and finish == "stop" else finish
            choices.append({"index": i, **body, "logprobs": logprobs, "finish_reason": finish})
        return {**self._envelope(choices, chunk=False), "usage": self.usage()}

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
              logprobs: dict | None = None, tool_calls: list[dict] | None = None) -> dict:
        """One streamed event: new text of choice `index`, or its finish reason (and tool calls:
        each whole, with its id, name and arguments, in OpenAI's delta shape)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            if tool_calls:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        return self._envelope([{**choice, "logprobs": logprobs, "finish_reason": finish}], chunk=True)

    def usage_chunk(self) -> dict:
        return {**self._envelope([], chunk=True), "usage": self.usage()}

    def _streamed(self, index: int, piece: str, finish: str | None) -> dict | None:
        """The chunk for new text (and/or the finish) of a choice, with what opens it and its logprobs."""
        first = not self.opened[index]
        self.opened[index] = True
        echo_logprobs = None
        if first and not self.chat:
            echoed, echo_logprobs, self.offset[index] = self._echo(index)
            piece = echoed + piece
        logprobs = None
        if self.logprobs:
            entries = self._entries(index, self.texts[index])[self.sent[index]:]
            self.sent[index] += len(entries)
            if entries or echo_logprobs is not None:
                logprobs, self.offset[index] = self._logprobs(entries, self.offset[index])
                if echo_logprobs is not None:
                    logprobs = {name: echo_logprobs[name] + logprobs[name] for name in logprobs}
        calls = None
        if self.call_streams is not None:  # text that may be a call waits; calls come with the finish
            stream = self.call_streams[index]
            if finish is None:
                piece = stream.feed(piece)
            else:
                piece, calls = stream.finish(cut=finish == "length")   # (the end event brings no text of its own)
                finish = "tool_calls" if calls and finish == "stop" else finish
        if not piece and finish is None and logprobs is None:
            return None
        chunk = self.chunk(index, text=piece, finish=finish, logprobs=logprobs, tool_calls=calls)
        if self.chat and first and index > 0:  # choice 0's role chunk is the stream's first event
            chunk["choices"][0]["delta"]["role"] = "assistant"
        return chunk

    def add(self, event: tuple) -> dict | None:
        """Record an engine event ("text", i, piece) or ("end", i, finish, n_tokens, cached_tokens);
        the chunk to stream."""
        if event[0] == "text":
            _, index, piece = event
            self.texts[index] += piece
            if self.timer is not None and piece:
                self.timer.text()
            return self._streamed(index, piece, None)
        _, index, finish, n_tokens, cached = event
        self.finish[index] = finish
        self.completion_tokens += n_tokens
        if index % self.n == 0:  # a prompt's cached tokens count once, not once per choice sharing them
            self.cached_tokens += cached
        if self.timer is not None and all(f is not None for f in self.finish):
            self.timer.done(self.completion_tokens)
        return self._streamed(index, "", finish)
