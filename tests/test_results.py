"""The committed accuracy results reproduce: re-running the eval of the shipped checkpoint on the bundled sample
gives the numbers in benchmarks/results/eval_default_sample/eval.json."""

import json
import shlex
from pathlib import Path

import pytest

from moe_prune.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "eval_default_sample" / "eval.json"


@pytest.mark.slow
def test_committed_eval_of_the_default_checkpoint_reproduces(tmp_path, monkeypatch):
    record = json.loads(COMMITTED.read_text())
    args = shlex.split(record["command"])[1:]  # drop "moe-prune"
    args[args.index("--out-dir") + 1] = str(tmp_path)
    monkeypatch.chdir(ROOT)  # the command names the checkpoint relative to the repository
    assert main(args) == 0
    new = json.loads((tmp_path / "eval.json").read_text())["reports"][0]
    old = record["reports"][0]
    # Accuracy on 1,000 images: allow 2 images of float noise between CPUs (a different BLAS can flip a near tie).
    tol = 2 / 1000
    assert abs(new["full"] - old["full"]) <= tol and abs(new["no_experts"] - old["no_experts"]) <= tol
    assert len(new["rows"]) == len(old["rows"])
    for a, b in zip(new["rows"], old["rows"]):
        assert (a["k"], a["mode"], a["method"], a["batch_size"]) == (b["k"], b["mode"], b["method"], b["batch_size"])
        assert abs(a["accuracy"] - b["accuracy"]) <= tol, (a, b)
