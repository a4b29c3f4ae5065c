"""The commands end to end on tiny models, and their behaviour on bad input (one line, exit 2, nothing written)."""

import errno
import json
import os

import numpy as np
import pytest
import torch

import moe_prune
from moe_prune.cli import main
from moe_prune.core.models import MnistConfig, MnistSoftMoE


@pytest.fixture()
def ckpt(tmp_path):
    model = MnistSoftMoE(MnistConfig(num_experts=16)).eval()
    return moe_prune.save(model, tmp_path / "tiny.safetensors")


@pytest.fixture()
def calib(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, (np.random.default_rng(0).random((40, 28, 28)) * 255).astype(np.uint8))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("moe-prune: error:"), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_compress_then_info(tmp_path, ckpt, calib, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["compress", str(ckpt), "--keep", "1/4", "--calib", str(calib), "--out", str(out)]) == 0
    path = out / "tiny.keep1of4.drop.safetensors"
    assert path.exists()
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    kept = info["moe_layers"][0]["kept_original_ids"]
    assert len(kept) == 4 and kept == sorted(kept)
    assert info["expert_parameters"] * 4 == moe_prune.summary(ckpt)["expert_parameters"]


@pytest.mark.parametrize("keep", ["0", "-1", "1.5", "17", "x", "1/0", "3/2"])
def test_compress_bad_keep(tmp_path, ckpt, calib, keep, capsys):
    before = ckpt.read_bytes()
    assert main(["compress", str(ckpt), "--keep", keep, "--calib", str(calib), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "keep" in one_line_error(capsys)
    assert ckpt.read_bytes() == before
    assert not (tmp_path / "o.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.safetensors", "calib.npy"])


@pytest.mark.parametrize("args,match", [
    (["--calib", "/nonexistent/dir"], "not found"),
    (["--calib", "BADNPY"], "bad.npy"),
    (["--out", "SELF"], "input"),
    (["--out", "/nonexistent/dir/x.safetensors"], "does not exist"),
])
def test_compress_bad_paths(tmp_path, ckpt, calib, args, match, capsys):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    args = [str(bad) if a == "BADNPY" else str(ckpt) if a == "SELF" else a for a in args]
    full = ["compress", str(ckpt), "--keep", "2", "--calib", str(calib), "--out", str(tmp_path / "o.safetensors")]
    for i in range(0, len(args), 2):
        full[full.index(args[i]) + 1] = args[i + 1]
    before = ckpt.read_bytes()
    assert main(full) == 2
    assert match in one_line_error(capsys)
    assert ckpt.read_bytes() == before


def test_full_disk_leaves_nothing(tmp_path, ckpt, calib, monkeypatch, capsys):
    import moe_prune.core.checkpoint as checkpoint

    def full_disk(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    old = tmp_path / "o.safetensors"
    old.write_bytes(b"previous output")
    assert main(["compress", str(ckpt), "--keep", "2", "--calib", str(calib), "--out", str(old)]) == 2
    assert "No space left" in one_line_error(capsys)
    assert old.read_bytes() == b"previous output"  # the old output survives, no temp file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "o.safetensors", "tiny.safetensors"]


def test_eval_writes_report(tmp_path, ckpt, capsys):
    out = tmp_path / "ev"
    assert main(["eval", str(ckpt), "--data", "sample", "--calib", "sample", "--calib-limit", "100", "--keep", "1/4",
                 "--batch-sizes", "32", "--random-seeds", "2", "--modes", "drop", "--out-dir", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())["reports"][0]
    methods = {(r["k"], r["method"]) for r in report["rows"]}
    assert {(4, "alg1"), (4, "alg2"), (4, "static"), (4, "random")} <= methods
    assert all(0 <= r["accuracy"] <= 1 for r in report["rows"])
    assert 0 <= report["no_experts"] <= 1 and (out / "eval.md").exists()


@pytest.mark.parametrize("args,match", [(["--keep", "0"], "keep"), (["--data", "/no/such"], "not found"),
                                        (["--modes", "half"], "mode")])
def test_eval_bad_input(tmp_path, ckpt, args, match, capsys):
    assert main(["eval", str(ckpt), "--data", "sample", "--out-dir", str(tmp_path / "e"), *args]) == 2
    assert match in one_line_error(capsys)


def test_eval_labels_that_do_not_fit_the_model(tmp_path, capsys):
    model = MnistSoftMoE(MnistConfig(num_experts=4, num_classes=5))
    path = moe_prune.save(model, tmp_path / "five.safetensors")
    assert main(["eval", str(path), "--data", "sample", "--out-dir", str(tmp_path / "e")]) == 2
    assert "classes" in one_line_error(capsys)


def test_demo_and_bench_on_a_tiny_checkpoint(tmp_path, ckpt, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--checkpoint", str(ckpt), "--out-dir", str(out), "--keep", "1/4", "--no-bench",
                 "--heal-steps", "30"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 4 and set(summary["accuracy"]) >= {"full", "static", "static_mass", "healed", "alg1",
                                                               "random_mean", "no_experts"}
    healed = moe_prune.summary(summary["healed"])["meta"]["heal"]
    assert healed["config"]["steps"] == 30
    # this untrained model's logits are near zero: its held-out loss may already be below nothing_below
    assert healed["loss_after"] < healed["loss_before"] or (
        healed["stopped"].startswith("nothing to heal") and healed["loss_after"] == healed["loss_before"])
    assert "compressed + healed" in capsys.readouterr().out
    assert all(os.path.exists(p) for p in summary["speed"]["onnx"].values())
    bench = tmp_path / "bench"
    assert main(["bench", str(ckpt), "--keep", "1/4", "--batch-sizes", "1,4", "--min-seconds", "0",
                 "--out-dir", str(bench)]) == 0
    r = json.loads((bench / "bench.json").read_text())
    assert set(r["latency"]["onnxruntime"]["1"]) == {"full", "compressed", "alg2", "alg1"}
    # Algorithm 1 reads the experts its batch kept: 4 at batch 1, between 4 and 16 for 4 inputs
    alg1 = r["bounds"]["alg1"]["by_batch"]
    assert alg1["1"]["union"] == {"moe": 4} and 4 <= alg1["4"]["union"]["moe"] <= 16
    assert alg1["1"]["bytes_ratio"] == r["bounds"]["alg2"]["bytes_ratio"] >= alg1["4"]["bytes_ratio"]
    assert all(b["roofline"] > 1 for b in alg1.values())
    assert r["bounds"]["compressed"]["flop_ratio"] > 1 and r["layer"]["latency"]["torch"]["4"]["alg2"]["p50_ms"] > 0
    experts = r["bounds"]["compressed"]["by_kind"]["experts"]  # 4 of 16 experts: a quarter of their cost
    assert experts["flops"][0] == 4 * experts["flops"][1] and experts["weight_params"][0] == 4 * experts["weight_params"][1]
    costs = r["text"].split("cost per input by layer kind")[1]
    assert f"{experts['flops'][1] / 1e6:.2f}" in next(line for line in costs.splitlines() if line.startswith("experts"))


def test_bench_without_a_gpu_says_so(tmp_path, ckpt, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", str(ckpt), "--provider", "cuda", "--batch-sizes", "1", "--out-dir", str(tmp_path / "b")]) == 2
    assert "CUDA" in one_line_error(capsys)


def test_looped_baseline_computes_the_same_model():
    from moe_prune.measurement.bench import looped
    from moe_prune.core.layers import SoftMoE, SoftMoEConfig

    for kind in ("gelu_mlp", "relu_mlp", "geglu"):
        layer = SoftMoE(SoftMoEConfig(dim=12, num_experts=6, slots_per_expert=2, hidden=8, expert=kind)).eval()
        x = torch.randn(3, 5, 12)
        with torch.no_grad():
            torch.testing.assert_close(looped(layer)(x), layer(x))
            kept = torch.tensor([1, 4])
            torch.testing.assert_close(looped(layer)(x, experts=kept), layer(x, experts=kept))


# -- issue 13: the small things ------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moe-prune {moe_prune.__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_traceback_before_or_after_the_command(tmp_path, where):
    argv = ["info", str(tmp_path / "absent.safetensors")]
    argv = ["--traceback", *argv] if where == "before" else [*argv, "--traceback"]
    with pytest.raises(moe_prune.CheckpointError, match="no such file"):
        main(argv)
    assert main(argv[1:] if where == "before" else argv[:-1]) == 2  # without it: the one line


def test_help_shows_every_default():
    from moe_prune.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    checked = 0
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())  # unwrapped
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, "==SUPPRESS=="):
                continue
            d = action.default
            shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
            assert f"(default: {shown})" in text, (name, action.dest)
            checked += 1
    assert checked >= 25


def test_recorded_command_is_the_argv_given_quoted(tmp_path, ckpt, calib):
    import shlex

    out = tmp_path / "with space" / "o.safetensors"
    out.parent.mkdir()
    argv = ["compress", str(ckpt), "--keep", "2", "--calib", str(calib), "--out", str(out)]
    assert main(argv) == 0
    command = moe_prune.load(out).checkpoint_meta["command"]
    assert command == shlex.join(["moe-prune", *argv]) and shlex.split(command)[1:] == argv


def test_out_folder_form_is_the_same_rule_for_compress_convert_export(tmp_path, ckpt, calib):
    assert main(["compress", str(ckpt), "--keep", "2", "--calib", str(calib), "--out", str(tmp_path / "c") + "/"]) == 0
    assert (tmp_path / "c" / "tiny.keep2.drop.safetensors").is_file()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "c"), "--no-validate"]) == 0  # an existing folder
    assert (tmp_path / "c" / "tiny.onnx").is_file()


