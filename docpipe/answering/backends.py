"""Where predictions come from, behind one interface: ``predict(requests) -> responses``.

- ``transformers``: the model folder loaded through its adapter, batched greedy ``generate``
  (CPU or GPU);
- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` endpoint, such as the published
  vLLM image, the image sent inline as a data URL;
- ``vllm``: vLLM's offline engine, batched; vLLM lives only in the GPU images, so this module
  imports it only when that backend runs.

Decoding is greedy everywhere. A request asks either its own document type or, routed, the run's
types as one question (``docpipe.routing``). With ``evaluation.structured_output`` the answer is
constrained to what it asks (``decoding_schema``): transformers with llguidance
(``finetune/adapters/constrained.py``), the OpenAI API with ``response_format`` (``json_schema``),
vLLM offline with ``StructuredOutputsParams(json=...)``. Every backend asks for the generated
tokens' log-probabilities, from which each field's confidence is computed (``confidence.py``).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from docpipe.config import EvaluationConfig, PipelineConfig, S3Config
from docpipe.data.examples import IMAGE_PLACEHOLDER, DataError, Example, Sample, load_image
from docpipe.doctypes import OTHER, TYPE_KEY, DocType
from docpipe.routing import Routing

_BUDGET = {"date": 12, "time": 10, "money": 16, "integer": 16, "id": 32, "text": 96}  # characters per value


class NoModelFolder(ValueError):
    """A backend that runs the model itself was given no model folder."""


@dataclass(frozen=True)
class Request:
    """One document to answer: its labelled type (None: a page of none of the types), and the routed
    question where it is asked without its type."""

    example: Example
    doc_type: DocType | None
    routing: Routing | None = None

    @property
    def asked(self) -> DocType | Routing:
        """What the answer must be: the document type's JSON, or a routed answer."""
        return self.routing or self.doc_type

    @property
    def question(self) -> str:
        """The prompt without its image placeholder, as chat APIs take the image separately."""
        return self.example.prompt.replace(IMAGE_PLACEHOLDER, "").strip()


def requests_for(examples: list[Example], registry: dict[str, DocType], routing: Routing, where: str) -> list[Request]:
    """Each example of the file at ``where`` as a request: its labelled type, and ``routing`` where it
    was exported routed (which must be the same question: the same prompt). ``DataError`` names the
    file and what is wrong."""
    if any(e.doc_type is None for e in examples):
        raise DataError(f"{where}: documents without a doc_type; export them again")
    unknown = sorted({e.doc_type for e in examples if e.doc_type not in registry and e.doc_type != OTHER})
    if unknown:
        raise DataError(f"{where}: document types {unknown} are not in the registry")
    if any(e.doc_type == OTHER and not e.routed for e in examples):
        raise DataError(f"{where}: pages labelled {OTHER} asked with a type's prompt; export them routed")
    stale = [e.id for e in examples if e.routed and e.prompt != routing.prompt]
    if stale:
        raise DataError(
            f"{where}: {len(stale)} routed document(s) (first {stale[0]}) were asked another routing prompt "
            "than this run's (export.routing_prompt, doc_types): export them again"
        )
    return [Request(e, registry.get(e.doc_type), routing if e.routed else None) for e in examples]


@dataclass(frozen=True)
class Response:
    id: str
    answer: str
    latency_s: float  # until this document's answer was there (a batch's documents share one)
    #: each generated token: (where it ends, in bytes of the answer's UTF-8, its log-probability)
    logprobs: tuple[tuple[int, float], ...] = ()


def byte_ends(pieces: list[tuple[bytes, float]]) -> tuple[tuple[int, float], ...]:
    """Token pieces (their bytes, their log-probability) as (end offset, log-probability)."""
    ends, total = [], 0
    for piece, logprob in pieces:
        total += len(piece)
        ends.append((total, logprob))
    return tuple(ends)


class Backend(Protocol):
    def predict(self, requests: list[Request]) -> list[Response]: ...

    def with_settings(self, settings: EvaluationConfig) -> Backend:
        """The same model (in memory, or behind the same server) answering with other decoding settings."""
        ...


def value_budget(spec) -> int:
    """The most characters a value of this field may take in an answer."""
    return max([len(v) for v in spec.values or []] + [_BUDGET.get(spec.type, 32)])


