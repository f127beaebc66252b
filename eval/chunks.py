"""One model on several engines (replicas): cells, and the items of a large cell in chunks, spread
over the engines; a chunked cell is written once, whole, exactly as if one engine had run it.

A chunk is a range of a cell's items (after ``limit``). Every engine runs the kind on its range
and returns the rows; the collector puts a cell's chunks back in item order and writes the cell's
samples file with the identity of the whole cell (the same identity one engine computes), then
its status. A cell is never written in parts: when a chunk fails, the cell fails and the rows of
its other chunks are dropped, so a rerun computes it whole again. Nothing here imports Ray: the
Ray layer (``chatvec.cluster.eval_driver``) only schedules the units.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from chatvec.core.storage import Store
from chatvec.eval.contracts import DONE, FAILED, GENERATE, Cell, CellResult
from chatvec.eval.identity import CellIdentity

logger = logging.getLogger(__name__)

# a chunk smaller than this is not worth a second engine's batch
MIN_CHUNK_ITEMS = 8
# each chunk takes this share of a cell's items not yet cut, divided by the replicas: chunks
# start large and shrink towards the end (guided self-scheduling), and the engines pull them as
# they finish, so one that runs ahead takes more and none waits long on the last
GUIDED_SHARE = 0.5


@dataclass(frozen=True)
class Chunk:
    """Items [start, stop) of a cell; chunk ``index`` of ``count``."""

    cell: Cell
    index: int
    count: int
    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"{self.cell.key}#{self.index + 1}/{self.count}"

    @property
    def items(self) -> int:
        return self.stop - self.start


@dataclass
class ChunkRows:
    """What an engine returns for a chunk: its rows and the whole cell's identity, or the error."""

    chunk: Chunk
    rows: list[dict] = field(default_factory=list)
    identity: CellIdentity | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


Unit = Cell | Chunk


def cell_of(unit: Unit) -> Cell:
    return unit.cell if isinstance(unit, Chunk) else unit


def plan_units(
    cells: Sequence[Cell],
    item_counts: dict[Cell, int],
    replicas: int,
    *,
    min_chunk: int = MIN_CHUNK_ITEMS,
    align: int = 1,
) -> list[Unit]:
    """The work units of one model's cells on ``replicas`` engines, largest first.

    A cell whose kind reads items and which has enough of them is cut into chunks: each takes
    ``GUIDED_SHARE / replicas`` of the items not yet cut, rounded up to a multiple of ``align``
    (an engine's batch) and to at least ``min_chunk`` items, so the last chunks are small and the
    engines, which pull chunks as they finish, end together. A tail shorter than ``min_chunk``
    joins the chunk before it. Any other cell is one unit; a cell of unknown size (its kind reads
    no items) counts as the largest, so it starts first. One engine: the cells as they are."""
    if replicas <= 1:
        return list(cells)
    align = max(1, align)
    step_min = align * math.ceil(min_chunk / align)
    units: list[tuple[float, Unit]] = []
    for cell in cells:
        if cell not in item_counts:
            units.append((math.inf, cell))
            continue
        n = item_counts[cell]
        bounds = [0]
        while bounds[-1] < n:
            left = n - bounds[-1]
            step = max(step_min, align * math.ceil(left * GUIDED_SHARE / replicas / align))
            bounds.append(min(n, bounds[-1] + step))
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_chunk:  # a short tail joins the chunk before it
            del bounds[-2]
        if len(bounds) <= 2:
            units.append((n, cell))
            continue
        count = len(bounds) - 1
        units += [(bounds[i + 1] - bounds[i], Chunk(cell, i, count, bounds[i], bounds[i + 1])) for i in range(count)]
    return [u for _size, u in sorted(units, key=lambda su: -su[0])]


class ChunkCollector:
    """Gathers the chunks of each cell; writes a cell when its last chunk is in."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self._got: dict[Cell, dict[int, ChunkRows]] = {}
        self._failed: set[Cell] = set()
        self._start: dict[Cell, float] = {}

    def has_failed(self, cell: Cell) -> bool:
        return cell in self._failed

    def add(self, got: ChunkRows) -> CellResult | None:
        """The cell's result once it is complete (or has just failed), else None."""
        from chatvec.eval.results import write_samples, write_status
        from chatvec.eval.schema import samples_table

        chunk, cell = got.chunk, got.chunk.cell
        if cell in self._failed:
            return None
        self._start.setdefault(cell, time.perf_counter() - got.seconds)
        if got.error is not None:
            return self.fail(chunk, got.error)
        parts = self._got.setdefault(cell, {})
        parts[chunk.index] = got
        if len(parts) < chunk.count:
            return None
        ordered = [parts[i] for i in range(chunk.count)]
        rows = [r for part in ordered for r in part.rows]
        identity = ordered[0].identity
        seconds = time.perf_counter() - self._start.pop(cell)
        write_samples(self.store, cell, samples_table(rows), identity)
        del self._got[cell]
        result = CellResult.of(
            cell,
            DONE,
            GENERATE,
            rows=len(rows),
            seconds=seconds,
            prompt_tokens=sum(p.prompt_tokens for p in ordered),
            completion_tokens=sum(p.completion_tokens for p in ordered),
        )
        write_status(
            self.store,
            cell,
            DONE,
            stage=GENERATE,
            run_id=self.run_id,
            rows=result.rows,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            seconds=result.seconds,
            chunks=chunk.count,
        )
        return result

    def fail(self, chunk: Chunk, error: str) -> CellResult | None:
        """The cell fails with the first error of any of its chunks; later chunks are dropped."""
        from chatvec.eval.results import write_status

        cell = chunk.cell
        if cell in self._failed:
            return None
        self._failed.add(cell)
        self._got.pop(cell, None)
        error = f"chunk {chunk.index + 1}/{chunk.count}: {error}"[:2000]
        logger.error("cell %s failed: %s", cell.key, error)
        write_status(self.store, cell, FAILED, stage=GENERATE, error=error, run_id=self.run_id)
        return CellResult.of(cell, FAILED, GENERATE, error=error)
