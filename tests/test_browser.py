"""The answer browser and the report's sample-based sections, on sample rows written by hand;
the filters run in a real headless Chromium when one is installed."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chatvec.core.storage import Store
from chatvec.eval.browser import load_samples, page_rel, write_pages
from chatvec.eval.report import ModelInfo, write_report
from chatvec.eval.schema import samples_table, summary_table

MODELS = [
    ModelInfo(name="cp.ko", role="cp", target="ko", language="ko"),
    ModelInfo(name="v.ko.r0.5", role="merged", target="ko", language="ko", vector="v", ratio=0.5, method="add"),
    ModelInfo(name="v.ko.r1", role="merged", target="ko", language="ko", vector="v", ratio=1.0, method="add"),
    ModelInfo(name="chat.v", role="chat", vector="v"),
]
# exact_match per item for (cp, r0.5, r1, chat)
TASK = {
    "1": (0, 0, 1, 1),
    "2": (0, 1, 1, 1),
    "3": (0, 0, 0, 1),  # merged wrong, chat right (both merged models)
    "4": (1, 1, 1, 0),
    "5": (0, 0, 1, 1),
    "6": (0, 1, 0, 1),
}


def task_rows() -> list[dict]:
    rows = []
    for item, scores in TASK.items():
        for m, s in zip(MODELS, scores):
            common = dict(
                model=m.name,
                language="ko",
                benchmark="ko-task",
                kind="task",
                item_id=item,
                prompt=f"<user> 질문 {item} <assistant>",
                response=f"{m.name} answer {item} <&>",
                detected_language="ko",
                in_language=True,
                judge_status="not_needed",
                details=json.dumps({"answer": f"정답 {item}"}, ensure_ascii=False),
            )
            rows.append(dict(common, metric="exact_match", score=float(s)))
            rows.append(dict(common, metric="in_language", score=1.0))
    return rows


def chat_rows() -> list[dict]:
    rows = []
    for item in ("q1", "q2"):
        for m in MODELS:
            common = dict(
                model=m.name,
                language="ko",
                benchmark="ko-chat",
                kind="chat",
                item_id=item,
                prompt="p",
                response="네." if item == "q2" else "좋은 질문입니다.",
                details=json.dumps(
                    {"question": f"서울은 어디? {item}", "reference": "한국의 수도"}, ensure_ascii=False
                ),
            )
            unparseable = m.role == "merged" and item == "q2"
            rows.append(
                dict(
                    common,
                    metric="judge_score",
                    score=None if unparseable else 7.0,
                    judge_status="unparseable" if unparseable else "ok",
                    judge_model="openai:j@http://h/v1",
                    judge_raw="I cannot decide." if unparseable else "Clear and correct. [[7]]",
                )
            )
            undetermined = item == "q2"
            rows.append(
                dict(
                    common,
                    metric="in_language",
                    score=None if undetermined else 1.0,
                    detected_language="undetermined" if undetermined else "ko",
                    judge_status="not_needed",
                    in_language=None if undetermined else True,
                )
            )
    return rows


class Items(HTMLParser):
    """The item sections of a page: data-scores, the answers' labels and texts, chips."""

    def __init__(self):
        super().__init__()
        self.items: list[dict] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "")
        if tag == "section" and "item" in cls.split():
            self.items.append(
                {
                    "scores": json.loads(a["data-scores"]),
                    "who": [],
                    "resp": [],
                    "chips": [],
                    "hidden": "hidden" in cls.split(),
                    "q": "",
                    "judge": [],
                }
            )
        self._stack.append(cls)

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if not self.items or not self._stack:
            return
        cls = self._stack[-1]
        it = self.items[-1]
        key = {"who": "who", "resp": "resp", "q": "q"}.get(cls.split()[-1] if cls else "")
        if cls.startswith("chip"):
            it["chips"].append(data)
        elif key == "q":
            it["q"] += data
        elif key:
            it[key].append(data)
        elif self._stack[-1] == "" and len(self._stack) > 2 and "judge" in " ".join(self._stack):
            it["judge"].append(data)


def parse(path: Path) -> list[dict]:
    p = Items()
    p.feed(path.read_text(encoding="utf-8"))
    return p.items


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    store = Store(str(out / "results"))
    rows = task_rows() + chat_rows()
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for r in rows:
        r.update(run_id="r1", created_at=now)
    for model, bench in {(r["model"], r["benchmark"]) for r in rows}:
        import io

        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(samples_table([r for r in rows if (r["model"], r["benchmark"]) == (model, bench)]), buf)
        store.write_bytes(f"samples/model={model}/language=ko/benchmark={bench}.parquet", buf.getvalue())
    summary = summary_table(
        [
            dict(
                run_id="r1",
                model=m.name,
                language="ko",
                benchmark="ko-task",
                kind="task",
                metric="exact_match",
                value=0.5,
                stderr=0.2,
                n=6,
                n_unscored=0,
                schema_version=1,
                created_at=now,
            )
            for m in MODELS
        ]
    )
    uri = write_report(
        str(out / "report"), run_id="r1", summary=summary, models=MODELS, title="t", results_uri=str(out / "results")
    )
    return Path(uri).parent


