"""The README's Python runs as written: every ```python block is executed in a fresh namespace, in a temporary
folder, on one torch thread, so a snippet that breaks fails the suite. A block that cannot run here (it needs the
reader's own model class or files) says so in the README, by its fence (```python no-test) and a reason in an HTML
comment on the line before (<!-- no-test: why -->); it is still compiled, and the counts below make sure no block
stops running without this file being changed too. The Use section's block is also run on each model family
moe-prune loads, to hold the README to its word that the same code works on every one."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import moe_prune as mp
from conftest import FIXTURES

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
# The README's blocks that run as written, and those marked no-test. Raise RUNNABLE when you add a block; a block
# marked no-test on purpose changes both numbers here, so it is seen in review.
RUNNABLE = 1
NO_TEST = 1
PYTHON = {"python", "py", "python3"}
NO_TEST_REASON = re.compile(r"^<!-- no-test: (.+) -->$")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    section: str  # the "## " heading it sits under
    no_test: bool
    reason: str | None  # from the <!-- no-test: ... --> comment right before the fence
    code: str

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def python_blocks(text: str) -> list[Block]:
    """Every fenced block whose info string starts with a Python language name, in order."""
    blocks, lines, section = [], text.split("\n"), ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.startswith("```"):
            i += 1
            continue
        info = line[3:].split()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if info and info[0] in PYTHON:
            before = NO_TEST_REASON.match(lines[i - 1].strip()) if i else None
            blocks.append(Block(i + 1, section, "no-test" in info[1:], before.group(1) if before else None,
                                "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
RUNS = [b for b in BLOCKS if not b.no_test]


def run(code: str, where: str, names: dict | None = None) -> dict:
    namespace = {"__name__": "__readme__", **(names or {})}
    exec(compile(code, where, "exec"), namespace)
    return namespace


def test_every_python_block_is_counted_and_every_skip_is_marked():
    skipped = [b for b in BLOCKS if b.no_test]
    assert len(RUNS) >= RUNNABLE, f"README blocks that run: {[b.where for b in RUNS]}, expected {RUNNABLE}"
    assert len(skipped) <= NO_TEST, f"README blocks marked no-test: {[b.where for b in skipped]}, expected {NO_TEST}"
    for b in skipped:
        assert b.reason, f"{b.where}: a no-test block needs <!-- no-test: why --> on the line before its fence"
    for b in RUNS:
        assert b.reason is None, f"{b.where}: a no-test comment over a block that runs; mark its fence or drop it"
    for b in BLOCKS:
        compile(b.code, b.where, "exec")  # the blocks that cannot run are at least Python


@pytest.mark.parametrize("block", RUNS, ids=[b.where for b in RUNS])
def test_readme_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes lands here
    run(block.code, block.where)


def use_block() -> Block:
    found = [b for b in RUNS if b.section == "Use" and "mp.compress(" in b.code]
    assert len(found) == 1, f"README: one runnable block under ## Use calls mp.compress(; found {[b.where for b in found]}"
    return found[0]


def native_vit(folder: Path) -> Path:
    # RGB at 32x32: the bundled 28x28 gray sample reaches it through the model's own preprocessing
    torch.manual_seed(0)
    vit = mp.SoftMoEViT(mp.ViTConfig(num_experts=16, moe_layer_index=(1,), img_size=32, patch_size=8, in_chans=3,
                                     num_classes=10, embed_dim=32, depth=2, num_heads=2)).eval()
    return mp.save(vit, folder / "vit.safetensors")


FAMILIES = {
    "native-vit": native_vit,
    # the soft-moe ViT fixture as its library saved it (tests/fixtures/README.md), read directly
    "soft-moe-vit-file": lambda folder: mp.CheckpointFile(FIXTURES / "bwconrad_vit_mnist" / "model.safetensors",
                                                          kwargs={"num_heads": 4, "global_pool": "token"}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_use_block_runs_on_every_family(family, tmp_path, monkeypatch):
    block = use_block()
    specific = re.findall(r"\.(?:moe|tokens|blocks)\b", block.code)  # attributes of one family (mp.moe_layers is fine)
    assert not specific, f"{block.where}: {specific} exist on one model family only"
    load = "mp.load(default_checkpoint())"
    assert block.code.count(load) == 1, f"{block.where}: the Use block no longer loads by {load}; update this test"
    checkpoint = FAMILIES[family](tmp_path)
    monkeypatch.chdir(tmp_path)
    ns = run(block.code.replace(load, "mp.load(CHECKPOINT)"), f"{block.where} ({family})", {"CHECKPOINT": checkpoint})

    model, small, record = ns["model"], ns["small"], ns["record"]
    layers = mp.moe_layers(model)
    assert record["kept_experts"].keys() == layers.keys()
    for name, layer in layers.items():
        assert len(record["kept_experts"][name]) == math.ceil(layer.config.num_experts / 8)
    assert ns["report"].passed and ns["path"].is_file() and (tmp_path / "fast.onnx").is_file()
    x = ns["calib"][0][:4]
    with torch.no_grad():  # what was saved is the model compress returned
        torch.testing.assert_close(mp.load(tmp_path / "small.safetensors")(x), small(x), rtol=0, atol=0)


def github_anchor(heading: str) -> str:
    # GitHub's slug: lower case, punctuation dropped, spaces to hyphens
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_point_to_its_headings():
    text = README.read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # headings and links outside code blocks
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert [link for link in links if link not in anchors] == []
