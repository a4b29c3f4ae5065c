"""Every checkpoint file a Soft MoE user has, read directly: a real Lightning .ckpt, torch.save files with the
prefixes DDP, torch.compile and EMA copies leave, sharded safetensors; the architecture from the tensor shapes;
dtype kept; files that need full unpickling refused. The oracle is the soft-moe library's own output on the
shared fixture (`output.npy`), which this code never produced."""

import json
import pickle
import os

import pytest
import torch
from safetensors.torch import save_file

import moe_prune
from moe_prune import CheckpointFile
from moe_prune.core.checkpoint import read_header
from moe_prune.cli import main
from moe_prune.errors import CheckpointError, ConfigError, DefaultedWarning

from library_models import Shell, lightning_checkpoint, vit_fixture

pytestmark = pytest.mark.usefixtures("one_thread")

# What the fixture's tensor shapes cannot tell: soft-moe's defaults for width 64 would be 1 head, "token" pooling.
NOT_IN_SHAPES = {"num_heads": 4, "global_pool": "token"}


@pytest.fixture(scope="module")
def vit():
    return vit_fixture()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, vit):
    """A Lightning checkpoint of a LightningModule training the soft-moe ViT; its hyper-parameters are its
    __init__'s arguments (the ViT's, with global_pool spelled out, and the training ones)."""
    state, kwargs, _, _ = vit
    return lightning_checkpoint(tmp_path_factory.mktemp("lightning") / "last.ckpt", state,
                                {**kwargs, "global_pool": "token", "lr": 1e-3, "batch_size": 64})


def run(model, x):
    with torch.no_grad():
        return model(x)


def assert_reproduces(model, vit, tol=1e-4):
    _, _, x, y = vit
    assert (run(model, x) - y).abs().max().item() <= tol


def test_lightning_ckpt_needs_no_kwargs(ckpt, vit, recwarn):
    model = moe_prune.load(ckpt)
    assert_reproduces(model, vit)
    assert not [w for w in recwarn if issubclass(w.category, DefaultedWarning)]  # num_heads came from the file
    found = moe_prune.summary(ckpt)["found"]
    assert found["file_format"] == "Lightning checkpoint" and found["entry"] == "state_dict"
    assert found["prefix"] == "model." and found["ignored_tensors"] == 1  # criterion.weight is not the model's
    assert found["sources"]["num_heads"] == "hyper_parameters" and found["sources"]["num_experts"] == "tensors"
    assert any(n.startswith("optimizer_states") for n in found["not_used"])
    assert found["defaulted"] == []


def test_pt_needs_only_what_the_shapes_cannot_tell(tmp_path, vit):
    state, _, x, y = vit
    path = tmp_path / "model.pt"
    torch.save(state, path)
    assert_reproduces(moe_prune.load(CheckpointFile(path, kwargs=NOT_IN_SHAPES)), vit)
    # Without them, the library's default for width 64 (1 head): a loud warning, and indeed another model.
    with pytest.warns(DefaultedWarning, match="num_heads=1"):
        guessed = moe_prune.load(path)
    assert (run(guessed, x) - y).abs().max().item() > 1e-3


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def _write(kind, tmp_path, state):
    """The fixture's weights as users' training loops leave them."""
    if kind == "pth, DDP module. prefix":
        path = tmp_path / "model.pth"
        torch.save(_prefixed(state, "module."), path)
    elif kind == "bin, nested under 'model'":
        path = tmp_path / "pytorch_model.bin"
        torch.save({"model": state, "epoch": 3, "args": {"lr": 0.1}}, path)
    elif kind == "torch.compile _orig_mod. prefix":
        path = tmp_path / "compiled.pt"
        compiled = torch.compile(Shell(state))  # compiles nothing until called; its state dict has the prefix
        sd = compiled.state_dict()
        assert all(k.startswith("_orig_mod.") for k in sd)
        torch.save(sd, path)
    elif kind == "legacy torch.save format":
        path = tmp_path / "legacy.pt"
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif kind == "sharded safetensors (index)":
        names = sorted(state)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for file, keys in shards.items():
            save_file({k: state[k].contiguous() for k in keys}, tmp_path / file)
        path = tmp_path / "model.safetensors.index.json"
        path.write_text(json.dumps({"metadata": {"total_size": 0},
                                    "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    elif kind == "sharded folder (.bin shards)":
        folder = tmp_path / "hf"
        folder.mkdir()
        names = sorted(state)
        torch.save({k: state[k] for k in names[:10]}, folder / "pytorch_model-1.bin")
        torch.save({k: state[k] for k in names[10:]}, folder / "pytorch_model-2.bin")
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
            k: "pytorch_model-1.bin" if i < 10 else "pytorch_model-2.bin" for i, k in enumerate(names)}}))
        path = folder
    else:
        raise AssertionError(kind)
    return path


