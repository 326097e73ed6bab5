"""Evaluation throughput: batched against one-at-a-time inference, constrained decoding against
free decoding, and scoring, in one run.

Builds the tiny random MiniCPM-V 4.6 and N synthetic eval documents (default 32), answers them
through the transformers backend with batch size 1 and with batch size B (default 8) on CPU,
and prints docs/s of each and their ratio (batched must win); then answers them at batch size B
with and without ``evaluation.structured_output`` (the schema's own token budget), printing
docs/s, milliseconds per decoding step (one token for every row of a batch: the random model
rambles to different lengths in each mode, so the cost of a step is the fair comparison) and
JSON validity of each; then scores M
predictions (default 20,000) and prints scored docs/s.

    .venv/bin/python benchmarks/evaluate_throughput.py [--documents 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from docpipe.answering.backends import Request, TransformersBackend
from docpipe.answering.parsing import extract_json, fits
from docpipe.answering.scoring import evaluate_all, score
from docpipe.config import SyntheticConfig, load_pipeline_config
from docpipe.data.examples import Example
from docpipe.doctypes import load_registry
from toolkit.synthetic import generate
from toolkit.tiny_model import build

ROOT = Path(__file__).resolve().parents[1]


def synthetic_requests(registry: dict, count: int, folder: Path) -> list[Request]:
    """``count`` synthetic documents of every type, their images in ``folder``, as evaluation requests."""
    requests = []
    for index, (record, image, _) in enumerate(generate(list(registry.values()), SyntheticConfig(count=count, seed=5))):
        path = folder / f"{index}.jpg"
        path.write_bytes(image)
        doc_type = registry[record.doc_type]
        conversations = [
            {"role": "user", "content": doc_type.prompt},
            {"role": "assistant", "content": doc_type.canonical_answer(record.fields)},
        ]
        example = Example(id=str(index), doc_type=doc_type.id, image=str(path), conversations=conversations)
        requests.append(Request(example, doc_type))
    return requests


def answer_pass(model: Path, requests: list[Request], folder: Path, batch: int, budget: int, constrained: bool):
    """docs/s, ms per decoding step and JSON validity of one pass over the documents."""
    overlay = folder / "evaluation.yaml"
    evaluation = {"batch_size": batch, "max_new_tokens": budget, "structured_output": constrained}
    overlay.write_text(json.dumps({"model": {"base": str(model)}, "evaluation": evaluation}))
    config = load_pipeline_config(
        [ROOT / "configs" / "pipeline.yaml", ROOT / "configs" / "overlays" / "embedded.yaml", overlay]
    )
    backend = TransformersBackend.from_folder(model, config)
    backend.predict(requests[: min(batch, 4)])  # warm-up
    started = time.perf_counter()
    responses = backend.predict(requests)
    seconds = time.perf_counter() - started
    lengths = [len(r.logprobs) + 1 for r in responses]  # each answer's tokens and its end
    steps = sum(min(budget, max(lengths[i : i + batch])) for i in range(0, len(lengths), batch))
    valid = sum(fits(extract_json(r.answer, q.doc_type), q.doc_type) for q, r in zip(requests, responses, strict=True))
    return len(requests) / seconds, 1000 * seconds / steps, valid / len(requests)


def scoring_rate(requests: list[Request], registry: dict, at_least: int) -> tuple[float, int]:
    """Predictions scored per second (metrics included), over at least ``at_least`` of them."""
    expected = [json.loads(r.example.answer) for r in requests]
    started = time.perf_counter()
    rounds = max(1, at_least // len(requests))
    scored = [
        score(r.doc_type, r.example.id, e, e, "", 0.1)
        for _ in range(rounds)
        for r, e in zip(requests, expected, strict=True)
    ]
    evaluate_all(scored, registry, 1.0)
    return len(scored) / (time.perf_counter() - started), len(scored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--scored", type=int, default=20_000)
    args = parser.parse_args()
    registry = load_registry(ROOT / "configs" / "doctypes")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build(tmp / "model", ROOT / "configs" / "doctypes")
        requests = synthetic_requests(registry, args.documents, tmp)
        rates = {
            batch: answer_pass(model, requests, tmp, batch, args.new_tokens, False)[0] for batch in (1, args.batch)
        }
        modes = {
            constrained: answer_pass(model, requests, tmp, args.batch, 512, constrained)
            for constrained in (False, True)
        }
    scoring, scored = scoring_rate(requests, registry, args.scored)

    print(f"one at a time (batch 1):   {rates[1]:7.2f} docs/s")
    print(f"batched (batch {args.batch}):        {rates[args.batch]:7.2f} docs/s")
    print(f"ratio batched / one at a time: {rates[args.batch] / rates[1]:.2f} (must be > 1)")
    for constrained, (docs, ms, valid) in modes.items():
        print(
            f"{'constrained' if constrained else 'free':>11} (batch {args.batch}): {docs:7.2f} docs/s, "
            f"{ms:6.1f} ms/step, JSON valid {valid:.2f}"
        )
    print(
        f"cost of constraining: {modes[True][1] / modes[False][1]:.2f}x per decoding step, "
        f"docs/s ratio constrained / free {modes[True][0] / modes[False][0]:.2f}"
    )
    print(f"scoring:                   {scoring:7.0f} docs/s ({scored} predictions, metrics included)")


if __name__ == "__main__":
    main()
