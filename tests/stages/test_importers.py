"""Importers: realistic Label Studio and PPOCRLabel files, and round trips from synthetic batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from docpipe.config import SyntheticConfig
from docpipe.data.dataset import latest_version, read_manifest
from docpipe.data.landing import write_batch
from docpipe.doctypes import load_registry
from docpipe.storage import open_storage
from stages.ingest.importers import ImportMapping, read_source
from tests.helpers import ROOT, jpeg, run_stage, write_overlay
from toolkit.synthetic import generate

FIXTURES = ROOT / "tests" / "fixtures"
MAPPINGS = ROOT / "configs" / "importers"
REGISTRY = load_registry(ROOT / "configs" / "doctypes")


@pytest.fixture
def config(overlay, tmp_path) -> list[Path]:
    return [*overlay, write_overlay(tmp_path, "lenient.yaml", "dataset: {max_bad_fraction: 1.0, workers: 1}\n")]


def manifest(datasets: Path) -> dict[str, tuple[str, dict]]:
    store = open_storage(datasets)
    return {r.id: (r.doc_type, r.fields) for r in read_manifest(store, latest_version(store))}


def quarantine_reasons(datasets: Path) -> list[str]:
    return [
        json.loads(line)["reason"]
        for path in (datasets / "quarantine").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]


def test_label_studio_export_fixture(config, tmp_path):
    batch = tmp_path / "ls"
    shutil.copytree(FIXTURES / "label-studio", batch)
    (batch / "3f2a9c1e-thsr-0001.jpg").write_bytes(jpeg(1))
    (batch / "77b0d4aa-thsr-0002.jpg").write_bytes(jpeg(2))
    code = run_stage(
        "ingest",
        config,
        "--output",
        str(tmp_path / "ds"),
        "--batch",
        str(batch),
        "--format",
        "label-studio",
        "--mapping",
        str(MAPPINGS / "label-studio-tickets.yaml"),
    )
    assert code == 0
    ((doc_type, fields),) = manifest(tmp_path / "ds").values()
    assert doc_type == "thsr_ticket"
    assert fields == {
        "乘車日期": "2024-03-18",
        "起站": "台北",
        "迄站": "左營",
        "票面金額": "1490",
        "票號": "08-1-24-1-019-0123",
    }
    assert quarantine_reasons(tmp_path / "ds") == ["unreadable: task has no annotation"]  # the cancelled task


def test_ppocrlabel_kie_fixture(config, tmp_path):
    batch = tmp_path / "invoices"
    shutil.copytree(FIXTURES / "ppocrlabel" / "invoices", batch)
    (batch / "einvoice-0001.jpg").write_bytes(jpeg(3))
    code = run_stage(
        "ingest",
        config,
        "--output",
        str(tmp_path / "ds"),
        "--batch",
        str(batch),
        "--format",
        "ppocrlabel",
        "--mapping",
        str(MAPPINGS / "ppocrlabel-einvoice.yaml"),
    )
    assert code == 0
    ((doc_type, fields),) = manifest(tmp_path / "ds").values()
    assert doc_type == "einvoice"
    assert fields == {
        "發票號碼": "AB-12345678",
        "開立日期": "2024-05-12",
        "隨機碼": "0427",
        "總計": "1200",
        "賣方統編": "12345678",
        "買方統編": None,
    }


def test_malformed_tool_records_are_named(tmp_path):
    (tmp_path / "Label.txt").write_text(
        'a.jpg\t[{"transcription": "x", "key_cls": "total"}]\nb.jpg no tab here\n', encoding="utf-8"
    )
    mapping = ImportMapping(doc_type="einvoice", fields={"total": "總計"})
    problems = [c.problem for c in read_source(open_storage(tmp_path), "ppocrlabel", mapping)]
    assert problems[0].startswith("not a PPOCRLabel line (path<TAB>JSON boxes): 'points'")
    assert problems[1].startswith("not a PPOCRLabel line (path<TAB>JSON boxes): Expecting value")


# Writers of each tool's format, for round trips from a synthetic landing batch.


def to_label_studio(records) -> list[dict]:
    tasks = []
    for n, record in enumerate(records):
        result = [{"id": "kind", "type": "choices", "value": {"choices": [record.doc_type]}}]
        for i, (name, value) in enumerate(record.fields.items()):
            box = {"x": 10.0, "y": 5.0 * i, "width": 20.0, "height": 4.0, "rotation": 0}
            result.append({"id": f"r{i}", "type": "rectanglelabels", "value": {**box, "rectanglelabels": [name]}})
            result.append({"id": f"r{i}", "type": "textarea", "value": {**box, "text": [value]}})
        tasks.append(
            {
                "id": n,
                "data": {"image": f"/data/local-files/?d={record.image}"},
                "annotations": [{"id": n, "result": result, "was_cancelled": False}],
            }
        )
    return tasks


def to_ppocr(records, folder: str) -> str:
    lines = []
    for record in records:
        boxes = [
            {
                "transcription": value,
                "points": [[10, 30 * i], [200, 30 * i], [200, 30 * i + 20], [10, 30 * i + 20]],
                "difficult": False,
                "key_cls": name,
            }
            for i, (name, value) in enumerate(record.fields.items())
        ]
        lines.append(f"{folder}/{record.image}\t{json.dumps(boxes, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


@pytest.mark.integration
def test_round_trips_give_the_same_dataset(config, tmp_path):
    """One synthetic batch, written as landing, Label Studio, PPOCRLabel and image-key: four equal datasets."""
    doc_types = [REGISTRY["einvoice"]]
    documents = list(generate(doc_types, SyntheticConfig(count=6, seed=21)))
    records = [record for record, _, _ in documents]
    landing = open_storage(tmp_path / "landing")
    write_batch(landing, [(record, image) for record, image, _ in documents], producer="test")

    ls = tmp_path / "ls"
    shutil.copytree(tmp_path / "landing" / "images", ls / "images")
    (ls / "export.json").write_text(json.dumps(to_label_studio(records), ensure_ascii=False))
    ppocr = tmp_path / "ppocr"
    shutil.copytree(tmp_path / "landing" / "images", ppocr / "images")
    (ppocr / "Label.txt").write_text(to_ppocr(records, "ppocr"), encoding="utf-8")
    key = tmp_path / "keyed"
    shutil.copytree(tmp_path / "landing" / "images", key / "img")
    (key / "key").mkdir()
    for record in records:
        (key / "key" / f"{Path(record.image).stem}.json").write_text(json.dumps(record.fields, ensure_ascii=False))

    runs = {
        "landing": (tmp_path / "landing", []),
        "label-studio": (ls, ["--doc-type", "einvoice"]),
        "ppocrlabel": (ppocr, ["--doc-type", "einvoice"]),
        "image-key": (key, ["--doc-type", "einvoice"]),
    }
    datasets = {}
    for fmt, (batch, extra) in runs.items():
        out = tmp_path / f"ds-{fmt}"
        assert run_stage("ingest", config, "--output", str(out), "--batch", str(batch), "--format", fmt, *extra) == 0
        datasets[fmt] = manifest(out)
    assert len(datasets["landing"]) == 6
    for fmt, found in datasets.items():
        assert found == datasets["landing"], fmt