FORMS = ["pth, DDP module. prefix", "bin, nested under 'model'", "torch.compile _orig_mod. prefix",
         "legacy torch.save format", "sharded safetensors (index)", "sharded folder (.bin shards)"]


@pytest.mark.parametrize("kind", FORMS)
def test_every_file_form_reproduces_the_library(kind, tmp_path, vit):
    path = _write(kind, tmp_path, vit[0])
    assert_reproduces(moe_prune.load(CheckpointFile(path, kwargs=NOT_IN_SHAPES)), vit)


def test_ema_weights_when_asked(tmp_path, vit):
    state, _, x, _ = vit
    ema = {k: v * 0.5 if k.startswith("head.") else v for k, v in state.items()}  # an EMA copy that differs
    ckpt = lightning_checkpoint(tmp_path / "ema.ckpt", state, {"num_heads": 4}, ema_state=ema)
    main_model, ema_model = moe_prune.load(ckpt), moe_prune.load(CheckpointFile(ckpt, ema=True))
    assert_reproduces(main_model, vit)
    assert torch.equal(ema_model.head.weight, ema["head.weight"])
    assert moe_prune.summary(CheckpointFile(ckpt, ema=True))["found"]["prefix"] == "model_ema.module."
    # timm's train.py keeps EMA weights as their own entry
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": state, "state_dict_ema": ema, "epoch": 1}, path)
    assert torch.equal(moe_prune.load(CheckpointFile(path, kwargs=NOT_IN_SHAPES, ema=True)).head.weight, ema["head.weight"])
    found = moe_prune.summary(CheckpointFile(path, kwargs=NOT_IN_SHAPES))["found"]
    assert found["entry"] == "state_dict" and found["other_ema_entries"] == ["state_dict_ema"]
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    with pytest.raises(CheckpointError, match="no EMA"):
        moe_prune.load(CheckpointFile(plain, ema=True))


def test_full_unpickling_is_refused_in_one_line(tmp_path, vit, capsys):
    path = tmp_path / "whole_model.pt"
    torch.save(Shell(vit[0]), path)  # torch.save(model): a pickled module, not a state dict
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="needs full unpickling.*Shell"):
        moe_prune.load(path)
    out = tmp_path / "out"
    assert main(["compress", str(path), "--calib", "sample", "--out", f"{out}/"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-prune: error:") and "\n" not in err and "weights_only" in err
    assert not out.exists() and path.read_bytes() == before


def test_a_malicious_pt_never_runs(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    for name, data in (("evil.pt", pickle.dumps({"w": Boom()})), ("evil.ckpt", None)):
        path = tmp_path / name
        if data is None:
            torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"x": Boom()}}, path)
        else:
            path.write_bytes(data)
        with pytest.raises(CheckpointError):
            moe_prune.load(path)
    assert not (tmp_path / "pwned").exists()


def test_ambiguous_and_foreign_layouts_say_what_to_do(tmp_path, vit):
    state = vit[0]
    two = tmp_path / "distill.pt"
    torch.save({**_prefixed(state, "student."), **_prefixed(state, "teacher.")}, two)
    with pytest.raises(CheckpointError, match="2 Soft MoE ViTs.*student"):
        moe_prune.load(two)
    own = tmp_path / "own.pt"
    torch.save({"encoder.moe.phi": torch.randn(8, 4, 1), "decoder.moe.phi": torch.randn(8, 4, 1),
                **{f"{p}.moe.experts.{e}.fc1.weight": torch.randn(16, 8) for p in ("encoder", "decoder") for e in range(4)},
                **{f"{p}.moe.experts.{e}.fc2.weight": torch.randn(8, 16) for p in ("encoder", "decoder") for e in range(4)}},
               own)
    with pytest.raises(CheckpointError, match=r"moe_prune\.convert\(model\)"):
        moe_prune.load(own)
    one = tmp_path / "one.pt"
    torch.save(state, one)
    with pytest.raises(ConfigError, match="unknown keyword"):
        moe_prune.load(CheckpointFile(one, kwargs={"num_head": 4}))


def test_given_kwargs_that_contradict_the_tensors(tmp_path, vit):
    path = tmp_path / "model.pt"
    torch.save(vit[0], path)
    with pytest.raises(CheckpointError, match="do not match"):
        moe_prune.load(CheckpointFile(path, kwargs={**NOT_IN_SHAPES, "num_experts": 8}))
    with pytest.raises(ConfigError, match="not divisible"):
        moe_prune.load(CheckpointFile(path, kwargs={"num_heads": 5}))


