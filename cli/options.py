"""Typer commands whose options come from a config dataclass (`pipelines/config.py` metadata).

`config_command(Cls)` turns `fn(cfg: Cls, **own)` into a typer command function with one
option per field of `Cls` (flag, help and default from the field), followed by fn's own
annotated parameters (CLI-only options such as `--json`); the command builds `Cls` from the
parsed values and calls `fn`. `command_args(cfg)` writes a config back as the options that
differ from the defaults (`scope run --dry-run`). Value shapes on the command line:

- str / int / float / bool (optionally None): as they are; a bool is `--x/--no-x` unless its
  `flags` say otherwise;
- a union of several types (`float | str`): the first number type that parses the text, else
  the text itself;
- a dict: a JSON object; with `expand`, also one option per field of that dataclass, whose
  given values override the JSON object's keys;
- a tuple or list with `sep`: one value, items joined by `sep`; a list without: a repeated flag.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from cli.common import json_object
from pipelines.config import default_of, meta

MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class FieldOption:
    """How one config field appears on the command line."""

    field: dataclasses.Field[Any]
    shape: str  # plain | bool | text | json | seq | list
    base: Any  # the CLI value type (items' type for seq and list; the union's types for text)
    container: type | None  # tuple or list for seq fields
    subs: tuple[FieldOption, ...] = ()  # json with `expand`: the options of its fields

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def flag(self) -> str:
        """The long flag (the 'on' form for a bool)."""
        decls = meta(self.field, "flags")
        return decls[0].split("/")[0] if decls else "--" + self.name.replace("_", "-")

    def cli_default(self) -> Any:
        default = default_of(self.field)
        if default is MISSING:
            return inspect.Parameter.empty
        if default is None or self.shape == "json":
            return None
        if self.shape == "text":
            return str(default)
        if self.shape == "seq":
            return meta(self.field, "sep").join(str(v) for v in default)
        return default

    def annotation(self) -> Any:
        cli_type: Any = {"text": str, "json": str, "seq": str}.get(self.shape, self.base)
        if self.shape == "list":
            cli_type = list[self.base]
        if self.cli_default() is None:
            cli_type = cli_type | None
        f = self.field
        info: Any
        if meta(f, "argument"):
            info = typer.Argument(help=meta(f, "help"))
        else:
            info = typer.Option(*meta(f, "flags"), help=meta(f, "help"),
                                envvar=meta(f, "envvar"))
        return Annotated[cli_type, info]

    def to_config(self, value: Any) -> Any:
        """The config value of a parsed CLI value (MISSING: leave the field's default)."""
        if self.shape == "json":
            return json_object(value, self.flag) if value else MISSING
        if self.shape == "seq" and value is not None:
            items = [v.strip() for v in value.split(meta(self.field, "sep")) if v.strip()]
            return self.container(self.base(v) for v in items)
        if self.shape == "list" and value is not None:
            return list(value)
        if self.shape == "text" and value is not None:
            return _first_parse(self.base, value)
        return value

    def words(self, value: Any) -> list[str]:
        """The command-line words that set this field to `value`."""
        if self.shape == "bool":
            return [self._bool_flag(value)]
        if self.shape == "json":
            return [self.flag, json.dumps(value, separators=(",", ":"))]
        if self.shape == "seq":
            return [self.flag, meta(self.field, "sep").join(str(v) for v in value)]
        if self.shape == "list":
            return [w for v in value for w in (self.flag, str(v))]
        return [self.flag, str(value)]

    def _bool_flag(self, value: bool) -> str:
        decls = meta(self.field, "flags")
        on, _, off = (decls[0] if decls else self.flag).partition("/")
        return on if value else (off or "--no-" + on[2:])


def field_options(cls: type) -> list[FieldOption]:
    """The command-line form of every field of a config dataclass (`cli=False` ones left out)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not meta(f, "cli"):
            continue
        expand = meta(f, "expand")
        if expand is not None:
            out.append(FieldOption(f, "json", dict, None, tuple(field_options(expand))))
            continue
        out.append(_shape(f, hints[f.name]))
    return out


def _shape(f: dataclasses.Field[Any], tp: Any) -> FieldOption:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if len(args) > 1:
            return FieldOption(f, "text", tuple(args), None)
        tp = args[0]
        args = list(typing.get_args(tp))
    origin = typing.get_origin(tp) or tp
    if origin is dict:
        return FieldOption(f, "json", dict, None)
    if origin in (tuple, list):
        shape = "seq" if meta(f, "sep") else "list"
        return FieldOption(f, shape, args[0] if args else str, origin)
    return FieldOption(f, "bool" if tp is bool else "plain", tp, None)


def _first_parse(types_: tuple[Any, ...], text: str) -> Any:
    """`text` as the first of a union's number types that parses it, else the text."""
    for tp in types_:
        if tp in (int, float):
            try:
                return tp(text)
            except ValueError:
                continue
    return text


def _flat(options: list[FieldOption]) -> list[FieldOption]:
    return [s for o in options for s in (o, *o.subs)]


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """The config that parsed command-line values (by parameter name) describe."""
    kwargs: dict[str, Any] = {}
    for o in field_options(cls):
        value = o.to_config(values[o.name])
        given = {s.name: values[s.name] for s in o.subs if values[s.name] != default_of(s.field)}
        if given:
            value = {**({} if value is MISSING else value), **given}
        if value is not MISSING:
            kwargs[o.name] = value
    return cls(**kwargs)


def config_command(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `fn(cfg, **own)` -> a typer command with `cls`'s fields as its options."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        options = _flat(field_options(cls))
        clash = {o.name for o in options} & {p.name for p in own}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} are also config fields")
        params = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                                    default=o.cli_default(), annotation=o.annotation())
                  for o in options]
        params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        def command(**values):
            cfg = build_config(cls, values)
            return fn(cfg, **{p.name: values[p.name] for p in own})

        command.__signature__ = inspect.Signature(params)
        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(command, attr, getattr(fn, attr))
        return command

    return decorate


def command_args(cfg: Any) -> tuple[list[str], list[str]]:
    """(options that write `cfg`, `name=value` notes for fields without a flag).

    Fields at their default or None are left out, and secret ones (storage options) always.
    """
    by_name = {o.name: o for o in field_options(type(cfg))}
    words: list[str] = []
    notes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if meta(f, "secret") or value is None or value == default_of(f):
            continue
        option = by_name.get(f.name)
        if option is None:
            notes[f.name] = value
        elif option.subs:
            subs = {s.name: s for s in option.subs}
            rest = {k: v for k, v in value.items() if k not in subs}
            words += option.words(rest) if rest else []
            for key, item in value.items():  # a flag's default value needs no words
                if key in subs and item != default_of(subs[key].field):
                    words += subs[key].words(item)
        else:
            words += option.words(value)
    return words, [f"{k}={json.dumps(v, default=str)}" for k, v in notes.items()]


def _register() -> None:
    """The slurm executor writes `scope <stage>` array-task lines with these words."""
    from pipelines.executors.base import register_command_args

    register_command_args(command_args)


_register()
