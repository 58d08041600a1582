"""De-duplicate cells seen whole in two overlapping tiles, in stage coordinates."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from scope_stream.vocabulary import Cell, CellKind

__all__ = ["Resolution", "StageDeduplicator"]


@dataclass(frozen=True)
class Resolution:
    """What :meth:`StageDeduplicator.resolve` decided for one cell.

    ``outcome``: ``"new"`` (first sight of this physical cell), ``"duplicate"`` (an earlier copy is
    better centred and stays; ``other`` is its ref) or ``"replaces"`` (this copy is better centred
    than the earlier one, ``other``, which stops counting).
    """

    outcome: str
    other: Any = None


class StageDeduplicator:
    """Admits each physical cell once across overlapping tiles.

    Cells are hashed on a grid of ``radius_um`` cells in stage µm. :meth:`admit` returns ``False`` for
    a cell when an already admitted cell of the same slide and kind, *from a different tile*, has its
    stage centroid within ``radius_um``; cells of the same tile are never merged (the segmenter already
    separated them). Use a radius well under a cell's diameter (default 4 µm: about half a red cell) and
    a tile overlap of at least the largest white-cell diameter, so that every cell cut by one tile's
    border is whole in a neighbour.

    Memory grows with the number of admitted cells; :meth:`forget_before` drops old grid rows when a
    scan advances in y (serpentine scans revisit a row only while scanning it and the next one).
    """

    def __init__(self, radius_um: float = 4.0, kinds: frozenset[CellKind] | None = None) -> None:
        if not (math.isfinite(radius_um) and radius_um >= 0):
            raise ValueError(f"radius_um must be a finite number >= 0, got {radius_um}")
        self.radius_um = float(radius_um)
        self.kinds = kinds
        self._cell = max(self.radius_um, 1e-6)
        # entries: [x_um, y_um, tile_id, ref, centring] (ref and centring only for resolve())
        self._grid: dict[tuple[str, str, int, int], list[list[Any]]] = defaultdict(list)
        self.admitted = 0
        self.rejected = 0

    def _key(self, slide: str, kind: str, x: float, y: float) -> tuple[str, str, int, int]:
        return slide, kind, math.floor(x / self._cell), math.floor(y / self._cell)

    def is_duplicate(self, cell: Cell) -> bool:
        """Whether ``cell`` repeats an admitted cell of another tile (does not record it)."""
        if self.kinds is not None and cell.kind not in self.kinds:
            return False
        if not (math.isfinite(cell.x_um) and math.isfinite(cell.y_um)):
            return False
        slide, kind = cell.slide_id, cell.kind.value
        gx, gy = math.floor(cell.x_um / self._cell), math.floor(cell.y_um / self._cell)
        r2 = self.radius_um * self.radius_um
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for x, y, tile, *_ in self._grid.get((slide, kind, gx + dx, gy + dy), ()):
                    if tile != cell.tile_id and (x - cell.x_um) ** 2 + (y - cell.y_um) ** 2 <= r2:
                        return True
        return False

    def _nearest(self, slide: str, kind: str, x: float, y: float, tile_id: str) -> tuple[Any, list[Any]] | None:
        gx, gy = math.floor(x / self._cell), math.floor(y / self._cell)
        best: tuple[float, Any, list[Any]] | None = None
        r2 = self.radius_um * self.radius_um
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                key = (slide, kind, gx + dx, gy + dy)
                for entry in self._grid.get(key, ()):
                    d2 = (entry[0] - x) ** 2 + (entry[1] - y) ** 2
                    if entry[2] != tile_id and d2 <= r2 and (best is None or d2 < best[0]):
                        best = (d2, key, entry)
        return None if best is None else (best[1], best[2])

    def resolve(
        self, slide_id: str, kind: str, x_um: float, y_um: float, tile_id: str, ref: Any, centring: float
    ) -> Resolution:
        """Decide between copies of one physical cell: the better-centred copy counts.

        ``centring`` is how far the cell lies inside its tile (e.g. the centroid's distance to the
        nearest tile edge, µm): the copy with the larger value wins, the earlier one on a tie (NaN
        loses). The nearest remembered cell of another tile within ``radius_um`` is the other copy;
        the winner is remembered (with ``ref``) in place of the loser. Non-finite positions are "new"
        and not remembered.
        """
        if not (math.isfinite(x_um) and math.isfinite(y_um)):
            self.admitted += 1
            return Resolution("new")
        c = float(centring) if math.isfinite(centring) else -math.inf
        found = self._nearest(slide_id, kind, x_um, y_um, tile_id)
        entry = [x_um, y_um, tile_id, ref, c]
        if found is None:
            self._grid[self._key(slide_id, kind, x_um, y_um)].append(entry)
            self.admitted += 1
            return Resolution("new")
        key, old = found
        self.rejected += 1
        if c > old[4]:
            self._grid[key].remove(old)
            self._grid[self._key(slide_id, kind, x_um, y_um)].append(entry)
            return Resolution("replaces", old[3])
        return Resolution("duplicate", old[3])

    def admit(self, cell: Cell) -> bool:
        """True (and remember the cell) the first time a physical cell is seen; False for a duplicate."""
        if self.is_duplicate(cell):
            self.rejected += 1
            return False
        if math.isfinite(cell.x_um) and math.isfinite(cell.y_um):
            self._grid[self._key(cell.slide_id, cell.kind.value, cell.x_um, cell.y_um)].append(
                [cell.x_um, cell.y_um, cell.tile_id, cell.cell_id, math.nan]
            )
        self.admitted += 1
        return True

    def filter(self, cells: list[Cell]) -> list[Cell]:
        """The cells of ``cells`` that :meth:`admit` accepts, in order."""
        return [c for c in cells if self.admit(c)]

    def forget_before(self, y_um: float, slide_id: str | None = None) -> int:
        """Forget cells with stage y below ``y_um`` (optionally of one slide); returns how many."""
        gy = math.floor(y_um / self._cell) - 1
        dropped = 0
        for key in [k for k in self._grid if k[3] < gy and (slide_id is None or k[0] == slide_id)]:
            dropped += len(self._grid.pop(key))
        return dropped

    def __len__(self) -> int:
        return sum(len(v) for v in self._grid.values())
