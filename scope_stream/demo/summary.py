"""The summary table printed at the end of a demo scan."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _fmt(v: Any, spec: str = "") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_table(report: dict[str, Any]) -> Table:
    t = Table(title=f"scope-stream: slide {report['slide_id']}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("tiles", f"{report['tiles']['scan']} scanned, {report['tiles']['reimage']} re-imaged")
    c = report["cells"]
    t.add_row("cells", f"{c['WBC']} white, {c['RBC']} red, {c['platelet']} platelets")
    diff = ", ".join(f"{k} {v['percent']:.0f}%" for k, v in report["differential"].items()) or "-"
    t.add_row("differential", diff)
    t.add_row("flagged", f"{len(report['flagged'])} cells; needs review: {'yes' if report['needs_review'] else 'no'}")
    gt = report.get("ground_truth")
    if gt:
        t.add_row(
            "sensitivity (planted abnormal)",
            f"{gt['found_abnormal']}/{gt['planted_abnormal']} = {_fmt(gt['sensitivity'], '.2f')}",
        )
        t.add_row("false flags / 100 WBC", _fmt(gt["false_flags_per_100_wbc"], ".1f"))
        t.add_row("WBC detection recall", f"{gt['wbc_matched']}/{gt['wbc_planted']}")
    cs = report.get("classifier_on_slide")
    if cs:
        t.add_row(
            "classifier on planted cells",
            f"accuracy (normal) {_fmt(cs['accuracy_normal'], '.2f')}, anomaly AUROC {_fmt(cs['anomaly_auroc'], '.2f')}"
            f" ({cs['matched']} cells)",
        )
    sp = report["speed"]
    t.add_row(
        "speed",
        f"{_fmt(sp['tiles_per_s'], '.2f')} tiles/s; latency p50 {_fmt(sp['latency_ms']['p50'], '.0f')} ms, "
        f"p95 {_fmt(sp['latency_ms']['p95'], '.0f')} ms",
    )
    return t
