"""The latency guard's cost model: each layer timed alone ("region"), once per machine, cached.

A region is one quantizable layer of the prepared float model (Conv/Gemm/MatMul with its weight and
bias, the ReLU/Clip the int8 form absorbs, or an attention activation x activation MatMul), cut
out as a model of its own whose inputs are the layer's real activations (one run of the float
model on a held-out batch).  Its int8 form is the same layer through quantize's own Q/DQ pass with
the calibrated ranges: a QuantizeLinear on every activation input and a DequantizeLinear on the
output, which ORT fuses as it does in the whole model (QLinearConv, MatMulIntegerToFloat, ...).
Both forms run interleaved in pairs on the target EP until the median time ratio is known to
``PRECISION`` (``bench.paired``), so a region costs two small sessions and tens of paired runs.

The int8 region is a *pessimistic* estimate of the layer inside the int8 model: alone it pays for
quantizing its input and dequantizing its output, which inside a chain of int8 layers are shared or
fused away.  So a kind (or a layer) that its regions say is clearly faster in int8 is faster in
the model, and a kind whose float time is below the guard's margin cannot pay it whatever int8
costs; :func:`onnxopt.quantization.static.guard` decides those cases without whole-model measurements and
measures the rest as before.

Timings are cached in ``$ONNXOPT_CACHE_DIR/regions.json`` (default
``$XDG_CACHE_HOME/onnxopt`` or ``~/.cache/onnxopt``; ``ONNXOPT_CACHE_DIR=off`` disables it), keyed
by the machine (CPU model, SIMD flags, ONNX Runtime version), the EP, the thread count and the
region's signature (op, attributes, weight and input shapes, absorbed activation, whether the
output is a graph output, weight bits, per-channel, activation type): the per-op int8 gains are
measured once per machine, and a second
run on the same model (or another model with the same layer shapes) measures nothing.  The file
is replaced atomically; concurrent writers at worst measure a region twice.

A layer whose region cannot be cut out or run (ORT refuses it alone, its input shape is unknown)
is estimated from its MACs (``onnxopt.flops``, as ``inspect --cost`` counts them) at the ms per
MAC its kind's timed regions showed on this machine, and marked ``estimated``.

Cost: one session with every layer input as an extra output, one run of it per CHUNK layers (only
their inputs fetched), then per region not in the cache two session creations and at least
``MIN_BLOCKS`` x ``PAIRS``, at most ``MAX_BLOCKS`` x ``PAIRS`` paired runs of one layer (the
``REGION_SECONDS`` deadline is checked after each block past the minimum): milliseconds for a small
layer, seconds for a large one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import benchmark as bench
from onnxopt import flops as cost
from onnxopt import runtime
from onnxopt.base import name_of, node_name
from onnxopt.quantization import qdq as qq

logger = logging.getLogger("onnxopt")

CACHE_ENV = "ONNXOPT_CACHE_DIR"
CACHE_FORMAT = "onnxopt-regions/2"
#: paired runs per block, blocks at least / at most, and the relative width of the median ratio's
#: interval at which a region's timing is precise enough
PAIRS, MIN_BLOCKS, MAX_BLOCKS, PRECISION = 8, 2, 12, 0.08
#: seconds at most per region
REGION_SECONDS = 2.0
#: layers whose input activations are read per float run (bounds the activations held at once)
CHUNK = 16


@dataclasses.dataclass
class Region:
    """One layer timed alone: median ms in float and in int8 (Q/DQ at its boundary), the median of
    the paired int8/float ratios and its ~95% interval; ``cached``: read from the cache file."""

    float_ms: float
    int8_ms: float
    ratio: float
    interval: tuple[float, float]
    pairs: int
    cached: bool = False
    #: not timed (its region could not be cut out or run): times from its MACs at the measured
    #: ms-per-MAC of the timed regions of its kind (:meth:`Regions.timings`)
    estimated: bool = False

    @property
    def saving_ms(self) -> float:
        """Float minus int8 time (negative: the int8 region is slower)."""
        return self.float_ms - self.int8_ms

    def to_dict(self) -> dict:
        return {"float_ms": self.float_ms, "int8_ms": self.int8_ms, "ratio": self.ratio,
                "interval": list(self.interval), "pairs": self.pairs}


def cache_path() -> Path | None:
    """The region cache file, or None when ``ONNXOPT_CACHE_DIR`` is ``off`` (or empty)."""
    where = os.environ.get(CACHE_ENV)
    if where is not None:
        return None if where.strip().lower() in ("", "off", "0", "none") else Path(where) / "regions.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxopt" / "regions.json"


_ENTRY: dict[str, type | tuple[type, ...]] = {"float_ms": (int, float), "int8_ms": (int, float), "ratio": (int, float),
                                               "interval": list, "pairs": int}


def _valid(entry) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in _ENTRY.items()) \
        and len(entry["interval"]) == 2 and entry["float_ms"] > 0 and entry["int8_ms"] > 0


def _load_cache(path: Path | None) -> dict:
    """The cache's entries; a missing, unreadable or foreign file, or a malformed entry, is a miss."""
    if path is None:
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    regions = d.get("regions") if isinstance(d, dict) and d.get("format") == CACHE_FORMAT else None
    return {k: v for k, v in regions.items() if _valid(v)} if isinstance(regions, dict) else {}