def _longest_answer_bytes(doc_type: DocType, routed: bool) -> int:
    longest = {spec.name: "x" * value_budget(spec) * 3 for spec in doc_type.fields}
    if routed:
        longest = {TYPE_KEY: doc_type.id, **longest}
    return len(json.dumps(longest, ensure_ascii=False).encode("utf-8"))


def max_new_tokens(asked: DocType | Routing, cap: int) -> int:
    """A token budget from the answer's schema: every key and a generous value in UTF-8 bytes
    (no tokenizer makes more tokens than bytes), for the longest type a routed answer may name;
    at most ``cap``."""
    if isinstance(asked, Routing):
        longest = max(_longest_answer_bytes(t, routed=True) for t in asked.doc_types)
    else:
        longest = _longest_answer_bytes(asked, routed=False)
    return min(cap, longest + 8)


def _bounded_schema(doc_type: DocType) -> dict:
    schema = doc_type.answer_schema()
    for spec in doc_type.fields:
        if spec.type != "enum":
            schema["properties"][spec.name]["maxLength"] = value_budget(spec)
    return schema


def decoding_schema(asked: DocType | Routing) -> dict:
    """The answer schema a constrained decoder follows: the type's (or each routed type's), each string
    value bounded to its budget, so that an answer closes within ``max_new_tokens`` whatever the model
    would ramble."""
    return asked.answer_schema(branch=_bounded_schema) if isinstance(asked, Routing) else _bounded_schema(asked)


def batches(requests: list[Request], size: int) -> Iterator[list[Request]]:
    for start in range(0, len(requests), size):
        yield requests[start : start + size]


def data_url(image_uri: str, config: PipelineConfig) -> str:
    buffer = io.BytesIO()
    load_image(image_uri, config.storage.s3).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(request: Request, config: PipelineConfig, image_url: str | None = None) -> list[dict]:
    """The document as an OpenAI chat request: the image (its data URL unless ``image_url`` is given),
    then the question."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url or data_url(request.example.image, config)}},
                {"type": "text", "text": request.question},
            ],
        }
    ]


def chat_request(
    request: Request, model: str, config: PipelineConfig, constrained: bool, image_url: str | None = None
) -> dict:
    """One ``/v1/chat/completions`` body: the image and the question, greedy, the token budget of what
    is asked and, ``constrained``, its answer's schema as ``response_format``. What a client of the
    published server sends (``request.json`` in the serving image is one, its image a placeholder)."""
    body = {
        "model": model,
        "messages": chat_messages(request, config, image_url),
        "temperature": 0,
        "max_tokens": max_new_tokens(request.asked, config.evaluation.max_new_tokens),
    }
    if constrained:
        body["response_format"] = response_format(request.asked)
    return body


def response_format(asked: DocType | Routing) -> dict:
    """The OpenAI API's ``response_format`` for a request's answer (a client can copy it)."""
    return {"type": "json_schema", "json_schema": {"name": asked.id, "schema": decoding_schema(asked), "strict": True}}


class TransformersBackend:
    """Batched greedy generation through the model family's adapter, with a model in memory: the
    patched folder's (``from_folder``) or the one being trained (checkpoint selection)."""

    def __init__(self, adapter, model, settings: EvaluationConfig, s3: S3Config):
        self.adapter, self.model, self.settings, self.s3 = adapter, model, settings, s3

    @classmethod
    def from_folder(cls, model_dir: Path, config: PipelineConfig) -> TransformersBackend:
        import torch

        from docpipe.model.adapters import load_adapter

        adapter = load_adapter(model_dir, config.model, config.training)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return cls(adapter, adapter.from_pretrained(dtype).to(device).eval(), config.evaluation, config.storage.s3)

    def with_settings(self, settings: EvaluationConfig) -> TransformersBackend:
        return TransformersBackend(self.adapter, self.model, settings, self.s3)

    def predict(self, requests: list[Request]) -> list[Response]:
        import torch

        responses = []
        for batch in batches(requests, self.settings.batch_size):
            started = time.perf_counter()
            samples = [Sample(r.example, load_image(r.example.image, self.s3)) for r in batch]
            budget = max(max_new_tokens(r.asked, self.settings.max_new_tokens) for r in batch)
            schemas = [decoding_schema(r.asked) for r in batch] if self.settings.structured_output else None
            with torch.no_grad():
                completions = self.adapter.complete(self.model, samples, budget, schemas)
            elapsed = time.perf_counter() - started
            responses += [
                Response(r.example.id, c.text, elapsed, c.logprobs) for r, c in zip(batch, completions, strict=True)
            ]
        return responses


