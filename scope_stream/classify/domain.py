"""The slide's domain check: is this slide from ground the classifier knows?

A classifier trained on one lab's camera and stain can be confidently wrong on another's. Each classified
white cell carries an *unfamiliarity* (its calibrated distance to the training cells in the model's own
features; about 5% of the training lab's normal cells reach the default flag threshold) and is flagged
``unfamiliar`` above it. Over a slide, the share of such cells says whether the differential can be
trusted: a slide from the training lab has about 5%; one from another microscope or stain has many more.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["DEFAULT_UNFAMILIAR_SLIDE_SHARE", "UNFAMILIAR", "domain_check"]

#: the flag reason of a cell unlike the training cells (``FlagReason.UNFAMILIAR``)
UNFAMILIAR = "unfamiliar"
#: above this share of unfamiliar white cells the differential is not to be trusted (``flags.unfamiliar_slide_share``)
DEFAULT_UNFAMILIAR_SLIDE_SHARE = 0.25


def domain_check(
    reasons_per_cell: Iterable[Iterable[str]], limit: float = DEFAULT_UNFAMILIAR_SLIDE_SHARE
) -> dict[str, Any]:
    """The domain check over a slide's *classified* white cells, given each one's flag reasons.

    Returns ``n_classified``, ``n_unfamiliar``, ``share_unfamiliar`` (None without cells), ``limit``,
    ``trusted`` (False when the share exceeds ``limit``; None without cells) and a plain ``message``.
    """
    if not 0 < limit <= 1:
        raise ValueError(f"the unfamiliar share limit must lie in (0, 1], got {limit}")
    n = n_unf = 0
    for reasons in reasons_per_cell:
        n += 1
        n_unf += UNFAMILIAR in set(reasons)
    share = n_unf / n if n else None
    if share is None:
        trusted: bool | None = None
        msg = "no classified white cells yet"
    elif share > limit:
        trusted = False
        msg = (
            f"{100 * share:.0f}% of white cells look unlike the classifier's training cells (limit "
            f"{100 * limit:.0f}%): this slide's microscope, stain or cells are unfamiliar to the model; do not "
            "trust the differential without review"
        )
    else:
        trusted = True
        msg = f"{100 * share:.0f}% of white cells look unfamiliar (limit {100 * limit:.0f}%): familiar ground"
    return {
        "n_classified": n,
        "n_unfamiliar": n_unf,
        "share_unfamiliar": round(share, 4) if share is not None else None,
        "limit": limit,
        "trusted": trusted,
        "message": msg,
    }
