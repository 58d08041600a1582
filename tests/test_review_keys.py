"""The review key map covers every label a reviewer needs (Qt-free: scope_stream/view/review.py)."""

from __future__ import annotations

import pytest

from scope_stream.view.flags import PBC_CLASSES
from scope_stream.view.review import ARTEFACT, OTHER, KeyMap, ReviewAction, ReviewSession, review_labels

SHIPPED = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "platelet"]  # the 6-class models


def test_shipped_model_keys_cover_ig_erythroblast_other_and_artefact() -> None:
    km = KeyMap.for_model(SHIPPED)
    keys = dict(km.class_keys)
    # 1-8 the PBC classes in their usual order (the model's six and the abnormal ig, erythroblast), 9, 0
    assert keys == {str(i + 1): c for i, c in enumerate(PBC_CLASSES)} | {"9": OTHER, "0": ARTEFACT}
    assert km.action("6") == (ReviewAction.RELABEL, "ig")
    assert km.action("7") == (ReviewAction.RELABEL, "erythroblast")
    assert km.action("9") == (ReviewAction.RELABEL, "other")
    assert km.action("0") == (ReviewAction.RELABEL, "artefact")
    assert set(SHIPPED) <= set(km.labels) and km.labels[-2:] == ["other", "artefact"]
    assert KeyMap().class_keys == km.class_keys  # the default is the same map


def test_every_model_class_gets_a_key_beyond_nine_too() -> None:
    model = [*SHIPPED, "blast", "smudge", "plasma cell", "myelocyte"]
    km = KeyMap.for_model(model)
    assert set(model) | {"ig", "erythroblast", "other", "artefact"} == set(km.labels)
    assert len(set(km.class_keys)) == len(km.class_keys.values()) == len(set(km.labels))
    # the navigation keys stay what they were
    nav = {"A", "Space", "Return", "Enter", "Right", "N", "Down", "Left", "P", "Up", "Backspace"}
    assert not nav & set(km.class_keys)
    key = km.key_for("myelocyte")
    assert key is not None and key.isalpha()
    assert km.action(key.lower()) == (ReviewAction.RELABEL, "myelocyte")
    assert km.key_for("other") == "9" and km.key_for("artefact") == "0"


def test_a_non_pbc_model_still_offers_the_pbc_abnormal_classes() -> None:
    assert review_labels(["blast", "normal"]) == [*PBC_CLASSES, "blast", "normal", "other", "artefact"]
    km = KeyMap.for_model(["blast", "normal"])
    assert km.key_for("ig") == "6" and km.key_for("erythroblast") == "7"  # the PBC keys never move
    assert km.key_for("blast") == "Q" and km.key_for("normal") == "W"
    assert review_labels() == [*PBC_CLASSES, "other", "artefact"]


def test_key_map_is_described_for_the_widget() -> None:
    text = KeyMap.for_model(SHIPPED).describe()
    for part in ("A / Space / Enter accept", "→ skip", "← back", "6 ig", "7 erythroblast", "9 other", "0 artefact"):
        assert part in text, part
    legend = KeyMap.for_model(SHIPPED).legend()
    assert [k for k, _ in legend[3:]] == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0"]


def test_review_session_relabels_as_erythroblast_and_other() -> None:
    from scope_stream.view.cells import CellRecord

    recs = [
        CellRecord(cell_id=f"c{i}", tile_id="t0", label=lab, x_um=0.0, y_um=0.0, flagged=True, flag_score=0.9 - i)
        for i, lab in enumerate(["neutrophil", "lymphocyte"])
    ]
    s = ReviewSession(recs, keymap=KeyMap.for_model(SHIPPED), clock=lambda: 0.0)
    first = s.handle_key("7")
    second = s.handle_key("9")
    assert first is not None and first.label == "erythroblast"
    assert second is not None and second.label == "other"
    assert s.done and {d.label for d in s.decisions} == {"erythroblast", "other"}


def test_too_many_classes_is_refused_plainly() -> None:
    with pytest.raises(ValueError, match="review keys"):
        KeyMap.for_model([f"c{i}" for i in range(40)])
