"""Containerised stages of the document-extraction finetuning pipeline.

Each stage is ``python -m stages.<name>``; shared pieces live in named modules:
``config`` (typed configuration), ``doctypes`` (document-type registry), ``storage``
(local paths and s3://), ``landing`` (labelled-batch format), ``tracking`` (MLflow),
``manifest`` and ``cli`` (the stage contract).
"""
