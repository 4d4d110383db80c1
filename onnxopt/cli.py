"""The ``onnxopt`` command: parse, call onnxopt.api, print.  Exit codes: 0 ok, 1 usage, 2 bad input,
3 validation refused.  Expected errors print one line, never a traceback."""

from __future__ import annotations

import json
import logging
import sys

import click

from onnxopt import __version__, api, pipeline, registry, report, runtime
from onnxopt.errors import OnnxoptError, ValidationRefused


class _Group(click.Group):
    """Maps errors to our exit codes (click's own usage exit code is 2; ours is 1)."""

    def main(self, args=None, prog_name=None, **extra):  # noqa: D401
        extra.pop("standalone_mode", None)
        try:
            super().main(args=args, prog_name=prog_name or "onnxopt", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.UsageError as e:
            e.show()
            sys.exit(1)
        except click.Abort:
            click.echo("onnxopt: aborted", err=True)
            sys.exit(1)
        except OnnxoptError as e:
            click.echo(f"onnxopt: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"onnxopt: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    root = logging.getLogger("onnxopt")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxopt")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(verbose: int, quiet: bool) -> None:
    """Post-export optimizer for ONNX models, validated on ONNX Runtime."""
    _setup_logging(verbose, quiet)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


@main.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the optimized model.")
@click.option("-p", "--pipeline", "pipeline_text", default=None,
              help='Passes, e.g. "cleanup,fold-constants{size-limit=4096},dedup" '
                   f'(default: {pipeline.DEFAULT_PIPELINE}).')
@click.option("--shape", "shapes", multiple=True, help="Input shape NAME:1x3x224x224 for symbolic dims (repeatable).")
@click.option("--data", type=click.Path(), default=None, help=".npz of input arrays by name, used for validation.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write a report: out.json or out.md.")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Compare against the original on ORT.")
@click.option("--force", is_flag=True, help="Write the result even when validation finds diverging outputs.")
@click.option("--verify-each", is_flag=True, help="Validate after every pass and name the pass that broke outputs.")
@click.option("--in-place", is_flag=True, help="Allow -o to be the input file.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to OUT.data (default: only when over ~1.8 GB).")
def optimize(model, output, pipeline_text, shapes, data, report_path, validate, force, verify_each, in_place,
             external_data):
    """Optimize MODEL into OUTPUT (validated against MODEL by default)."""
    if report_path:
        report.check_path(report_path)
    try:
        result = api.optimize(model, output, pipeline_text=pipeline_text, data=data,
                              shapes=runtime.parse_shapes(shapes), validate_result=validate, force=force,
                              verify_each=verify_each, in_place=in_place, external_data=external_data)
    except ValidationRefused as e:
        if report_path and e.result:
            report.write(e.result, report_path)
        for line in (e.result or {}).get("validation", {}).get("outputs", []):
            if not line["ok"]:
                click.echo(f"  {line['name']}: max abs {line['max_abs']:.3g}, max rel {line['max_rel']:.3g}: {line['reason']}", err=True)
        raise
    if report_path:
        report.write(result, report_path)
    inp, out = result["input"], result["output"]
    click.echo(f"{model}: {inp['nodes']} -> {out['nodes']} nodes, {_mb(inp['file_bytes'])} -> {_mb(out['file_bytes'])}"
               f" ({result['iterations']} iteration(s), {result['seconds']:.2f} s)")
    for name, entry in result["passes"].items():
        if entry["changed"]:
            click.echo(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in entry["changed"].items()))
    v = result["validation"]
    if v is None:
        click.echo("validation: skipped (--no-validate)")
    else:
        status = "ok" if v["ok"] else "DIVERGED (written because of --force)"
        latency = ""
        if v.get("latency_ref_ms"):
            latency = f", latency {v['latency_ref_ms']:.3f} -> {v['latency_new_ms']:.3f} ms"
        click.echo(f"validation: {status}, {len(v['outputs'])} output(s), max abs diff {v['max_abs']:.3g}{latency}")
    click.echo(f"wrote {output}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(model, as_json):
    """Show a model's structure: opsets, inputs/outputs, ops, parameters, subgraphs, external data."""
    info = api.inspect(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: IR {info['ir_version']}, producer {info['producer'] or '-'}")
    click.echo("opsets: " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()))
    for kind in ("inputs", "outputs"):
        click.echo(f"{kind}:")
        for v in info[kind]:
            shape = "?" if v["shape"] is None else "x".join(str(d) for d in v["shape"]) or "scalar"
            click.echo(f"  {v['name']}: {v['dtype']} [{shape}]")
    click.echo(f"nodes: {info['nodes']}")
    for op, n in info["ops"].items():
        click.echo(f"  {op}: {n}")
    click.echo(f"parameters: {info['parameters']:,} ({_mb(info['parameter_bytes'])})")
    for dtype, e in info["parameters_by_dtype"].items():
        click.echo(f"  {dtype}: {e['params']:,} ({_mb(e['bytes'])})")
    if info["subgraphs"]:
        click.echo("subgraphs:")
        for s in info["subgraphs"]:
            click.echo(f"  {s['op']} '{s['node']}'.{s['attribute']}: {s['nodes']} nodes")
    if info["custom_domains"]:
        click.echo("custom domains: " + ", ".join(info["custom_domains"]))
    if info["external_data"]:
        click.echo("external data:")
        for f, n in info["external_data"].items():
            click.echo(f"  {f}: {_mb(n)}")


@main.command("passes")
def list_passes():
    """List the available passes with their one-line contracts."""
    for name in registry.names():
        cls = registry.get(name)
        opts = ", ".join(f"{k}={v}" for k, v in pipeline.options_of(cls).items())
        click.echo(f"{name}{' {' + opts + '}' if opts else ''}\n    {cls.contract()}")


if __name__ == "__main__":
    main()
