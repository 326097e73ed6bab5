"""One redaction for every text a user can see: logs, manifests, specs, MLflow, error messages.

``redact`` removes the user:password part of URLs anywhere in a text and the values of the
environment's secret variables (AWS and MLflow credentials, and any variable whose name says
secret, password, token, ...), through nested lists and mappings. ``redact_output`` makes the
process's stdout and stderr (and so every print and every log handler created after it) and
every log handler already set up write redacted text, tracebacks included.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

MASK = "***"
SECRET_NAME = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private)", re.I)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")
_MIN_SECRET_LENGTH = 6  # shorter values would mask ordinary words


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables, longest first."""
    environ = os.environ if environ is None else environ
    # names first, then each value by get(): other threads (MLflow's telemetry) change os.environ meanwhile
    values = {environ.get(name) or "" for name in list(environ) if SECRET_NAME.search(name)}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, MASK)
    return text


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """``value`` with URL credentials and secret values masked, through lists, tuples and mappings."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        return {key: redact(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(item, secrets) for item in value)
    return value


class RedactingFormatter(logging.Formatter):
    """Formats with the handler's own formatter, then redacts the whole line (tracebacks too)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(self.inner.format(record))


class RedactingStream:
    """A text stream that redacts what is written to it, then passes it on."""

    def __init__(self, inner: TextIO):
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(redact_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def redact_output() -> None:
    """Redact this process's stdout, stderr and the log handlers set up so far (call it first thing)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    redact_logs()


def redact_logs() -> None:
    """Redact what every handler of the root logger and of already-configured loggers writes
    (handlers hold the stream they were created with)."""
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):  # placeholders of unconfigured names have none
            if isinstance(getattr(handler, "stream", None), RedactingStream):
                continue  # writes into a redacting stream already: once is enough
            if not isinstance(handler.formatter, RedactingFormatter):
                handler.setFormatter(RedactingFormatter(handler.formatter))
