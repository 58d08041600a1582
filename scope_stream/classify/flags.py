"""Deciding which classified cells need a person's eyes."""

from __future__ import annotations

from scope_stream.config.classify import FlagConfig
from scope_stream.vocabulary import Cell, CellCall, Flag, FlagReason

__all__ = ["flag_call"]


def flag_call(cell: Cell, call: CellCall, cfg: FlagConfig) -> Flag | None:
    """A :class:`Flag` when the call is anomalous, uncertain or of an abnormal class; else ``None``.

    ``score`` is the largest of the anomaly score, the uncertainty and (for an abnormal class) the
    class probability, so flags sort by how strongly they fired. Unset thresholds of ``cfg`` are the
    fallbacks: resolve the config against the model first (:meth:`FlagConfig.resolved`,
    :meth:`DiffusionClassifier.flag_thresholds`).
    """
    if call.cell_id != cell.cell_id:
        raise ValueError(f"call is for cell {call.cell_id!r}, not {cell.cell_id!r}")
    reasons: list[FlagReason] = []
    scores: list[float] = []
    if call.anomaly_score >= cfg.anomaly:
        reasons.append(FlagReason.ANOMALY)
        scores.append(call.anomaly_score)
    if call.uncertainty >= cfg.uncertainty:
        reasons.append(FlagReason.UNCERTAIN)
        scores.append(call.uncertainty)
    if call.unfamiliarity is not None and call.unfamiliarity >= cfg.unfamiliar_threshold:
        reasons.append(FlagReason.UNFAMILIAR)
        scores.append(call.unfamiliarity)
    if call.label in set(cfg.abnormal_classes):
        reasons.append(FlagReason.ABNORMAL_CLASS)
        scores.append(call.probabilities.get(call.label, 1.0))
    if not reasons:
        return None
    return Flag(
        cell_id=cell.cell_id,
        tile_id=cell.tile_id,
        slide_id=cell.slide_id,
        reasons=reasons,
        score=float(max(scores)),
        label=call.label,
        x_um=cell.x_um,
        y_um=cell.y_um,
    )
