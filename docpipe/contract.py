"""The stage contract, shared by every ``python -m stages.<name>``.

A stage module defines its flags on ``stage_parser`` and a ``run``; ``main`` loads the
validated configuration, takes the ``--output`` folder for itself (a second run into it is
refused before anything is written), opens the stage's MLflow run, calls ``run``, writes
``result.json`` into the ``--output`` location and maps the outcome to an exit code:
0 success, 2 bad input, usage or a folder in use (one line naming the file and the problem),
1 failure. The last stderr line says why, naming the first cause; every text the stage
writes or logs is redacted (``docpipe.redaction``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path

from docpipe import tracking
from docpipe.config import PipelineConfig, load_pipeline_config
from docpipe.doctypes import LabelError
from docpipe.loader import ConfigError
from docpipe.locking import FolderInUse, exclusive
from docpipe.manifest import RESULT_FILE, StageOutput, StageResult, versions
from docpipe.redaction import redact, redact_output, redact_text
from docpipe.storage import LocalStorage, Storage, StorageError, StorageUnavailable, open_storage

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
log = logging.getLogger("stages")


class BadInputError(ValueError):
    """Input the stage cannot accept; the message names the file and the problem."""


@contextmanager
def input_errors_are_bad_input(*errors: type[Exception], prefix: str = "") -> Iterator[None]:
    """Inside: a ``StorageError`` or one of ``errors`` is the input's fault, re-raised as
    ``BadInputError`` (``prefix`` + its message); a store that does not answer
    (``StorageUnavailable``) stays what it is, a failure of the run."""
    try:
        yield
    except StorageUnavailable:
        raise
    except (StorageError, *errors) as exc:
        raise BadInputError(f"{prefix}{exc}") from exc


Runner = Callable[[argparse.Namespace, PipelineConfig, Storage], StageOutput]


def stage_parser(stage: str, description: str, module: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the flags every stage takes; ``module`` runs it (default ``stages.<stage>``)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module or f'stages.{stage}'}", description=description)
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        help="pipeline YAML; repeat to add overlays, merged in order (default: configs/pipeline.yaml)",
    )
    parser.add_argument("--output", required=True, help="output location: a folder or s3://bucket/prefix")
    parser.add_argument(
        "--overrides",
        type=_json_mapping,
        default=None,
        help="a JSON mapping merged over the config files (a run's settings, e.g. from the Airflow form)",
    )
    return parser


def config_flags(paths: Iterable[str | Path]) -> list[str]:
    """The ``--config`` flags naming these files, in merge order: how a stage is told its configuration."""
    return [flag for path in paths for flag in ("--config", str(path))]


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _one_line(error: BaseException) -> str:
    return redact_text("; ".join(line.strip() for line in str(error).splitlines() if line.strip()))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {_one_line(error)}"


def _fail(stage: str, message: str, code: int) -> int:
    print(f"{stage}: error: {redact_text(message)}", file=sys.stderr)  # the last line says why
    return code


def main(
    stage: str,
    parser: argparse.ArgumentParser,
    run: Runner,
    argv: list[str] | None = None,
    adjust_args: Callable[[argparse.Namespace, PipelineConfig], None] | None = None,
) -> int:
    """Parse flags, take the output folder, run the stage under MLflow, write ``result.json``;
    returns the exit code. ``adjust_args`` may change the flags once the configuration is known
    (finetune on node k > 0 of a multi-node run writes its own files in a folder of its own)."""
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad flags
    redact_output()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_pipeline_config(args.config, args.overrides)
        if adjust_args:
            adjust_args(args, config)
        output = open_storage(args.output, config.storage.s3)
    except (ConfigError, StorageError) as exc:
        return _fail(stage, _one_line(exc), EXIT_BAD_INPUT)
    try:
        with exclusive(Path(output.uri)) if isinstance(output, LocalStorage) else nullcontext():
            return _tracked(stage, run, args, config, output)
    except FolderInUse as exc:
        return _fail(stage, str(exc), EXIT_BAD_INPUT)


def _tracked(stage: str, run: Runner, args: argparse.Namespace, config: PipelineConfig, output: Storage) -> int:
    """The stage under its MLflow run, its manifest written; the first cause of a failure is the one reported."""
    params = {"stage": vars(args), "config": config.model_dump(mode="json")}
    result, failure = None, None
    try:
        with tracking.stage_run(config.tracking, stage, params) as run_id:
            result, failure = _execute(stage, run, args, config, output, run_id)
            if isinstance(failure, StorageUnavailable) and not isinstance(output, LocalStorage):
                log.error("%s not written: the store did not answer", output.uri_of(RESULT_FILE))
            else:
                output.write_bytes(RESULT_FILE, json.dumps(redact(result.model_dump(mode="json")), indent=2).encode())
            tracking.log_result(result)
    except Exception as exc:  # tracking or the output location failed, around the stage
        log.exception("stage %s: tracking or output failed", stage)
        first = f"{result.error}; then " if result and result.error else ""
        return _fail(stage, f"{first}{_describe(exc)}", result.exit_code if first else EXIT_FAILED)
    log.info("%s %s in %.1fs; manifest %s", stage, result.status, result.duration_s, output.uri_of(RESULT_FILE))
    if result.error:
        return _fail(stage, result.error, result.exit_code)
    return result.exit_code


def _execute(
    stage: str, run: Runner, args: argparse.Namespace, config: PipelineConfig, output: Storage, run_id: str
) -> tuple[StageResult, Exception | None]:
    """Call the stage's ``run`` and describe the outcome, whatever it was; also the exception, if any."""
    started, clock = datetime.now(UTC), time.perf_counter()
    error, code, produced, failure = None, EXIT_OK, StageOutput(), None
    try:
        produced = run(args, config, output)
    except (BadInputError, ConfigError, LabelError) as exc:
        error, code, failure = _one_line(exc), EXIT_BAD_INPUT, exc
    except StorageUnavailable as exc:  # the cause is the message; a traceback (or a worker's) adds only noise
        log.error("stage %s failed: %s", stage, _describe(exc))
        error, code, failure = _describe(exc), EXIT_FAILED, exc
    except Exception as exc:
        log.exception("stage %s failed", stage)
        error, code, failure = _describe(exc), EXIT_FAILED, exc
    result = StageResult(
        **produced.model_dump(),
        stage=stage,
        status="succeeded" if code == EXIT_OK else "failed",
        exit_code=code,
        error=error,
        started_at=started,
        finished_at=datetime.now(UTC),
        duration_s=round(time.perf_counter() - clock, 3),
        versions=versions(),
        mlflow_run_id=run_id,
    )
    return result, failure
