"""The Lab's HTTP routes, mounted on the server's FastAPI app (see llama3/lab/__init__.py).

Rules shared with the OpenAI API of llama3/server.py: the API key of /v1 (app.state.check_key),
its OpenAI-shaped errors (APIError; Llama3Error -> 400), bodies parsed key -> size -> JSON ->
fields.  The page itself (/lab, /lab/static) needs no key, as a browser cannot send one when it
opens a URL; the page asks for the key when the API answers 401.

Views run one at a time (`lock`) on a worker thread, because they register hooks and switch
layers to the explicit attention path for their pass.  Hooks act only on their own thread, so
generations running meanwhile (the lab's stream, or /v1 requests) are not disturbed.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from llama3.errors import Llama3Error
from llama3.generate import GenerationSettings
from llama3.inspect.tokens import encode_prompt
from llama3.lab import views
from llama3.lab.walk import Walkthrough, walk
from llama3.server import APIError, _validation_error

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20          # bytes per request body
MAX_TEXT = 20_000           # characters per prompt
MAX_NEW_TOKENS = 512        # per generate request
PATCH_TOKENS = 64           # patching reruns the model blocks x positions times: keep prompts short


# ------------------------------------------------------------------ bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class GenerateBody(_Body):
    prompt: str | None = Field(None, max_length=MAX_TEXT)
    messages: list[Message] | None = Field(None, min_length=1, max_length=200)
    max_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)


class IdsBody(_Body):
    ids: list[int] = Field(min_length=1)
    layer: int = 0


class PromptBody(_Body):
    prompt: str | None = Field(None, max_length=MAX_TEXT)
    ids: list[int] | None = Field(None, min_length=1)
    layer: int = 0


class PatchBody(_Body):
    clean: str = Field(min_length=1, max_length=MAX_TEXT)
    corrupted: str = Field(min_length=1, max_length=MAX_TEXT)
    answer: str | None = None
    wrong: str | None = None
    site: Literal["resid", "attn", "ffn", "heads"] = "resid"


class AttributeBody(_Body):
    prompt: str | None = Field(None, min_length=1, max_length=MAX_TEXT)
    ids: list[int] | None = Field(None, min_length=1)   # instead of prompt: a context from the chat
    target: str | None = None
    method: Literal["integrated_gradients", "gradient_x_input"] = "integrated_gradients"
    steps: int = Field(32, ge=1, le=128)
    baseline: str | None = None


class AblateBody(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    heads: list[tuple[int, int]] = Field(default_factory=list, max_length=1024)
    blocks: list[int] = Field(default_factory=list, max_length=1024)
    top: int = Field(5, ge=1, le=50)


class FidelityBody(_Body):
    prompt: str = Field("The capital of France is", min_length=1, max_length=2000)


# ------------------------------------------------------------------- mount
def mount_lab(app: FastAPI, llm, *, source: str | None | bool = None, name: str = "model") -> FastAPI:
    """Add the Lab's page and JSON endpoints to `app` (made by llama3.server.create_app).

    source: what `llm` was loaded from (None: the default model), for the fidelity check against
    transformers; False when it came from no file (that check is then refused)."""
    if llm.tokenizer is None:
        raise Llama3Error("the lab needs a model with a tokenizer; load a model folder or .gguf that has one")
    check_key = app.state.check_key
    lock = threading.Lock()
    texts = Walkthrough()

    async def parse(request: Request, schema: type[BaseModel]):
        check_key(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
            raise too_large(int(declared))
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise too_large(len(raw))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="json_invalid") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="json_invalid")
        try:
            return schema.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None

    def too_large(size: int) -> APIError:
        return APIError(413, f"the request body is {size} bytes; the lab accepts at most {MAX_BODY}",
                        code="request_too_large")

    async def compute(fn, *args, **kwargs):
        """Run one view on a worker thread, one at a time; a view too big for memory is a 413."""
        def locked():
            with lock:
                return fn(*args, **kwargs)
        try:
            return await run_in_threadpool(locked)
        except views.TooLarge as e:
            raise APIError(413, str(e), code="view_too_large") from None

    def ids_of(body) -> list[int]:
        ids = body.ids if getattr(body, "ids", None) is not None else None
        if ids is None:
            if not getattr(body, "prompt", None):
                raise APIError(400, "give a prompt (text) or ids (token ids)", param="prompt", code="invalid_value")
            ids = body.prompt
        return encode_prompt(llm, ids)

    # ----------------------------------------------------------- the page
    app.mount("/lab/static", StaticFiles(directory=STATIC), name="lab-static")

    @app.get("/lab")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/lab/api/info")
    async def info(request: Request):
        check_key(request)
        c = llm.config
        return {"name": name, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                "n_rep": c.n_rep, "dim": c.dim, "head_dim": c.head_dim, "hidden_dim": c.hidden_dim,
                "vocab_size": c.vocab_size, "max_seq_len": c.max_seq_len,
                "chat": getattr(llm.tokenizer, "chat_format", None) is not None,
                "dtype": str(llm.model.dtype).removeprefix("torch."),
                "fidelity": source is not False}

    # ---------------------------------------------------------- streaming
    @app.post("/lab/api/generate")
    async def generate(request: Request):
        body: GenerateBody = await parse(request, GenerateBody)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt (completion) or messages (chat), not both",
                           param="prompt", code="invalid_value")
        if body.messages is not None:
            ids = llm.tokenizer.encode_chat([m.model_dump() for m in body.messages], add_generation_prompt=True)
        else:
            ids = encode_prompt(llm, body.prompt)
        if len(ids) >= llm.config.max_seq_len:
            raise APIError(400, f"the prompt is {len(ids)} tokens but the model's context holds "
                           f"{llm.config.max_seq_len}; shorten it", param="prompt", code="context_length_exceeded")
        settings = GenerationSettings(max_new_tokens=body.max_tokens, temperature=body.temperature,
                                      top_k=body.top_k, top_p=body.top_p, min_p=body.min_p, seed=body.seed)
        events = views.generate_events(llm, ids, settings)

        def sse():
            try:
                for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as error:  # after the stream began: an error event, as /v1 does
                yield f"data: {json.dumps(APIError(500, f'{type(error).__name__}: {error}', type='server_error').body())}\n\n"
            finally:
                events.close()

        return StreamingResponse(sse(), media_type="text/event-stream")

    # -------------------------------------------------------------- views
    @app.post("/lab/api/token")
    async def token(request: Request):
        body: IdsBody = await parse(request, IdsBody)
        return await compute(views.token_views, llm, ids_of(body))

    @app.post("/lab/api/head")
    async def head(request: Request):
        body: PromptBody = await parse(request, PromptBody)
        return await compute(views.head_map, llm, ids_of(body), body.layer)

    @app.post("/lab/api/walk")
    async def walk_pass(request: Request):
        body: PromptBody = await parse(request, PromptBody)
        return await compute(walk, llm, ids_of(body), body.layer, texts)

    @app.post("/lab/api/patch")
    async def patching(request: Request):
        from llama3.inspect.patching import patch

        body: PatchBody = await parse(request, PatchBody)
        n = len(encode_prompt(llm, body.clean))
        if n > PATCH_TOKENS:
            raise APIError(400, f"the clean prompt is {n} tokens; patching in the lab takes at most {PATCH_TOKENS} "
                           "(it reruns the model once per block and position); use `llama3 inspect patch` for more",
                           param="clean", code="invalid_value")
        views.check_fits(llm, views.forward_bytes(llm, n, batch=16), "patching this prompt")
        result = await compute(patch, llm, body.clean, body.corrupted, answer=body.answer, wrong=body.wrong,
                               site=body.site)
        return result.to_dict()

    @app.post("/lab/api/attribute")
    async def attribution(request: Request):
        from llama3.inspect.attribution import attribute

        body: AttributeBody = await parse(request, AttributeBody)
        ids = ids_of(body)
        views.check_fits(llm, 3 * views.forward_bytes(llm, len(ids), batch=8), "attribution of this prompt")
        result = await compute(attribute, llm, ids, target=body.target, method=body.method,
                               steps=body.steps, baseline=body.baseline)
        return result.to_dict()

    @app.post("/lab/api/ablate")
    async def ablation(request: Request):
        from llama3.inspect.patching import ablate

        body: AblateBody = await parse(request, AblateBody)
        result = await compute(ablate, llm, body.prompt, heads=body.heads, blocks=body.blocks, top_k=body.top)
        return result.to_dict()

    @app.post("/lab/api/fidelity")
    async def check_fidelity(request: Request):
        body: FidelityBody = await parse(request, FidelityBody)
        return await compute(views.fidelity, llm, source, encode_prompt(llm, body.prompt))

    return app