def _save_cache(path: Path | None, new: Mapping[str, dict]) -> None:
    """Merge ``new`` into the cache file (read again first: another process may have written)."""
    if path is None or not new:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_load_cache(path), **new}
        fd, tmp = tempfile.mkstemp(prefix=".regions-", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only home is not an error: the timings are simply not kept
        logger.info("region cache %s not written (%s)", path, e.strerror or e)
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, "regions": entries}, f)
        os.replace(tmp, path)
    except OSError as e:
        logger.info("region cache %s not written (%s)", path, e.strerror or e)
        Path(tmp).unlink(missing_ok=True)


def machine_key(ep: str, threads: int | None) -> str:
    info = bench.machine()
    return f"{info['cpu']}|{' '.join(info['simd'])}|ort {info['onnxruntime']}|{ep}|threads {threads}"


class Regions:
    """Region timings of a prepared float model's layers (see the module docstring)."""

    def __init__(self, model: ir.Model, float_bytes: bytes, feeds: Mapping[str, np.ndarray],
                 ranges: Mapping[str, tuple[float, float]], profile: qq.Profile, per_channel: bool, qmax: int,
                 ep: str, threads: int | None):
        self.model, self.float_bytes, self.feeds, self.ranges = model, float_bytes, feeds, ranges
        self.profile, self.per_channel, self.qmax, self.ep, self.threads = profile, per_channel, qmax, ep, threads
        self.path = cache_path()
        self.machine = machine_key(ep, threads)
        self.measured = 0  # regions timed by this object (not read from the cache)
        self._acts_session: Any = None  # the float model with every layer input as an output (timings)

    def timings(self, kinds: Mapping[str, str]) -> dict[str, Region]:
        """Layer name -> its Region, for the layers of ``kinds`` (name -> layer kind).  A layer
        whose region cannot be cut out or run gets times estimated from its MACs (``inspect
        --cost``'s count) at the median ms per MAC of its kind's timed regions; without such
        regions (or MACs) it is left out, and the guard measures it in the whole model."""
        nodes = {n.name: n for n in self.model.graph}
        layers = [nodes[n] for n in kinds if n in nodes]
        if not layers:
            return {}
        cache = _load_cache(self.path)
        new: dict[str, dict] = {}
        out: dict[str, Region] = {}
        acts: dict[str, np.ndarray] = {}
        every = sorted({name_of(v) for n in layers for v in _activations(n)})
        self._acts_session = None
        for i, node in enumerate(layers):
            if i % CHUNK == 0:  # the next CHUNK layers' inputs, one run (memory: CHUNK layers' activations)
                acts = self._activations(sorted({name_of(v) for n in layers[i:i + CHUNK] for v in _activations(n)}), every)
            if any(v.name not in acts for v in _activations(node)):
                continue
            feeds = {name_of(v): acts[name_of(v)] for v in _activations(node)}
            key = self._key(node, feeds)
            hit = cache.get(key) or new.get(key)
            if hit is not None:
                out[node_name(node)] = Region(hit["float_ms"], hit["int8_ms"], hit["ratio"], tuple(hit["interval"]),
                                        hit["pairs"], cached=key in cache)
                continue
            region = self._measure(node, feeds)
            if region is not None:
                out[node_name(node)] = region
                new[key] = region.to_dict()
        self._acts_session = None
        _save_cache(self.path, new)
        if len(out) < len(layers):
            out.update(self._estimate([n for n in layers if n.name not in out], out, kinds))
        return out

    def _estimate(self, missing: list[ir.Node], timed: Mapping[str, Region], kinds: Mapping[str, str]) -> dict[str, Region]:
        """Regions for ``missing`` layers from MACs (see :meth:`timings`)."""
        try:
            macs = {n.name: n.macs for n in cost.estimate(self.model, {k: tuple(v.shape) for k, v in self.feeds.items()}).nodes}
        except Exception as e:  # noqa: BLE001 - without MACs the layers are simply measured in the model
            logger.debug("MACs unavailable for the cost model: %s", e)
            return {}
        out = {}
        for node in missing:
            name = node_name(node)  # layers are looked up by name: they have one
            kind = kinds[name]
            rates = [(r.float_ms / macs[n], r.int8_ms / macs[n]) for n, r in timed.items()
                     if kinds.get(n) == kind and not r.estimated and macs.get(n)]
            if not rates or not macs.get(name):
                continue
            f = float(np.median([a for a, _ in rates])) * macs[name]
            q8 = float(np.median([b for _, b in rates])) * macs[name]
            out[name] = Region(f, q8, q8 / f, (q8 / f, q8 / f), 0, estimated=True)
        return out

    # ---------------------------------------------------------------- internals
    def _activations(self, names: list[str], every: list[str]) -> dict[str, np.ndarray]:
        """The float inputs ``names`` on the held-out batch: one run of a session (made once) that
        has ``every`` layer input as an extra output, fetching only ``names``."""
        if not names:
            return {}
        graph_inputs = {v.name for v in self.model.graph.inputs}
        extra = [n for n in names if n not in graph_inputs]
        if self._acts_session is None:
            outputs = [n for n in every if n not in graph_inputs]
            self._acts_session = runtime.session(runtime.with_outputs(onnx.load_from_string(self.float_bytes), outputs),
                                                 "cpu", self.threads, optimize=False)
        sess = self._acts_session
        feeds = {k: v for k, v in self.feeds.items() if k in {i.name for i in sess.get_inputs()}}
        acts = dict(zip(extra, sess.run(extra, feeds))) if extra else {}
        acts.update({k: v for k, v in self.feeds.items() if k in names})
        return {k: v for k, v in acts.items() if isinstance(v, np.ndarray) and v.dtype == np.float32}

    def _key(self, node: ir.Node, feeds: Mapping[str, np.ndarray]) -> str:
        act = qq.absorbable(node.outputs[0], self.profile)
        weights = [(tuple(v.const_value.shape.numpy()) if v is not None and v.const_value is not None else None)
                   for v in node.inputs]
        attrs = sorted((k, str(a.value)) for k, a in node.attributes.items())
        act_sig = None if act is None else (act.op_type, qq.clip_bound(act, 2, "max") if act.op_type == "Clip" else None)
        # a layer feeding a graph output keeps a float output (no output Q/DQ: ORT cannot fuse its int8
        # kernel), an interior one gets one: two different regions
        text = repr((node.domain, node.op_type, attrs, weights, [tuple(a.shape) for a in feeds.values()], act_sig,
                     node.outputs[0].is_graph_output(), self.per_channel, self.qmax, self.profile.activation,
                     self.profile.name))
        return self.machine + "|" + hashlib.sha1(text.encode()).hexdigest()

    def _region_model(self, node: ir.Node, feeds: Mapping[str, np.ndarray]) -> ir.Model | None:
        """The layer alone (and the activation its int8 form absorbs), then an Identity so its
        output is not a graph output (quantize puts a Q/DQ on it, as inside the model) unless it is
        one in the model."""
        act = qq.absorbable(node.outputs[0], self.profile)
        inputs = [ir.Value(name=k, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(a.shape)) for k, a in feeds.items()]
        by_name = {v.name: v for v in inputs}
        graph = ir.Graph(inputs, [], nodes=[], opset_imports=dict(self.model.opset_imports), name="region")

        def copy_input(v: ir.Value | None) -> ir.Value | None:
            if v is None:
                return None
            if v.name in by_name:
                return by_name[v.name]
            if v.const_value is None:
                raise KeyError(v.name)
            c = ir.Value(name=v.name, type=v.type, shape=v.shape, const_value=v.const_value)
            graph.register_initializer(c)
            by_name[v.name] = c
            return c

        try:
            layer = ir.Node(node.domain, node.op_type, [copy_input(v) for v in node.inputs],
                            attributes=list(node.attributes.values()), name=node.name, num_outputs=1)
        except KeyError:
            return None
        layer.outputs[0].name, layer.outputs[0].type = node.outputs[0].name, ir.TensorType(ir.DataType.FLOAT)
        graph.append(layer)
        last = layer.outputs[0]
        if act is not None:
            try:
                extra = [last] + [copy_input(v) for v in act.inputs[1:]]
            except KeyError:
                return None
            a = ir.Node(act.domain, act.op_type, extra, attributes=list(act.attributes.values()), name=act.name)
            a.outputs[0].name, a.outputs[0].type = act.outputs[0].name, ir.TensorType(ir.DataType.FLOAT)
            graph.append(a)
            last = a.outputs[0]
        if node.outputs[0].is_graph_output():  # stays float in the model too (no Q/DQ on a graph output)
            graph.outputs.append(last)
        else:
            ident = ir.Node("", "Identity", [last], name="region_output")
            ident.outputs[0].name, ident.outputs[0].type = "region_output", ir.TensorType(ir.DataType.FLOAT)
            graph.append(ident)
            graph.outputs.append(ident.outputs[0])
        return ir.Model(graph, ir_version=self.model.ir_version)

    def _measure(self, node: ir.Node, feeds: Mapping[str, np.ndarray]) -> Region | None:
        try:
            region = self._region_model(node, feeds)
            if region is None:
                return None
            float_bytes = ir.to_proto(region).SerializeToString()
            the_plan = qq.plan(region, self.profile)
            if node.name not in the_plan.targets or any(s not in self.ranges for s in the_plan.stats_names()):
                return None
            qq.QuantizeQDQ(the_plan, dict(self.ranges), self.profile, self.per_channel, self.qmax)(region)
            int8_bytes = ir.to_proto(region).SerializeToString()
            sessions = [runtime.session(m, self.ep, self.threads) for m in (int8_bytes, float_bytes)]
            for sess in sessions:
                for _ in range(3):
                    sess.run(None, dict(feeds))
            c = bench.paired((sessions[0], dict(feeds)), (sessions[1], dict(feeds)), threshold=1.0, pairs_per_block=PAIRS,
                             min_blocks=MIN_BLOCKS, max_blocks=MAX_BLOCKS, seconds=REGION_SECONDS, precision=PRECISION)
        except Exception as e:  # noqa: BLE001 - a region ORT refuses (or fails to run) is measured in the whole model
            logger.debug("region of %s not timed: %s", node.name, e)
            return None
        self.measured += 1
        return Region(c["b_ms"], c["a_ms"], c["ratio"], (c["interval"][0], c["interval"][1]), c["pairs"])


def _activations(node: ir.Node) -> list[ir.Value]:
    """The layer's float inputs that are not constants (its activations)."""
    return [v for v in node.inputs if v is not None and v.const_value is None]
