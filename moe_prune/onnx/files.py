"""ONNX files on disk: writing a model (one file, or NAME.onnx + NAME.onnx.data), reading what a file holds.

A model whose weights are below `embed_limit_bytes` is one self-contained file. A larger one is NAME.onnx plus
NAME.onnx.data beside it (the protobuf format cannot hold more than 2 GiB); the model records the data file by its
bare name, so the two travel together. Both are written completely to temporary files in the destination folder,
then renamed into place, the data file first: the new model is never visible without its data (only in the
instant between the two renames can an old model meet the new data file).

    write_onnx(proto, out, limit)        atomically, externalizing tensors of >= 1 KiB above the limit
    check_external_data(path)            refuses data outside the model's folder (before anything reads it)
    op_histogram(path)                   operator counts, subgraphs and local functions included
    graphs / nodes / tensors(proto)      the walkers the three use
    set_preprocess / read_preprocess     the model's input preprocessing, recorded in its metadata_props

The preprocessing record: metadata_props["moe_prune.preprocess"] is JSON, `Preprocess.to_dict()` plus "in_graph"
(true: the graph takes uint8 [B, H, W, C] and does / 255, NHWC -> NCHW and mean/std itself; false: the caller feeds
float [B, C, H, W] already normalized). Consumers without torch or onnx read it with ONNX Runtime:
`session.get_modelmeta().custom_metadata_map`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from ..errors import ExportError, first_line
from ..core.files import atomic_output

# Below this many bytes of weights the model is embedded in one .onnx file. The protobuf limit is 2 GiB for the
# whole message; the headroom is for the graph itself.
EMBED_LIMIT_BYTES = 1_500_000_000
_PROTOBUF_LIMIT = 2**31 - 1
_GRAPH_HEADROOM = 64 << 20
MAX_EMBED_LIMIT_BYTES = _PROTOBUF_LIMIT - _GRAPH_HEADROOM  # the largest limit a caller may choose
# Tensors smaller than this stay inside the .onnx file even when the weights go to NAME.onnx.data (onnx's own
# default threshold); larger ones are aligned so ONNX Runtime can memory-map them.
_EXTERNAL_MIN_BYTES = 1024
_EXTERNAL_ALIGN = 4096


# -- walking a model -----------------------------------------------------------------------------------------


def graphs(proto):
    """Every graph of a model: the main graph and the subgraphs in node attributes, recursively."""
    stack = [proto.graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for a in node.attribute:
                stack.extend([a.g] if a.HasField("g") else [])
                stack.extend(a.graphs)


def nodes(proto):
    """Every node of a model: in all its graphs and in its local functions (whose subgraphs are rare enough)."""
    for g in graphs(proto):
        yield from g.node
    for fn in proto.functions:
        yield from fn.node


def tensors(proto) -> list:
    """Every TensorProto of a model: initializers, sparse initializers, and Constant/attribute tensors, also in
    subgraphs and local functions."""
    found = []
    for g in graphs(proto):
        found.extend(g.initializer)
        for sparse in g.sparse_initializer:
            found.extend((sparse.values, sparse.indices))
    for node in nodes(proto):
        for a in node.attribute:
            if a.HasField("t"):
                found.append(a.t)
            found.extend(a.tensors)
    return found


# -- the preprocessing record ---------------------------------------------------------------------------------

PREPROCESS_KEY = "moe_prune.preprocess"


def set_preprocess(proto, preprocess, in_graph: bool) -> None:
    """Record a model's input preprocessing in its metadata_props (replacing an earlier record).

    Args:
        proto: the onnx.ModelProto, changed in place.
        preprocess: a `preprocess.Preprocess`.
        in_graph: whether the graph applies / 255 and mean/std itself (its input is uint8 [B, H, W, C]).

    Example:
        >>> set_preprocess(proto, Preprocess(size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD), True)
    """
    kept = [p for p in proto.metadata_props if p.key != PREPROCESS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = PREPROCESS_KEY, json.dumps({**preprocess.to_dict(), "in_graph": bool(in_graph)})


def read_preprocess(metadata: dict, where: str | os.PathLike = "the model"):
    """The preprocessing recorded by `set_preprocess`, from a model's metadata map.

    Args:
        metadata: {key: value} of the model's metadata_props (ONNX Runtime:
            `session.get_modelmeta().custom_metadata_map`; onnx: {p.key: p.value for p in proto.metadata_props}).
        where: the file, for the error message.

    Returns:
        (Preprocess, in_graph), or (None, False) when nothing is recorded (a token model, or a file exported
        before the record existed).

    Raises:
        ExportError: the record is not valid JSON or not a valid preprocessing.

    Example:
        >>> read_preprocess(ort.InferenceSession("m.onnx").get_modelmeta().custom_metadata_map)
        (Preprocess(size=(16, 16), channels=3, ...), True)
    """
    from ..errors import MoePruneError
    from ..core.preprocess import Preprocess

    text = metadata.get(PREPROCESS_KEY)
    if text is None:
        return None, False
    try:
        record = json.loads(text)
        in_graph = record.pop("in_graph")
        if not isinstance(in_graph, bool):
            raise ValueError(f"in_graph is {in_graph!r}, not true or false")
        return Preprocess.from_dict(record), in_graph
    except (ValueError, KeyError, TypeError, AttributeError, MoePruneError) as e:
        raise ExportError(f"{where}: its {PREPROCESS_KEY} record is broken ({first_line(e)}); re-export the model "
                          "with moe-prune export") from None


# -- writing -------------------------------------------------------------------------------------------------


def strip_debug_info(proto) -> None:
    """Drop per-node debug records: the dynamo exporter stores Python stack traces there, with this checkout's
    absolute paths and FX codegen counters (`<eval_with_key>.80`) that change from one export to the next; without
    them two exports of one model are byte-identical."""
    for node in nodes(proto):
        node.ClearField("doc_string")
        del node.metadata_props[:]


def write_onnx(proto, out: Path, embed_limit_bytes: int) -> None:
    """Write `proto` as one file, or as out + out.data when its weights exceed the limit; atomically.

    Args:
        proto: the onnx.ModelProto (its tensors are moved out of it when they go to out.data).
        out: the .onnx path (checked by the caller with files.check_output).
        embed_limit_bytes: weights up to this size stay inside the .onnx file.

    Raises:
        OutputError: a file cannot be written (nothing is changed then).

    Example:
        >>> write_onnx(onnx.load("big.onnx"), Path("copy.onnx"), EMBED_LIMIT_BYTES)
    """
    weights = sum(len(t.raw_data) for t in tensors(proto))
    if weights <= embed_limit_bytes:
        with atomic_output(out, suffix=".onnx") as tmp:
            tmp.write_bytes(proto.SerializeToString())
        return
    data = out.with_name(out.name + ".data")
    # Nested: both temporary files are complete before either rename; the inner (data) rename runs first.
    with atomic_output(out, suffix=".onnx") as tmp_model, atomic_output(data, suffix=".data") as tmp_data:
        _externalize(proto, tmp_data, data.name)
        tmp_model.write_bytes(proto.SerializeToString())


def _externalize(proto, data_path: Path, location: str) -> None:
    """Move every tensor of >= 1 KiB into `data_path`, recording the bare file name `location`."""
    from onnx import TensorProto

    offset = 0
    with open(data_path, "wb") as f:
        for t in tensors(proto):
            if len(t.raw_data) < _EXTERNAL_MIN_BYTES:
                continue
            pad = -offset % _EXTERNAL_ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(t.raw_data)
            length = len(t.raw_data)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = TensorProto.EXTERNAL
            t.ClearField("raw_data")
            offset += length


# -- checks --------------------------------------------------------------------------------------------------


def check_external_data(path: str | os.PathLike) -> list[str]:
    """Refuse an ONNX model whose external data lies outside its folder; list the data files it uses.

    Reads only the model's protobuf (no tensor data), so it is safe on files from anywhere.

    Args:
        path: an .onnx file.

    Returns:
        The external data files it names, relative to its folder (empty for a self-contained model).

    Raises:
        ExportError: the file is missing or not an ONNX model; an external-data location is absolute, goes
            up with '..', or resolves (through a link) outside the model's folder; or a data file is missing.

    Example:
        >>> check_external_data("model.onnx")
        ['model.onnx.data']
        >>> check_external_data("evil.onnx")  # location "../../etc/passwd" -> ExportError
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: no such file" if not p.exists() else f"{p}: is not a file; give the .onnx file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{p}: not an ONNX model (it does not parse as an ONNX protobuf: {first_line(e)})") from e
    if not proto.HasField("graph") or not proto.opset_import or proto.ir_version <= 0:
        raise ExportError(f"{p}: not an ONNX model (no graph, opset or IR version in it)")
    folder = p.resolve().parent
    files = []
    for t in tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        where = f"{p}: tensor {t.name!r} keeps its data in {loc!r}"
        parts = loc.replace("\\", "/").split("/")
        drive = len(loc) > 1 and loc[1] == ":" and loc[0].isalpha()  # C:\\... or C:..., absolute on Windows
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or drive or ".." in parts:
            raise ExportError(f"{where}, outside the model's folder; refusing to load it (re-export the model, "
                              "or move the data beside it and record its bare file name)")
        target = (folder / loc).resolve()
        if folder not in target.parents:
            raise ExportError(f"{where}, which resolves outside the model's folder ({target}); refusing to load it")
        if not target.is_file():
            raise ExportError(f"{where}, which is missing; copy {loc} beside the model (they travel together)")
        if loc not in files:
            files.append(loc)
    return files


def op_histogram(path_or_proto) -> dict[str, int]:
    """Count the operators of an ONNX graph (subgraphs and local functions included), most frequent first.

    Example:
        >>> op_histogram("model.onnx")
        {'MatMul': 6, 'Softmax': 3, ...}
    """
    import onnx

    proto = path_or_proto
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(path_or_proto), load_external_data=False)
    ops = Counter(node.op_type for node in nodes(proto))
    return dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
