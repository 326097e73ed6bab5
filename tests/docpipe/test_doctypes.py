"""Document-type registry: schema derivation, canonical answers, normalisation, label validation."""

from __future__ import annotations

import json

import jsonschema
import pytest

from docpipe.doctypes import LabelError, load_registry
from docpipe.loader import ConfigError
from tests.helpers import ROOT, SROIE

REGISTRY = load_registry(ROOT / "configs" / "doctypes")
THSR = REGISTRY["thsr_ticket"]
TICKET = {"乘車日期": "2024/1/5", "起站": "臺北", "迄站": "左營", "票面金額": "NT$1,490", "票號": "08-1-24-1-019-0123"}


def test_shipped_types():
    assert set(REGISTRY) == {"thsr_ticket", "tra_ticket", "einvoice", "receipt_en"}
    assert THSR.prompt == "<image>\n如果這是張高鐵票,請回傳乘車日期、起站、迄站、票面金額、票號"
    assert [f.name for f in REGISTRY["receipt_en"].fields] == ["company", "date", "address", "total"]


@pytest.mark.parametrize("doc_type", REGISTRY.values(), ids=lambda d: d.id)
def test_answer_schema_is_valid_and_closed(doc_type):
    schema = doc_type.answer_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert list(schema["properties"]) == [f.name for f in doc_type.fields]
    assert schema["required"] == [f.name for f in doc_type.fields]
    assert schema["additionalProperties"] is False


def test_canonical_answer_has_fixed_order_and_keeps_non_ascii():
    shuffled = dict(reversed(list(TICKET.items())))
    answer = THSR.canonical_answer(shuffled)
    assert answer == (
        '{"乘車日期": "2024-01-05", "起站": "台北", "迄站": "左營", "票面金額": "1490", "票號": "08-1-24-1-019-0123"}'
    )
    jsonschema.validate(json.loads(answer), THSR.answer_schema())


@pytest.mark.parametrize("doc_type", REGISTRY.values(), ids=lambda d: d.id)
def test_canonical_fields_are_a_fixed_point(doc_type):
    """Stored labels are canonical; canonicalising them again (as export does) changes nothing."""
    from docpipe.config import SyntheticConfig
    from toolkit.synthetic import generate

    for record, _, _ in generate([doc_type], SyntheticConfig(count=10, seed=4)):
        canonical = doc_type.canonical_fields(record.fields)
        assert doc_type.canonical_fields(canonical) == canonical


def test_optional_field_is_null_in_the_answer_and_allowed_by_the_schema():
    invoice = REGISTRY["einvoice"]
    fields = {
        "發票號碼": "ab-12345678",
        "開立日期": "2024/05/12",
        "隨機碼": "0042",
        "總計": "1,200",
        "賣方統編": "12345678",
    }
    answer = json.loads(invoice.canonical_answer(fields))
    assert answer["買方統編"] is None and answer["發票號碼"] == "AB-12345678"
    jsonschema.validate(answer, invoice.answer_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**answer, "發票號碼": "AB12345678"}, invoice.answer_schema())


@pytest.mark.parametrize(
    ("field", "a", "b"),
    [
        ("票面金額", "NT$1,490", "1490"),
        ("票面金額", "ＮＴ＄１４９０", "1490.00"),  # full-width, NFKC
        ("起站", "臺北", "台北"),  # variant table
        ("乘車日期", "2024/01/05", "2024-1-5"),
        ("乘車日期", "２０２４．０１．０５", "2024-01-05"),
        ("票號", "08-1-24-1-019-0123", " 08-1-24-1-019-0123 "),
    ],
)
def test_compare_keys_match(field, a, b):
    assert THSR.compare_key(field, a) == THSR.compare_key(field, b)


@pytest.mark.parametrize(
    ("field", "a", "b"),
    [("票面金額", "1490", "1409"), ("乘車日期", "2024/01/05", "2024/05/01"), ("起站", "台北", "板橋")],
)
def test_compare_keys_differ(field, a, b):
    assert THSR.compare_key(field, a) != THSR.compare_key(field, b)