def test_eval_and_bench_say_when_matplotlib_is_missing(tmp_path, ckpt, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "ev"
    assert main(["eval", str(ckpt), "--data", "sample", "--calib", "sample", "--calib-limit", "50", "--keep", "1/4",
                 "--batch-sizes", "32", "--random-seeds", "1", "--modes", "drop", "--out-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{out / 'eval.png'} not written: matplotlib is not installed" in err and not (out / "eval.png").exists()


def test_checklist_marks_rule_and_verdict_agree(tmp_path):
    """An element near 0 with a relative error above rtol passes allclose: its mark says why (the worst
    element's share of its tolerance), and a failing one is unmarked, so the verdict follows the marks."""
    import numpy as np

    from moe_prune.onnx.validate import BatchCheck, ValidationReport, compare_batch

    ok, bad = BatchCheck(1, 1, 0.0, 0.0, True), BatchCheck(4, 1, 0.0, 0.0, True)
    ref = np.array([1e-3, 1.0])
    compare_batch(ok, ref + np.array([5e-5, 0.0]), ref, atol=1e-4, rtol=1e-3)  # rel 5%, yet within atol + rtol|ref|
    compare_batch(bad, ref + np.array([2e-4, 0.0]), ref, atol=1e-4, rtol=1e-3)
    assert ok.passed and ok.max_rel > 1e-3 and 0.4 < ok.worst < 0.6
    assert not bad.passed and 1.9 < bad.worst < 2.1
    report = ValidationReport(tmp_path / "m.onnx", 1e-4, 1e-3, [], {"MatMul": 1}, checks=[ok])
    lines = report.format().splitlines()
    assert any(line.strip().startswith("[x] batch size 1: worst element at 0.50 of its tolerance") for line in lines)
    assert lines[-1].strip() == "PASSED"
    report.checks.append(bad)
    lines = report.format().splitlines()
    assert any(line.strip().startswith("[ ] batch size 4: worst element at 1.98") for line in lines)
    assert lines[-1].strip() == "FAILED"


def test_speedup_far_above_its_bound_is_flagged():
    from moe_prune.measurement.reports import ABOVE_BOUND_NOTE, demo_speed, of_bound

    assert of_bound(2.0, 2.0) == ("100%", False) and of_bound(2.4, 2.0) == ("120%", False)
    assert of_bound(6.66, 2.0) == ("333% !", True) and of_bound(1.0, None) == ("", False)
    stats = lambda ms: {"p50_ms": ms}  # noqa: E731
    r = {"env": {"onnxruntime": "1", "provider": "cpu", "cpu": "x", "torch_threads": 1},
         "bounds": {n: {"flop_ratio": 2.0, "bytes_ratio": 2.0, "by_batch": {"1": {"bytes_ratio": 2.0, "roofline": 2.0}}}
                    for n in ("compressed", "alg2")},
         "latency": {"onnxruntime": {"1": {"full": stats(1.0), "compressed": stats(0.15), "alg2": stats(0.6)}},
                     "speedup": {"onnxruntime": {"1": {"compressed": 6.66, "alg2": 1.66}}}}}
    text = demo_speed(r)
    assert "333% !" in text and "83%" in text and ABOVE_BOUND_NOTE in text
    r["latency"]["speedup"]["onnxruntime"]["1"]["compressed"] = 1.9
    assert ABOVE_BOUND_NOTE not in demo_speed(r)


def test_random_subsets_of_a_compressed_model_are_router_ids(tmp_path, ckpt):
    from moe_prune.compression.compress import compress_file
    from moe_prune.measurement.bench import reduced_model
    from moe_prune.selection.scores import random_subsets, with_experts

    small = moe_prune.load(compress_file(ckpt, {"moe": [3, 7, 9, 12, 15]}, tmp_path / "s.safetensors"))
    for seed in range(5):
        subset = random_subsets(small, 2, torch.Generator().manual_seed(seed))["moe"]
        assert set(subset.tolist()) <= {3, 7, 9, 12, 15} and len(subset) == 2
        with_experts(small, {"moe": subset})(torch.rand(2, 1, 28, 28))  # a stack position would be refused
    reduced, _ = reduced_model(small, "2")
    assert set(reduced.moe.config.origin) <= {3, 7, 9, 12, 15}


def test_demo_on_a_compressed_checkpoint(tmp_path, ckpt, calib):
    small = tmp_path / "small.safetensors"
    assert main(["compress", str(ckpt), "--keep", "8", "--calib", str(calib), "--out", str(small)]) == 0
    out = tmp_path / "demo"
    assert main(["demo", "--checkpoint", str(small), "--keep", "2", "--out-dir", str(out), "--no-export",
                 "--heal-steps", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 2 and summary["healed"] is None and "healed" not in summary["accuracy"]


def test_bench_on_a_bare_layer_times_tokens(tmp_path, capsys):
    from moe_prune.core.layers import SoftMoE, SoftMoEConfig

    layer = moe_prune.save(SoftMoE(SoftMoEConfig(dim=16, num_experts=8, slots_per_expert=1, hidden=8)),
                           tmp_path / "layer.safetensors")
    out = tmp_path / "b"
    assert main(["bench", str(layer), "--keep", "2", "--batch-sizes", "1", "--min-seconds", "0", "--out-dir", str(out)]) == 0
    r = json.loads((out / "bench.json").read_text())
    assert r["tokens"] == 16 and set(r["latency"]["onnxruntime"]["1"]) == {"full", "compressed", "alg2", "alg1"}
    assert r["bounds"]["compressed"]["by_kind"]["experts"]["flops"][0] == 4 * r["bounds"]["compressed"]["by_kind"]["experts"]["flops"][1]
