"""``python -m stages.serve``: an OpenAI-compatible chat server for a model folder, on CPU.

It stands in for the vLLM server where no GPU is (tests, the embedded demo): the same
``/v1/chat/completions`` request (an image as a data URL, then the question), ``/v1/models``
and ``/health``, answered by the model family's adapter with greedy decoding. It does not
constrain answers to a ``response_format`` schema (vLLM does); a request that asks for one is
answered unconstrained and says so in the response's ``system_fingerprint``.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel

from stages.config import load_pipeline_config
from stages.finetune.data import IMAGE_PLACEHOLDER, Example, Sample


class ChatRequest(BaseModel):
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    response_format: dict[str, Any] | None = None


def sample_of(messages: list[dict[str, Any]]) -> Sample:
    """The last user message's image (a data URL) and text, as the adapters take them."""
    user = next(m for m in reversed(messages) if m.get("role") == "user")
    content = user["content"] if isinstance(user["content"], list) else [{"type": "text", "text": user["content"]}]
    urls = [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]
    text = "\n".join(part["text"] for part in content if part.get("type") == "text")
    if len(urls) != 1 or not urls[0].startswith("data:image/"):
        raise ValueError("expected exactly one image, as a data:image/...;base64 URL")
    image = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))).convert("RGB")
    example = Example(id="request", image="request", conversations=[
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{text}"}, {"role": "assistant", "content": ""}])  # fmt: skip
    return Sample(example, image)


def create_app(model_dir: Path, served_model: str, config_paths: list[Path] | None = None):
    import torch
    from fastapi import FastAPI, HTTPException

    from stages.finetune.adapters import load_adapter

    config = load_pipeline_config(config_paths)
    adapter = load_adapter(model_dir, config.model, config.training)
    model = adapter.from_pretrained(torch.float32).eval()
    app = FastAPI(title=f"{served_model} (CPU stand-in for vLLM)")

    @app.get("/health")
    def health() -> dict:
        return {}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": served_model, "object": "model", "owned_by": "doc-extraction"}]}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest) -> dict:
        if request.model != served_model:
            raise HTTPException(404, f"model {request.model!r} is not served here; {served_model!r} is")
        try:
            sample = sample_of(request.messages)
        except (ValueError, KeyError, StopIteration, OSError) as exc:
            raise HTTPException(400, f"bad request: {exc}") from exc
        budget = request.max_completion_tokens or request.max_tokens or 256
        with torch.no_grad():
            (answer,) = adapter.generate(model, [sample], budget)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served_model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "system_fingerprint": "unconstrained" if request.response_format else "cpu-stand-in",
        }  # fmt: skip

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m stages.serve", description=__doc__)
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
