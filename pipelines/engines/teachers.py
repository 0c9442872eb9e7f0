"""Teachers: who writes the rest of a failed response after the policy's kept prefix.

Every teacher answers ``continue_batch(items) -> [TeacherOutput(text, status, ...)]``: the
SUFFIX text that follows ``item.prefix_text`` (the policy's kept steps, decoded), one output per
item, never raising for a bad item. Statuses: ``ok``, ``teacher_error`` (the engine failed, timed
out or sent an invalid reply: ``retryable``, a rerun asks again; or, for good, the prompt did not
fit, the oracle could not continue), ``empty_response`` (blank
text), ``no_reference`` (the ``reference`` teacher and a problem without a usable solution).

- ``hf:``/``vllm:``/``openai:`` (:class:`EngineTeacher`): the problem is rendered with the
  TEACHER's chat template (``engines.prompts``, or ``raw``), and the kept prefix is the start of
  the assistant turn. With the policy's vocabulary the exact prefix ids are sent
  (``GenerationRequest.prefix_token_ids``); with another tokenizer the prefix text is encoded
  by the teacher's tokenizer. The suffix comes back as text either way.
- ``oracle:arith`` / ``oracle:countdown`` (:class:`OracleTeacher`): the task's
  ``oracle_continue``; arith's is the one canonical solution, countdown's a completion drawn
  uniformly among all of them, seeded by the item's seed (deterministic per item).
- ``reference`` (:class:`ReferenceTeacher`): the dataset's ``solution``, from its step k* on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from scope_data.steps import split_mode_for, split_steps
from scope_data.tasks import exact_task

logger = logging.getLogger(__name__)


@dataclass
class TeacherItem:
    """One continuation to write: the scored row (problem fields), the kept prefix and a seed."""

    row: dict[str, Any]
    prefix_text: str
    prefix_token_ids: list[int]  # POLICY token ids of the kept prefix
    prefix_steps: int  # k*: number of policy steps kept
    seed: int = 0


@dataclass
class TeacherOutput:
    """The suffix text after the prefix, why it stopped ("stop"/"length"/"error") and a status."""

    text: str
    status: str = "ok"
    finish_reason: str = "stop"
    detail: str = ""
    retryable: bool = False  # a transient failure (engine down, invalid reply): ask again later


class Teacher(Protocol):
    name: str
    deterministic: bool  # the same item always gives the same text: one attempt is enough

    def continue_batch(self, items: list[TeacherItem]) -> list[TeacherOutput]: ...

    def close(self) -> None: ...


def _checked(text: str, finish_reason: str = "stop") -> TeacherOutput:
    if not text.strip():
        return TeacherOutput(text, "empty_response", finish_reason)
    return TeacherOutput(text, "ok", finish_reason)


class OracleTeacher:
    """``oracle:<task>``: an exact continuation of a correct prefix of the task (``arith``:
    the canonical solution; ``countdown``: uniform among all completions, seeded by
    ``item.seed``). Always a valid solution: one attempt is enough."""

    deterministic = True

    def __init__(self, task: str = "arith") -> None:
        self.module = exact_task(task)
        self.name = f"oracle:{task}"
        self.seeded = task != "arith"  # arith's continuation is unique

    def continue_batch(self, items: list[TeacherItem]) -> list[TeacherOutput]:
        out = []
        for item in items:
            try:
                problem = self.module.parse_prompt(item.row["prompt"])
                seed = {"rng": f"{self.name}:{item.seed}"} if self.seeded else {}
                out.append(_checked(self.module.oracle_continue(problem, item.prefix_text,
                                                                **seed)))
            except ValueError as e:
                out.append(TeacherOutput("", "teacher_error", "error", f"{self.name}: {e}"))
        return out

    def close(self) -> None:
        pass


class ReferenceTeacher:
    """``reference``: the problem's reference ``solution`` from its step k* on.

    The solution is split with ``split_mode`` (``auto``: ``newline`` for arith and countdown,
    ``blank_line`` otherwise); the suffix is the solution text from step k*'s first character
    to its end, joined to the prefix by the step separator (one newline, or a blank line) minus
    the newlines the prefix already ends with.
    """

    name = "reference"
    deterministic = True

    def __init__(self, split_mode: str = "auto") -> None:
        self.split_mode = split_mode

    def continue_batch(self, items: list[TeacherItem]) -> list[TeacherOutput]:
        return [self._one(item) for item in items]

    def _one(self, item: TeacherItem) -> TeacherOutput:
        solution = item.row.get("solution")
        if not isinstance(solution, str) or not solution.strip():
            return TeacherOutput("", "no_reference", "error", "the problem has no solution")
        override = None if self.split_mode == "auto" else self.split_mode
        mode = split_mode_for(item.row.get("task"), override)
        steps = split_steps(solution, mode)
        k = item.prefix_steps
        if k >= len(steps):
            return TeacherOutput(
                "", "no_reference", "error", f"the solution has {len(steps)} steps, k* = {k}"
            )
        need = 1 if mode == "newline" else 2
        prefix = item.prefix_text
        have = prefix[len(prefix.rstrip()) :].count("\n")
        joiner = "\n" * max(0, need - have) if prefix.strip() else ""
        return _checked(joiner + solution[steps[k].char_start :])

    def close(self) -> None:
        pass


@dataclass
class EngineTeacher:
    """A generation engine (``hf:``, ``vllm:``, ``openai:``) continuing the kept prefix."""

    engine: Any
    policy_vocab: dict[str, int]
    template: str = "chat"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    deterministic: bool = field(init=False)  # greedy (temperature 0): one attempt is enough
    name: str = field(init=False)
    same_vocab: bool = field(init=False)

    def __post_init__(self) -> None:
        self.name = str(self.engine.spec)
        self.same_vocab = self.engine.tokenizer.get_vocab() == self.policy_vocab
        self.deterministic = self.temperature <= 0

    def request_for(self, item: TeacherItem) -> Any:
        """The GenerationRequest for one item (teacher prompt ids + prefix ids)."""
        from pipelines.engines.base import GenerationRequest
        from pipelines.engines.prompts import encode_prompt, render_prompt

        tok = self.engine.tokenizer
        prompt_ids = encode_prompt(
            tok, render_prompt(tok, item.row["prompt"], self.template), self.template
        )
        if self.same_vocab:
            prefix_ids = list(item.prefix_token_ids)
        else:
            prefix_ids = list(tok(item.prefix_text, add_special_tokens=False)["input_ids"])
        return GenerationRequest(
            prompt_token_ids=prompt_ids, n=1, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, seed=item.seed, prefix_token_ids=prefix_ids,
        )

    def continue_batch(self, items: list[TeacherItem]) -> list[TeacherOutput]:
        outputs: list[TeacherOutput | None] = [None] * len(items)
        requests, where = [], []
        limit = getattr(self.engine, "max_model_len", None)
        for i, item in enumerate(items):
            try:
                req = self.request_for(item)
            except Exception as e:  # noqa: BLE001  (a bad row never stops the stage)
                outputs[i] = TeacherOutput("", "teacher_error", "error", f"prompt: {e}")
                continue
            used = len(req.prompt_token_ids) + len(req.prefix_token_ids)
            if limit and used >= limit:
                outputs[i] = TeacherOutput(
                    "", "teacher_error", "error",
                    f"prompt+prefix has {used} teacher tokens, max_model_len is {limit}",
                )
                continue
            requests.append(req)
            where.append(i)
        for i, result in zip(where, self._generate(requests), strict=True):
            outputs[i] = result
        return [o for o in outputs if o is not None]

    def _generate(self, requests: list[Any]) -> list[TeacherOutput]:
        """Generate a batch. If it fails, retry request by request to isolate the bad ones;
        after two failures in a row (an endpoint that is down) the rest fail without retry."""
        if not requests:
            return []
        try:
            return [self._output(r[0]) for r in self.engine.generate(requests)]
        except Exception as e:  # noqa: BLE001  (a failed teacher call is a row status)
            error = e
        if len(requests) == 1:
            return [self._error(error)]
        outputs: list[TeacherOutput] = []
        in_a_row = 0
        for req in requests:
            if in_a_row >= 2:
                outputs.append(self._error(error))
                continue
            try:
                outputs.append(self._output(self.engine.generate([req])[0][0]))
                in_a_row = 0
            except Exception as e:  # noqa: BLE001
                error, in_a_row = e, in_a_row + 1
                outputs.append(self._error(e))
        return outputs

    def _error(self, e: Exception) -> TeacherOutput:
        logger.warning("teacher %s failed: %s", self.name, e)
        return TeacherOutput("", "teacher_error", "error", f"{type(e).__name__}: {e}",
                             retryable=True)

    @staticmethod
    def _output(result: Any) -> TeacherOutput:
        if result.finish_reason == "error":
            return TeacherOutput(result.text, "teacher_error", "error", "engine error",
                                 retryable=True)
        return _checked(result.text, result.finish_reason)

    def close(self) -> None:
        self.engine.close()


def load_teacher(
    spec: str,
    *,
    policy_tokenizer: Any = None,
    template: str = "chat",
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    split_mode: str = "auto",
    engine_options: dict[str, Any] | None = None,
) -> Teacher:
    """The teacher for a spec: ``oracle:<task>``, ``reference`` or a generation engine spec."""
    from pipelines.engines.base import load_generation_engine
    from pipelines.engines.spec import parse_spec

    parsed = parse_spec(spec, "teacher")
    if parsed.kind == "oracle":
        return OracleTeacher(parsed.target)
    if parsed.kind == "reference":
        return ReferenceTeacher(split_mode)
    if policy_tokenizer is None:
        raise ValueError(f"teacher {spec!r} needs the policy tokenizer")
    engine = load_generation_engine(parsed, **(engine_options or {}))
    return EngineTeacher(
        engine, policy_tokenizer.get_vocab(), template=template, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens,
    )