def test_bf16_checkpoint_compresses_to_bf16(tmp_path, vit):
    state = {k: v.bfloat16() for k, v in vit[0].items()}
    path = tmp_path / "bf16.pt"
    torch.save(state, path)
    model = moe_prune.load(CheckpointFile(path, kwargs=NOT_IN_SHAPES))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _, _, x, y = vit
    assert (run(model, x).float() - y).abs().max().item() < 0.1  # runs on float32 images, in bfloat16
    for extra in ([], ["--heal", "--heal-steps", "3"]):
        out = tmp_path / f"small{len(extra)}.safetensors"
        assert main(["compress", str(path), "--kwargs", json.dumps(NOT_IN_SHAPES), "--calib", "sample",
                     "--calib-limit", "64", "--rule", "mass", "--keep", "1/8", "--out", str(out), *extra]) == 0
        _, header = read_header(out)
        assert {dtype for dtype, _ in header.values()} == {"BF16"}
        assert out.stat().st_size < path.stat().st_size
        small = moe_prune.load(out)
        assert {p.dtype for p in small.parameters()} == {torch.bfloat16}
    # converted to the native format, still bfloat16
    native = tmp_path / "native.safetensors"
    assert main(["convert", str(path), "--kwargs", json.dumps(NOT_IN_SHAPES), "--out", str(native)]) == 0
    assert {d for d, _ in read_header(native)[1].values()} == {"BF16"}


def test_every_command_takes_the_lightning_ckpt(ckpt, tmp_path, capsys):
    assert main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "Lightning checkpoint, entry 'state_dict', names under 'model.' (1 other tensor(s) not used)" in text
    assert "from the checkpoint's hyper_parameters:" in text and "num_heads=4" in text
    assert "warning" not in text
    small = tmp_path / "small.safetensors"
    assert main(["compress", str(ckpt), "--calib", "sample", "--calib-limit", "128", "--out", str(small)]) == 0
    assert capsys.readouterr().err.count("warning") == 0
    s = moe_prune.summary(small)
    assert [layer["experts_held"] for layer in s["moe_layers"]] == [2, 2]
    assert s["meta"]["source_meta"]["converted_from"].startswith("soft-moe (bwconrad)")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "full.onnx")]) == 0
    assert main(["export", str(small), "--out", str(tmp_path / "small.onnx")]) == 0
    assert main(["export", str(ckpt), "--keep", "1/8", "--dynamic", "--per", "input",
                 "--out", str(tmp_path / "alg1.onnx")]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["eval", str(ckpt), "--data", "sample", "--calib", "sample", "--calib-limit", "64", "--keep", "1/8",
                 "--modes", "drop", "--batch-sizes", "32", "--random-seeds", "1", "--out-dir", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())["reports"][0]
    assert report["experts"] == 16 and report["checkpoint"] == str(ckpt)
    assert main(["bench", str(ckpt), "--compressed", str(small), "--batch-sizes", "2", "--min-seconds", "0",
                 "--no-layer", "--out-dir", str(tmp_path / "bench")]) == 0
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["checkpoint"] == str(ckpt) and bench["latency"]["torch"]
    capsys.readouterr()


def test_convert_command_needs_no_kwargs_for_a_lightning_ckpt(ckpt, tmp_path, vit, capsys):
    out = tmp_path / "native.safetensors"
    assert main(["convert", str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "from the checkpoint's hyper_parameters: global_pool=\"token\", num_heads=4" in printed
    assert_reproduces(moe_prune.load(out), vit)
    assert main(["convert", str(out), "--out", str(tmp_path / "again.safetensors")]) == 2
    assert "already a moe-prune checkpoint" in capsys.readouterr().err


def test_dtype_converts_the_output(tmp_path):
    """--dtype writes the compressed (or converted) checkpoint in another dtype; calibration stays in fp32, so the
    kept experts are the ones an fp32 output keeps."""
    from moe_prune.flows.demo import default_checkpoint

    outs = {}
    for dtype in ("fp32", "fp16", "bf16"):
        outs[dtype] = tmp_path / f"{dtype}.safetensors"
        assert main(["compress", str(default_checkpoint()), "--calib", "sample", "--calib-limit", "200", "--rule",
                     "mass", "--dtype", dtype, "--out", str(outs[dtype])]) == 0
    names = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
    for dtype, path in outs.items():
        assert {d for d, _ in read_header(path)[1].values()} == {names[dtype]}
    kept = {d: moe_prune.summary(p)["meta"]["kept_experts"] for d, p in outs.items()}
    assert kept["fp16"] == kept["bf16"] == kept["fp32"]
    assert outs["fp16"].stat().st_size < 0.55 * outs["fp32"].stat().st_size
