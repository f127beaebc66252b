"""Sweep files: the shipped examples parse; bad files give one error naming each key and its line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatvec.core.errors import ConfigError
from chatvec.core.yamlconfig import parse_model
from chatvec.runs.sweep import Sweep, load_sweep

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
vectors:
  v1: {base: /m/base, chat: /m/chat}
targets:
  - language: zh-Hant
    cp: /m/cp
    benchmarks: [chat]
ratios: [0.5, 1.0]
"""


def parse(text: str) -> Sweep:
    return parse_model(textwrap.dedent(text), Sweep, "sweep.yaml")


def test_examples_parse():
    paper = load_sweep(str(ROOT / "examples" / "paper.yaml"))
    assert [t.language for t in paper.targets] == ["zh-Hant", "zh-Hans", "ko"]
    assert paper.ratios == [0.5, 1.0]
    assert set(paper.vectors) == {"llama2-chat"}
    assert paper.vectors["llama2-chat"].base.startswith("meta-llama/Llama-2")
    demo = load_sweep(str(ROOT / "examples" / "demo.yaml"))
    assert demo.name == "demo" and demo.embeddings == ["all", "skip"]


def test_examples_demo_matches_what_the_demo_writes(tmp_path):
    from chatvec.cli.cmd_demo import write_sweep_file

    written = load_sweep(str(write_sweep_file(tmp_path)))
    shipped = load_sweep(str(ROOT / "examples" / "demo.yaml"))
    strip = lambda s: s.replace(tmp_path.as_posix() + "/", "").replace("demo-out/", "")  # noqa: E731
    a = strip(written.model_dump_json())
    b = strip(shipped.model_dump_json())
    assert a == b


def test_defaults_and_shorthands():
    s = parse(GOOD + "methods: [add, {method: dare, density: 0.9}]\nembeddings: [all, skip]\n")
    assert [m.label() for m in s.methods] == ["add", "dare0.9"]
    assert s.embeddings == ["all", "skip"]
    s = parse(GOOD + "embeddings: null\nmethods: ties\n")
    assert s.embeddings == ["all"] and s.methods[0].method == "ties"
    s = parse(GOOD)
    assert s.baselines.cp and s.baselines.chat and s.nightly.k == 2.0 and s.root is None


@pytest.mark.parametrize(
    "extra, key, line",
    [
        ("ratio: [0.5]\n", "ratio", 8),  # misspelt key
        ("ratios: [0.5, -1]\n", "ratios", 8),
        ("ratios: [0.5, 0.5]\n", "ratios", 8),
        ("methods: [merge]\n", "methods.0", 8),
        ("embeddings: [skipp]\n", "embeddings.0", 8),
        ("nightly: {k: -1}\n", "nightly.k", 8),
        ("workers: {merge: two}\n", "workers.merge", 8),
        ("baselines: {cp: true, chatt: false}\n", "baselines.chatt", 8),
    ],
)
def test_bad_values_name_key_and_line(extra, key, line):
    text = GOOD.replace("ratios: [0.5, 1.0]\n", "") + extra
    # every case replaces the last line, so the bad key sits on line 8
    with pytest.raises(ConfigError) as err:
        parse(text)
    msg = str(err.value)
    assert f"line {line}: {key}" in msg, msg


def test_every_problem_is_listed_at_once():
    text = """\
    vectors:
      v1: {base: /b, chat: /c, bse: /x}
    targets:
      - {language: ko, cp: /cp, benchmarks: []}
    judge: [1, 2]
    """
    with pytest.raises(ConfigError) as err:
        parse(text)
    msg = str(err.value)
    assert "line 2: vectors.v1.bse: unknown key" in msg
    assert "line 4: targets.0.benchmarks" in msg
    assert "line 5: judge" in msg


def test_cross_checks():
    bad_vector = GOOD.replace("    benchmarks: [chat]\n", "    benchmarks: [chat]\n    vectors: [nope]\n")
    with pytest.raises(ConfigError, match="names vector 'nope'"):
        parse(bad_vector)
    dup = GOOD.replace("ratios:", "  - {language: zh-Hant, cp: /m/cp2, benchmarks: [chat]}\nratios:")
    with pytest.raises(ConfigError, match="two targets are named 'zh-Hant'"):
        parse(dup)
    ok = dup.replace("cp: /m/cp2,", "cp: /m/cp2, name: breeze,")
    assert [t.key for t in parse(ok).targets] == ["zh-Hant", "breeze"]
    with pytest.raises(ConfigError, match="not a usable name"):
        parse(GOOD.replace("v1:", "'my vector':"))


def test_missing_file_and_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("vectors: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(str(bad))


def test_cli_bad_sweep_file_exit_status(tmp_path):
    bad = tmp_path / "sweep.yaml"
    bad.write_text(GOOD + "judgee: x\n")
    proc = subprocess.run(
        [sys.executable, "-m", "chatvec.cli", "sweep", str(bad), "--root", str(tmp_path / "store")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "line 9: judgee: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists()
