"""One request's run through the engine: its n choices as sequences, and (echo) its prompt's log-probabilities.

    generation = RequestGeneration(llm, prompt_ids, settings, n=2, echo=True, generate=True)
    generation.score_prompts()             # (echo) off the event loop
    job = queue.submit(generation.rows, settings, samplers=generation.samplers)   # or FinishedJob
      -> the n choices of every prompt are n sequences of one engine request, each picking with its
         own Sampler seeded seed, seed+1, ... (`row_seeds`), so they differ and choice 0 equals the
         same request with n=1;
      -> (echo) each prompt's log-probabilities, from one forward of the prompt (`prompt_logprobs`)
         on the server's preparing thread.
    async for event in job.events(): ...   ("text", choice, piece), ("end", choice, reason, n, cached)

grammar (response_format, `llama3.structured`): every choice's Sampler gets its own GrammarProcessor.
Choice c = prompt c // n, its (c % n)-th sample.  `generated_logprobs(c)` reads the per-token
log-probabilities the engine records for choice c's sequence.  With max_tokens 0 (echo only) no
sequence is submitted (server_queue.FinishedJob ends every choice with "length" and no tokens).
"""

from __future__ import annotations

from llama3.generate import GenerationSettings, row_seeds
from llama3.logprobs import prompt_logprobs
from llama3.sampling import Sampler, SamplingError, TokenLogprobs
from llama3.server_api.fields import RequestError


class RequestGeneration:
    def __init__(self, llm, prompt_ids: list[list[int]], settings: GenerationSettings, *, n: int = 1,
                 echo: bool = False, generate: bool = True, grammar=None):
        self.llm, self.prompt_ids, self.settings, self.n = llm, prompt_ids, settings, n
        self.echo, self.generate = echo, generate
        self.rows = [ids for ids in prompt_ids for _ in range(n)]
        self.prompt_entries: list[list[TokenLogprobs | None]] | None = None  # per prompt, after score_prompts()
        self.request = None                                                 # the engine's Request
        self.samplers: list[Sampler] | None = None
        if generate:
            vocab = llm.config.vocab_size
            try:
                self.samplers = [Sampler.from_settings(settings, vocab, prompt_ids=ids, seed=seed, device=llm.device,
                                                  processor=grammar.processor() if grammar else None)
                                 for ids in prompt_ids for seed in row_seeds(settings.seed, n)]
            except SamplingError as error:
                raise RequestError(str(error), param=error.param) from None

    def prompt_of(self, choice: int) -> int:
        return choice // self.n

    def score_prompts(self) -> None:
        """(echo) Each prompt's log-probabilities from one forward of it (call off the event loop)."""
        top = self.settings.logprobs or 0
        self.prompt_entries = [prompt_logprobs(self.llm.model, ids, top) for ids in self.prompt_ids]

    def generated_logprobs(self, choice: int) -> list[TokenLogprobs]:
        """The log-probabilities the engine has recorded so far for choice `choice`'s new tokens."""
        if self.request is None:
            return []
        return list(self.request.sequences[choice].result.logprobs or [])
