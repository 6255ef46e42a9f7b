"""What the worker thread runs for one request.

    RequestGeneration(llm, prompt_ids, settings, n=2, echo=True, generate=True)
      iterate -> (echo) each prompt's log-probabilities, computed once per prompt
              -> the n choices of every prompt as one TextGeneration batch: (choice, piece)

Choice c = prompt c // n, its (c % n)-th sample; the n choices of a prompt are seeded
seed, seed+1, ... (`row_seeds`), so they differ, and choice 0 equals the same request with n=1.
It has what the server's queue uses of a TextGeneration (iteration, `.tokens.tokens`,
`completions()`), so the queue runs it unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator

from llama3.generate import Completion, GenerationSettings, TextGeneration, row_seeds
from llama3.logprobs import prompt_logprobs
from llama3.sampling import Sampler, SamplingError, TokenLogprobs
from llama3.server_api.fields import RequestError


class RequestGeneration:
    def __init__(self, llm, prompt_ids: list[list[int]], settings: GenerationSettings, *, n: int = 1,
                 echo: bool = False, generate: bool = True):
        self.llm, self.prompt_ids, self.settings, self.n = llm, prompt_ids, settings, n
        self.echo = echo
        self.prompt_entries: list[list[TokenLogprobs | None]] | None = None  # per prompt, after iterating
        self.text: TextGeneration | None = None
        rows = [ids for ids in prompt_ids for _ in range(n)]
        if generate:
            device, vocab = llm.device, llm.config.vocab_size
            try:
                samplers = [Sampler.from_settings(settings, vocab, prompt_ids=ids, seed=seed, device=device)
                            for ids in prompt_ids for seed in row_seeds(settings.seed, n)]
            except SamplingError as error:
                raise RequestError(str(error), param=error.param) from None
            self.text = TextGeneration(llm.model, llm.tokenizer, rows, settings, samplers=samplers)
        self.rows = rows

    def prompt_of(self, choice: int) -> int:
        return choice // self.n

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self.echo:
            top = self.settings.logprobs or 0
            self.prompt_entries = [prompt_logprobs(self.llm.model, ids, top) for ids in self.prompt_ids]
        if self.text is not None:
            yield from self.text

    @property
    def tokens(self):
        """The token layer (the queue counts `tokens.tokens`); none when nothing is generated."""
        return self.text.tokens if self.text is not None else SimpleNamespace(tokens=[[] for _ in self.rows])

    def generated_logprobs(self, choice: int) -> list[TokenLogprobs]:
        """The log-probabilities recorded so far for choice `choice`'s new tokens."""
        if self.text is None or self.text.logprobs is None:
            return []
        return self.text.logprobs[choice]

    def completions(self) -> list[Completion]:
        if self.text is not None:
            return self.text.completions()
        logprobs = [] if self.settings.logprobs is not None else None
        return [Completion("", [], "length", len(ids), logprobs) for ids in self.rows]
