"""Recipes: one YAML file naming everything a `scope run` needs (problems, models, options).

```yaml
name: arith-tiny
algo: scope                 # grpo | luffy | prm_dense | scope (scope_data.algos)
seed: 0
rounds: 3
policy: tiny                # an engine spec (hf:/path, vllm:...) or `tiny` (built and cached)
tiny: {max_steps: 1000}     # build options when policy is tiny (TinyConfig fields; with
                            # task: countdown, CountdownTinyConfig fields)
prm: rule:arith
teacher: oracle:arith
problems:                   # training problems: {path: TABLE}, {arith: {count, seed, ...}}
                            # or {countdown: {count, seed, min_solutions, max_solutions, ...}}
  arith: {count: 64, seed: 1}
eval:                       # held-out sets, same forms plus a name; `every: K` evaluates a set
  - {name: heldout, arith: {count: 128, seed: 2}}   # at round 0, every K-th round and the
                                                      # last (default 1; 0: first and last only)
generate: {n: 4, temperature: 1.0, max_new_tokens: 64}   # per-stage options: the fields of
score: {}                                                 # each stage's config dataclass
correct: {}
train: {report_to: none}    # TrainConfig fields (tensorboard,wandb: RUN_DIR/tracking), plus
                            # carry_state (default true) and fixed_steps_per_round
evaluate: {n: 4, temperature: 0.6}
dynamic_sampling: {enable: true, max_num_gen_batches: 3}  # optional, DAPO (needs
                            # generate.prompts_per_round; pipelines.loop.sampling)
launch: {train: accelerate launch --config_file zero3.yaml -m cli.main}  # optional
executor: {executor: ray, ray_address: auto, retries: 2}  # optional: runs every sharded stage
```

`launch` only changes what `scope run --dry-run` prints for a stage run by hand (the loop
itself runs every stage in its own process).

Keys are checked: a typo names the valid keys. Relative `path:` entries resolve against the
recipe file's folder. Per-stage option names are checked when the stage config is built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scope_data.algos import ALGO_NAMES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
STAGE_KEYS = ("generate", "score", "correct", "train", "evaluate")
GENERATED_TASKS = ("arith", "countdown")  # problem sets a recipe may generate by name


@dataclass
class Recipe:
    """A parsed recipe; `source` is the file it came from (None when built in code)."""

    name: str
    algo: str
    seed: int
    rounds: int
    policy: str
    problems: dict[str, Any]
    eval: list[dict[str, Any]]
    prm: str = "rule:arith"
    teacher: str = "oracle:arith"
    tiny: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    correct: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    launch: dict[str, str] = field(default_factory=dict)  # stage -> launcher for --dry-run
    dynamic_sampling: dict[str, Any] = field(default_factory=dict)  # resolved: enable, cap
    executor: dict[str, Any] = field(default_factory=dict)  # generate/score/correct executor
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in self.__dataclass_fields__
                if k != "source"}


REQUIRED = ("name", "algo", "policy", "problems", "eval")
KNOWN = tuple(f for f in Recipe.__dataclass_fields__ if f != "source")


def resolve_recipe_path(name_or_path: str) -> Path:
    """A file path, or the name of a bundled recipe (`arith-tiny` -> pipelines/recipes/...)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise FileNotFoundError(
        f"recipe {name_or_path!r} not found (not a file; bundled recipes: {', '.join(known)})"
    )


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse and check a recipe file; `overrides` (e.g. {"algo": "grpo", "seed": 1}) win."""
    import yaml

    path = resolve_recipe_path(name_or_path)
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ValueError(f"{path}: {size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        body = yaml.load(path.read_text(), Loader=_no_alias_loader())  # a SafeLoader
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(body, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping")
    return recipe_from_dict({**body, **(overrides or {})}, source=str(path))


MAX_RECIPE_BYTES = 1 << 20


def _no_alias_loader() -> type:
    """yaml's SafeLoader refusing aliases: `*anchor` references let a few hundred bytes expand
    to gigabytes once written out (a "billion laughs" recipe); recipes never need them."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.events.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: YAML aliases (*name) are not "
                                     "allowed in a recipe")
            return super().compose_node(parent, index)

    return NoAliasLoader


