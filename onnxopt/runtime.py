"""ONNX Runtime sessions, execution-provider names, and the inputs we feed them.

Inputs are either user data (``--data file.npz``, arrays by input name) or synthesized from the
model's declared types: ``--shape name:1x3x224x224`` fixes dims, a symbolic dim without one
becomes 1 (with a warning; when the model does not run so, :func:`run_synthesized` searches image sizes, signal
lengths and small sizes), floats are standard-normal, integers lie in [0, 4) so that they are
safe as indices or sizes, or in [0, n) when the input indexes a table of n rows
(:func:`index_bounds`: a token-type id into a 2-row table), booleans are random, and inputs whose name contains "mask" are padding
masks (1 then trailing 0, at least one 1 per row) as attention masks are.  The seed is fixed so runs are reproducible.
Synthesized inputs are capped at MAX_SYNTHESIZED_BYTES (1 GiB) per input and in total: a model
declaring a dim of 1e9 is refused with one line naming the input (give --data, or --shape for
symbolic dims) instead of failing in the allocator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import io
from onnxopt.base import light_proto, name_of
from onnxopt.errors import BadInputError, UsageError

logger = logging.getLogger(__name__)

EP_NAMES = {
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

#: Options we pass per EP (small on purpose; documented in README "Execution providers").
EP_OPTIONS = {
    "OpenVINOExecutionProvider": {"device_type": "CPU"},
    "TensorrtExecutionProvider": {"trt_fp16_enable": "False", "trt_engine_cache_enable": "False"},
    "CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"},
}

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32,
    "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


def parse_eps(text: str | None) -> tuple[str, ...]:
    """``--ep cpu,openvino`` -> ("cpu", "openvino"), each checked to be available."""
    eps = tuple(e.strip().lower() for e in (text or "cpu").split(",") if e.strip()) or ("cpu",)
    for ep in eps:
        provider(ep)
    return eps


def provider(ep: str) -> str:
    """Map a short EP name (cpu, openvino, ...) to the ORT provider, or fail listing those available."""
    name = EP_NAMES.get(ep.lower(), ep)
    available = ort.get_available_providers()
    if name not in available:
        short = [k for k, v in EP_NAMES.items() if v in available]
        raise UsageError(f"execution provider '{ep}' is not available here; available: {', '.join(short)}")
    return name


class Light(NamedTuple):
    """A model serialized without its large initializers (``base.light_proto``), and those
    initializers as arrays: :func:`session` hands them to ORT in memory
    (``add_external_initializers``), so the weights are neither copied into protobuf nor parsed
    back (about 3x faster to serialize for a 20 MB model).  ORT copies them into the graph before
    it optimizes, so the session is the same as from the whole model."""

    data: bytes
    initializers: dict[str, np.ndarray]


#: what a session is made from: serialized bytes, a :class:`Light`, or a model file's path
Source = bytes | Light | str


def light(model: ir.Model) -> Light:
    """:class:`Light` of ``model`` (the arrays are the model's own, not copies)."""
    proto, left = light_proto(model)
    return Light(proto.SerializeToString(), {name: t.numpy() for name, t in left.items()})


#: weights above this are handed to ORT as a weightless model plus the arrays (:class:`Light`), not
#: as one serialized protobuf: a protobuf holds at most 2 GB, and the bytes would be a second copy
LIGHT_ABOVE = 1 << 30


def source_of(model: ir.Model) -> bytes | Light:
    """What ORT sessions of ``model`` are made from: its serialized bytes, or for weights over
    LIGHT_ABOVE, or with any weight still in an external-data file (bytes would reference it relative to
    the working folder), a :class:`Light` (the weights stay the model's own arrays, memory-mapped
    when they come from external data)."""
    if io.weight_bytes(model) > LIGHT_ABOVE or next(io.external_tensors(model), None) is not None:
        return light(model)
    return ir.to_proto(model).SerializeToString()


#: EPs with a thread pool of their own, bound through a provider option (the CPU EP's is intra_op_num_threads)
THREAD_OPTIONS = {"OpenVINOExecutionProvider": "num_of_threads"}


def providers(name: str, threads: int | None) -> list[tuple[str, dict[str, str]]]:
    """The ``providers`` list for a session on the EP ``name`` (full or short name, availability not
    checked): its :data:`EP_OPTIONS`, the thread cap for EPs in :data:`THREAD_OPTIONS`, and the CPU EP
    as fallback for the nodes a non-CPU EP does not take."""
    name = EP_NAMES.get(name.lower(), name)
    options = dict(EP_OPTIONS.get(name, {}))
    if threads and name in THREAD_OPTIONS:
        options[THREAD_OPTIONS[name]] = str(threads)
    found = [(name, options)]
    if name != "CPUExecutionProvider":
        found.append(("CPUExecutionProvider", {}))
    return found


@dataclasses.dataclass
class _Facts:
    """What this module remembers about a session it made (kept here, keyed weakly by the
    session, not set on ORT's object): the model source, for index bounds read on demand."""

    source: str | bytes | None = None
    bounds: dict[str, int] | None = None


_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session(model: str | os.PathLike | bytes | Light, ep: str = "cpu", threads: int | None = 1,
            optimize: bool = True, prepack: bool = True) -> ort.InferenceSession:
    """Create an ORT session; a model ORT refuses becomes one BadInputError line.  ``prepack=False``
    (a model file whose session is not timed where it matters): ORT memory-maps the external weights
    instead of reading and repacking them (a 2.57 GB decoder: 0.56 GB anonymous memory instead of 2.5;
    its 1-token decoding step as fast, a 16-token prompt 2x slower)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # we report failures ourselves, in one line
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = []  # alive until the session has copied them
    if isinstance(model, Light):
        source: str | bytes = model.data
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in model.initializers.values()]
        if values:
            opts.add_external_initializers(list(model.initializers), values)
    else:
        source = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(source, opts, providers=providers(provider(ep), threads))
        # synthesize() reads the graph for index bounds (integer_high), lazily: a path, or bytes up
        # to BOUNDS_BYTES, of a model with integer inputs (no reference is kept to a big model's bytes)
        try:
            if not values and any(i.type in INTEGER_TYPES for i in sess.get_inputs()) and \
                    (not isinstance(source, bytes) or len(source) <= BOUNDS_BYTES):
                _FACTS[sess] = _Facts(source=source)
        except (AttributeError, TypeError):  # a session-like object without inputs or weak references: no bounds
            pass
        return sess
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types
        label = "model" if isinstance(model, (bytes, Light)) else Path(model).name
        raise BadInputError(f"{label}: ONNX Runtime cannot load it: {ort_message(e)}") from None


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
        outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, dict(feeds))
    except Exception as e:  # noqa: BLE001
        providers = ", ".join(p.replace("ExecutionProvider", "") for p in sess.get_providers())
        raise BadInputError(f"ONNX Runtime ({providers}) failed to run the model: {ort_message(e)}") from None
    return dict(zip(names, values))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """A serialized copy of ``model`` that also returns the values ``names`` (untyped outputs:
    ORT infers their types), to read intermediate tensors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    return copy.SerializeToString()


def with_outputs_of(source: onnx.ModelProto | bytes | Light | str | os.PathLike,
                    names: list[str]) -> bytes | Light | str:
    """:func:`with_outputs` of a session source: a proto, serialized bytes, a ``Light`` (its weightless
    proto gets the outputs; the arrays stay as they are), or a model file (a sibling file is written
    beside it, its graph only, referencing the same external data; the caller's folder holds it)."""
    if isinstance(source, Light):
        return Light(with_outputs(onnx.load_from_string(source.data), names), source.initializers)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        key = hashlib.sha1("\0".join(names).encode()).hexdigest()[:12]
        sibling = path.with_name(f"{path.stem}.outputs-{key}.onnx")
        if not sibling.exists():
            sibling.write_bytes(with_outputs(onnx.load(str(path), load_external_data=False), names))
        return str(sibling)
    return with_outputs(source if isinstance(source, onnx.ModelProto) else onnx.load_from_string(source), names)


def run_candidate(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
                  wanted: list[str]) -> dict[str, np.ndarray]:
    """Run a model compared against a reference: feed only the inputs it has (an optimized model
    may have dropped initializer-backed ones) and ask only for the wanted outputs it produces."""
    inputs = {i.name for i in sess.get_inputs()}
    outputs = {o.name for o in sess.get_outputs()}
    return run(sess, {k: v for k, v in feeds.items() if k in inputs}, [n for n in wanted if n in outputs])


def parse_shapes(items: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``name:1x3x224x224`` options (``name:`` alone means a scalar)."""
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not re.fullmatch(r"(\d+(x\d+)*)?", dims):
            raise UsageError(f"--shape '{item}': expected NAME:DxDxD, e.g. input:1x3x224x224")
        shapes[name] = tuple(int(d) for d in dims.split("x")) if dims else ()
    return shapes


def free_dims(inp: ort.NodeArg) -> list[str]:
    """The names of one input's dims that are not fixed sizes (symbolic, or unknown)."""
    return [str(d) for d in inp.shape or [] if not (isinstance(d, int) and d >= 0)]


def resolve_shape(inp: ort.NodeArg, overrides: Mapping[str, tuple[int, ...]], quiet: bool = False) -> tuple[int, ...]:
    if inp.name in overrides:
        shape = overrides[inp.name]
        declared = inp.shape or []
        if inp.shape is not None and len(shape) != len(declared):
            raise BadInputError(f"--shape {inp.name}: rank {len(shape)} given, model declares rank {len(declared)}")
        for i, (got, want) in enumerate(zip(shape, declared)):
            if isinstance(want, int) and want != got:
                raise BadInputError(f"--shape {inp.name}: dim {i} is {got}, model declares {want}")
        return shape
    dims = [d if isinstance(d, int) and d >= 0 else 1 for d in inp.shape or []]
    symbolic = free_dims(inp)
    if symbolic and not quiet:
        logger.warning("input '%s' has symbolic dims %s: using 1 for each (set them with --shape %s:%s)",
                       inp.name, ", ".join(symbolic), inp.name, "x".join(map(str, dims)))
    return tuple(dims)


#: Largest synthesized input data, per input and in total (the float ones are drawn in float64
#: first, so the peak is up to 3x this for float32 inputs).
MAX_SYNTHESIZED_BYTES = 1 << 30


def synthesize(sess: ort.InferenceSession, overrides: Mapping[str, tuple[int, ...]] | None = None,
               seed: int = 0, quiet: bool = False) -> dict[str, np.ndarray]:
    """Random inputs matching the session's inputs (see module docstring for the distributions)."""
    overrides = dict(overrides or {})
    names = {i.name for i in sess.get_inputs()}
    unknown = set(overrides) - names
    if unknown:
        raise BadInputError(f"--shape names unknown input(s) {sorted(unknown)}; inputs are {sorted(names)}")
    rng = np.random.default_rng(seed)
    feeds = {}
    total = 0
    inputs = sess.get_inputs()
    symbolic = [i for i in inputs if i.name not in overrides and free_dims(i)]
    if len(symbolic) > 2 and not quiet:  # one line, not one per input (a decoder has dozens of past tensors)
        dims = dict.fromkeys(d for i in symbolic for d in free_dims(i))
        first = symbolic[0]
        logger.warning("%d inputs have symbolic dims %s: using 1 for each (set them with --shape, e.g. --shape %s:%s)",
                       len(symbolic), ", ".join(dims), first.name, "x".join(map(str, resolve_shape(first, overrides, True))))
        quiet = True
    for inp in inputs:
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise BadInputError(f"input '{inp.name}' has type {inp.type}: give it with --data")
        shape = resolve_shape(inp, overrides, quiet)
        nbytes = int(np.prod(shape, dtype=object)) * (8 if dtype == np.str_ else np.dtype(dtype).itemsize)
        total += nbytes
        if nbytes > MAX_SYNTHESIZED_BYTES or total > MAX_SYNTHESIZED_BYTES:
            what = (f"{nbytes / 2**30:,.1f} GiB" if nbytes > MAX_SYNTHESIZED_BYTES
                    else f"{total / 2**30:,.1f} GiB with the inputs before it")
            raise BadInputError(
                f"input '{inp.name}' {list(shape)} {np.dtype(dtype).name}: synthesizing it would take {what} "
                f"(limit {MAX_SYNTHESIZED_BYTES / 2**30:g} GiB); give real inputs with --data, "
                f"or smaller symbolic dims with --shape {inp.name}:...")
        value: np.ndarray
        if "mask" in inp.name.lower() and dtype != np.str_ and len(shape) >= 1:
            value = _padding_mask(rng, shape).astype(dtype)
        elif dtype == np.bool_:
            value = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            value = rng.integers(0, integer_high(sess, inp.name), size=shape).astype(dtype)
        elif dtype == np.str_:
            value = np.full(shape, "a", dtype=object)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        feeds[inp.name] = np.asarray(value)
    return feeds


#: symbolic-dim values tried, and assignments tried at most, when the inputs synthesized with every
#: symbolic dim at 1 do not run (dims the model relates, e.g. a mask of length past + seq)
DIM_CHOICES, DIM_TRIES = (1, 2, 3, 4), 64
#: sizes tried before DIM_CHOICES for the symbolic spatial dims of an image-like input (H = W;
#: detectors such as YOLO need multiples of 32), and lengths for the symbolic last dim of a
#: signal-like input (doubling: an audio model needs at least its frame); see :func:`shape_kinds`
IMAGE_SIZES = (224, 256, 320, 416, 640)
SIGNAL_LENGTHS = tuple(2 ** k for k in range(1, 15))  # 2, 4, ..., 16,384
#: rounds over those sizes: the other open dims at 1, then the next assignments of DIM_CHOICES
SIZE_ROUNDS = 3
_FLOAT_TYPES = frozenset({"tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"})


def symbolic_dims(sess) -> dict[tuple[str, int], str]:
    """(input, axis) -> dim name for every dim an input declares as non-static (unnamed dims get
    their own name, so they vary independently)."""
    found = {}
    for inp in sess.get_inputs():
        for axis, d in enumerate(inp.shape or []):
            if not (isinstance(d, int) and d >= 0):
                found[(inp.name, axis)] = d if isinstance(d, str) and d else f"{inp.name}:{axis}"
    return found


def assignments(choices: Mapping[str, Sequence[int]], limit: int):
    """Up to ``limit`` assignments {dim: value}, each dim from its ``choices``, in order of the
    sum of the choice indices (the first choices first; ties in a fixed order).  Lazy: O(limit x
    dims) whatever the product of the choices."""
    names = sorted(choices)
    if not names:
        yield {}
        return
    sizes = [len(choices[n]) for n in names]
    count = 0
    for total in range(sum(sizes) - len(sizes) + 1):
        stack: list[tuple[int, list[int]]] = [(0, [])]
        while stack:  # the index vectors with this sum, depth first
            i, picked = stack.pop()
            left = total - sum(picked)
            if i == len(names) - 1:
                if left < sizes[i]:
                    yield {n: choices[n][k] for n, k in zip(names, picked + [left])}
                    count += 1
                    if count >= limit:
                        return
                continue
            for k in range(min(left, sizes[i] - 1), -1, -1):
                stack.append((i + 1, picked + [k]))


def synthesize_runnable(sess: ort.InferenceSession, overrides: Mapping[str, tuple[int, ...]] | None = None,
                        seed: int = 0, quiet: bool = False) -> dict[str, np.ndarray]:
    """:func:`run_synthesized`'s inputs."""
    return run_synthesized(sess, overrides, seed, quiet)[0]


def run_synthesized(sess: ort.InferenceSession, overrides: Mapping[str, tuple[int, ...]] | None = None,
                    seed: int = 0, quiet: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`synthesize`, run once; when the model fails on it and it has symbolic dims that
    ``overrides`` leave open, those dims are searched (:func:`size_trials`: image sizes and signal
    lengths first, then DIM_CHOICES smallest first) for values the model runs on: a detector needs
    H and W multiples of 32, an audio model at least its frame, a GPT-2 with past its mask length to
    be past + seq.  Bounded: at most 1 + SIZE_ROUNDS x (len(IMAGE_SIZES) + len(SIGNAL_LENGTHS)) +
    DIM_TRIES = 122 session runs (each assignment runs once).  A model that runs with every open
    dim at 1 keeps 1.  A symbolic dim that an input given in ``overrides`` fixes keeps that value
    in every input that shares its name.  The values found are logged in one line (set them with
    ``--shape``); none found -> the first error, with a hint naming the sizes tried.  Returns the
    inputs and the outputs of the run that accepted them (every output: the reference a caller
    would compute next)."""
    overrides = dict(overrides or {})
    symbolic = symbolic_dims(sess)
    fixed = {dim: overrides[name][axis] for (name, axis), dim in symbolic.items()
             if name in overrides and axis < len(overrides[name])}

    def shaped(values: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        out = dict(overrides)
        for inp in sess.get_inputs():
            if inp.name not in out and inp.shape is not None and any((inp.name, a) in symbolic for a in range(len(inp.shape))):
                out[inp.name] = tuple(values.get(symbolic[(inp.name, a)], 1) if (inp.name, a) in symbolic else int(d)
                                      for a, d in enumerate(inp.shape))
        return out

    first_shapes = shaped(fixed) if any(fixed.get(d) for (n, _a), d in symbolic.items() if n not in overrides) else overrides
    feeds = synthesize(sess, first_shapes, seed, quiet)
    try:
        return feeds, run(sess, feeds)
    except BadInputError as e:
        first = e
    open_dims = {dim for (name, _axis), dim in symbolic.items() if name not in overrides and dim not in fixed}
    seen: set[tuple[tuple[str, int], ...]] = {tuple(sorted(dict.fromkeys(open_dims, 1).items()))}
    for values, why in size_trials(sess, open_dims):
        key = tuple(sorted(values.items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            feeds = synthesize(sess, shaped({**fixed, **values}), seed, quiet=True)
            outputs = run(sess, feeds)
        except BadInputError:
            continue
        if not quiet:
            logger.warning("the model does not run with every symbolic dim at 1; using %s (%s; set them with --shape)",
                           ", ".join(f"{k}={v}" for k, v in sorted(values.items())), why)
        return feeds, outputs
    kinds = {kind for kind, _name in shape_kinds(sess, open_dims).values()}
    tried = "".join([", symbolic dims at 1" if open_dims else "",
                     f", image sizes {IMAGE_SIZES[0]}-{IMAGE_SIZES[-1]}" if "image" in kinds else "",
                     f", signal lengths {SIGNAL_LENGTHS[0]}-{SIGNAL_LENGTHS[-1]}" if "signal" in kinds else "",
                     f" and up to {DIM_TRIES} other sizes" if open_dims else ""])
    raise BadInputError(f"{first} (on synthesized inputs{tried}; give real inputs with --data or sizes with --shape)") from None


def image_axes(inp) -> tuple[int, ...]:
    """The symbolic spatial axes of an image-like input (an ORT NodeArg): a float or uint8 input of
    rank 4, NCHW (axis 1 a static 1 or 3, or axes 2 and 3 both symbolic) or NHWC (axis 3 a static
    1 or 3, or axes 1 and 2 both symbolic); () for any other input.  A transformer's past
    [batch, heads, past, head_dim] has one symbolic axis beside a static dim other than 1 or 3: not
    an image."""
    shape = inp.shape
    if inp.type not in _FLOAT_TYPES | {"tensor(uint8)"} or shape is None or len(shape) != 4:
        return ()
    static = [isinstance(d, int) and d >= 0 for d in shape]
    for channel, spatial in ((1, (2, 3)), (3, (1, 2))):
        open_axes = tuple(a for a in spatial if not static[a])
        if open_axes and ((static[channel] and shape[channel] in (1, 3)) or len(open_axes) == 2):
            return open_axes
    return ()


def shape_kinds(sess, dims: set[str] | frozenset[str]) -> dict[str, tuple[str, str]]:
    """Dim name -> ("image" or "signal", the input that has it) for those of ``dims`` whose sizes
    :func:`size_trials` searches first: the symbolic spatial dims of an image-like input
    (:func:`image_axes`), and the symbolic last dim of a float input of rank 1 to 3 whose name does
    not say mask (a signal or a sequence: audio [batch, samples], [batch, channels, samples])."""
    symbolic = symbolic_dims(sess)
    found: dict[str, tuple[str, str]] = {}
    for inp in sess.get_inputs():
        for axis in image_axes(inp):
            if symbolic[(inp.name, axis)] in dims:
                found.setdefault(symbolic[(inp.name, axis)], ("image", inp.name))
    for inp in sess.get_inputs():
        rank = len(inp.shape) if inp.shape is not None else 0
        if inp.type in _FLOAT_TYPES and 1 <= rank <= 3 and "mask" not in inp.name.lower() \
                and (inp.name, rank - 1) in symbolic and symbolic[(inp.name, rank - 1)] in dims:
            found.setdefault(symbolic[(inp.name, rank - 1)], ("signal", inp.name))
    return found


def size_trials(sess, open_dims: set[str]) -> Iterator[tuple[dict[str, int], str]]:
    """The assignments of ``open_dims`` that :func:`run_synthesized` tries after every dim at 1, in
    order, each with the reason its warning gives.  First, when :func:`shape_kinds` finds image or
    signal dims, SIZE_ROUNDS rounds over IMAGE_SIZES (every image dim at the same size, before
    any odd size) then SIGNAL_LENGTHS (doubling), the other open dims at 1 in the first round and at
    the next assignments of DIM_CHOICES in the later ones (a kind's dims stay at 1 while the other
    kind's are searched); then the DIM_CHOICES assignments of all open dims, smallest change
    first (at most DIM_TRIES).  At most SIZE_ROUNDS x (5 + 14) + DIM_TRIES = 121 assignments."""
    kinds = shape_kinds(sess, open_dims)
    base = dict.fromkeys(open_dims, 1)
    others = sorted(set(open_dims) - set(kinds))
    for other in assignments({d: DIM_CHOICES for d in others}, SIZE_ROUNDS):
        for kind, sizes, what in (("image", IMAGE_SIZES, "the first of the sizes {} it runs on"),
                                  ("signal", SIGNAL_LENGTHS, "the shortest of the lengths {} it runs on")):
            dims = sorted(d for d, (k, _name) in kinds.items() if k == kind)
            if not dims:
                continue
            names = ", ".join(f"'{n}'" for n in sorted({kinds[d][1] for d in dims}))
            listed = ", ".join(map(str, sizes)) if len(sizes) <= 5 else f"{sizes[0]}, {sizes[1]}, ..., {sizes[-1]}"
            why = f"{kind}-like input {names}: " + what.format(listed)
            for size in sizes:
                yield {**base, **other, **dict.fromkeys(dims, size)}, why
    for values in assignments({d: DIM_CHOICES for d in open_dims}, DIM_TRIES):
        if any(v != 1 for v in values.values()):
            yield values, "the smallest values it runs on"


#: index-preserving ops an integer input may pass through on its way to a Gather's indices
INDEX_PASS_THROUGH = frozenset({"Cast", "CastLike", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand",
                                "Transpose", "Slice", "Tile"})


def index_bounds(model: ir.Model | onnx.ModelProto) -> dict[str, int]:
    """Integer graph input -> the fewest rows of the tables it indexes: the input reaches a
    Gather's (or GatherElements') indices, through :data:`INDEX_PASS_THROUGH` ops only, and the
    table's dim on the gather axis is static (an initializer, a Constant, a declared shape, or one
    of those through Cast/DequantizeLinear/Identity).  Main graph only; cost O(nodes)."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)

    def table_dims(value: ir.Value, depth: int = 0) -> tuple[int, ...] | None:
        if value.const_value is not None:
            return tuple(value.const_value.shape.numpy())
        node = value.producer()
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            return tuple(node.attributes["value"].as_tensor().shape.numpy())
        if value.shape is not None and all(isinstance(d, int) for d in value.shape):
            return tuple(d for d in value.shape if isinstance(d, int))
        if node is not None and depth < 8 and node.op_type in ("Cast", "DequantizeLinear", "Identity") and node.inputs:
            return table_dims(node.inputs[0], depth + 1) if node.inputs[0] is not None else None
        return None

    out: dict[str, int] = {}
    for inp in model.graph.inputs:
        if inp.dtype is None or not inp.dtype.is_integer():
            continue
        stack, seen, bound = [inp], {id(inp)}, None
        while stack:
            for use in stack.pop().uses():
                node, idx = use.node, use.idx
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type in INDEX_PASS_THROUGH and idx == 0 and node.outputs and id(node.outputs[0]) not in seen:
                    seen.add(id(node.outputs[0]))
                    stack.append(node.outputs[0])
                elif node.op_type in ("Gather", "GatherElements") and idx == 1 and node.inputs[0] is not None:
                    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
                    table = table_dims(node.inputs[0])
                    if table and -len(table) <= axis < len(table) and table[axis] > 0:
                        bound = table[axis] if bound is None else min(bound, table[axis])
        if bound is not None:
            out[name_of(inp)] = bound
    return out


def remember_bounds(sess, bounds: Mapping[str, int]) -> None:
    """Give ``sess`` the :func:`index_bounds` of the model it was made from, for sessions made from
    bytes too large to keep (see :func:`session`)."""
    try:
        _FACTS.setdefault(sess, _Facts()).bounds = dict(bounds)
    except TypeError:  # not weakly referenceable: a session-like object, no bounds
        pass


#: serialized models up to this size keep a reference for :func:`integer_high` (paths always do;
#: callers holding a larger model give its bounds with :func:`remember_bounds`)
BOUNDS_BYTES = 64 << 20
INTEGER_TYPES = frozenset(f"tensor({t})" for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"))


def integer_high(sess, name: str) -> int:
    """Exclusive upper bound of synthesized integers for input ``name``: 4, or fewer when the
    input indexes a smaller table (:func:`index_bounds` of the session's model, read once)."""
    return max(1, min(4, table_rows(sess, name) or 4))


def table_rows(sess, name: str) -> int | None:
    """The rows of the table input ``name`` indexes (:func:`index_bounds`, read once per
    session), or None when unknown."""
    try:
        facts = _FACTS.get(sess) or _Facts()
    except TypeError:
        facts = _Facts()
    bounds = facts.bounds
    if bounds is None:
        bounds = {}
        source = facts.source
        try:
            if isinstance(source, bytes):
                bounds = index_bounds(onnx.load_from_string(source))
            elif source is not None:
                bounds = index_bounds(onnx.load(str(source), load_external_data=False))
        except Exception as e:  # noqa: BLE001 - without bounds the plain [0, 4) range is used
            logger.debug("index bounds unavailable: %s", e)
        facts.bounds = bounds
        with contextlib.suppress(TypeError):
            _FACTS[sess] = facts
    return bounds.get(name)


def _padding_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """1 for real positions, 0 for trailing padding (at least one real position per row)."""
    length = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    keep = rng.integers(1, length + 1, size=rows) if length else np.zeros(rows, dtype=int)
    mask = (np.arange(length)[None, :] < keep[:, None]).astype(np.int64)
    return mask.reshape(shape)


def check_feeds(arrays: dict[str, np.ndarray], sess: ort.InferenceSession, label: str) -> dict[str, np.ndarray]:
    """Names, dtypes, ranks, static dims and finiteness of one batch against the session's inputs."""
    p = label
    inputs = {i.name: i for i in sess.get_inputs()}
    missing = sorted(set(inputs) - set(arrays))
    extra = sorted(set(arrays) - set(inputs))
    if missing or extra:
        raise BadInputError(f"{p}: arrays {sorted(arrays)} do not match model inputs {sorted(inputs)}"
                            + (f" (missing {missing})" if missing else "")
                            + (f" (unknown {extra})" if extra else ""))
    for name, arr in arrays.items():
        inp = inputs[name]
        want = _ORT_TYPES.get(inp.type)
        if want is not None and want != np.str_ and arr.dtype != np.dtype(want):
            raise BadInputError(f"{p}: array '{name}' has dtype {arr.dtype}, model expects {np.dtype(want)}")
        if inp.shape is not None:
            if arr.ndim != len(inp.shape):
                raise BadInputError(f"{p}: array '{name}' has shape {arr.shape}, model expects rank {len(inp.shape)} {inp.shape}")
            for got, dim in zip(arr.shape, inp.shape):
                if isinstance(dim, int) and dim >= 0 and dim != got:
                    raise BadInputError(f"{p}: array '{name}' has shape {arr.shape}, model expects {inp.shape}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise BadInputError(f"{p}: array '{name}' contains NaN or Inf")
    return arrays


def ort_message(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text[:400]
