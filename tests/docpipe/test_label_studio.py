"""Label Studio's side of the labelling loop without a server: the labelling configuration from the
registry, results both ways, what counts as reviewed and changed, and a client that never hangs."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from docpipe.config import LabellingConfig
from docpipe.doctypes import load_registry
from docpipe.label_studio import (
    API_KEY_ENV,
    LabelStudio,
    LabelStudioError,
    labelling_config,
    result_fields,
    result_items,
)
from stages.collect_labels import changes, reviewed
from tests.helpers import ROOT

REGISTRY = load_registry(ROOT / "configs" / "doctypes")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_labelling_config_has_one_input_per_field(name):
    doc_type = REGISTRY[name]
    view = ET.fromstring(labelling_config(doc_type))
    inputs = {tag.get("name"): tag for tag in view if tag.tag in ("TextArea", "Choices")}
    assert list(inputs) == [spec.name for spec in doc_type.fields]
    assert all(tag.get("toName") == "image" for tag in inputs.values())
    assert view.find("Image").get("value") == "$image"
    for spec in doc_type.fields:
        if spec.type == "enum":
            assert [c.get("value") for c in inputs[spec.name]] == list(spec.values)
        assert inputs[spec.name].get("required") == ("true" if spec.required else "false")


def test_results_go_there_and_back():
    doc_type = REGISTRY["thsr_ticket"]
    fields = {spec.name: (spec.values or spec.samples or ["臺北 1"])[0] for spec in doc_type.fields}
    fields[doc_type.fields[-1].name] = None
    items = result_items(doc_type, fields, {name: 0.5 for name in fields})
    assert len(items) == len(fields) - 1 and all(item["score"] == 0.5 for item in items)
    assert result_fields(doc_type, items) == fields


def test_changes_are_counted_after_the_types_normalisation():
    doc_type = REGISTRY["receipt_en"]
    money = next(spec.name for spec in doc_type.fields if spec.type == "money")
    text = next(spec.name for spec in doc_type.fields if spec.type == "text")
    prefilled = {money: "12.50", text: "ACME"}
    assert changes(doc_type, prefilled, {money: "12.5", text: "ACME"}) == []
    assert changes(doc_type, prefilled, {money: "12.60", text: "ACME"}) == [money]
    assert changes(doc_type, {}, {text: "ACME"}) == [text]


def test_reviewed_is_the_latest_submitted_annotation_of_a_task_not_yet_landed():
    first, second = {"id": 1, "updated_at": "2026-01-01"}, {"id": 2, "updated_at": "2026-01-02"}
    assert reviewed({"annotations": [second, first]}) is second
    assert reviewed({"annotations": [{"id": 3, "was_cancelled": True}]}) is None
    assert reviewed({"annotations": []}) is None
    assert reviewed({"annotations": [first], "meta": {"landed_in": "s3://landing/b1"}}) is None


def test_without_a_key_the_client_says_which_variable(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(LabelStudioError, match=API_KEY_ENV):
        LabelStudio(LabellingConfig())


def test_a_stalled_server_is_a_bounded_failure(monkeypatch):
    """A server that accepts connections and never answers: the call fails after its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(8)], daemon=True).start()
    monkeypatch.setenv(API_KEY_ENV, "legacy-token")
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    client = LabelStudio(LabellingConfig(url=url, timeout_s=1, retries=1))
    started = time.monotonic()
    with pytest.raises(LabelStudioError, match="did not answer GET /api/projects"):
        client.find_project("doc-extraction: receipt_en")
    assert time.monotonic() - started < 10
    listener.close()


def test_an_expired_access_token_is_refreshed_once_with_the_personal_access_token(monkeypatch):
    """A personal access token (a refresh JWT) is exchanged for an access token, and again when the
    server answers 401 mid-stage; a second 401 is a failure, not a loop."""
    seen, accesses = [], (f"access-{n}" for n in itertools.count(1))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(200, {"access": next(accesses)})

        def do_GET(self):  # noqa: N802
            seen.append(self.headers["Authorization"])
            expired = self.headers["Authorization"] == "Bearer access-1" or "always" in self.path
            self._send(401, {"detail": "expired"}) if expired else self._send(200, {"results": []})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(API_KEY_ENV, "header.payload.signature")
    try:
        client = LabelStudio(LabellingConfig(url=f"http://127.0.0.1:{server.server_address[1]}", retries=0))
        assert client.find_project("doc-extraction: receipt_en") is None
        assert seen == ["Bearer access-1", "Bearer access-2"]
        with pytest.raises(LabelStudioError, match="HTTP 401"):
            client._call("GET", "/api/always")
    finally:
        server.shutdown()
