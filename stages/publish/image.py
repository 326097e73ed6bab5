"""The serving image: vLLM's flags for MiniCPM-V, build, push, and the smoke test after the push.

Everything goes through the Docker API (docker-py; ``DOCKER_HOST`` picks the engine, podman's
included), so the DAG's workers and the tests drive it the same way.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from docpipe.config import PipelineConfig
from docpipe.locking import LOCK_SUFFIX
from docpipe.orchestration.containers import gpu_run_arguments

DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "serving.Dockerfile"
BAKED_MODEL = "/models/served"
LOG_TAIL = 60


class SmokeTestFailed(RuntimeError):
    """The pushed image did not serve a valid answer; the message ends with the server's log tail."""


def serve_flags(config: PipelineConfig, model: str) -> dict[str, Any]:
    """``vllm serve`` flags as its ``--config`` YAML takes them. Remote-code models need their
    .py files beside the weights (patch put them there) and ``--trust-remote-code``; a model
    streamed from the artifact store loads through the Run:ai streamer."""
    serving = config.publish.serving
    flags: dict[str, Any] = {
        "model": model,
        "served-model-name": serving.served_model_name,
        "max-model-len": serving.max_model_len,
        "limit-mm-per-prompt": json.dumps(serving.limit_mm_per_prompt),
        "gpu-memory-utilization": serving.gpu_memory_utilization,
        "port": serving.port,
    }
    if config.model.adapter == "remote_code":
        flags["trust-remote-code"] = True
    if model.startswith("s3://"):
        flags["load-format"] = "runai_streamer"
    return flags


def build_context(context: Path, model_dir: Path, model_uri: str, config: PipelineConfig, request: Path) -> Path:
    """The build context: the Dockerfile, serve.yaml, request.json (a request a client can copy), and
    model/ (the weights where baked)."""
    baked = config.publish.model_source == "baked"
    (context / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy(DOCKERFILE, context / "Dockerfile")
    shutil.copy(request, context / "request.json")
    if baked:
        shutil.copytree(
            model_dir,
            context / "model",
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("result.json", "patch.json", f"*{LOCK_SUFFIX}"),
        )
    flags = serve_flags(config, BAKED_MODEL if baked else model_uri)
    (context / "serve.yaml").write_text(yaml.safe_dump(flags, sort_keys=False))
    return context


@dataclass(frozen=True)
class PushedImage:
    reference: str  # repository:tag
    digest: str  # sha256:... of the pushed manifest

    @property
    def pinned(self) -> str:
        return f"{self.reference.rsplit(':', 1)[0]}@{self.digest}"


def build_and_push(client, context: Path, reference: str, base_image: str, version: str) -> PushedImage:
    """Build the serving image, push it, and return its reference and manifest digest."""
    client.images.build(
        path=str(context), tag=reference, rm=True, buildargs={"BASE_IMAGE": base_image, "MODEL_VERSION": version}
    )
    repository, tag = reference.rsplit(":", 1)
    digest = None
    for line in client.api.push(repository, tag=tag, stream=True, decode=True):
        if "error" in line:
            raise RuntimeError(f"push of {reference} failed: {line['error']}")
        digest = (line.get("aux") or {}).get("Digest", digest)
    if digest is None:  # some engines report it only in the repository's digests
        digests = client.images.get(reference).attrs.get("RepoDigests", [])
        digest = next((d.split("@", 1)[1] for d in digests if d.startswith(repository)), None)
    if digest is None:
        raise RuntimeError(f"push of {reference} reported no digest")
    return PushedImage(reference, digest)


def _log_tail(container) -> str:
    return container.logs(tail=LOG_TAIL).decode("utf-8", "replace")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def smoke_test(client, image: str, config: PipelineConfig, check) -> str:
    """Start ``image``, wait for /health, ask one question through the OpenAI API, and pass the
    answer to ``check`` (which raises ValueError if it is not acceptable). Returns the answer."""
    from openai import OpenAI

    port = config.publish.serving.port
    arguments = gpu_run_arguments(config.gpu_container, config.publish.smoke_gpus or None)
    arguments.pop("ulimits")  # a server needs none of the training limits
    container = client.containers.run(image, detach=True, ports={f"{port}/tcp": ("127.0.0.1", None)}, **arguments)
    try:
        deadline = time.monotonic() + config.publish.smoke_timeout_s
        while True:
            container.reload()
            if container.status == "exited":
                raise SmokeTestFailed(f"{image} exited before serving; server log tail:\n{_log_tail(container)}")
            bindings = container.attrs["NetworkSettings"]["Ports"].get(f"{port}/tcp") or []
            base = f"http://127.0.0.1:{bindings[0]['HostPort']}" if bindings else None
            if base and _healthy(f"{base}/health"):
                break
            if time.monotonic() > deadline:
                raise SmokeTestFailed(
                    f"{image}: /health did not answer within {config.publish.smoke_timeout_s}s; "
                    f"server log tail:\n{_log_tail(container)}"
                )
            time.sleep(1)
        try:
            answer = check(OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=1, timeout=600))
        except Exception as exc:
            raise SmokeTestFailed(f"{image}: {exc}; server log tail:\n{_log_tail(container)}") from exc
        return answer
    finally:
        container.remove(force=True)
