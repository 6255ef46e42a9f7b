"""An OpenAI-compatible HTTP API over one loaded model, so existing clients work unchanged.

    app = create_app(llm, model_name="smollm2-135m-instruct")   # a FastAPI app
    uvicorn.run(app, host="127.0.0.1", port=8000)               # or: llama3 serve

Endpoints (the part of OpenAI's API that clients need to generate text):
    GET  /health                 liveness and a few counters (no key needed); 503 once the server failed
    GET  /v1/models              the one model served
    POST /v1/completions         continue a prompt
    POST /v1/chat/completions    answer a conversation (the model's chat template applied)

How a request flows:
    check the bearer key -> parse the JSON -> validate the fields -> tokenize and check
    that the prompt fits the context -> wait in the queue -> the engine generates it in its batch
    token by token and hands the text back to the event loop -> one JSON response, or
    server-sent events (`data: {...}` lines) ending with `data: [DONE]`.

The model runs in the engine's thread (`llama3.engine`, through `GenerationQueue`): every
running request decodes in one batched forward per step over a paged KV cache, new ones
join at the next step, and prompt prefixes already computed are reused; the event loop
stays free to accept, queue and stream.  Nothing about sampling or chat templates is
decided here.  A client that goes away cancels its request at the next step; a full
waiting queue (--max-queued) answers 429.  Every error has OpenAI's shape:
    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from llama3.errors import Llama3Error, ServiceError
from llama3.engine import Engine, EngineConfig
from llama3.generate import fit_prompt
from llama3.llm import LLM
from llama3.server_limits import ServerLimits, install as install_limits, off_loop, parse_json
from llama3.server_api.fields import (ChatFields, CompletionFields, RequestError, SamplingFields, encode_prompts,
                                      parse_prompts, settings_for)
from llama3.server_api.jobs import RequestGeneration
from llama3.server_api.metrics import Metrics
from llama3.server_api.reply import Reply
from llama3.server_api.structured import response_grammar
from llama3.server_api.tools import tool_plan
from llama3.server_api.tokenize import register as register_tokenize
from llama3.server_queue import Cancelled, FinishedJob, GenerationQueue, Job, QueueFull

log = logging.getLogger("llama3.server")


# ----------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _internal_error(error: Exception) -> APIError:
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")


def _llama3_error(error: Llama3Error) -> APIError:
    """A Llama3Error as the client sees it, answered or streamed: a RequestError names its field and
    status; a ServiceError (the server failed, e.g. a tensor-parallel rank died) is a 503; the rest are 400s."""
    if isinstance(error, RequestError):  # names the field (server_api)
        return APIError(error.status, str(error), param=error.param, code=error.code)
    if isinstance(error, ServiceError):
        log.error("%s", error)  # the operator's one line: the server cannot answer until it is fixed
        return APIError(503, str(error), type="server_error", code="service_unavailable")
    return APIError(400, str(error), code="invalid_value")


def _validation_error(error: ValidationError) -> APIError:
    """pydantic's first complaint -> a 400 naming the field, e.g. param 'messages.0.role'."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# --------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(SamplingFields):
    """The fields both endpoints share.  Unknown fields (user, metadata, ...) are ignored;
    fields that would change the answer but are not implemented are refused (see UNSUPPORTED)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None                       # None: the model served
    max_tokens: int | None = Field(None, ge=1)     # None: the endpoint's default
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None            # up to 4 strings, cut from the answer
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # same seed + same request = same answer
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop", code="invalid_value")
        return stops


class CompletionRequest(CompletionFields, _GenerationRequest):
    prompt: list[str | list[int]]                  # text or token ids; a list gives one choice per prompt
    max_tokens: int | None = Field(16, ge=0)       # OpenAI's default for completions; 0 only with echo

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, prompt):
        return parse_prompts(prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list | None = None       # an assistant's calls (server_api/tools.py checks them)
    tool_call_id: str | None = None      # a tool message: the call it answers
    name: str | None = None

    def as_dict(self, index: int) -> dict:
        """{"role", "content": str} (+ tool_calls / tool_call_id / name): text parts joined;
        images, audio, ... refused."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, "only text content parts are supported",
                               param=f"messages.{index}.content", code="unsupported_parameter")
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for it
        tool_fields = {"tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id, "name": self.name}
        return {"role": role, "content": content or "", **{k: v for k, v in tool_fields.items() if v is not None}}


class ChatCompletionRequest(ChatFields, _GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


# Fields of OpenAI's API this server does not implement -> their "off" value.
UNSUPPORTED = {"best_of": 1, "suffix": None, "functions": None}


def _refuse_unsupported(body: dict) -> None:
    for name, off in UNSUPPORTED.items():
        value = body.get(name)
        empty = value is False or (isinstance(value, (dict, list)) and not value)  # not 0: 0 == False
        if value is not None and value != off and not empty:
            raise APIError(400, f"{name}={json.dumps(value)} is not supported by this server; leave it out",
                           param=name, code="unsupported_parameter")


# ------------------------------------------------------------------------ app
def create_app(llm: LLM, model_name: str, api_key: str | None = None, *,
               queue: GenerationQueue | None = None, limits: ServerLimits | None = None,
               engine: EngineConfig | None = None) -> FastAPI:
    """A FastAPI app serving `llm` under the name `model_name`.

    api_key: when set, every /v1 request must send `Authorization: Bearer <api_key>`.
    queue: the engine that runs the generations (default: a new one over `llm`, configured by
    `engine`: --kv-memory, --parallel, --max-queued); its counters are reported by /health and
    it is closed when the app shuts down.
    limits: body size, max_tokens cap, prompts and characters per request, and (without
    api_key) the Host/Origin/Content-Type checks; see server_limits.py.
    """
    if llm.tokenizer is None:
        raise Llama3Error("this model has no tokenizer; load a model folder or .gguf that includes one")
    queue = queue or GenerationQueue(Engine(llm.model, llm.tokenizer, engine))
    limits = limits or ServerLimits()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.close()  # cancel what is running, drop what waits, stop the thread

    app = FastAPI(title="llama3", description="OpenAI-compatible API for a llama3 model",
                  lifespan=lifespan)
    app.state.queue = queue
    app.state.failure = None  # a ServiceError's message once one was answered: /health is 503 from then on
    install_limits(app, limits, api_key)
    # /metrics: the engine's KV blocks, prefix-cache use and preemptions as llama3_cache_* gauges
    app.state.metrics = metrics = Metrics(queue, cache_stats=getattr(queue, "cache_stats", None))

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # unknown path, wrong method
        kind = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, str(error.detail), code=kind).response()

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, error: Cancelled):  # the server is stopping
        return APIError(503, str(error), type="server_error", code="cancelled").response()

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):  # our fault: say so in OpenAI's shape
        return _internal_error(error).response()

    @app.exception_handler(Llama3Error)
    async def user_error(request: Request, error: Llama3Error):  # e.g. an unknown chat role; 503: ServiceError
        return answer(error).response()

    def answer(error: Llama3Error) -> APIError:  # the handler's and the streams' (a ServiceError: /health too)
        if isinstance(error, ServiceError):
            app.state.failure = str(error)  # the server cannot answer until it is restarted: /health says so
        return _llama3_error(error)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    app.state.check_key = check_key  # the same key rule for routes mounted later (llama3.lab)

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        """Key, then JSON, then fields, then model name: the first problem found is answered."""
        check_key(request)
        body = await off_loop(parse_json, await request.body(), limits)  # 400 for hostile JSON too
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="json_invalid")
        body = {name: value for name, value in body.items() if value is not None}  # null = not given
        _refuse_unsupported(body)
        try:
            parsed = schema.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        if parsed.model is not None and parsed.model != model_name:
            raise unknown_model(parsed.model)
        return parsed

    def unknown_model(name: str) -> APIError:
        return APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                        param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if app.state.failure is not None:  # e.g. a --tp rank died: a supervisor restarts a server whose health fails
            return JSONResponse({"status": "error", "error": app.state.failure, "model": model_name, **queue.stats()},
                                status_code=503)
        return {"status": "ok", "model": model_name, **queue.stats()}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(model_name, created, llm.config.max_seq_len)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_key(request)
        if name != model_name:
            raise unknown_model(name)
        return _model_card(model_name, created, llm.config.max_seq_len)

    register_tokenize(app, llm, parse, check_key)  # /tokenize, /detokenize, /tokenizer_info

    @app.get("/metrics")
    async def prometheus_metrics():  # no key, like /health: counts and timings, no content
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; it is allowed only with echo (to score "
                           "the prompt)", param="max_tokens", code="invalid_value")
        limits.check_prompts(req.prompt, llm.config.max_seq_len, param="prompt", one_prompt=False)
        ids = await off_loop(encode_prompts, llm.tokenizer, req.prompt)
        echo_texts = [p if isinstance(p, str) else llm.tokenizer.decode(p) for p in req.prompt] if req.echo else None
        return await _answer(request, req, ids, req.max_tokens, chat=False, echo_texts=echo_texts)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        messages = [m.as_dict(i) for i, m in enumerate(req.messages)]
        chars = limits.prompt_chars(llm.config.max_seq_len)
        tools = await off_loop(tool_plan, llm, req, messages)  # checked (400); a forced call's grammar
        shown = tools.tools if tools else None
        limits.check_prompts([m["content"] for m in messages] + ([json.dumps(shown)] if shown else []),
                             llm.config.max_seq_len, param="messages", one_prompt=True)
        ids = [await off_loop(lambda: llm.tokenizer.encode_chat(messages, True, tools=shown), limits=limits,
                              max_chars=2 * chars + 65536)]  # the template's output limit
        return await _answer(request, req, ids, req.max_completion_tokens or req.max_tokens, chat=True,
                             tools=tools if shown else None)

    async def _answer(request: Request, req: _GenerationRequest, prompt_ids: list[list[int]],
                      max_tokens: int | None, chat: bool, echo_texts: list[str] | None = None, tools=None):
        context = llm.config.max_seq_len
        new_tokens = 1 if max_tokens == 0 else limits.max_new_tokens(max_tokens, chat, context)  # 0: echo only
        settings = settings_for(req, new_tokens, req.stop_strings())
        for ids in prompt_ids:
            try:
                fit_prompt(ids, context, settings.max_new_tokens, truncate=False)
            except Llama3Error:
                raise APIError(400, f"the prompt is {len(ids)} tokens but the model's context holds {context} "
                               "(prompt + answer); shorten it", param="messages" if chat else "prompt",
                               code="context_length_exceeded") from None
        generation = RequestGeneration(llm, prompt_ids, settings, n=req.n, echo=echo_texts is not None,
                                       generate=max_tokens != 0,
                                       grammar=(tools and tools.grammar) or response_grammar(llm, req.response_format))
        if generation.echo:
            await off_loop(generation.score_prompts)  # the prompt's log-probabilities: one forward, off the loop
        try:
            job = (queue.submit(generation.rows, settings, samplers=generation.samplers) if generation.generate
                   else FinishedJob(len(generation.rows)))
        except QueueFull as error:
            raise APIError(429, str(error), type="requests", code="rate_limit_exceeded") from None
        generation.request = job.request
        timer = metrics.request("chat" if chat else "completions", sum(len(ids) for ids in prompt_ids))
        reply = Reply(model_name, chat, prompt_ids, tokenizer=llm.tokenizer, job=generation, n=req.n,
                      echo_texts=echo_texts, timer=timer, tools=tools)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_stream(job, reply, usage, answer), media_type="text/event-stream",
                                     background=BackgroundTask(job.cancel))
        whole = await _until_done_or_gone(request, job, reply)
        return JSONResponse(whole) if whole is not None else Response(status_code=499)

    return app


