"""How long a fresh process takes to start an hf engine: chatvec's start against one where
transformers imports scikit-learn, as it does on its own, in the same run.

    python bench/engine_start.py [--repeats 7] [--hidden 512] [--layers 4]

Every eval actor, and every `chatvec eval --workers 0`, starts a fresh Python process that
imports torch and transformers and loads the model. transformers' model classes import its
assisted decoding, which imports scikit-learn whenever it is installed (lm-eval installs it);
chatvec answers transformers' "is scikit-learn available" with no before its model classes
load (chatvec.eval.engines.base.import_transformers). The baseline imports ``sklearn.metrics``
first, which is what transformers would have done. Each timing is a whole subprocess on one
CPU thread: interpreter start, imports, a small random Llama loaded and one token generated.
The two alternate; the table shows medians and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = """
import sys
{pre}
from chatvec.eval.engines import Decoding, GenerationRequest, load_engine
engine = load_engine("hf", sys.argv[1], device="cpu", batch_size=1)
ids = engine.tokenizer("hello")["input_ids"]
engine.generate([GenerationRequest(ids, Decoding(max_new_tokens=1))])
print("sklearn" in sys.modules)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    from chatvec.demo.tiny import build_model_dir

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    arms = {
        "scikit-learn imported (transformers' own start)": START.format(pre="import sklearn.metrics"),
        "chatvec's start": START.format(pre=""),
    }
    with tempfile.TemporaryDirectory(prefix="bench-engine-start-") as work:
        model = str(build_model_dir(Path(work) / "m", seed=5, hidden=args.hidden, layers=args.layers, shard_size=None))
        times: dict[str, list[float]] = {label: [] for label in arms}
        loaded: dict[str, str] = {}
        for _ in range(args.repeats):
            for label, script in arms.items():
                start = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, "-c", script, model], env=env, capture_output=True, text=True, check=True
                )
                times[label].append(time.perf_counter() - start)
                loaded[label] = proc.stdout.strip().splitlines()[-1]
    base = statistics.median(times[next(iter(arms))])
    print(f"\nhf engine start in a fresh process, 1 CPU thread, medians of {args.repeats}")
    print(f"{'start':<50} {'median s':>9} {'ratio':>7}  sklearn loaded")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:<50} {med:9.2f} {med / base:6.2f}x  {loaded[label]}")


if __name__ == "__main__":
    main()
