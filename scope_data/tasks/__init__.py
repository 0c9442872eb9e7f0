"""The synthetic tasks with an exact checker: one module each, one registry here.

A task module (``arith``, ``countdown``) holds pure logic with the same names: ``parse_prompt``
(prompt text -> problem), ``check_steps`` (one verdict per response line: the exact process
oracle, the ``rule:<task>`` PRM), ``first_error``, ``is_correct`` (the verifier),
``extract_answer``, ``response_lines`` and ``oracle_continue`` (the ``oracle:<task>`` teacher).
Responses of these tasks hold one step per line. The task is the ``task`` column of a problems
table (data); the PRM and teacher specs come from the user's options only.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXACT_TASKS = ("arith", "countdown")
"""Tasks with an exact verifier and process oracle, one step per response line."""


def task_module(task: str | None) -> ModuleType | None:
    """The module of an exact task (``arith``, ``countdown``), None for any other task."""
    if task not in EXACT_TASKS:
        return None
    return importlib.import_module(f"scope_data.tasks.{task}")


def exact_task(task: str | None) -> ModuleType:
    """The module of an exact task; ValueError naming the task otherwise."""
    module = task_module(task)
    if module is None:
        raise ValueError(f"task {task!r} has no exact checker (exact tasks: "
                         f"{', '.join(EXACT_TASKS)})")
    return module


def gold_first_error(task: str | None, prompt: str, response: str) -> int:
    """The exact checker's first error of a response (-1: a complete, correct solution; the
    number of lines: every line right but unfinished); ValueError for a task without checker or
    a prompt that is not of the task."""
    module = exact_task(task)
    return int(module.first_error(module.parse_prompt(prompt), response))


def solution_path(task: str | None, prompt: str, response: str) -> str | None:
    """The canonical solution path of a correct response, for tasks with many right answers
    (``countdown``: equal strings are the same solution); None for a wrong response, a prompt
    that is not of the task, or a task with one solution path."""
    module = task_module(task)
    path_of = getattr(module, "canonical_path", None)
    if path_of is None:
        return None
    try:
        return path_of(module.parse_prompt(prompt), response)
    except ValueError:
        return None


def has_paths(task: str | None) -> bool:
    """Whether the task's correct responses have distinct solution paths (countdown)."""
    return hasattr(task_module(task), "canonical_path")
