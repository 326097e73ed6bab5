"""Evaluation of a finetuned model on an export's eval documents, with an accuracy gate.

- ``__main__``: the stage (``python -m stages.evaluate``): predictions from a backend, metrics,
  the OCR baseline beside them, the gate's decision, the HTML report, everything in MLflow.
- ``backends``: ``transformers`` (batched generate), ``openai`` (any OpenAI-compatible
  server, the published vLLM image included), ``vllm`` (the offline engine, GPU images only).
- ``parsing``: the JSON object inside a model's answer.
- ``metrics``: field and document accuracy, JSON validity, per-field accuracy and character
  error rate, latency, Donut's field F1 and tree-edit-distance accuracy.
- ``gate``: thresholds per document type and no regression against the champion.
- ``baseline``: the OCR pipeline teams are leaving (PP-OCRv4 via RapidOCR, reading order,
  per-type keyword rules).
- ``report``: the HTML report.
"""
