"""`moe-prune serve` without a server: the inference callable, its errors, and that the serve path needs no torch.

The real server (Triton through PyTriton, in the Python 3.13 serving environment) is tested in
tests/test_serve_live.py.
"""

import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

import moe_prune
from moe_prune.cli import main
from moe_prune.compression.compress import compress_model
from moe_prune.onnx.export import export_onnx
from moe_prune.core.models import MnistConfig, MnistSoftMoE
from moe_prune.selection.scores import with_selection
from moe_prune.serving.server import OnnxModel, ServeConfig, TensorSpec, start


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("server")
    full = MnistSoftMoE(MnistConfig(num_experts=16)).eval()
    return {
        "full": export_onnx(full, tmp / "full.onnx"),
        "compressed": export_onnx(compress_model(full, {"moe": torch.tensor([1, 5, 9, 12])}), tmp / "compressed.onnx"),
        "alg2": export_onnx(with_selection(full, "1/4", per="batch"), tmp / "alg2.onnx", with_choice=True),
        "fixed": export_onnx(full, tmp / "fixed.onnx", dynamic_batch=False),
    }


def images(n, seed):
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


@pytest.mark.parametrize("name", ["full", "compressed"])
def test_requests_batched_together_get_their_own_answers(models, name):
    """Triton hands the callable several requests at once; each answer must be what the request alone gets."""
    m = OnnxModel(models[name], threads=1)
    ref = ort.InferenceSession(str(models[name]), providers=["CPUExecutionProvider"])
    requests = [{"input": images(n, seed)} for seed, n in enumerate([1, 4, 33, 2])]
    answers = m(requests)
    assert len(answers) == len(requests)
    for req, ans in zip(requests, answers):
        assert list(ans) == ["output"]
        np.testing.assert_allclose(ans["output"], ref.run(None, req)[0], atol=1e-5, rtol=0)
    one = m([{"input": images(1, 9)}])[0]["output"]
    assert one.shape == (1, 10)


def test_signature_comes_from_the_graph(models):
    m = OnnxModel(models["full"])
    assert m.inputs == [TensorSpec("input", "float32", (1, 28, 28))]
    assert m.outputs == [TensorSpec("output", "float32", (10,))]
    assert m.dropped == []


def test_algorithm2_expert_ids_are_not_served(models):
    """Its `experts.moe` output is one set of ids for the whole batch: no batch axis, cannot be split per request."""
    m = OnnxModel(models["alg2"])
    assert [t.name for t in m.outputs] == ["output"]
    assert m.dropped == ["experts.moe"]


def test_fixed_batch_model_is_refused(models):
    with pytest.raises(moe_prune.ServeError, match="no dynamic batch axis"):
        OnnxModel(models["fixed"])


@pytest.mark.parametrize("content", [b"hello\n", b"", bytes(range(256)) * 8])
def test_not_an_onnx_file_is_one_line_exit_2(tmp_path, capsys, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    assert main(["serve", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-prune: error: ") and str(bad) in err, err


def test_missing_file_and_folder(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a file" in capsys.readouterr().err


def test_truncated_model_is_refused(models, tmp_path, capsys):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(models["full"].read_bytes()[:20000])
    assert main(["serve", str(cut)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_without_pytriton_the_error_says_how_to_install(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytriton", None)  # as in an environment without nvidia-pytriton
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)
    with pytest.raises(moe_prune.ServeError, match="nvidia-pytriton"):
        start(ServeConfig(str(models["full"])))


def test_bad_max_batch_size(models):
    with pytest.raises(moe_prune.ServeError, match="max-batch-size"):
        start(ServeConfig(str(models["full"]), max_batch_size=0))


def test_help_names_the_defaults_and_algorithm_1(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for fragment in ("default: 8000", "default: 8001", "default: 8002", "default: 64", "Algorithm 1", "per input",
                     "SIGTERM", "--provider {cpu,cuda}"):
        assert fragment in out, fragment


def test_serve_path_imports_neither_torch_nor_triton(models, tmp_path):
    """In a Python where importing torch or triton fails, the CLI, the server module and the callable still work."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "triton"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import numpy as np
        import moe_prune, moe_prune.cli, moe_prune.serving.server
        rc = moe_prune.cli.main(["serve", {str(bad)!r}])
        assert rc == 2, rc
        m = moe_prune.serving.server.OnnxModel({str(models["compressed"])!r})
        out = m([{{"input": np.zeros((3, 1, 28, 28), np.float32)}}])
        assert out[0]["output"].shape == (3, 10)
        assert isinstance(moe_prune.ServeError("x"), moe_prune.MoePruneError)
        loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "triton") and sys.modules[k] is not None)
        assert not loaded, loaded
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert "moe-prune: error:" in r.stderr


def test_package_names_still_resolve():
    """The public API is imported on first use; every listed name resolves, unknown names raise AttributeError."""
    for name in moe_prune.__all__:
        assert getattr(moe_prune, name) is not None, name
    assert moe_prune.serve_model is moe_prune.serving.server.serve
    with pytest.raises(AttributeError):
        moe_prune.no_such_name


def test_external_data_outside_the_model_folder_is_refused(models, tmp_path, capsys):
    """moe-prune's guarantee for ONNX files (README): here ONNX Runtime's own path check enforces it."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    proto = onnx.load(str(models["full"]))
    placeholder = "x" * len("../evil.bin")  # onnx refuses to write '..' itself; patch the name in afterwards
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location=placeholder, size_threshold=0)
    (tmp_path / "sub").mkdir()
    onnx.save(proto, tmp_path / "sub" / "m.onnx")
    (tmp_path / "sub" / placeholder).rename(tmp_path / "evil.bin")
    path = tmp_path / "sub" / "m.onnx"
    path.write_bytes(path.read_bytes().replace(placeholder.encode(), b"../evil.bin"))
    assert main(["serve", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "escapes" in err, err