class Server(uvicorn.Server):
    """uvicorn's server, plus: Ctrl-C / SIGTERM first cancels the running and waiting
    generations, so open streams end at once (with an error event) instead of holding
    the shutdown until their last token.  `Server(uvicorn.Config(app, ...)).run()`."""

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.queue.cancel_all()
        super().handle_exit(sig, frame)


def _model_card(name: str, created: int, context: int) -> dict:
    """OpenAI's model object, plus the context length (vLLM's max_model_len) clients size prompts by."""
    return {"id": name, "object": "model", "created": created, "owned_by": "llama3", "max_model_len": context,
            "context_length": context}


# ------------------------------------------------------------------- responses
def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(job: Job, reply: Reply, include_usage: bool,
                  answer=_llama3_error) -> AsyncIterator[str]:
    """Server-sent events: (chat) a first chunk with the role, the text as it comes,
    a last chunk per choice with its finish reason, optional usage, then [DONE].
    An error after the stream has started is sent as an `{"error": ...}` event, without [DONE]."""
    try:
        if reply.chat:
            yield _sse(reply.chunk(0, role=True))
        try:
            async for batch in job.batches():  # the events the engine handed over together: one write
                chunks = [chunk for chunk in map(reply.add, batch) if chunk is not None]
                if chunks:
                    yield "".join(map(_sse, chunks))
        except Cancelled as error:
            yield _sse(APIError(503, str(error), type="server_error", code="cancelled").body())
            return
        except Llama3Error as error:  # as the same request unstreamed is answered (ServiceError: 503)
            yield _sse(answer(error).body())
            return
        except Exception as error:  # a bug: tell the client, log the traceback, end the stream
            log.exception("generation failed")
            yield _sse(_internal_error(error).body())
            return
        if include_usage:
            yield _sse(reply.usage_chunk())
        yield _sse("[DONE]")
    finally:
        job.cancel()  # the client left (or we are done): stop generating for it


async def _until_done_or_gone(request: Request, job: Job, reply: Reply) -> dict | None:
    """The whole answer; None (and the job cancelled) if the client disconnects first."""
    async def collect():
        async for event in job.events():
            reply.add(event)

    async def client_gone():  # the body is read, so the next message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done_task, gone_task = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        if not done_task.done():
            return None  # nobody is listening any more
        done_task.result()  # re-raise a generation error
        return reply.whole()
    finally:
        job.cancel()
        for task in (done_task, gone_task):
            task.cancel()

