"""The configuration reference is generated from the models' field descriptions and kept current."""

from __future__ import annotations

from pydantic import BaseModel, Field

from toolkit import config_reference


def test_the_committed_reference_is_current_and_every_field_is_described():
    assert config_reference.undescribed() == []
    assert config_reference.main(["--check"]) == 0


def test_a_stale_page_fails_the_check(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "reference.md"
    stale.write_text(config_reference.page().replace("peak learning rate", "learning rate"), encoding="utf-8")
    monkeypatch.setattr(config_reference, "PAGE", stale)
    assert config_reference.main(["--check"]) == 1
    assert "is stale: run `make docs`" in capsys.readouterr().err


def test_a_field_without_a_description_fails_and_is_named(monkeypatch, capsys):
    class Section(BaseModel):
        described: int = Field(1, description="has one")
        bare: int = 2

    class Root(BaseModel):
        section: Section = Field(Section(), description="a section")

    monkeypatch.setattr(config_reference, "ROOTS", ((Root, "a root", ""),))
    assert config_reference.main(["--check"]) == 1
    assert "Section.bare" in capsys.readouterr().err and config_reference.undescribed() == ["Section.bare"]


def test_the_page_shows_each_settings_type_default_and_bounds():
    text = config_reference.page()
    assert "| max_slice_nums | int | `9` | ≥ 1, ≤ 9 | above 9 crashes MiniCPM-V 2.6 code |" in text
    assert "## `training.launch`" in text and "## `doctype.fields[]`" in text
    assert "| tracking_uri | str | required |" in text
