"""Scan plans: useq grids from slide bounds with overlap, explicit field of view, stage limits."""

from __future__ import annotations

import itertools

import pytest
import useq

from scope_stream.acquire.plan import PlanError, ScanPlan, fov_for_objective, grid_plan, stage_limits
from scope_stream.config import ScopeStreamConfig


def _covered(plan: ScanPlan, region: tuple[float, float, float, float]) -> bool:
    fw, fh = plan.fov_um
    x0, y0, x1, y1 = region
    # every point of a fine lattice over the region lies in some field
    for i, j in itertools.product(range(21), range(21)):
        x, y = x0 + (x1 - x0) * i / 20, y0 + (y1 - y0) * j / 20
        if not any(abs(p.x_um - x) <= fw / 2 + 1e-6 and abs(p.y_um - y) <= fh / 2 + 1e-6 for p in plan):
            return False
    return True


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25])
def test_grid_covers_region_with_requested_overlap(overlap: float) -> None:
    region = (100.0, 200.0, 1100.0, 900.0)
    plan = ScanPlan.from_region(region, (256.0, 192.0), overlap)
    assert isinstance(plan.grid, useq.GridFromEdges)
    assert plan.grid.fov_width == 256.0 and plan.grid.fov_height == 192.0  # explicit: no engine can re-space it
    assert _covered(plan, region)
    xs = sorted({round(p.x_um, 6) for p in plan})
    ys = sorted({round(p.y_um, 6) for p in plan})
    assert xs[1] - xs[0] == pytest.approx(256.0 * (1 - overlap))
    assert ys[1] - ys[0] == pytest.approx(192.0 * (1 - overlap))
    # centred: the overhang is the same on both sides
    bx0, by0, bx1, by1 = plan.bounds_um
    assert region[0] - bx0 == pytest.approx(bx1 - region[2])
    assert region[1] - by0 == pytest.approx(by1 - region[3])
    assert len(plan) == len(xs) * len(ys)
    assert [p.index for p in plan] == list(range(len(plan)))
    assert len({p.tile_id for p in plan}) == len(plan)


def test_snake_order_starts_at_the_top_left_and_steps_to_neighbours() -> None:
    plan = ScanPlan.from_region((0, 0, 1000, 1000), (256, 256), 0.1)
    first = plan.positions[0]
    assert first.x_um == min(p.x_um for p in plan) and first.y_um == min(p.y_um for p in plan)
    assert (first.row, first.col) == (0, 0)
    step = 256 * 0.9
    for a, b in itertools.pairwise(plan.positions):  # each move is one field (snake: no fly-back)
        assert abs(a.x_um - b.x_um) + abs(a.y_um - b.y_um) == pytest.approx(step)
    # useq's own positions are the same set, mirrored in y about the centre
    useq_pos = {(round(p.x, 3), round(p.y, 3)) for p in plan.grid.iter_grid_positions()}
    ours = {(round(p.x_um, 3), round(p.y_um, 3)) for p in plan}
    assert useq_pos == ours


@pytest.mark.parametrize(("span", "fov", "overlap", "n"), [(130, 48, 0.1, 3), (134.4, 48, 0.1, 3), (1000, 256, 0.1, 5)])
def test_field_count_is_exact_despite_float_rounding(span: float, fov: float, overlap: float, n: int) -> None:
    # 48 + 2 * 43.2 = 134.4 covers 130 µm with 3 fields; (134.4 - 48) / 43.2 is 2.0000000000000004 in floats
    plan = ScanPlan.from_region((1000, 1000, 1000 + span, 1000 + span), (fov, fov), overlap)
    assert len(plan) == n * n
    assert _covered(plan, (1000, 1000, 1000 + span, 1000 + span))


def test_small_region_is_one_field() -> None:
    plan = ScanPlan.from_region((0, 0, 10, 10), (100, 100), 0.2)
    assert len(plan) == 1 and (plan.positions[0].x_um, plan.positions[0].y_um) == (5, 5)


def test_grid_is_shifted_inside_stage_limits_or_refused() -> None:
    plan = ScanPlan.from_region((0, 0, 1000, 1000), (256, 256), 0.1, limits=(0, 0, 5000, 5000))
    assert min(p.x_um for p in plan) >= 0 and min(p.y_um for p in plan) >= 0
    assert _covered(plan, (0, 0, 1000, 1000)) or min(p.x_um for p in plan) == 0
    with pytest.raises(PlanError, match="stage limits"):
        grid_plan((0, 0, 5000, 100), (256, 256), 0.1, limits=(0, 0, 1000, 1000))


@pytest.mark.parametrize(
    ("region", "fov", "overlap", "match"),
    [
        ((0, 0, -1, 10), (10, 10), 0.1, "x1 > x0"),
        ((0, 0, 10, 10), (0, 10), 0.1, "field of view"),
        ((0, 0, 10, 10), (10, 10), 0.95, "overlap"),
        ((0, 0, float("nan"), 10), (10, 10), 0.1, "finite"),
    ],
)
def test_bad_plans_are_clear_errors(region, fov, overlap, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PlanError, match=match):
        grid_plan(region, fov, overlap)


def test_plan_from_config_uses_camera_and_objective() -> None:
    cfg = ScopeStreamConfig.model_validate(
        {
            "microscope": {"camera_width": 200, "camera_height": 100},
            "scan": {"x0_um": 0, "y0_um": 0, "x1_um": 400, "y1_um": 300, "overlap": 0.0, "objective": "20x"},
        }
    )
    assert fov_for_objective(cfg, "20x") == (100.0, 50.0)  # 0.5 µm/px
    plan = ScanPlan.from_config(cfg)
    assert plan.fov_um == (100.0, 50.0) and plan.objective == "20x" and len(plan) == 4 * 6
    assert stage_limits(cfg) == cfg.microscope.stage_limits()
    with pytest.raises(PlanError, match="not configured"):
        fov_for_objective(cfg, "100x")


def test_plan_exports_to_useq_sequence_and_pycromanager_events() -> None:
    plan = ScanPlan.from_region((0, 0, 300, 300), (128, 128), 0.1, z_um=12.5)
    seq = plan.to_sequence()
    events = list(seq)
    assert [(e.x_pos, e.y_pos, e.z_pos) for e in events] == [(p.x_um, p.y_um, 12.5) for p in plan]
    pm = plan.to_pycromanager_events()
    assert pm[0] == {"axes": {"position": 0}, "x": plan.positions[0].x_um, "y": plan.positions[0].y_um, "z": 12.5}