def test_unparseable_value_is_compared_as_folded_text():
    assert THSR.compare_key("票面金額", "about a thousand") == "about a thousand"
    assert THSR.compare_key("票面金額", None) == ""


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({**TICKET, "車廂": "5"}, "unknown field '車廂'"),
        ({k: v for k, v in TICKET.items() if k != "票號"}, "required field '票號' is missing"),
        ({**TICKET, "票號": "   "}, "required field '票號' is missing"),
        ({**TICKET, "票號": "12345"}, "field '票號' (id): '12345' does not match"),
        ({**TICKET, "起站": "高雄"}, "field '起站' (enum): '高雄' is not one of"),
        ({**TICKET, "乘車日期": "05/01/2024"}, "field '乘車日期' (date): '05/01/2024' is not a date (read YMD"),
        ({**TICKET, "票面金額": "free"}, "field '票面金額' (money): 'free' is not an amount"),
        ({**TICKET, "票面金額": ["1490"]}, "field '票面金額': expected a string, got list"),
    ],
)
def test_label_problems_are_named(fields, problem):
    with pytest.raises(LabelError) as caught:
        THSR.canonical_fields(fields)
    assert any(problem in p for p in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith("thsr_ticket: ")


def test_every_problem_is_reported_at_once():
    with pytest.raises(LabelError) as caught:
        THSR.canonical_fields({"起站": "台北", "extra": "x"})
    assert len(caught.value.problems) == 5  # one unknown field, four required fields missing


def test_real_sroie_labels_validate_and_match_the_schema():
    receipt = REGISTRY["receipt_en"]
    keys = sorted((SROIE / "key").glob("*.json"))
    assert len(keys) == 46, f"expected the 46 SROIE receipts in {SROIE} (set SHARED_DIR if shared/ lives elsewhere)"
    for path in keys:
        raw = json.loads(path.read_text(encoding="utf-8"))
        answer = json.loads(receipt.canonical_answer(raw))
        jsonschema.validate(answer, receipt.answer_schema())
        assert receipt.compare_key("total", raw["total"]) == receipt.compare_key("total", answer["total"]), path


def test_sroie_day_first_dates_and_currency_prefixes():
    receipt = REGISTRY["receipt_en"]
    date = receipt.field("date")
    assert {receipt.canonical_value(date, raw) for raw in ("25/12/2018", "25-12-18", "25 DEC 2018", "25122018")} == {
        "2018-12-25"
    }
    assert receipt.compare_key("total", "RM41.45") == receipt.compare_key("total", "41.450") == "41.45"


@pytest.mark.parametrize(
    ("doc_type", "printed", "canonical"),
    [
        ("receipt_en", "28 MAR 18", "2018-03-28"),
        ("receipt_en", "24-MAR-2018", "2018-03-24"),
        ("receipt_en", "2018/02/22", "2018-02-22"),  # a four-digit year first is never day first
        ("receipt_en", "20180304", "2018-03-04"),
        ("receipt_en", "25032018", "2018-03-25"),
        ("receipt_en", "11.02.18", "2018-02-11"),  # ambiguous: the type reads day first
        ("receipt_en", "March 3, 2018", "2018-03-03"),
        ("thsr_ticket", "2024年3月5日", "2024-03-05"),
        ("thsr_ticket", "民國113年3月5日", "2024-03-05"),
        ("thsr_ticket", "113/03/05", "2024-03-05"),  # a three-digit year on a Taiwanese ticket is a ROC year
        ("thsr_ticket", "11.02.18", "2011-02-18"),  # ambiguous: the type reads year first
        ("einvoice", "中華民國 113 年 12 月 31 日", "2024-12-31"),
    ],
)
def test_date_shapes_read_in_the_types_order(doc_type, printed, canonical):
    spec = next(f for f in REGISTRY[doc_type].fields if f.type == "date")
    assert REGISTRY[doc_type].canonical_value(spec, printed) == canonical


@pytest.mark.parametrize("printed", ["3180303", "31/08/303", "30/02/2018", "25/12/1911", "2018-13-01", "12/25/2018"])
def test_numbers_that_are_no_real_date_in_a_sane_year_are_refused(printed):
    """strptime's %d%m%Y took 3180303 as year 303; a seven-digit stamp is not a date."""
    receipt = REGISTRY["receipt_en"]
    with pytest.raises(ValueError, match="is not a date"):
        receipt.canonical_value(receipt.field("date"), printed)


def test_print_formats_must_read_back_in_the_declared_order(tmp_path):
    text = (ROOT / "configs/doctypes/receipt_en.yaml").read_text().replace('"%d/%m/%Y",', '"%m/%d/%Y",', 1)
    (tmp_path / "receipt_en.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"printed as '%m/%d/%Y' reads back as .* \(date_order DMY\)"):
        load_registry(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("id: thsr_ticket", "id: thsr"), "id: 'thsr' must match the file name 'thsr_ticket'"),
        (lambda t: t.replace('prompt: "<image>\\n', 'prompt: "'), "prompt: Value error, prompt must contain"),
        (
            lambda t: t.replace("    type: enum\n    values: &thsr_stations", "    type: enum\n    x: &thsr_stations"),
            "Extra inputs are not permitted",
        ),
        (lambda t: t.replace("pattern: '\\d{2}", "pattern: '(\\d{2}"), "invalid regular expression"),
        (lambda t: t.replace("type: money", "type: currency"), "Input should be 'text', 'date'"),
    ],
)
def test_bad_doctype_file_is_named(doctypes_copy, edit, message):
    path = doctypes_copy / "thsr_ticket.yaml"
    original = path.read_text(encoding="utf-8")
    changed = edit(original)
    assert changed != original, "the edit must change the file"
    path.write_text(changed, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_registry(doctypes_copy)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_empty_registry_folder_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no document types"):
        load_registry(tmp_path)