def _typed(where: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    """`value` if it has the recipe type of `key` (bool is not an int here), else ValueError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: {key} must be {names}, got {type(value).__name__} "
                         f"{value!r}")
    return value


INT_RANGE = 1 << 63  # integers are stored as int64 columns and JSON numbers


def typed_options(cls: Any, options: dict[str, Any], where: str) -> dict[str, Any]:
    """`options` checked against the parameter types of `cls` (a dataclass or a function) with
    pydantic, strictly: a bool is not an int, 2.9 is not an int, "4" is not a number (an int may
    be a float, a list a tuple); integers stay within int64. ValueError names the option."""
    import inspect
    import json
    import typing

    import pydantic

    hints = typing.get_type_hints(cls)
    known = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {', '.join(sorted(known))}")
    strict = pydantic.ConfigDict(strict=True)
    out = {}
    for name, value in options.items():
        hint = hints.get(name, Any)
        try:
            text = json.dumps(value, allow_nan=True)
            out[name] = pydantic.TypeAdapter(hint, config=strict).validate_json(text)
        except (TypeError, ValueError) as e:  # pydantic.ValidationError is a ValueError
            reason = e.errors()[0]["msg"] if isinstance(e, pydantic.ValidationError) else str(e)
            raise ValueError(f"{where}: option {name} must be {_type_name(hint)}, got "
                             f"{type(value).__name__} {value!r:.80} ({reason})") from None
        _check_int_range(where, name, out[name])
    return out


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_int_range(where: str, name: str, value: Any) -> None:
    values = value.values() if isinstance(value, dict) else value if isinstance(
        value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, (list, tuple, dict)):
            _check_int_range(where, name, v)
        elif isinstance(v, int) and not isinstance(v, bool) and not -INT_RANGE <= v < INT_RANGE:
            raise ValueError(f"{where}: option {name} holds {v!r:.40}, outside the 64-bit "
                             "integer range")


def recipe_from_dict(body: dict[str, Any], source: str | None = None) -> Recipe:
    where = source or "recipe"
    unknown = sorted(set(body) - set(KNOWN))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(KNOWN)}")
    missing = [k for k in REQUIRED if k not in body]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    body = copy.deepcopy(body)
    if body["algo"] not in ALGO_NAMES:
        raise ValueError(f"{where}: algo {body['algo']!r} is not one of {', '.join(ALGO_NAMES)}")
    body.setdefault("seed", 0)
    body.setdefault("rounds", 1)
    for key, kind in (("name", str), ("algo", str), ("policy", str), ("prm", str),
                      ("teacher", str), ("seed", int), ("rounds", int)):
        if key in body:
            _typed(where, key, body[key], kind)
    if not 0 <= body["seed"] < INT_RANGE:
        raise ValueError(f"{where}: seed must be in [0, 2**63), got {body['seed']!r:.40}")
    if body["rounds"] < 1:
        raise ValueError(f"{where}: rounds must be >= 1, got {body['rounds']}")
    base = Path(source).parent if source else Path.cwd()
    body["problems"] = _problem_source(body["problems"], base, f"{where}: problems")
    extra = sorted(set(body["problems"]) - {"path", *GENERATED_TASKS})
    if extra:
        raise ValueError(f"{where}: problems: unknown key(s) {extra}; valid: path, "
                         f"{', '.join(GENERATED_TASKS)}")
    evals = body["eval"]
    if isinstance(evals, dict):
        evals = [evals]
    if not evals:
        raise ValueError(f"{where}: eval needs at least one problem set")
    body["eval"] = []
    for i, entry in enumerate(evals):
        entry = _problem_source(entry, base, f"{where}: eval[{i}]")
        entry.setdefault("name", f"eval{i}")
        extra = sorted(set(entry) - {"name", "path", *GENERATED_TASKS, "every"})
        if extra:
            raise ValueError(f"{where}: eval[{i}]: unknown key(s) {extra}; valid: name, path, "
                             f"{', '.join(GENERATED_TASKS)}, every")
        every = _typed(f"{where}: eval[{i}]", "every", entry.get("every", 1), int)
        if every < 0:
            raise ValueError(f"{where}: eval[{i}]: every must be >= 0, got {every}")
        body["eval"].append(entry)
    names = [e["name"] for e in body["eval"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: eval set names must be unique, got {names}")
    for key in (*STAGE_KEYS, "tiny", "launch", "dynamic_sampling", "executor"):
        value = body.get(key) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {key} must be a mapping of options")
        body[key] = value
    body["seed"], body["rounds"] = int(body["seed"]), int(body["rounds"])
    body["dynamic_sampling"] = _dynamic_sampling(body, f"{where}: dynamic_sampling")
    return Recipe(**body, source=source)


# verl's algorithm.filter_groups names; the mapping's presence enables it unless enable: false
DYNAMIC_SAMPLING = {"enable": (bool, True), "max_num_gen_batches": (int, 3)}


def _dynamic_sampling(body: dict[str, Any], where: str) -> dict[str, Any]:
    """The checked `dynamic_sampling` mapping with defaults, or {} when off."""
    given = body["dynamic_sampling"]
    unknown = sorted(set(given) - set(DYNAMIC_SAMPLING))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: "
                         f"{', '.join(DYNAMIC_SAMPLING)}")
    if not given:
        return {}
    out = {k: _typed(where, k, given.get(k, default), kind)
           for k, (kind, default) in DYNAMIC_SAMPLING.items()}
    if not out["enable"]:
        return {}
    if out["max_num_gen_batches"] < 1:
        raise ValueError(f"{where}: max_num_gen_batches must be >= 1, got "
                         f"{out['max_num_gen_batches']}")
    if body["generate"].get("prompts_per_round") is None:
        raise ValueError(f"{where}: needs generate.prompts_per_round (the problems of one "
                         "sampling batch and the number of groups a round trains on)")
    return out


def _problem_source(entry: Any, base: Path, where: str) -> dict[str, Any]:
    if isinstance(entry, str):
        entry = {"path": entry}
    kinds = [k for k in ("path", *GENERATED_TASKS) if isinstance(entry, dict) and k in entry]
    if len(kinds) != 1:
        raise ValueError(f"{where}: give exactly one of `path: TABLE`, `arith: {{count, seed}}` "
                         "or `countdown: {count, seed}`")
    entry = dict(entry)
    for key in ("path", "name"):
        if key in entry and not isinstance(entry[key], str):
            raise ValueError(f"{where}: {key} must be str, got {type(entry[key]).__name__} "
                             f"{entry[key]!r:.60}")
    if "path" in entry and "://" not in str(entry["path"]):
        entry["path"] = str((base / str(entry["path"])).expanduser())
    task = kinds[0]
    if task in GENERATED_TASKS:
        if not isinstance(entry[task] or {}, dict):
            raise ValueError(f"{where}: {task} must be a mapping of options (count, seed, ...)")
        opts = dict(entry[task] or {})
        if "count" not in opts:
            raise ValueError(f"{where}: {task} problems need a count")
        entry[task] = opts
    return entry
