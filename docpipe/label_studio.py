"""Label Studio as the place people review what the model pre-filled: the labelling configuration
of a document type (from the registry), tasks with predictions, the reviewed values back, and a
small client of its REST API.

The client speaks HTTP with ``requests`` rather than through ``label-studio-sdk``: the SDK pins
``opencv-python-headless`` 4.12, which needs numpy < 2.3, below the stack's (the server, which
pins openai < 2 and pytz < 2023, runs from its own environment: ``make label-studio``, or the
compose service). Every call has a timeout and bounded retries, so a stalled server is a failure
that says so, never a hang. The key comes from ``LABEL_STUDIO_API_KEY``: a personal access
token (a JWT, exchanged for a short-lived access token) or a legacy token.
"""

from __future__ import annotations

import os
from typing import Any
from xml.sax.saxutils import quoteattr

from docpipe.config import LabellingConfig, PipelineConfig
from docpipe.contract import BadInputError
from docpipe.doctypes import DocType, load_registry

API_KEY_ENV = "LABEL_STUDIO_API_KEY"
IMAGE = "image"  # the Image tag's name, which every field's result points at


class LabelStudioError(RuntimeError):
    """Label Studio refused or did not answer; the message says which call and why."""


def registered_type(config: PipelineConfig, name: str) -> DocType:
    """The registry's document type of this id (a ``BadInputError`` naming the registry's otherwise)."""
    registry = load_registry(config.doctypes_dir)
    if name not in registry:
        raise BadInputError(f"--doc-type {name}: not in the registry {sorted(registry)}")
    return registry[name]


def project_title(settings: LabellingConfig, doc_type: DocType) -> str:
    """The one project of a document type."""
    return f"{settings.project_prefix}: {doc_type.id}"


def labelling_config(doc_type: DocType) -> str:
    """The project's labelling configuration: the image, then one input per field (a choice for an
    enum, a one-line text box otherwise), labelled as the registry labels them."""
    parts = [
        f'<View>\n  <Image name={quoteattr(IMAGE)} value="$image" zoom="true" zoomControl="true"/>',
        f"  <Header value={quoteattr(doc_type.display_name)}/>",
    ]
    for spec in doc_type.fields:
        name, required = quoteattr(spec.name), "true" if spec.required else "false"
        parts.append(f'  <Header value={quoteattr(f"{spec.label or spec.name} ({spec.name})")} size="5"/>')
        if spec.type == "enum":
            choices = "".join(f"<Choice value={quoteattr(value)}/>" for value in spec.values)
            parts.append(
                f'  <Choices name={name} toName="{IMAGE}" choice="single" required="{required}">{choices}</Choices>'
            )
        else:
            parts.append(
                f'  <TextArea name={name} toName="{IMAGE}" editable="true" maxSubmissions="1" '
                f'rows="1" required="{required}"/>'
            )
    return "\n".join([*parts, "</View>"])


def result_items(doc_type: DocType, fields: dict, confidence: dict[str, float] | None = None) -> list[dict]:
    """Field values as Label Studio results (a prediction's or an annotation's); empty values left out."""
    items = []
    for spec in doc_type.fields:
        value = fields.get(spec.name)
        if value is None or str(value) == "":
            continue
        kind, content = (
            ("choices", {"choices": [str(value)]}) if spec.type == "enum" else ("textarea", {"text": [str(value)]})
        )
        item = {"from_name": spec.name, "to_name": IMAGE, "type": kind, "value": content}
        if confidence is not None and spec.name in confidence:
            item["score"] = confidence[spec.name]
        items.append(item)
    return items


def result_fields(doc_type: DocType, items: list[dict]) -> dict[str, str | None]:
    """Field values out of Label Studio results (every field of the type; None where left empty)."""
    found: dict[str, str] = {}
    for item in items:
        value = item.get("value") or {}
        texts = value.get("text") or value.get("choices") or []
        if item.get("from_name") in {spec.name for spec in doc_type.fields} and texts:
            found[item["from_name"]] = "\n".join(str(text) for text in texts).strip()
    return {spec.name: found.get(spec.name) or None for spec in doc_type.fields}


class LabelStudio:
    """The REST calls the loop needs, against ``labelling.url``."""

    def __init__(self, settings: LabellingConfig):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        key = os.environ.get(API_KEY_ENV)
        if not key:
            raise LabelStudioError(f"{API_KEY_ENV} is not set: a Label Studio access token (Account & Settings)")
        self.url, self.timeout = settings.url.rstrip("/"), (5, settings.timeout_s)
        self.session = requests.Session()
        retry = Retry(
            total=settings.retries, backoff_factor=0.5, status_forcelist=(502, 503, 504), allowed_methods=None
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        # a personal access token is a refresh JWT, exchanged for short-lived access tokens as they expire
        self.refresh_token = key if key.count(".") == 2 else None
        if self.refresh_token:
            self._refresh()
        else:
            self.session.headers["Authorization"] = f"Token {key}"

    def _refresh(self) -> None:
        access = self._call("POST", "/api/token/refresh", json={"refresh": self.refresh_token}, renew=False)["access"]
        self.session.headers["Authorization"] = f"Bearer {access}"

    def _call(self, method: str, path: str, renew: bool = True, **kwargs) -> Any:
        import requests

        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise LabelStudioError(
                f"Label Studio at {self.url} did not answer {method} {path}: {type(exc).__name__}"
            ) from None
        if response.status_code == 401 and self.refresh_token and renew:  # the access token expired
            self._refresh()
            return self._call(method, path, renew=False, **kwargs)
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio refused {method} {path}: HTTP {response.status_code} {response.text[:300]}"
            )
        return response.json() if response.content else None

    def find_project(self, title: str) -> dict | None:
        listed = self._call("GET", "/api/projects", params={"page_size": 1000, "title": title})
        projects = listed["results"] if isinstance(listed, dict) else listed
        return next((p for p in projects if p["title"] == title), None)

    def project(self, title: str, label_config: str) -> dict:
        """The project of this title, created with ``label_config`` if there is none; an existing one's
        configuration is brought up to date (fields added to the type appear in it)."""
        found = self.find_project(title)
        if found is None:
            return self._call("POST", "/api/projects", json={"title": title, "label_config": label_config})
        if found.get("label_config") != label_config:
            found = self._call("PATCH", f"/api/projects/{found['id']}", json={"label_config": label_config})
        return found

    def import_tasks(self, project_id: int, tasks: list[dict]) -> int:
        """Import tasks (with their predictions); the number Label Studio took."""
        answer = self._call("POST", f"/api/projects/{project_id}/import", json=tasks)
        return int(answer.get("task_count", 0))

    def tasks(self, project_id: int) -> list[dict]:
        """Every task of the project with its annotations and predictions."""
        tasks, page = [], 1
        while True:
            answer = self._call(
                "GET", "/api/tasks", params={"project": project_id, "fields": "all", "page": page, "page_size": 100}
            )
            tasks += answer["tasks"]
            if len(tasks) >= answer.get("total", 0) or not answer["tasks"]:
                return tasks
            page += 1

    def annotate(self, task_id: int, result: list[dict]) -> dict:
        """Submit an annotation of a task, as a reviewer does."""
        return self._call("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})

    def mark(self, task_id: int, meta: dict) -> None:
        """Record ``meta`` on a task (where its reviewed values went)."""
        self._call("PATCH", f"/api/tasks/{task_id}", json={"meta": meta})