def test_samples_are_read_back_from_the_results_folder(report):
    rows = load_samples(str(report.parent / "results"))
    assert len(rows) == len(task_rows()) + len(chat_rows())


def test_a_page_per_benchmark_and_language_with_every_answer_side_by_side(report):
    page = report / page_rel("ko-task", "ko")
    items = parse(page)
    assert [it["who"] for it in items] == [["CP", "CP + 0.5 CV", "CP + 1 CV", "chat"]] * 6
    assert [it["resp"][1] for it in items] == [f"v.ko.r0.5 answer {i} <&>" for i in TASK]  # escaped, then read back
    for it, scores in zip(items, TASK.values()):
        assert it["scores"] == {f"{m.name}\texact_match": float(s) for m, s in zip(MODELS, scores)} | {
            f"{m.name}\tin_language": 1.0 for m in MODELS
        }
        assert f"exact_match: {scores[0]:g}" in it["chips"]
    text = page.read_text(encoding="utf-8")
    assert "정답 1" in text and "detected: ko" in text and "http" not in text.replace("http://h/v1", "")
    assert '<a href="../index.html">' in text


def test_judge_reasoning_scores_and_undetermined_language_are_shown(report):
    items = parse(report / page_rel("ko-chat", "ko"))
    q1, q2 = items
    assert q1["q"].startswith("서울은 어디? q1")
    assert "judge_score: 7" in q1["chips"]
    assert "judge_score: unparseable" in q2["chips"] and "in_language: undetermined" in q2["chips"]
    text = (report / page_rel("ko-chat", "ko")).read_text(encoding="utf-8")
    assert text.count("Clear and correct. [[7]]") == 6 and text.count("I cannot decide.") == 2


def test_the_report_links_the_pages_and_holds_paired_and_judge_tables(report):
    index = (report / "index.html").read_text(encoding="utf-8")
    for bench in ("ko-task", "ko-chat"):
        rel = page_rel(bench, "ko")
        assert f'href="{rel}"' in index and (report / rel).is_file()
    paired = index[index.index("<h2>Paired comparisons</h2>") : index.index("<h2>Judging</h2>")]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", paired)][1:]
    em = {(r[1], r[2]): r for r in rows if r[4] == "exact_match"}
    # CP + 1 CV against CP: items 1, 2, 5 gained (discordant 3 : 0), item 4 both right
    r = em[("CP + 1 CV", "CP")]
    assert r[5] == "6" and r[8] == "+0.500" and r[11] == f"{2 / 8:.2g}"
    assert em[("CP + 0.5 CV", "chat")][8] == "-0.333"  # 3/6 against 5/6
    judging = index[index.index("<h2>Judging</h2>") : index.index("<h2>Answers</h2>")]
    assert "openai:j@http://h/v1" in judging and "unparseable" in judging
    assert re.search(
        r"<td>CP \+ 1 CV</td><td>ko</td><td>ko-chat</td><td>judge_score</td>"
        r"<td class=\"num\">1</td><td class=\"num\">1</td>",
        judging,
    )


def test_pages_only_for_benchmarks_with_answers(tmp_path):
    rows = [
        dict(model="cp.ko", language="ko", benchmark="ppl", metric="perplexity", item_id="1", score=3.0, response=None)
    ]
    assert write_pages(Store(str(tmp_path)), rows, labels={}, roles={}, order=[]) == []


CHROMIUM = next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


def chromium(args: list[str], tmp_path: Path) -> str:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path)))
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed: the filters run in a browser only where one is")
def test_the_outcome_filter_runs_in_a_real_browser(report, tmp_path):
    page = (report / page_rel("ko-task", "ko")).as_uri()
    presets = json.loads(
        re.search(
            r"const CONFIG = (\{.*?\});\n", (report / page_rel("ko-task", "ko")).read_text(encoding="utf-8")
        ).group(1)
    )["presets"]
    wanted = next(i for i, p in enumerate(presets) if p["x"] == "v.ko.r0.5" and p["y"] == "chat.v" and p["rel"] == "lt")
    assert "merged wrong, chat right" in presets[wanted]["label"]
    dom = chromium(["--dump-dom", f"{page}#preset={wanted}"], tmp_path)
    p = Items()
    p.feed(dom)
    visible = [TASK_ID for TASK_ID, it in zip(TASK, p.items) if not it["hidden"]]
    assert visible == ["1", "3", "5"]  # r0.5 wrong where chat is right
    assert "showing 3 of 6 items" in dom
    dom = chromium(["--dump-dom", page], tmp_path)
    assert "showing 6 of 6 items" in dom
