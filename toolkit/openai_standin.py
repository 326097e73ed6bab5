"""``python -m toolkit.openai_standin``: an OpenAI-compatible chat server for a model folder, on CPU.

It stands in for the vLLM server where no GPU is (tests, the embedded demo): the same
``/v1/chat/completions`` request (an image as a data URL, then the question), ``/v1/models``
and ``/health``, answered by the model family's adapter with greedy decoding. Like the OpenAI
API it reports ``usage`` and ``finish_reason`` (``length`` when the answer was cut at
``max_tokens``), and with ``stream: true`` answers as server-sent events (the whole answer in
one chunk, generated first). A bad request gets a 400 in OpenAI's error shape saying why:
over ``publish.serving``'s limits on image bytes, image pixels (checked before decoding) or
``max_tokens``, an image that does not decode, a malformed message, a schema that does not
compile. A ``response_format`` (``json_schema`` or ``json_object``) constrains the answer as vLLM
does (llguidance, through the adapter), and ``logprobs: true`` returns each generated token's
log-probability in OpenAI's shape (no alternatives: ``top_logprobs`` is 0).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

from docpipe.config import ServingConfig, load_pipeline_config
from docpipe.data.examples import IMAGE_PLACEHOLDER, Example, Sample


class BadRequest(ValueError):
    """A request this server refuses; the message is the client's to read (no internals in it)."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=0, description="alternatives per token: none here")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one answer per request")


def decode_image(url: str, limits: ServingConfig) -> Image.Image:
    """A data URL's image, within the byte and pixel limits (pixels read from the header, before
    the image is decoded)."""
    if not url.startswith("data:image/") or "," not in url:
        raise BadRequest("the image must be a data:image/...;base64,... URL")
    payload = url.split(",", 1)[1]
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise BadRequest(f"the image is over {limits.max_image_bytes} bytes, this server's limit")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("the image is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest("the image could not be read: not a PNG, JPEG, WebP or other supported image") from None
    if width * height > limits.max_image_pixels:
        raise BadRequest(
            f"the image is {width}x{height} = {width * height} pixels, over this server's limit of "
            f"{limits.max_image_pixels}"
        )
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest("the image could not be decoded: truncated or corrupt") from None


def sample_of(messages: list[dict[str, Any]], limits: ServingConfig) -> Sample:
    """The last user message's image (a data URL) and text, as the adapters take them."""
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        raise BadRequest("no user message")
    content = user.get("content")
    content = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise BadRequest("a user message's content must be a string or a list of content parts")
    urls = [(part.get("image_url") or {}).get("url", "") for part in content if part.get("type") == "image_url"]
    text = "\n".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
    if len(urls) != 1:
        raise BadRequest(f"expected exactly one image in the user message, got {len(urls)}")
    image = decode_image(urls[0], limits)
    example = Example(
        id="request",
        image="request",
        conversations=[
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{text}"},
            {"role": "assistant", "content": ""},
        ],
    )
    return Sample(example, image)


def token_budget(request: ChatRequest, limits: ServingConfig) -> int:
    """The request's max_tokens, within this server's limit (default: the limit)."""
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise BadRequest(f"max_tokens {asked} is over this server's limit of {limits.max_tokens}")
    return asked or limits.max_tokens


def answer_schema(response_format: dict[str, Any] | None) -> dict | None:
    """The JSON schema a ``response_format`` asks the answer to follow (None: free text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        raise BadRequest(
            "response_format must be {type: text}, {type: json_object} or {type: json_schema, "
            "json_schema: {name, schema: {...}}}"
        )
    return schema


def logprobs_content(completion) -> list[dict]:
    """OpenAI's ``logprobs.content``: each generated token of the answer with its bytes and log-probability."""
    text, start, content = completion.text.encode("utf-8"), 0, []
    for end, logprob in completion.logprobs:
        piece = text[start:end]
        content.append(
            {
                "token": piece.decode("utf-8", errors="replace"),
                "logprob": logprob,
                "bytes": list(piece),
                "top_logprobs": [],
            }
        )
        start = end
    return content


def error_body(message: str, param: str | None = None) -> dict:
    """OpenAI's error shape, which its clients read."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def sse(chunks: list[dict]) -> Iterator[str]:
    yield from (f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in chunks)
    yield "data: [DONE]\n\n"


def chat_completion(completion, prompt_tokens: int, served_model: str, request: ChatRequest) -> dict:
    """The OpenAI ``chat.completion`` object for one generated answer: usage and finish reason
    from the generated ids, the chosen tokens' log-probabilities when asked for."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion.tokens,
        "total_tokens": prompt_tokens + completion.tokens,
    }
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": completion.text},
        "finish_reason": "length" if completion.cut else "stop",
        "logprobs": {"content": logprobs_content(completion)} if request.logprobs else None,
    }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": served_model,
        "system_fingerprint": "cpu-stand-in",
        "object": "chat.completion",
        "usage": usage,
        "choices": [choice],
    }


def completion_chunks(reply: dict, request: ChatRequest) -> list[dict]:
    """The same answer as server-sent ``chat.completion.chunk`` events: the content, the finish
    reason, and the usage where ``stream_options.include_usage`` asks for it."""
    chunk = {key: reply[key] for key in ("id", "created", "model", "system_fingerprint")}
    chunk["object"] = "chat.completion.chunk"
    (choice,) = reply["choices"]
    content = {"index": 0, "delta": choice["message"], "finish_reason": None, "logprobs": choice["logprobs"]}
    chunks = [
        {**chunk, "choices": [content]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]},
    ]
    if request.stream_options and request.stream_options.include_usage:
        chunks.append({**chunk, "choices": [], "usage": reply["usage"]})
    return chunks


def create_app(model_dir: Path, served_model: str, config_paths: list[Path] | None = None):
    import threading

    import torch
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from docpipe.model.adapters import load_adapter
    from docpipe.model.constrained import GrammarError

    config = load_pipeline_config(config_paths)
    limits = config.publish.serving
    adapter = load_adapter(model_dir, config.model, config.training)
    model = adapter.from_pretrained(torch.float32).eval()
    one_at_a_time = threading.Lock()  # one model, one generation at a time; requests queue
    app = FastAPI(title=f"{served_model} (CPU stand-in for vLLM)")

    @app.exception_handler(RequestValidationError)
    def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        return JSONResponse(error_body(problems, ".".join(map(str, first[1:])) or None), status_code=400)

    @app.exception_handler(BadRequest)
    def bad(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.get("/health")
    def health() -> dict:
        return {}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": served_model, "object": "model", "owned_by": "doc-extraction"}]}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest):
        if request.model != served_model:
            return JSONResponse(
                error_body(f"model {request.model!r} is not served here; {served_model!r} is", "model"), status_code=404
            )
        sample, budget = sample_of(request.messages, limits), token_budget(request, limits)
        schema = answer_schema(request.response_format)
        try:
            with one_at_a_time, torch.no_grad():
                (completion,) = adapter.complete(model, [sample], budget, [schema] if schema else None)
        except GrammarError as exc:
            raise BadRequest(f"response_format: {exc}") from None
        reply = chat_completion(completion, adapter.length(sample), served_model, request)
        if not request.stream:
            return reply
        return StreamingResponse(sse(completion_chunks(reply, request)), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m toolkit.openai_standin", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="a patched model folder")
    parser.add_argument("--config", type=Path, action="append", help="pipeline YAML (+ overlays): model.adapter")
    parser.add_argument("--served-model-name", default="doc-extraction")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.model, args.served_model_name, args.config), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
