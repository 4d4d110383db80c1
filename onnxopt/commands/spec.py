"""Options dataclasses -> command-line flags, written once.

A command's settings are one ``Options`` dataclass (fields grouped into nested dataclasses where
there are many).  A field that users set from the command line carries its flag in its metadata
(:func:`flag`); fields without one are Python-API settings only.  From these the CLI builds the
command's click options (:func:`click_params`), ``batch`` checks the options given for
``--command X`` against X's fields and turns them back into arguments (:func:`to_args`), and the
docs' option tables are generated (:func:`option_table`).  A flag is never declared twice.

A :class:`Command` is what one command module exposes: its name, help, positional arguments,
``Options`` type, ``run(options, progress) -> Result`` and the text printers.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import click

from onnxopt.commands.core import ProgressFn, Result
from onnxopt.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one Options field appears on the command line."""

    decls: tuple[str, ...]
    help: str
    #: extra ``click.Option`` keyword arguments (type, multiple, is_flag, show_default, flag_value...)
    click: Mapping[str, Any]
    #: turns the parsed command-line value into the field's value (e.g. "a,b" -> ("a", "b"))
    parse: Callable[[Any], Any] | None = None
    #: the default shown in --help and the docs when the field's own default is None ("not given")
    shown: Any = None

    @property
    def long(self) -> str:
        """The first long flag without its dashes (the key in batch manifests): ``max-drop``."""
        name = next(d for d in self.decls if d.startswith("--"))
        return name.split("/")[0][2:]

    @property
    def key(self) -> str:
        return self.long.replace("-", "_")


def flag(value: Any, *decls: str, help: str, parse: Callable[[Any], Any] | None = None, shown: Any = None,
         factory: Callable[[], Any] | None = None, **click_kwargs: Any) -> Any:
    """A dataclass field (default ``value``) set by ``decls`` on the command line (``"--x"``,
    ``"-p", "--pipeline"``, ``"--per-channel/--per-tensor"``); ``click_kwargs["default"]`` gives the
    command line another default than the API's."""
    meta = {"flag": Flag(tuple(decls), help, click_kwargs, parse, shown)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=value, metadata=meta)


def group(cls: type) -> Any:
    """A nested group of options (its fields are flattened on the command line)."""
    return dataclasses.field(default_factory=cls, metadata={"group": True})


def flags_of(options: type) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Flag]]:
    """(path of field names, field, flag) of every command-line field, groups flattened in order."""
    for f in dataclasses.fields(options):
        if f.metadata.get("group"):
            for path, inner, fl in flags_of(_group_type(options, f)):
                yield (f.name, *path), inner, fl
        elif "flag" in f.metadata:
            yield (f.name,), f, f.metadata["flag"]


