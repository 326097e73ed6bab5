"""Ingest: every bad-input class gets a clear reason and loses nothing; versions are cumulative,
idempotent and leak-free; the same on local folders and a real S3 API."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from docpipe.config import S3Config
from docpipe.data.dataset import latest_version, read_card, read_manifest, split_for
from docpipe.data.landing import COMPLETE_MARKER, LABELS_FILE, LabelRecord, marker_for, write_batch
from docpipe.storage import open_storage
from tests.helpers import jpeg, run_stage, write_overlay

TICKET = {
    "乘車日期": "2024/01/05",
    "起站": "台北",
    "迄站": "左營",
    "票面金額": "NT$1,490",
    "票號": "08-1-24-1-019-0123",
}


def ticket(**changes) -> dict:
    return {k: v for k, v in {**TICKET, **changes}.items() if v is not None}


@pytest.fixture
def config(overlay, tmp_path) -> list[Path]:
    """The test overlay, with a bad-record limit that lets single-record cases through."""
    return [*overlay, write_overlay(tmp_path, "lenient.yaml", "dataset: {max_bad_fraction: 1.0, workers: 2}\n")]


def landed(root: Path, documents: list[tuple[dict, bytes]], name: str = "batch") -> Path:
    """A complete landing batch: image i at images/<i>.jpg, labelled by documents[i][0] (which may
    name another image path, even an invalid one)."""
    batch = root / name
    (batch / "images").mkdir(parents=True)
    lines = []
    for i, (label, data) in enumerate(documents):
        (batch / "images" / f"{i:03d}.jpg").write_bytes(data)
        lines.append(
            json.dumps({"image": f"images/{i:03d}.jpg", "doc_type": "thsr_ticket", **label}, ensure_ascii=False)
        )
    labels = ("\n".join(lines) + "\n").encode("utf-8")
    (batch / LABELS_FILE).write_bytes(labels)
    (batch / COMPLETE_MARKER).write_text(marker_for(labels, "tests").model_dump_json())
    return batch


def reseal(batch: Path) -> None:
    """A new marker for the batch's labels as they are now: a producer that changed them before completing."""
    (batch / COMPLETE_MARKER).write_text(marker_for((batch / LABELS_FILE).read_bytes(), "tests").model_dump_json())


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def ingest(config: list[Path], datasets: Path, *batches: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    args = [arg for batch in batches for arg in ("--batch", str(batch))]
    code = run_stage("ingest", config, "--output", str(datasets), *args, *extra)
    return code, json.loads((datasets / "result.json").read_text())


def quarantined(datasets: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((datasets / "quarantine").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_good_batch_becomes_a_version(config, tmp_path):
    batch = landed(tmp_path, [({"fields": ticket(票號=f"08-1-24-1-019-{i:04d}")}, jpeg(i)) for i in range(5)])
    code, result = ingest(config, tmp_path / "ds", batch)
    assert code == 0 and result["counts"]["documents"] == 5 and result["counts"]["quarantined"] == 0
    store = open_storage(tmp_path / "ds")
    version = latest_version(store)
    assert result["outputs"]["version"] == version
    records = read_manifest(store, version)
    assert {r.fields["票面金額"] for r in records} == {"1490"} and {r.fields["起站"] for r in records} == {"台北"}
    for record in records:
        assert store.sha256(record.image) == record.id  # stored once, by content hash
        assert record.source.startswith(str(batch))
    card = read_card(store, version)
    assert card.documents == 5 and sum(card.counts["thsr_ticket"].values()) == 5


def truncated_jpeg() -> bytes:
    return jpeg(9099, size=(400, 300))[:600]


def bomb_png() -> bytes:
    """A valid tiny PNG whose header claims 100000 x 100000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", 100_000, 100_000) + data[24:29]
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize(
    ("label", "image", "reason"),
    [
        ({"fields": ticket()}, truncated_jpeg(), "image: does not decode fully"),
        ({"fields": ticket()}, bomb_png(), "image: decompression bomb refused: Image size (10000000000 pixels)"),
        ({"fields": ticket()}, b"%PDF-1.4 not an image", "image: does not decode fully"),
        ({"fields": ticket()}, jpeg(size=(20, 20)), "image: 20x20 pixels, a side under 32"),
        ({"doc_type": "bus_ticket", "fields": ticket()}, jpeg(), "doc_type: unknown document type 'bus_ticket'"),
        ({"fields": ticket(票號=None)}, jpeg(), "fields: thsr_ticket: required field '票號' is missing"),
        ({"fields": ticket(票面金額="free")}, jpeg(), "field '票面金額' (money): 'free' is not an amount"),
        ({"fields": ticket(座位="5A")}, jpeg(), "unknown field '座位'"),
        ({"image": "../outside.jpg", "fields": ticket()}, jpeg(), "image_path: invalid key '../outside.jpg'"),
        ({"image": "/etc/hostname", "fields": ticket()}, jpeg(), "image_path: invalid key '/etc/hostname'"),
        ({"image": "images/missing.jpg", "fields": ticket()}, None, "image_path: "),
        (
            {"doc_type": "other", "fields": {"起站": "台北"}},
            jpeg(),
            "fields: other: a page of none of the registered types has no fields, got ['起站']",
        ),
    ],
    ids=[
        "truncated",
        "bomb",
        "not-an-image",
        "too-small",
        "doc-type",
        "required",
        "value",
        "unknown-field",
        "dotdot",
        "absolute",
        "missing",
        "other-with-fields",
    ],
)
def test_bad_record_is_quarantined_with_its_reason_and_good_ones_go_on(config, tmp_path, label, image, reason):
    good = ({"fields": ticket()}, jpeg(1023))
    documents = [good, (label, image if image is not None else jpeg(4056))]
    batch = landed(tmp_path, documents)
    before = tree_digest(batch)

    code, result = ingest(config, tmp_path / "ds", batch)
    assert code == 0
    assert result["counts"] == {**result["counts"], "seen": 2, "accepted": 1, "quarantined": 1, "documents": 1}
    (bad,) = quarantined(tmp_path / "ds")
    assert reason in bad["reason"], bad["reason"]
    assert bad["source"] == f"{batch / LABELS_FILE}:2" and bad["batch"] == str(batch)
    assert bad["record"]["fields"] == label["fields"]  # the record itself is kept
    assert tree_digest(batch) == before  # originals untouched


def test_a_page_of_none_of_the_types_is_a_document_labelled_other(config, tmp_path):
    batch = landed(tmp_path, [({"fields": ticket()}, jpeg(1023)), ({"doc_type": "other", "fields": {}}, jpeg(77))])
    code, result = ingest(config, tmp_path / "ds", batch)
    assert code == 0 and result["counts"]["accepted"] == 2 and result["counts"]["quarantined"] == 0
    store = open_storage(str(tmp_path / "ds"))
    records = read_manifest(store, latest_version(store))
    assert sorted((r.doc_type, r.fields) for r in records)[0] == ("other", {})
    assert sum(read_card(store, latest_version(store)).counts["other"].values()) == 1


def test_pixel_limit_is_configurable(config, tmp_path):
    strict = write_overlay(tmp_path, "strict.yaml", "dataset: {max_image_pixels: 5000}\n")
    batch = landed(tmp_path, [({"fields": ticket()}, jpeg(1, size=(100, 60)))])
    ingest([*config, strict], tmp_path / "ds", batch)
    (bad,) = quarantined(tmp_path / "ds")
    assert bad["reason"] == "image: 100x60 pixels, over the limit of 5000"


def test_symlink_out_of_the_batch_is_refused(config, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg(7077))
    batch = landed(tmp_path, [({"fields": ticket()}, jpeg()), ({"fields": ticket()}, jpeg(8088))])
    (batch / "images" / "001.jpg").unlink()
    (batch / "images" / "001.jpg").symlink_to(secret)
    ingest(config, tmp_path / "ds", batch)
    (bad,) = quarantined(tmp_path / "ds")
    assert "a symbolic link pointing outside" in bad["reason"]


def test_unreadable_label_lines_are_quarantined(config, tmp_path):
    batch = landed(tmp_path, [({"fields": ticket()}, jpeg())])
    with open(batch / LABELS_FILE, "ab") as labels:
        labels.write(b'{"image": "images/000.jpg", "doc_type": \n')  # broken JSON
        labels.write(b"\xff\xfe not utf-8\n")
        labels.write(b'{"image": "images/000.jpg", "doc_type": "thsr_ticket"}\n')  # no fields
    reseal(batch)
    code, result = ingest(config, tmp_path / "ds", batch)
    assert code == 0 and result["counts"]["accepted"] == 1
    reasons = [q["reason"] for q in quarantined(tmp_path / "ds")]
    assert reasons[0].startswith("unreadable: not a label record") and "Invalid JSON" in reasons[0]
    assert reasons[1].startswith("unreadable: not UTF-8")
    assert reasons[2] == "unreadable: not a label record: fields: Field required"


def test_exif_orientation_is_applied(config, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    sideways = jpeg(50670, size=(120, 40), exif=exif.tobytes())
    batch = landed(tmp_path, [({"fields": ticket()}, sideways)])
    ingest(config, tmp_path / "ds", batch)
    store = open_storage(tmp_path / "ds")
    (record,) = read_manifest(store, latest_version(store))
    assert (record.width, record.height) == (40, 120)
    assert record.id == hashlib.sha256(sideways).hexdigest() and record.image.endswith(".png")
    assert Image.open(io.BytesIO(store.read_bytes(record.image))).size == (40, 120)


def test_duplicates_merge_and_conflicts_are_quarantined(config, tmp_path):
    same, other = jpeg(10110), jpeg(20220)
    batch = landed(
        tmp_path,
        [
            ({"fields": ticket()}, same),
            ({"fields": ticket(票面金額="1490")}, same),  # the same label once normalised: a duplicate
            ({"fields": ticket()}, other),
            ({"fields": ticket(迄站="台中")}, other),  # same image, different label: a conflict
        ],
    )
    code, result = ingest(config, tmp_path / "ds", batch)
    assert code == 0 and result["counts"]["documents"] == 1
    conflicts = quarantined(tmp_path / "ds")
    assert len(conflicts) == 2 and all(q["reason"].startswith("conflict: image ") for q in conflicts)

    # Labels of one image that differ only in whitespace or case are one document, not a conflict.
    receipt = {
        "doc_type": "receipt_en",
        "fields": {
            "company": "BOOK TA .K (TAMAN DAYA) SDN BHD",
            "date": "25/12/2018",
            "address": "NO.53, JALAN SAGU 18",
            "total": "9.00",
        },
    }
    respaced = {**receipt, "fields": {**receipt["fields"], "company": "Book Ta.K (Taman Daya) Sdn Bhd"}}
    spaced = landed(tmp_path, [(receipt, jpeg(50550)), (respaced, jpeg(50550))], name="spaced")
    code, result = ingest(config, tmp_path / "ds", spaced)
    assert (code, result["counts"]["added"], result["counts"]["quarantined"]) == (0, 1, 0)
    kept = [
        r
        for r in read_manifest(open_storage(tmp_path / "ds"), result["outputs"]["version"])
        if r.doc_type == "receipt_en"
    ]
    assert [r.fields["company"] for r in kept] == ["BOOK TA .K (TAMAN DAYA) SDN BHD"]  # the first copy's label

    # A later batch that relabels a known image is quarantined; the dataset keeps the first label.
    relabel = landed(tmp_path, [({"fields": ticket(起站="板橋")}, same)], name="later")
    code, result = ingest(config, tmp_path / "ds", relabel)
    assert result["counts"]["new_version"] == 0 and result["counts"]["quarantined"] == 1


def stored_images(datasets: Path) -> list[Path]:
    return sorted((datasets / "images").glob("*"))


def test_too_many_bad_records_fail_the_stage_and_write_no_version(overlay, tmp_path):
    known = landed(tmp_path, [({"fields": ticket()}, jpeg(99))], name="known")
    assert ingest(overlay, tmp_path / "ds", known)[0] == 0
    before = stored_images(tmp_path / "ds")
    good = [({"fields": ticket(票號=f"08-1-24-1-019-{i:04d}")}, jpeg(i)) for i in range(2)]
    batch = landed(tmp_path, good + [({"fields": {}}, jpeg(100 + i)) for i in range(3)])
    code, result = ingest(overlay, tmp_path / "ds", batch)  # default limit: 20 %
    assert code == 2 and result["status"] == "failed"
    assert f"{batch}: 3 of 5 records bad (60% > 20%; {{'fields': 3}})" in result["error"]
    assert read_card(open_storage(tmp_path / "ds"), latest_version(open_storage(tmp_path / "ds"))).documents == 1
    assert len(quarantined(tmp_path / "ds")) == 3  # still there to read
    assert stored_images(tmp_path / "ds") == before  # the refused batch's good images are not left behind


@pytest.mark.parametrize("change", ["append", "edit", "marker"])
def test_a_batch_changed_after_its_marker_is_refused(config, tmp_path, change):
    batch = landed(tmp_path, [({"fields": ticket()}, jpeg())])
    labels = batch / LABELS_FILE
    if change == "append":
        labels.write_bytes(labels.read_bytes() + labels.read_bytes())
    elif change == "edit":
        labels.write_bytes(labels.read_bytes().replace("台北".encode(), "台中".encode()))
    else:
        (batch / COMPLETE_MARKER).write_text("{}")
    before = tree_digest(batch)
    code, result = ingest(config, tmp_path / "ds", batch)
    expected = "not a batch marker" if change == "marker" else "the batch changed after it was completed"
    assert code == 2 and expected in result["error"] and str(batch) in result["error"]
    assert latest_version(open_storage(tmp_path / "ds")) is None and stored_images(tmp_path / "ds") == []
    assert tree_digest(batch) == before


def test_copies_of_an_image_with_a_valid_and_an_invalid_label_are_a_conflict(config, tmp_path):
    same = jpeg(30330)
    batch = landed(
        tmp_path,
        [
            ({"fields": ticket()}, same),
            ({"fields": ticket(票面金額="a lot")}, same),  # the other copy's label is invalid: which one is right?
            ({"fields": ticket(票號="08-1-24-1-019-9999")}, jpeg(40440)),
        ],
    )
    code, result = ingest(config, tmp_path / "ds", batch)
    assert code == 0 and result["counts"]["documents"] == 1
    reasons = sorted(q["reason"].split(":")[0] for q in quarantined(tmp_path / "ds"))
    assert reasons == ["conflict", "fields"]
    assert len(stored_images(tmp_path / "ds")) == 1  # the conflicting image is not kept


def test_incomplete_batch_is_refused(config, tmp_path):
    batch = landed(tmp_path, [({"fields": ticket()}, jpeg())])
    (batch / COMPLETE_MARKER).unlink()
    code, result = ingest(config, tmp_path / "ds", batch)
    assert code == 2 and "no _COMPLETE marker, the batch is still being written" in result["error"]


def test_reingest_changes_nothing_and_versions_accumulate(config, tmp_path):
    first = landed(
        tmp_path, [({"fields": ticket(票號=f"08-1-24-1-019-{i:04d}")}, jpeg(i)) for i in range(30)], name="first"
    )
    ingest(config, tmp_path / "ds", first)
    store = open_storage(tmp_path / "ds")
    v1 = latest_version(store)
    snapshot = tree_digest(tmp_path / "ds" / "versions")

    code, result = ingest(config, tmp_path / "ds", first)
    assert code == 0 and result["counts"]["new_version"] == 0 and result["outputs"]["version"] == v1
    assert result["counts"]["quarantined"] == 0  # the same labels read back from the manifest are no conflict
    assert tree_digest(tmp_path / "ds" / "versions") == snapshot

    second = landed(
        tmp_path, [({"fields": ticket(票號=f"09-1-24-1-019-{i:04d}")}, jpeg(100 + i)) for i in range(30)], name="second"
    )
    ingest(config, tmp_path / "ds", second)
    v2 = latest_version(store)
    old, new = read_manifest(store, v1), {r.id: r for r in read_manifest(store, v2)}
    assert v2 != v1 and len(new) == 60 and read_card(store, v2).parent == v1
    for record in old:  # every document keeps its split: nothing from eval leaks into train
        assert new[record.id].split == record.split
    assert {r.split for r in new.values()} == {"train", "eval"}


def test_split_is_a_pure_function_of_the_hash_and_salt():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = [split_for(i, "v1", 0.1) for i in ids]
    assert splits == [split_for(i, "v1", 0.1) for i in ids]
    assert 0.08 < splits.count("eval") / len(ids) < 0.12
    assert splits != [split_for(i, "v2", 0.1) for i in ids]


def test_tiny_type_without_eval_document_is_warned_about(config, tmp_path):
    batch = landed(tmp_path, [({"fields": ticket()}, jpeg(3033))])
    ingest(config, tmp_path / "ds", batch)
    store = open_storage(tmp_path / "ds")
    card = read_card(store, latest_version(store))
    (record,) = read_manifest(store, card.version)
    if record.split == "train":
        assert card.warnings == ["thsr_ticket has 1 train and no eval document; its accuracy cannot be measured yet"]
    else:
        assert card.warnings == []


def test_sroie_folder_imports_all_46_real_receipts(config, tmp_path):
    from tests.helpers import SROIE

    code, result = ingest(config, tmp_path / "ds", SROIE, extra=("--format", "image-key", "--doc-type", "receipt_en"))
    assert code == 0 and result["counts"]["documents"] == 46 and result["counts"]["quarantined"] == 0
    store = open_storage(tmp_path / "ds")
    totals = {r.source.rsplit("/", 1)[1]: r.fields["total"] for r in read_manifest(store, latest_version(store))}
    assert totals["000.jpg"] == "9.00"


def test_image_key_needs_a_doc_type(config, tmp_path):
    from tests.helpers import SROIE

    code, result = ingest(config, tmp_path / "ds", SROIE, extra=("--format", "image-key"))
    assert code == 2 and "--format image-key: give --doc-type or a --mapping with doc_type" in result["error"]


def test_dataset_version_is_an_input_of_the_mlflow_run(config, tmp_path):
    batch = landed(tmp_path, [({"fields": ticket()}, jpeg())])
    _, result = ingest(config, tmp_path / "ds", batch)
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db").get_run(result["mlflow_run_id"])
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == result["outputs"]["version"]
    assert run.data.tags["dataset.version"] == result["outputs"]["version"]
    assert run.data.metrics["count.documents"] == 1


@pytest.mark.integration
def test_ingest_from_and_to_s3(config, tmp_path, bucket, s3_endpoint):
    s3 = S3Config(endpoint_url=s3_endpoint)
    landing = open_storage(f"s3://{bucket}/landing/b1", s3)
    write_batch(
        landing,
        [
            (LabelRecord(image="images/a.jpg", doc_type="thsr_ticket", fields=ticket()), jpeg(1011)),
            (LabelRecord(image="images/b.jpg", doc_type="thsr_ticket", fields={}), jpeg(2022)),
        ],
        producer="test",
    )
    s3_overlay = write_overlay(tmp_path, "s3.yaml", f"storage:\n  s3:\n    endpoint_url: {s3_endpoint}\n")
    datasets = f"s3://{bucket}/datasets"
    code = run_stage("ingest", [*config, s3_overlay], "--output", datasets, "--batch", landing.uri)
    assert code == 0
    store = open_storage(datasets, s3)
    (record,) = read_manifest(store, latest_version(store))
    assert store.sha256(record.image) == record.id and record.source == f"{landing.uri}/images/a.jpg"
    (bad_file,) = [k for k in store.list("quarantine")]
    assert "required field" in store.read_bytes(bad_file).decode()
    assert json.loads(store.read_bytes("result.json"))["counts"]["quarantined"] == 1
