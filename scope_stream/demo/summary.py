"""The summary table printed at the end of a demo scan."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .report import speed_text


def _fmt(v: Any, spec: str = "") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_table(report: dict[str, Any]) -> Table:
    t = Table(title=f"scope-stream: slide {report['slide_id']}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("tiles", f"{report['tiles']['scan']} scanned, {report['tiles']['reimage']} re-imaged")
    c = report["cells"]
    t.add_row("cells", f"{c['WBC']} white, {c['RBC']} red, {c['platelet']} platelets")
    dt = report.get("differential_table")
    if dt:  # the report's differential: every class, the unfamiliar/unclassified cells apart (zeros left out here)
        diff = ", ".join(f"{r['class']} {r['percent']:.0f}%" for r in dt["rows"] if r["count"]) or "-"
    else:
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
    t.add_row("speed", speed_text(report["speed"]))
    return t
