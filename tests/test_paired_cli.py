"""`chatvec results --compare A B`: cells both runs scored on the same items are compared item by
item, on runs written to a real store folder."""

from __future__ import annotations

import datetime as dt
import io
import random

import pyarrow.parquet as pq
from click.testing import CliRunner

from chatvec.cli.main import cli
from chatvec.core.storage import Store
from chatvec.eval import history
from chatvec.eval.kinds.base import mean_stderr
from chatvec.eval.schema import samples_table, summary_table

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def write_run(root: str, run_id: str, cells: dict[tuple, dict[str, float]]) -> None:
    store = Store(history.run_uri(root, run_id))
    summary = []
    for (model, bench), items in cells.items():
        rows = [
            dict(
                run_id=run_id,
                model=model,
                language="ko",
                benchmark=bench,
                kind="chat",
                item_id=i,
                metric="judge_score",
                score=s,
                judge_status="ok",
                created_at=NOW,
            )
            for i, s in items.items()
        ]
        buf = io.BytesIO()
        pq.write_table(samples_table(rows), buf)
        store.write_bytes(f"samples/model={model}/language=ko/benchmark={bench}.parquet", buf.getvalue())
        mean, se, n = mean_stderr(list(items.values()))
        summary.append(
            dict(
                run_id=run_id,
                model=model,
                language="ko",
                benchmark=bench,
                kind="chat",
                metric="judge_score",
                value=mean,
                stderr=se,
                n=n,
                n_unscored=0,
                schema_version=1,
                created_at=NOW,
            )
        )
    history.write_run_summary(root, run_id, summary_table(summary))


def test_compare_pairs_the_cells_with_the_same_items(tmp_path):
    root = str(tmp_path / "store")
    rng = random.Random(11)
    base = {str(i): rng.uniform(1, 9) for i in range(50)}
    write_run(root, "n1", {("m", "chat"): base, ("m", "other"): base})
    write_run(
        root,
        "n2",
        {
            ("m", "chat"): {i: v - 0.4 + rng.gauss(0, 0.1) for i, v in base.items()},
            ("m", "other"): {i: v - 0.4 for i, v in list(base.items())[:40]},
        },
    )
    out = CliRunner().invoke(cli, ["results", "--root", root, "--compare", "n1", "n2"])
    assert out.exit_code == 0, out.output
    text = out.output
    changes, paired = text.split("item by item")
    lines = {line.split()[2]: line.split() for line in changes.splitlines()[2:] if line.strip()[:1] == "m"}
    # the paired threshold is far below the unpaired one: the small drop of every item is a regression
    assert lines["chat"][-1] == "REGRESSION" and float(lines["chat"][-2]) < 0.1
    assert lines["other"][-1] != "REGRESSION" and float(lines["other"][-1]) > 0.5
    rows = [line.split() for line in paired.splitlines()[3:] if line.strip()]
    assert [r[:5] for r in rows if r[0] == "m"] == [["m", "ko", "chat", "judge_score", "50"]]  # not "other"
    assert rows[0][-1] == "*"
    assert "1 regression(s)" in text