class OpenAIBackend:
    """An OpenAI-compatible server; requests go concurrently, up to ``evaluation.batch_size`` at once."""

    def __init__(self, endpoint: str, model: str, config: PipelineConfig):
        from openai import OpenAI

        # A key only where the server wants one, from the environment; vLLM's default wants none.
        self.client = OpenAI(
            base_url=endpoint, api_key=os.environ.get("OPENAI_API_KEY", "none"), max_retries=3, timeout=600
        )
        self.model = model
        self.config = config

    def with_settings(self, settings: EvaluationConfig) -> OpenAIBackend:
        other = copy.copy(self)  # the same client and its connections
        other.config = self.config.model_copy(update={"evaluation": settings})
        return other

    def request_arguments(self, request: Request) -> dict:
        constrained = self.config.evaluation.structured_output
        return chat_request(request, self.model, self.config, constrained) | {"logprobs": True}

    def _answer(self, request: Request) -> Response:
        started = time.perf_counter()
        completion = self.client.chat.completions.create(**self.request_arguments(request))
        choice = completion.choices[0]
        tokens = (choice.logprobs.content or []) if choice.logprobs else []
        pieces = [(bytes(t.bytes) if t.bytes is not None else t.token.encode("utf-8"), t.logprob) for t in tokens]
        return Response(
            request.example.id, choice.message.content or "", time.perf_counter() - started, byte_ends(pieces)
        )

    def predict(self, requests: list[Request]) -> list[Response]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.config.evaluation.batch_size) as pool:
            return list(pool.map(self._answer, requests))


class VllmBackend:
    """vLLM's offline engine: the whole eval set as one batch of chat requests."""

    def __init__(self, model_dir: Path, config: PipelineConfig):
        from vllm import LLM

        self.config = config
        self.llm = LLM(
            model=str(model_dir),
            trust_remote_code=config.model.adapter == "remote_code",
            max_model_len=config.training.model_max_length,
            limit_mm_per_prompt={"image": 1},
        )

    def with_settings(self, settings: EvaluationConfig) -> VllmBackend:
        other = copy.copy(self)  # the same engine
        other.config = self.config.model_copy(update={"evaluation": settings})
        return other

    def sampling_arguments(self, request: Request) -> dict:
        """Keyword arguments of ``vllm.SamplingParams`` for one request (no vllm needed to build them)."""
        settings = self.config.evaluation
        arguments = {
            "temperature": 0.0,
            "max_tokens": max_new_tokens(request.asked, settings.max_new_tokens),
            "logprobs": 0,
        }  # the chosen token's only
        if settings.structured_output:
            arguments["structured_outputs"] = {"json": decoding_schema(request.asked)}
        return arguments

    def predict(self, requests: list[Request]) -> list[Response]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = []
        for request in requests:
            arguments = self.sampling_arguments(request)
            if "structured_outputs" in arguments:
                arguments["structured_outputs"] = StructuredOutputsParams(**arguments["structured_outputs"])
            params.append(SamplingParams(**arguments))
        started = time.perf_counter()
        outputs = self.llm.chat([chat_messages(r, self.config) for r in requests], sampling_params=params)
        elapsed = time.perf_counter() - started
        return [
            Response(r.example.id, o.outputs[0].text, elapsed, self.logprobs(o.outputs[0]))
            for r, o in zip(requests, outputs, strict=True)
        ]

    @staticmethod
    def logprobs(output) -> tuple[tuple[int, float], ...]:
        """The chosen tokens' log-probabilities of a ``CompletionOutput``, by where each ends in its text."""
        chosen = [step[token] for step, token in zip(output.logprobs or [], output.token_ids, strict=False)]
        return byte_ends([((c.decoded_token or "").encode("utf-8"), c.logprob) for c in chosen])


def open_backend(config: PipelineConfig, model: str | None) -> Backend:
    """The configured backend: ``openai`` against ``evaluation.endpoint``, else ``vllm`` or
    ``transformers`` on the model folder ``model`` (``NoModelFolder`` where it is not one)."""
    settings = config.evaluation
    if settings.backend == "openai":
        return OpenAIBackend(settings.endpoint, settings.served_model, config)
    if not model or not (Path(model) / "config.json").is_file():
        raise NoModelFolder(f"--model {model}: backend {settings.backend} needs a model folder with config.json")
    if settings.backend == "vllm":
        return VllmBackend(Path(model), config)
    return TransformersBackend.from_folder(Path(model), config)
