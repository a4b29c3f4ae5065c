"""Native checkpoints, the public libraries' fixtures, and every bad checkpoint a user could bring."""

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import moe_prune
from moe_prune.core.library_files import convert_file as _convert_file
from moe_prune.errors import CheckpointError, ConfigError, OutputError
from moe_prune.core.models import MnistConfig, MnistSoftMoE

from conftest import FIXTURES, SHARED_FIXTURES

FIXTURE_NAMES = ("bwconrad_vit_mnist", "lucidrains_layer")


def fixture(name):
    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    x = torch.from_numpy(np.load(FIXTURES / name / "input.npy"))
    y = torch.from_numpy(np.load(FIXTURES / name / "output.npy"))
    return FIXTURES / name / "model.safetensors", cfg["kwargs"], x, y


def run(model, x):
    with torch.no_grad():
        return model(x)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_fixtures_ship_in_the_repository():
    """The parity tests read tests/fixtures, in the repository: a plain clone runs them (nothing skips)."""
    assert FIXTURES.parent == Path(__file__).resolve().parent
    for name in FIXTURE_NAMES:
        assert {"config.json", "input.npy", "output.npy", "model.safetensors"} <= set(_files(FIXTURES / name)), name


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason=f"no shared copy at {SHARED_FIXTURES} to compare with")
def test_fixtures_match_the_shared_copy():
    """The in-repository fixtures are byte for byte the ones the libraries wrote into ../shared/fixtures."""
    assert _files(FIXTURES) == _files(SHARED_FIXTURES)
    for rel in _files(SHARED_FIXTURES):
        assert (FIXTURES / rel).read_bytes() == (SHARED_FIXTURES / rel).read_bytes(), f"tests/fixtures/{rel} differs"


@pytest.mark.parametrize("name,loader", [("bwconrad_vit_mnist", moe_prune.from_bwconrad),
                                         ("lucidrains_layer", moe_prune.from_lucidrains)])
def test_fixture_reproduces_library_output(name, loader):
    path, kwargs, x, y = fixture(name)
    model = loader(path, **kwargs)
    assert (run(model, x) - y).abs().max() <= 1e-4
    # also from a state dict in memory
    from safetensors.torch import load_file

    model = loader(load_file(path), **kwargs)
    assert (run(model, x) - y).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["bwconrad_vit_mnist", "lucidrains_layer"])
def test_convert_then_load_reproduces(name, tmp_path):
    path, kwargs, x, y = fixture(name)
    out = tmp_path / "native.safetensors"
    _, found = _convert_file(path, out, "auto", kwargs)
    assert found["library"].endswith(f"({name.split('_')[0]})")
    model = moe_prune.load(out)
    assert (run(model, x) - y).abs().max() <= 1e-4
    s = moe_prune.summary(out)
    assert s["moe_layers"][0]["router_experts"] == kwargs["num_experts"]


def test_convert_cli(tmp_path, capsys):
    from moe_prune.cli import main

    src = FIXTURES / "bwconrad_vit_mnist"
    out = tmp_path / "vit.safetensors"
    assert main(["convert", str(src / "model.safetensors"), "--kwargs", str(src / "config.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == f"converted {src / 'model.safetensors'} -> {out}"
    assert "from --kwargs: num_experts=16" in printed  # every argument the user gave is listed with its source
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [layer["name"] for layer in info["moe_layers"]] == ["blocks.2.mlp", "blocks.3.mlp"]
    assert info["parameters"] == 1199756


def test_bwconrad_kwargs_that_contradict_the_tensors():
    path, kwargs, _, _ = fixture("bwconrad_vit_mnist")
    with pytest.raises(CheckpointError, match="do not match"):
        moe_prune.from_bwconrad(path, **{**kwargs, "num_experts": 8})
    with pytest.raises(CheckpointError, match="missing"):
        moe_prune.from_bwconrad(path, **{**kwargs, "moe_layer_index": 1})
    with pytest.raises(ConfigError, match="unknown keyword"):
        moe_prune.from_bwconrad(path, **{**kwargs, "num_expert": 8})
    with pytest.raises(ConfigError, match="custom"):
        moe_prune.from_bwconrad(path, **kwargs, mlp_layer=torch.nn.Linear)


def test_lucidrains_kwargs_that_contradict_the_tensors():
    path, kwargs, _, _ = fixture("lucidrains_layer")
    with pytest.raises(CheckpointError):
        moe_prune.from_lucidrains(path, **{**kwargs, "num_experts": 4})
    with pytest.raises(CheckpointError):
        moe_prune.from_lucidrains(path, **{**kwargs, "geglu": True})
    with pytest.raises(ConfigError, match="at most one"):
        moe_prune.from_lucidrains(path, dim=64, num_experts=8, seq_len=64, num_slots=8)


def small_model():
    return MnistSoftMoE(MnistConfig(num_experts=4)).eval()


def test_native_round_trip_and_meta(tmp_path):
    model = small_model()
    path = moe_prune.save(model, tmp_path / "m.safetensors", meta={"test_accuracy": 0.5})
    loaded = moe_prune.load(path)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(run(model, x), run(loaded, x))
    assert loaded.checkpoint_meta == {"test_accuracy": 0.5}
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not left private like a temp file


# -- bad input: one clear CheckpointError naming the file, input untouched -------------------------------------


def _valid_file(tmp_path):
    return moe_prune.save(small_model(), tmp_path / "good.safetensors")


def _corrupt(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


BAD = {
    "missing": lambda t, good: t / "nope.safetensors",
    "folder": lambda t, good: t,
    "empty": lambda t, good: _corrupt(t, "empty.safetensors", b""),
    "truncated": lambda t, good: _corrupt(t, "trunc.safetensors", good.read_bytes()[: len(good.read_bytes()) // 2]),
    "truncated_header": lambda t, good: _corrupt(t, "th.safetensors", good.read_bytes()[:40]),
    "pickle": lambda t, good: _corrupt(t, "p.safetensors", pickle.dumps({"a": 1})),
    "zip": lambda t, good: _corrupt(t, "z.pt", b"PK\x03\x04" + b"\0" * 100),
    "text": lambda t, good: _corrupt(t, "t.safetensors", b"hello world, not a checkpoint at all"),
    "header_lies_offsets": lambda t, good: _corrupt(t, "o.safetensors", _header_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1600]}}, 16)),
    "header_huge": lambda t, good: _corrupt(t, "h.safetensors", struct.pack("<Q", 2**62) + b"{}"),
    "header_bad_json": lambda t, good: _corrupt(t, "j.safetensors", struct.pack("<Q", 5) + b"{abc}"),
    "not_native": lambda t, good: _plain(t),
}


def _header_file(header: dict, data_len: int) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"\0" * data_len


def _plain(t):
    p = t / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, p)
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_gives_one_clear_error(case, tmp_path, capsys):
    from moe_prune.cli import main

    good = _valid_file(tmp_path)
    path = BAD[case](tmp_path, good)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(CheckpointError) as e:
        moe_prune.load(path)
    assert str(path) in str(e.value)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-prune: error:") and "\n" not in err and "Traceback" not in err
    if before is not None:
        assert path.read_bytes() == before


def test_pickle_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="pickle"):
        moe_prune.load(p)
    assert not (tmp_path / "pwned").exists()


