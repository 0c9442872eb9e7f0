"""Engine spec strings (DESIGN.md section 4): parsing, resolution to paths, the tokenizer loader.

`parse_spec` turns a spec string into an `EngineSpec`; `resolve` is the one place that says
which weights and which tokenizer a spec names and whether `scope train` can update it (every
stage, the trainer, the round loop and the engines ask it); `load_tokenizer` is the one
(cached) tokenizer loader.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scope_data.tasks import EXACT_TASKS  # rule:<task> PRMs and oracle:<task> teachers

GENERATION_FORMS = ("hf:<path-or-hub-id>", "vllm:<path-or-hub-id>", "openai:<base_url>#<model>")
PRM_FORMS = ("rule:arith", "hf-cls:<model>", "hf-tag:<model>", "vllm:<model>", "rule:countdown",
             "noisy:<prm>?f1=F&seed=S")
TEACHER_FORMS = GENERATION_FORMS + ("oracle:arith", "reference", "oracle:countdown")
TRAINABLE_KINDS = ("hf", "vllm")  # local or hub causal-LM weights
NOISY_PARAMS = {"f1": float, "seed": int}  # noisy:<prm>?f1=F&seed=S (seed optional, 0)


class SpecError(ValueError):
    """An engine spec string that does not parse; the message lists the valid forms."""


@dataclass(frozen=True)
class EngineSpec:
    """A parsed spec: `kind:target`, the model name of `openai:<base_url>#<model>`, and the
    role it was parsed for ("generation", "prm" or "teacher")."""

    kind: str
    target: str
    model: str | None = None
    role: str = "generation"

    def __str__(self) -> str:
        if self.kind == "reference":
            return "reference"
        return f"{self.kind}:{self.target}" + (f"#{self.model}" if self.model else "")


def parse_spec(spec: str, role: str = "generation") -> EngineSpec:
    """Parse `spec` for `role` in {"generation", "prm", "teacher"}; SpecError lists valid forms."""
    forms = {"generation": GENERATION_FORMS, "prm": PRM_FORMS, "teacher": TEACHER_FORMS}[role]
    kinds = {f.split(":")[0] for f in forms}
    text = (spec or "").strip()
    kind, sep, target = text.partition(":")
    if text == "reference" and "reference" in kinds:
        return EngineSpec("reference", "", role=role)
    if not sep or kind not in kinds or not target:
        raise SpecError(f"unknown {role} engine spec {spec!r}; valid forms: {', '.join(forms)}")
    if kind in ("rule", "oracle") and target not in EXACT_TASKS:
        raise SpecError(f"unknown {role} engine spec {spec!r}: {kind}:<task> exists for "
                        f"{', '.join(EXACT_TASKS)}")
    if kind == "noisy":
        noisy_params(EngineSpec(kind, target, role=role))  # raises for a bad form
    if kind == "openai":
        base_url, hash_sign, model = target.partition("#")
        if not hash_sign or not base_url or not model:
            raise SpecError(f"openai spec {spec!r} must look like openai:<base_url>#<model>")
        return EngineSpec("openai", base_url, model, role)
    return EngineSpec(kind, target, role=role)


def noisy_params(spec: EngineSpec) -> tuple[EngineSpec, dict[str, float | int]]:
    """The inner PRM spec and the parameters (``f1`` in [0, 1], ``seed``) of a
    ``noisy:<prm>?f1=F&seed=S`` spec; SpecError naming the bad part."""
    inner_text, sep, query = spec.target.rpartition("?")
    form = "noisy:<prm>?f1=F&seed=S"
    if not sep or not inner_text:
        raise SpecError(f"noisy PRM spec {str(spec)!r} must look like {form}")
    params: dict[str, float | int] = {}
    for pair in query.split("&"):
        key, eq, value = pair.partition("=")
        if key not in NOISY_PARAMS or not eq or key in params:
            raise SpecError(f"noisy PRM spec {str(spec)!r}: bad parameter {pair!r} "
                            f"(expected {form})")
        try:
            params[key] = NOISY_PARAMS[key](value)
        except ValueError:
            raise SpecError(f"noisy PRM spec {str(spec)!r}: {key} must be a number, "
                            f"got {value!r}") from None
    if "f1" not in params or not 0 <= params["f1"] <= 1:
        raise SpecError(f"noisy PRM spec {str(spec)!r} needs f1 in [0, 1] ({form})")
    return parse_spec(inner_text, "prm"), {"seed": 0, **params}


def parse_model(text: str) -> EngineSpec:
    """A model to load or train: any engine spec (PRM kinds parsed as PRMs), or a bare folder /
    hub id (read as `hf:`)."""
    kind, sep, _ = text.partition(":")
    if kind in ("rule", "hf-cls", "hf-tag", "noisy") and sep:
        return parse_spec(text, "prm")
    if text == "reference" or (sep and kind in {f.split(":")[0] for f in TEACHER_FORMS}):
        return parse_spec(text, "teacher")
    return EngineSpec("hf", text)


@dataclass(frozen=True)
class ResolvedModel:
    """What a spec names: the weights to load (None: a remote endpoint or a rule), the tokenizer
    to load (None: none needed) and whether `scope train` can update the weights (a causal LM
    policy or teacher: `hf:`, `vllm:`; never a PRM)."""

    model_path: str | None
    tokenizer_path: str | None
    trainable: bool


def resolve(spec: EngineSpec, tokenizer: str | None = None) -> ResolvedModel:
    """The model path, tokenizer path and trainability of a parsed spec.

    `tokenizer` overrides the tokenizer (`--tokenizer`); without it an `openai:` spec's
    tokenizer is its served model name and a local/hub model's is its own folder.
    """
    if spec.kind == "openai":
        return ResolvedModel(None, tokenizer or spec.model, False)
    if spec.kind in ("rule", "oracle", "reference"):
        return ResolvedModel(None, tokenizer, False)
    if spec.kind == "noisy":  # the inner PRM's weights and tokenizer
        return resolve(noisy_params(spec)[0], tokenizer)
    trainable = spec.kind in TRAINABLE_KINDS and spec.role != "prm"
    return ResolvedModel(spec.target, tokenizer or spec.target, trainable)


def policy_tokenizer_path(policy: str, override: str | None = None) -> str:
    """The tokenizer behind a rollouts table's `policy` column (`override`: the user's choice)."""
    if override:
        return override
    path = resolve(parse_model(policy)).tokenizer_path
    if path is None:
        raise ValueError(f"policy {policy!r} names no tokenizer; pass the policy tokenizer")
    return path


def trainable_path(policy: str) -> str:
    """The weights `scope train` loads for a policy spec (ValueError if it has none)."""
    resolved = resolve(parse_model(policy))
    if not resolved.trainable or resolved.model_path is None:
        raise ValueError(f"policy spec {policy!r} has no trainable weights; use hf:<path>")
    return resolved.model_path


def trained_spec(policy: str, folder: str) -> str:
    """The spec of a checkpoint trained from `policy` and saved in `folder` (same engine kind)."""
    kind = parse_model(policy).kind
    return str(EngineSpec(kind if kind in TRAINABLE_KINDS else "hf", folder))


def local_model_path(target: str) -> str:
    """A local folder as is; anything that looks like a path but is missing raises naming it."""
    path = Path(target).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {target!r} has no config.json")
        return str(path)
    looks_local = target.startswith((".", "/", "~")) or target.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"model path {target!r} does not exist")
    return target  # a hub id: from_pretrained resolves it (from the local HF cache offline)


def load_tokenizer(path: str, trust_remote_code: bool = False, local_only: bool = False) -> Any:
    """`AutoTokenizer.from_pretrained(path)`, loaded once per process and folder content.

    `local_only`: never download (a path a TABLE named, e.g. its `policy` column: data must
    not make scope fetch anything; the user's own options may).

    Callers share the object: never mutate it. A folder whose tokenizer files change (a model
    saved again to the same path) is loaded anew. OSError becomes FileNotFoundError naming path.
    """
    return _load_tokenizer(str(path), bool(trust_remote_code), bool(local_only),
                           _files_stamp(str(path)))


def _files_stamp(path: str) -> tuple[tuple[str, int, int], ...]:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                        for p in folder.iterdir() if p.is_file()))


@functools.lru_cache(maxsize=16)
def _load_tokenizer(path: str, trust_remote_code: bool, local_only: bool,
                    _stamp: tuple[Any, ...]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                             local_files_only=local_only)
    except OSError as e:
        hint = (" (named by the table, which never makes scope download anything: pass the "
                "tokenizer option)" if local_only else "")
        raise FileNotFoundError(f"cannot load the tokenizer {path!r}{hint}: {e}") from None
