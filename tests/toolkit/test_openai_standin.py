"""The CPU serving stand-in (``toolkit.openai_standin``) speaks the OpenAI API honestly, tested with the
official ``openai`` client against a real server process on loopback running the tiny model:
usage and finish_reason, streaming, response_format and logprobs, and a 400 saying why for every
bad request it is sent, after which it still answers."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml
from PIL import Image

from tests.helpers import EMBEDDED, PIPELINE, ROOT, free_port, wait_for_http

pytestmark = pytest.mark.integration

LIMITS = {"max_image_bytes": 300_000, "max_image_pixels": 4_000_000, "max_tokens": 64}
QUESTION = "如果這是張高鐵票,請回傳乘車日期、起站、迄站、票面金額、票號"


def peak_memory_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM), KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """toolkit.openai_standin with small request limits; yields the process and an OpenAI client for it."""
    limits = tmp_path_factory.mktemp("serve") / "limits.yaml"
    limits.write_text(yaml.safe_dump({"publish": {"serving": LIMITS}}))
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "toolkit.openai_standin",
            "--model",
            str(tiny_model),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--config",
            str(PIPELINE),
            "--config",
            str(EMBEDDED),
            "--config",
            str(limits),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", lambda: process.poll() is None)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        yield process, client
    finally:
        process.terminate()
        process.wait(timeout=20)


def data_url(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


TICKET = data_url(Image.new("RGB", (320, 200), "white"))
TRUNCATED = "data:image/png;base64," + base64.b64encode(base64.b64decode(TICKET.split(",")[1])[:120]).decode()


def ask(client: openai.OpenAI, url: str = TICKET, **kwargs):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], temperature=0, **kwargs
    )


def test_answers_report_usage_and_why_they_stopped(server):
    _, client = server
    cut = ask(client, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 3 and cut.usage.prompt_tokens > 10
    assert cut.usage.total_tokens == cut.usage.prompt_tokens + cut.usage.completion_tokens
    longer = ask(client, max_tokens=LIMITS["max_tokens"])
    assert longer.choices[0].message.content.startswith(cut.choices[0].message.content)  # greedy: the same start
    assert longer.usage.prompt_tokens == cut.usage.prompt_tokens
    stopped = longer.usage.completion_tokens < LIMITS["max_tokens"]
    assert longer.choices[0].finish_reason == ("stop" if stopped else "length")


def test_streaming_sends_the_same_answer_as_server_sent_events(server):
    _, client = server
    whole = ask(client, max_tokens=8)
    chunks = list(ask(client, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def _png_bytes(width: int, height: int) -> str:
    """A bilevel PNG: a few KB on the wire, width x height pixels once decoded."""
    return data_url(Image.new("1", (width, height), 1))


BAD_REQUESTS = {
    "negative max_tokens": ({"max_tokens": -5}, "max_tokens: Input should be greater than or equal to 1"),
    "max_tokens over the limit": ({"max_tokens": 100_000}, "max_tokens 100000 is over this server's limit of 64"),
    "too many pixels": ({"url": _png_bytes(8000, 8000)}, "8000x8000 = 64000000 pixels, over this server's limit"),
    "too many bytes": ({"url": "data:image/png;base64," + "A" * 500_000}, "over 300000 bytes, this server's limit"),
    "not an image": (
        {"url": "data:image/png;base64," + base64.b64encode(b"<html>").decode()},
        "could not be read: not a PNG, JPEG",
    ),
    "truncated image": ({"url": TRUNCATED}, "could not be decoded: truncated or corrupt"),
    "not base64": ({"url": "data:image/png;base64,@@@@"}, "not valid base64"),
    "a web URL": ({"url": "https://example.com/a.png"}, "must be a data:image/"),
    "two answers": ({"n": 2}, "n: Input should be less than or equal to 1"),
    "a schema without its schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format must be",
    ),
    "a schema that does not compile": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}},
                },
            }
        },
        "response_format: schema",
    ),
    "alternatives per token": ({"logprobs": True, "top_logprobs": 3}, "top_logprobs: Input should be less than"),
}

CODE = {
    "type": "object",
    "properties": {"code": {"type": "string", "pattern": "^[0-9]{2,4}$"}},
    "required": ["code"],
    "additionalProperties": False,
}


def test_response_format_constrains_the_answer_and_logprobs_come_with_it(server):
    _, client = server
    free = ask(client, max_tokens=24)
    assert not free.choices[0].message.content.startswith("{")  # a random model: no JSON of its own
    schema = {"type": "json_schema", "json_schema": {"name": "code", "schema": CODE, "strict": True}}
    for response_format in (schema, {"type": "json_object"}):
        answer = ask(client, max_tokens=LIMITS["max_tokens"], response_format=response_format, logprobs=True)
        choice = answer.choices[0]
        value = json.loads(choice.message.content)
        assert isinstance(value, dict) and choice.finish_reason == "stop"
        if response_format is schema:
            assert list(value) == ["code"] and re.fullmatch("[0-9]{2,4}", value["code"])
        tokens = choice.logprobs.content
        assert b"".join(bytes(t.bytes) for t in tokens) == choice.message.content.encode()
        assert all(t.logprob <= 0 and t.top_logprobs == [] for t in tokens)
    assert ask(client, max_tokens=4).choices[0].logprobs is None  # only when asked


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_a_400_saying_why_and_the_server_answers_the_next(server, case):
    process, client = server
    arguments, reason = BAD_REQUESTS[case]
    before = peak_memory_kib(process.pid)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, **{"url": TICKET, **arguments})
    message = refused.value.body["message"]
    assert reason in message, message
    assert "object at 0x" not in message and "Traceback" not in message
    assert peak_memory_kib(process.pid) - before < 100_000  # refused before decoding: no +590 MB for a bomb
    assert ask(client, max_tokens=2).choices[0].message.content is not None


def test_requests_without_exactly_one_image_or_for_another_model_are_refused(server):
    _, client = server
    with pytest.raises(openai.BadRequestError, match="exactly one image"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.NotFoundError, match="'other' is not served here"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": QUESTION}])
