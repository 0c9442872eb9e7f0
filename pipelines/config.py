"""Config dataclass fields that describe themselves: help text, CLI flag, identity.

Stage configs declare their fields with `option(default, help=...)`, the way TRL configs carry
`field(metadata={"help": ...})` for `transformers.HfArgumentParser`. One declaration feeds:

- the `scope <stage>` options (`cli/options.py` builds them: flag, help, default);
- the commands `scope run --dry-run` prints (the same flags);
- `identity(cfg)`: the one answer to "what does this output depend on", hashed into
  `scope run` stage markers and (with model fingerprints, `manifest_config`) into table
  manifests: a changed identity field reruns the stage;
- `engine_options(cfg)`, the engine keyword arguments (fields marked `engine`);
- `TrainConfig.training_arguments()` (fields marked `trainer`).

Metadata keys (all optional except `help`): `flags` (CLI declarations where they differ from
`--field-name`, e.g. `"--lr"` or `"--only-failed/--all"`), `identity` (False: how to run, not
what comes out: input and output paths, shards, devices, batch and memory knobs), `secret`
(never hashed, recorded or printed: storage options), `cli` (False: no CLI option), `sep`
(a sequence field written as one CLI value, items joined by `sep`), `expand` (a dict field
filled on the CLI by one option per field of the given dataclass), `argument` (positional),
`envvar` (CLI fallback), `engine` (an engine keyword argument: True for the field's name, or
the keyword), `trainer` (passed to `TrainingArguments` under the same name), `model` (an engine
spec whose local weights are fingerprinted: its role, generation | prm | teacher).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

STORAGE_OPTIONS_HELP = (
    "fsspec storage options as JSON (e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'); "
    "default: $SCOPE_STORAGE_OPTIONS. Credentials are never written to manifests."
)


def option(default: Any = dataclasses.MISSING, *, help: str,
           default_factory: Any = dataclasses.MISSING, flags: str | tuple[str, ...] = (),
           identity: bool = True, secret: bool = False, cli: bool = True,
           sep: str | None = None, expand: type | None = None, argument: bool = False,
           envvar: str | None = None, engine: bool | str = False, trainer: bool = False,
           model: str | None = None) -> Any:
    """A dataclass field carrying its CLI and identity metadata (see the module docstring)."""
    meta = {"help": help, "flags": (flags,) if isinstance(flags, str) else tuple(flags),
            "identity": identity and not secret, "secret": secret, "cli": cli, "sep": sep,
            "expand": expand, "argument": argument, "envvar": envvar, "engine": engine,
            "trainer": trainer, "model": model}
    return dataclasses.field(default=default, default_factory=default_factory,
                             repr=not secret, metadata=meta)


def storage_options_field() -> Any:
    """The `storage_options` field every table-reading config has (credentials: secret)."""
    return option(None, help=STORAGE_OPTIONS_HELP, secret=True, envvar="SCOPE_STORAGE_OPTIONS")


def num_shards_field() -> Any:
    return option(1, help="split the stage into N parts", identity=False)


def shard_index_field() -> Any:
    return option(None, help="run only this part (N machines split a stage)", identity=False)


def meta(f: dataclasses.Field[Any], key: str) -> Any:
    """A metadata value of a field (defaults as `option` sets them, for plain fields too)."""
    return f.metadata.get(key, {"identity": True, "cli": True, "flags": ()}.get(key))


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (`dataclasses.MISSING` for a required field)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def identity(cfg: Any) -> dict[str, Any]:
    """What an output made with `cfg` depends on: every identity field, as JSON values.

    The one function that decides a config's identity for hashing (manifests, part markers,
    `scope run` stage markers). Fields marked `identity=False` or `secret` are left out, so
    credentials never reach a hash or a manifest; defaults are included, so a manifest says
    everything its table depends on. Stages add what a field cannot say (model fingerprints).
    """
    body = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if meta(f, "identity") and not meta(f, "secret")}
    return json.loads(json.dumps(body, default=str))


def manifest_config(stage: str, cfg: Any) -> dict[str, Any]:
    """A stage table's config: the stage, `identity(cfg)` and `<field>_fingerprint` of each
    `model` field (`engines.fingerprint`: new weights saved to the same path rerun the stage)."""
    from pipelines.engines.fingerprint import model_fingerprint

    prints = {f"{f.name}_fingerprint": model_fingerprint(getattr(cfg, f.name), meta(f, "model"))
              for f in dataclasses.fields(cfg) if meta(f, "model")}
    return {"stage": stage, **identity(cfg), **prints}


def engine_options(cfg: Any) -> dict[str, Any]:
    """The engine keyword arguments of a config: its `engine` fields that are not None."""
    out = {}
    for f in dataclasses.fields(cfg):
        key, value = meta(f, "engine"), getattr(cfg, f.name)
        if key and value is not None:
            out[f.name if key is True else key] = value
    return out
