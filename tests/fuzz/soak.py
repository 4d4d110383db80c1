"""Long differential-fuzz run (no hypothesis shrinking; same construction as the CI strategy).

    python -m tests.fuzz.soak --graphs 10000 [--seed S] [--jobs N] [--out DIR] [--passes a,b]
    python -m tests.fuzz.soak --replay SEED            # re-check one generated case, print its graph
    python -m tests.fuzz.soak --graphs 2000 --blocks round2 [--seed S]   # only issue 22's patterns

Graph i is ``strategies.random_case(seed * 10_000_000 + i)``.  Cases the filter rejects (checker,
ORT load) or that the original cannot run at any point are not counted; generation goes on
until N valid graphs ran.  Every failing case is written to DIR (default ``fuzz-failures``) as
``<seed>.onnx`` plus ``<seed>.txt`` (one line per finding: pass, kind, expected vs got).
The last line is exactly ``N graphs, K changed`` (K: graphs with at least one finding).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _work(args):
    case_seed, cfg_names, only = args
    from tests.fuzz import oracle, strategies
    try:
        case = strategies.random_case(case_seed, only)
    except Exception as e:  # noqa: BLE001 - a generator bug: report, never count as a library bug
        return case_seed, "gen-error", [f"{type(e).__name__}: {e}"], None, ""
    if strategies.check_valid(case) is not None:
        return case_seed, "rejected", [], None, ""
    cfgs = [c for c in oracle.configs() if cfg_names is None or c[0] in cfg_names]
    verdict = oracle.check_case(case, cfgs)
    if not verdict.valid:
        return case_seed, "rejected", [], None, ""
    lines = [str(f) for f in verdict.findings]
    return case_seed, "ok", lines, case.model.SerializeToString() if lines else None, case.describe()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="fuzz-failures")
    ap.add_argument("--passes", default=None, help="comma-separated config labels (pass names, 'default')")
    ap.add_argument("--replay", type=int, default=None, help="check one case seed and print its graph")
    ap.add_argument("--blocks", default=None, help="comma-separated block kinds to draw from (e.g. round2)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    cfg_names = set(args.passes.split(",")) if args.passes else None
    only = args.blocks.split(",") if args.blocks else None

    if args.replay is not None:
        import onnx

        from tests.fuzz import oracle, strategies
        case = strategies.random_case(args.replay, only)
        print(case.describe())
        print(onnx.printer.to_text(case.model.graph))
        print("filter:", strategies.check_valid(case) or "valid")
        v = oracle.check_case(case, [c for c in oracle.configs() if cfg_names is None or c[0] in cfg_names])
        print("runnable points:", v.points_run)
        for f in v.findings:
            print(f)
        return 1 if v.findings else 0

    from tests.fuzz import oracle, strategies  # noqa: F401 - imported before forking: workers share one version
    out = Path(args.out)
    base = args.seed * 10_000_000
    done = changed = rejected = gen_errors = 0
    next_seed = 0
    t0 = time.time()
    ctx = mp.get_context("fork")
    pool = ctx.Pool(args.jobs, maxtasksperchild=200) if args.jobs > 1 else None
    try:
        while done < args.graphs:
            need = args.graphs - done
            batch = [(base + s, cfg_names, only) for s in range(next_seed, next_seed + max(args.jobs * 4, int(need * 1.1) + 1))]
            batch = batch[: max(args.jobs * 8, min(len(batch), 64))]
            next_seed += len(batch)
            results = pool.imap(_work, batch) if pool else map(_work, batch)
            for seed, status, lines, model_bytes, desc in results:
                if status == "gen-error":
                    gen_errors += 1
                    print(f"generator error at seed {seed}: {lines[0][:200]}", file=sys.stderr)
                    continue
                if status == "rejected" or done >= args.graphs:
                    rejected += status == "rejected"
                    continue
                done += 1
                if lines:
                    changed += 1
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"{seed}.onnx").write_bytes(model_bytes)
                    (out / f"{seed}.txt").write_text("".join(f"seed {seed} ({desc}): {line}\n" for line in lines))
                    for line in lines:
                        print(f"seed {seed}: {line}", file=sys.stderr)
                if done % 100 == 0:
                    print(f"... {done} graphs, {changed} changed, {rejected} rejected, {time.time() - t0:.0f} s",
                          file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.terminate()
    print(f"({rejected} generated graphs rejected by the filter, {gen_errors} generator errors, "
          f"{time.time() - t0:.0f} s; failures in {out}/)" if changed else
          f"({rejected} generated graphs rejected by the filter, {gen_errors} generator errors, {time.time() - t0:.0f} s)")
    print(f"{done} graphs, {changed} changed")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
