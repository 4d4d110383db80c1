"""Inputs of a decoder with a key-value cache: a short prompt and a decoding step with a past.

A decoder exported with its cache (``past_key_values.*``, ``past_key_i``... inputs, ``present.*``
outputs) runs in two regimes a deployment meets: the prompt (``past`` empty, ``seq`` tokens) and
every later token (``seq`` = 1 after ``past`` cached ones).  Synthesized inputs with every symbolic
dim at 1 exercise neither (one token, one random cached token), and a budget judged there misses
what a real prompt shows (an int4 decoder judged at one token: cosine drop 0.03; on 16-token
prompts 0.105).  :func:`points` recognizes such a model from its interface, by names and dims only
(no exporter-specific op patterns):

- **cache inputs**: float inputs whose name contains ``past`` (rank >= 3), sharing one symbolic
  dim (the past length; the other shared symbolic dim, also on the ids, is the batch);
- **ids**: an integer input of rank 2 that is not a mask or positions; its last dim is ``seq``;
- **mask** (optional): an input whose name contains ``mask``, rank 2, all ones over past + seq;
- **positions** (optional): an input whose name contains ``position``: past, ..., past + seq - 1.

The prompt point feeds ``prompt`` tokens after an empty cache; the decoding step feeds one token
after the prompt, its cache the prompt's own ``present`` outputs (matched to the cache inputs by
name with ``present`` for ``past``, else by order and shape), so the step sees the keys and values
the model itself wrote.  A model that does not run with an empty cache gets a cache of one random
token before the prompt.  Anything else (no cache inputs, an input the rules do not place, a run
that fails) -> None: the caller synthesizes as for any model.  Cost: two runs of the model.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping

import numpy as np

from onnxopt import runtime
from onnxopt.errors import BadInputError

logger = logging.getLogger(__name__)

#: tokens of the synthesized prompt (the decoding step follows it)
PROMPT_TOKENS = 16
#: how the points' labels begin (callers tell a decoder's points, and its decoding steps, by them)
PROMPT, STEP = "decoder prompt", "decoder step"


@dataclasses.dataclass(frozen=True)
class Interface:
    """Where a decoder's inputs keep batch, sequence and past lengths."""

    ids: str
    past: str  # the cache inputs' shared symbolic dim
    cache: tuple[str, ...]  # cache input names, in graph order
    mask: str | None
    positions: str | None


def _dims(inp) -> list:
    return list(inp.shape or [])


def _symbolic(d) -> bool:
    return not (isinstance(d, int) and d >= 0)


def interface(sess) -> Interface | None:
    """The decoder interface of a session's inputs, or None when it is not one (see module doc)."""
    inputs = sess.get_inputs()
    cache = [i for i in inputs if "past" in i.name.lower() and "float" in i.type and len(_dims(i)) >= 3]
    if not cache:
        return None
    shared = set.intersection(*({d for d in _dims(i) if isinstance(d, str) and d} for i in cache))
    masks = [i for i in inputs if "mask" in i.name.lower() and len(_dims(i)) == 2]
    positions = [i for i in inputs if "position" in i.name.lower() and len(_dims(i)) == 2]
    ids = [i for i in inputs if i.type in runtime.INTEGER_TYPES and len(_dims(i)) == 2
           and i not in masks and i not in positions]
    if len(ids) != 1 or len(masks) > 1 or len(positions) > 1 or not _symbolic(_dims(ids[0])[1]):
        return None
    batch = _dims(ids[0])[0]
    past = [d for d in shared if d != batch]
    others = [i for i in inputs if i not in cache + masks + positions + ids]
    if len(past) != 1 or others:
        return None
    return Interface(ids[0].name, past[0], tuple(i.name for i in cache),
                     masks[0].name if masks else None, positions[0].name if positions else None)


def feeds(sess, face: Interface, *, tokens: int, past: int, seed: int,
          cache: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inputs of ``tokens`` new tokens after ``past`` cached ones (batch 1): ids drawn over the
    embedding table's rows (below 4 when its size is unknown), the mask all ones, positions counting
    on from ``past``, the cache from ``cache`` or random."""
    shapes = {}
    for inp in sess.get_inputs():
        if inp.name in face.cache:
            shapes[inp.name] = tuple(past if d == face.past else 1 if _symbolic(d) else int(d) for d in _dims(inp))
    shapes[face.ids] = (1, tokens)
    for name in (face.mask, face.positions):
        if name:
            shapes[name] = (1, past + tokens if name == face.mask else tokens)
    out = runtime.synthesize(sess, shapes, seed=seed, quiet=True)
    rows = runtime.table_rows(sess, face.ids)
    if rows:  # token ids over the whole vocabulary (synthesize keeps integers below 4)
        out[face.ids] = np.random.default_rng(seed).integers(0, rows, size=(1, tokens)).astype(out[face.ids].dtype)
    if face.mask:
        out[face.mask] = np.ones_like(out[face.mask])
    if face.positions:
        out[face.positions] = np.arange(past, past + tokens).reshape(1, tokens).astype(out[face.positions].dtype)
    for name in face.cache:
        if cache is not None and name in cache:
            out[name] = np.ascontiguousarray(cache[name]).astype(out[name].dtype)
    return out


def pair_cache(face: Interface, outputs: Mapping[str, np.ndarray], past: int) -> dict[str, np.ndarray] | None:
    """Each cache input's value from the ``present`` outputs of a run over ``past`` tokens: by name
    (``present`` for ``past``), else by order; None when they do not line up."""
    presents = [n for n in outputs if "present" in n.lower()]
    by_name = {}
    for name in face.cache:
        twin = re.sub("past_key_values|past", "present", name, count=1, flags=re.IGNORECASE)
        if twin in outputs:
            by_name[name] = outputs[twin]
    found = by_name if len(by_name) == len(face.cache) else (
        dict(zip(face.cache, (outputs[n] for n in presents))) if len(presents) == len(face.cache) else None)
    if found is None or any(np.ndim(v) < 3 or past not in np.shape(v) for v in found.values()):
        return None
    return found


def points(sess, seeds: tuple[int, ...] = (0,), tokens: int = PROMPT_TOKENS) -> list[tuple[str, dict, dict]] | None:
    """(label, feeds, outputs) of a prompt and a decoding step for each seed, or None when the
    session is not a decoder with a cache or does not run so (see module doc)."""
    face = interface(sess)
    if face is None:
        return None
    found = []
    for seed in seeds:
        for before in (0, 1):  # an empty cache, else one random cached token
            try:
                prompt = feeds(sess, face, tokens=tokens, past=before, seed=seed)
                outputs = runtime.run(sess, prompt)
                break
            except BadInputError as e:
                logger.debug("decoder prompt with a past of %d fails: %s", before, e)
        else:
            return None
        cache = pair_cache(face, outputs, before + tokens)
        step = feeds(sess, face, tokens=1, past=before + tokens, seed=seed + 1000, cache=cache)
        try:
            step_outputs = runtime.run(sess, step)
        except BadInputError as e:
            logger.debug("decoder step fails: %s", e)
            return None
        cached = "" if before == 0 else f" after {before} random cached token"
        found.append((f"{PROMPT} of {tokens} tokens{cached}, seed {seed}", prompt, outputs))
        found.append((f"{STEP}: 1 token after {before + tokens} cached ({'the prompt' if cache else 'random'})"
                      f", seed {seed}", step, step_outputs))
    return found