def _group_type(options: type, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(options)
    return typing.cast(type, hints[f.name])


def click_params(options: type) -> list[click.Parameter]:
    """click options for every flagged field of ``options`` (dest = the joined field path)."""
    params: list[click.Parameter] = []
    for path, f, fl in flags_of(options):
        kwargs = dict(fl.click)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        kwargs.setdefault("default", default)
        text = fl.help
        if fl.shown is not None:  # the default "not given" stands for, as click shows a default
            text += f"  [default: {_shown(fl)}]"
        elif default is not None and default != [] and default is not False:
            kwargs.setdefault("show_default", True)
        params.append(click.Option([*fl.decls, "__".join(path)], help=text, **kwargs))
    return params


def _shown(fl: Flag) -> str:
    """A flag's shown default: for a boolean pair the flag it stands for (``per-channel``)."""
    pair = next((d for d in fl.decls if "/" in d), None)
    if pair is not None and isinstance(fl.shown, bool):
        on, _, off = pair.partition("/")
        return (on if fl.shown else off).lstrip("-")
    return str(fl.shown)


def build(options_type: type, values: Mapping[str, Any], **fixed: Any) -> Any:
    """An ``options_type`` instance from click's parsed values (keys: joined field paths) and
    ``fixed`` top-level fields (the positional arguments)."""
    return _build(options_type, values, (), fixed)


def _build(options: type, values: Mapping[str, Any], prefix: tuple[str, ...], fixed: Mapping[str, Any]) -> Any:
    kwargs: dict[str, Any] = dict(fixed)
    for f in dataclasses.fields(options):
        path = (*prefix, f.name)
        if f.metadata.get("group"):
            kwargs[f.name] = _build(_group_type(options, f), values, path, {})
        elif "flag" in f.metadata and "__".join(path) in values:
            value = values["__".join(path)]
            fl: Flag = f.metadata["flag"]
            if isinstance(value, list):
                value = tuple(value)
            if value == () and f.default is None:  # a repeatable flag not given: "not given"
                value = None
            kwargs[f.name] = fl.parse(value) if fl.parse is not None and value is not None else value
    return options(**kwargs)


def given(options: Any, defaults: Any, fields: Sequence[str]) -> list[str]:
    """What the user set among ``fields`` (field names, any group, in that order): those whose value in
    ``options`` differs from ``defaults``, named by their flag (``--method``), or by the field name
    for a Python-API-only setting (``percentile``)."""
    found: dict[str, str] = {}
    for path in _leaf_paths(type(options)):
        if path[-1] in fields and _get(options, path) != _get(defaults, path):
            f = _field(type(options), path)
            fl = f.metadata.get("flag")
            found[path[-1]] = fl.decls[-1].split("/")[0] if fl is not None else path[-1]
    return [found[name] for name in fields if name in found]


def _leaf_paths(options: type) -> Iterator[tuple[str, ...]]:
    for f in dataclasses.fields(options):
        if f.metadata.get("group"):
            yield from ((f.name, *p) for p in _leaf_paths(_group_type(options, f)))
        else:
            yield (f.name,)


def _field(options: type, path: tuple[str, ...]) -> dataclasses.Field:
    for name in path[:-1]:
        options = _group_type(options, next(f for f in dataclasses.fields(options) if f.name == name))
    return next(f for f in dataclasses.fields(options) if f.name == path[-1])


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def by_key(options: type) -> dict[str, tuple[Flag, bool]]:
    """Manifest/batch key -> (flag, inverted): the long flag's name (``max_drop``), the field name
    (``shapes``) and a boolean pair's "off" name (``per_tensor``, ``no_validate``: inverted)."""
    out: dict[str, tuple[Flag, bool]] = {}
    for path, _, fl in flags_of(options):
        out.setdefault(fl.key, (fl, False))
        out.setdefault(path[-1], (fl, False))
        off = next((d.partition("/")[2] for d in fl.decls if "/" in d), "")
        if off:
            out.setdefault(off.lstrip("-").replace("-", "_"), (fl, True))
    return out


def to_args(options: type, values: Mapping[str, Any]) -> list[str]:
    """Command-line arguments for ``values`` (batch/manifest keys, ``max_drop`` or ``max-drop`` ->
    command-line values); unknown keys are a usage error naming the command's options."""
    known = by_key(options)
    args: list[str] = []
    for raw, value in values.items():
        key = raw.replace("-", "_")
        if key not in known:
            raise UsageError(f"'{raw}' is not an option of this command (options: "
                             f"{', '.join(sorted({f.key for f, _ in known.values()}))})")
        fl, inverted = known[key]
        if value is None:
            continue
        decl = next(d for d in fl.decls if d.startswith("--"))
        on, _, off = decl.partition("/")
        if fl.click.get("is_flag") or off:
            if bool(value) != inverted:
                args.append(on)
            elif off:
                args.append(off)
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            args += [on, str(v)]
    return args


def option_table(options: type) -> str:
    """The Markdown table of a command's flags (docs/commands/*.md)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for _, f, fl in flags_of(options):
        default = _shown(fl) if fl.shown is not None else (f.default if f.default is not dataclasses.MISSING else "")
        default = "" if default is None or default is False or default == () else default
        names = ", ".join(f"`{d}`" for d in fl.decls)
        meaning = fl.help.replace("|", "\\|")
        rows.append(f"| {names} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


@dataclasses.dataclass(frozen=True)
class Command:
    """One command as the CLI, ``batch``, the API and the docs see it."""

    name: str
    short_help: str
    help: str
    #: positional arguments, in order: (field name, click.Argument keyword arguments)
    arguments: tuple[tuple[str, Mapping[str, Any]], ...]
    options: type
    run: Callable[[Any, ProgressFn | None], Result]
    #: prints a result (exit 0) and, optionally, the diagnostics of a refused report (exit 3)
    render: Callable[[Result], None]
    render_refused: Callable[[dict], None] | None = None
    #: the argument naming the written file (crash isolation removes its staging entries)
    output: str | None = "output_path"
    #: the label of the models a crash message names
    label: Callable[[Mapping[str, Any]], str] = lambda kw: str(kw.get("input_path"))
    #: the progress bar's title (None: no bar) and its total for these options (None: unknown)
    progress: str | None = None
    progress_total: Callable[[Any], int | None] | None = None
    #: the command's Result type (its report keys)
    result: type[Result] = Result
    #: adjusts the options to the report the CLI writes (optimize counts the cost for it)
    for_report: Callable[[Any], Any] | None = None
    #: run in a forked child (crash isolation, see onnxopt.cli)
    isolated: bool = True
    #: takes other commands' flags to pass through (batch --command X: exactly X's)
    passthrough: bool = False


def from_kwargs(options_type: type, *args: Any, **kwargs: Any) -> Any:
    """An ``options`` instance from positional arguments (its leading fields) and keyword
    arguments named after its fields, groups' fields included (the Python API's flat form)."""
    top = [f for f in dataclasses.fields(options_type) if not f.metadata.get("group")]
    fixed = {f.name: a for f, a in zip(top, args)}
    if len(args) > len(top):
        raise TypeError(f"{options_type.__qualname__}: too many positional arguments")
    placed: set[str] = set(fixed)
    instance = _place(options_type, {**kwargs, **fixed}, placed)
    unknown = sorted(set(kwargs) - placed)
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)} (known: "
                        f"{', '.join(sorted(_leaves(options_type)))})")
    return instance


def _place(options: type, values: Mapping[str, Any], placed: set[str]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        if f.metadata.get("group"):
            kwargs[f.name] = _place(_group_type(options, f), values, placed)
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
            placed.add(f.name)
    return options(**kwargs)


def _leaves(options: type) -> Iterator[str]:
    for f in dataclasses.fields(options):
        if f.metadata.get("group"):
            yield from _leaves(_group_type(options, f))
        else:
            yield f.name
