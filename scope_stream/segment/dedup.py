"""De-duplicate cells seen whole in two overlapping tiles, in stage coordinates."""

from __future__ import annotations

import math
from collections import defaultdict

from scope_stream.vocabulary import Cell, CellKind

__all__ = ["StageDeduplicator"]


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
        self._grid: dict[tuple[str, str, int, int], list[tuple[float, float, str]]] = defaultdict(list)
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
                for x, y, tile in self._grid.get((slide, kind, gx + dx, gy + dy), ()):
                    if tile != cell.tile_id and (x - cell.x_um) ** 2 + (y - cell.y_um) ** 2 <= r2:
                        return True
        return False

    def admit(self, cell: Cell) -> bool:
        """True (and remember the cell) the first time a physical cell is seen; False for a duplicate."""
        if self.is_duplicate(cell):
            self.rejected += 1
            return False
        if math.isfinite(cell.x_um) and math.isfinite(cell.y_um):
            self._grid[self._key(cell.slide_id, cell.kind.value, cell.x_um, cell.y_um)].append(
                (cell.x_um, cell.y_um, cell.tile_id)
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