def _rewrite(tmp_path, mutate_state=None, mutate_record=None):
    from safetensors import safe_open

    good = _valid_file(tmp_path)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(meta["moe_prune"])
    if mutate_state:
        mutate_state(state)
    if mutate_record:
        mutate_record(record)
    p = tmp_path / "bad.safetensors"
    save_file(state, p, metadata={**meta, "moe_prune": json.dumps(record)})
    return p


@pytest.mark.parametrize(
    "state_change,record_change,match",
    [
        (lambda s: s.pop("head.weight"), None, "missing"),
        (lambda s: s.update(extra=torch.zeros(1)), None, "unexpected"),
        (lambda s: s.update({"head.weight": torch.zeros(10, 5)}), None, "shape"),
        (None, lambda r: r["spec"]["moe"]["moe"].update(num_experts=8), "shape"),
        (None, lambda r: r["spec"]["config"].update(num_experts=4, hidden=-1), "invalid"),
        (None, lambda r: r["spec"].update(family="resnet"), "invalid"),
        (None, lambda r: r.update(format_version=99), "version"),
        (lambda s: s["head.weight"].__setitem__((0, 0), float("nan")), None, "NaN"),
        (None, lambda r: r["spec"]["moe"]["moe"].update(held=[2, 1]), "invalid"),
    ],
)
def test_config_contradicting_tensors(tmp_path, state_change, record_change, match):
    p = _rewrite(tmp_path, state_change, record_change)
    with pytest.raises(CheckpointError, match=match):
        moe_prune.load(p)


def test_save_refuses_to_overwrite_its_input(tmp_path):
    good = _valid_file(tmp_path)
    before = good.read_bytes()
    with pytest.raises(OutputError, match="input"):
        moe_prune.save(small_model(), good, inputs=(good,))
    assert good.read_bytes() == before
    with pytest.raises(OutputError, match="does not exist"):
        moe_prune.save(small_model(), tmp_path / "no" / "such" / "dir.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["good.safetensors"]


def test_half_precision_and_mixed_checkpoints_load_as_float32(tmp_path):
    from safetensors import safe_open

    good = _valid_file(tmp_path)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v.half() if i % 2 else v.bfloat16() for i, (k, v) in enumerate(state.items())}
    save_file(state, tmp_path / "half.safetensors", metadata=meta)
    model = moe_prune.load(tmp_path / "half.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.isfinite(run(model, torch.rand(2, 1, 28, 28))).all()


def test_format_version_1_files_read_present_as_held(tmp_path):
    """Version 1 named a compressed drop layer's held experts `present`; such files load as they did."""
    from safetensors import safe_open

    from moe_prune.compression.compress import compress_model

    small = compress_model(small_model(), {"moe": torch.tensor([0, 2])})
    new = moe_prune.save(small, tmp_path / "v2.safetensors")
    with safe_open(str(new), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(meta["moe_prune"])
    assert record["format_version"] == 2 and record["spec"]["moe"]["moe"]["held"] == [0, 2]
    layer = record["spec"]["moe"]["moe"]
    layer["present"] = layer.pop("held")
    record["format_version"] = 1
    old = tmp_path / "v1.safetensors"
    save_file(state, old, metadata={**meta, "moe_prune": json.dumps(record)})
    loaded = moe_prune.load(old)
    assert loaded.moe.config.held == (0, 2) and loaded.moe.config == small.moe.config
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    row = moe_prune.summary(old)["moe_layers"][0]  # summary reads the old name too
    assert row["experts_held"] == 2 and row["kept_original_ids"] == [0, 2]
    layer["held"] = [0, 2]  # both names: refused
    save_file(state, old, metadata={**meta, "moe_prune": json.dumps(record)})
    with pytest.raises(CheckpointError, match="present"):
        moe_prune.load(old)
