"""Transformers PRMs: `hf-cls:<model>` (Qwen2.5-Math-PRM style), `hf-tag:<model>` (Math-Shepherd).

hf-cls (token classification, 2 labels). The chat template renders
    system: "Please reason step by step, and put your final answer within \\boxed{}."
    user: the problem
    assistant: s_1 <extra_0> s_2 <extra_0> ... s_K <extra_0>
and p_k = softmax(logits at the k-th separator)[1] (positive class = column 1; a 1-label head
gives sigmoid(logit)). Models whose config names `Qwen2ForProcessRewardModel` (the released
Qwen PRMs) need remote code: pass `trust_remote_code=True` (off by default) or use `vllm:`.

hf-tag (causal LM). The input is `problem + " " + "\\n".join(s_k + " ки")` and
p_k = softmax([z_good, z_bad])[0], where z are the LM logits read AT the k-th tag token (the
position whose next-token prediction is the "+"/"-" label the tag stands for; Math-Shepherd
trains and reads exactly there). Defaults: tag " ки", good "+", bad "-". Good/bad tokens are
looked up in the vocabulary first, else must encode to one token. Math-Shepherd's card reads
the ids of `tokenizer.encode("+ -")[1:]` ([648, 387]), which with a SentencePiece tokenizer may
be the word-initial pieces ("▁+", "▁-"): pass those exact pieces via good_token/bad_token.

Both: a step's text never contains the step token (occurrences are removed first). Tag positions
come from the tokenizer's offset mapping (the token holding the tag's last character), so the
tag id may also occur inside step text. Batches are packed by length: items sorted by token
count fill a batch while `rows * longest <= batch_tokens`, right padding.

Context rule: an input longer than `max_length` tokens keeps its first `max_length` tokens; the
steps whose tag falls beyond are NaN and the row's status is "truncated". Both families are
decoders (causal attention), so every kept step's score is exactly what the full input gives:
truncation never changes or invents a score, it only leaves the tail unscored.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from pipelines.engines.base import PRMScores, check_remote_code
from pipelines.engines.spec import EngineSpec, load_tokenizer, resolve

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16"
        ) from None


def single_token_id(tokenizer: Any, token: str, what: str) -> int:
    """The id of `token`: a vocabulary entry, or a string that encodes to exactly one token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
        return tid
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"{what} {token!r} is not a single token of this tokenizer (encodes to {ids}); "
            f"pass a token from the model's vocabulary"
        )
    return ids[0]


def pack_by_length(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches: sorted by length, each with rows * longest <= budget
    (a single longer row still gets its own batch)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max(lengths[i], max((lengths[j] for j in current), default=0))
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# decoder-only model types (causal self-attention): see `_HFPRM.causal`
CAUSAL_DECODERS = frozenset({
    "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2",
    "phi3", "deepseek_v2", "deepseek_v3", "internlm2", "olmo2",
})


class PRMInput:
    """How a PRM family renders (problem, steps) into token ids and where it reads each step.

    family "cls": chat template, steps each followed by the separator (default `<extra_0>`);
    family "tag": `problem + " " + "\\n".join(step + tag)` (default tag " ки"), good/bad tokens.
    Shared by the transformers and vLLM engines.
    """

    def __init__(
        self, tokenizer: Any, family: str, *, step_token: str | None = None,
        good_token: str = "+", bad_token: str = "-", system_prompt: str = QWEN_PRM_SYSTEM,
    ):
        if family not in ("cls", "tag"):
            raise ValueError(f"PRM family must be 'cls' or 'tag', got {family!r}")
        if not tokenizer.is_fast:
            raise ValueError("a fast tokenizer (offset mapping) is required for PRM scoring")
        self.tokenizer, self.family, self.system_prompt = tokenizer, family, system_prompt
        self.step_token = step_token or ("<extra_0>" if family == "cls" else " ки")
        self.joiner = "" if family == "cls" else "\n"
        if family == "cls":
            self.step_token_id = single_token_id(tokenizer, self.step_token, "step token")
        else:
            self.good_id = single_token_id(tokenizer, good_token, "good token")
            self.bad_id = single_token_id(tokenizer, bad_token, "bad token")

    def clean_steps(self, steps: list[str]) -> list[str]:
        tag = self.step_token.strip() or self.step_token
        return [s.replace(tag, "") for s in steps]

    def render(self, steps: list[str], problem: str) -> tuple[str, int, bool]:
        """(text, char offset where the step block starts, add_special_tokens)."""
        block = self.joiner.join(s + self.step_token for s in steps)
        if self.family == "tag":
            head = problem + " "
            return head + block, len(head), True
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": problem},
            {"role": "assistant", "content": block},
        ]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=False
            )
        else:
            text = f"{self.system_prompt}\n\n{problem}\n\n{block}"
        start = text.rfind(block) if block else len(text)
        if start < 0:
            raise ValueError("the chat template altered the step text")
        return text, start, False

    def encode(self, problem: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of the rendered input and the token index of each step's tag."""
        steps = self.clean_steps(steps)
        text, block_start, special = self.render(steps, problem)
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True,
                             verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        tag_ends, cursor = [], block_start
        for k, step in enumerate(steps):
            cursor += len(step) + len(self.step_token)
            tag_ends.append(cursor)
            cursor += len(self.joiner) if k < len(steps) - 1 else 0
        positions, t = [], 0
        for end in tag_ends:
            while t < len(offsets) and not (offsets[t][0] <= end - 1 < offsets[t][1]):
                t += 1
            if t == len(offsets):
                raise ValueError(f"step tag {self.step_token!r} not found in the tokens")
            positions.append(t)
        return ids, positions


def split_for_context(
    encoded: list[tuple[list[int], list[int]]], max_length: int
) -> tuple[list[PRMScores], list[tuple[int, list[int], list[int]]]]:
    """NaN-filled results and the (item, ids cut to max_length, tag positions) to run; rows
    longer than the context get status "truncated" (see the module docstring)."""
    results = [PRMScores([math.nan] * len(pos)) for _, pos in encoded]
    work = []
    for i, (ids, pos) in enumerate(encoded):
        if not pos:
            continue
        if len(ids) > max_length:
            results[i].status = "truncated"
            ids = ids[:max_length]
        work.append((i, ids, pos))
    return results, work


def mark_nan(results: list[PRMScores]) -> list[PRMScores]:
    for res in results:
        if res.status == "ok" and any(not math.isfinite(x) for x in res.scores):
            res.status = "nan"
    return results


class _HFPRM(ABC):
    """Shared loading, truncation and packed batching; subclasses load and read the model."""

    family = ""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        step_token: str | None = None,
        good_token: str = "+",
        bad_token: str = "-",
        trust_remote_code: bool = False,
        max_length: int | None = None,
        batch_tokens: int = 8192,
        device: str | None = None,
        dtype: str = "auto",
        system_prompt: str = QWEN_PRM_SYSTEM,
        **_: Any,
    ):
        import torch

        self.spec = spec
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.batch_tokens = int(batch_tokens)
        resolved = resolve(spec)
        path = str(resolved.model_path)
        check_remote_code(path, trust_remote_code)
        tokenizer = load_tokenizer(str(resolved.tokenizer_path), trust_remote_code)
        try:
            self.input = PRMInput(tokenizer, self.family, step_token=step_token,
                                  good_token=good_token, bad_token=bad_token,
                                  system_prompt=system_prompt)
        except ValueError as e:
            raise ValueError(f"{spec}: {e}") from None
        self.tokenizer = tokenizer
        self.model = self._load_model(path, trust_remote_code).to(self.device).eval()
        context = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_length = int(max_length or context)
        # Right padding never changes a causal decoder's outputs at real positions (they cannot
        # attend to later pads), so the padding mask is dropped for known decoder-only families:
        # attention then takes the fused causal kernel instead of a masked one (CPU, 32k-token
        # batches of ProcessBench inputs: 0.31x -> 0.59x the speed of one sequence at a time).
        self.causal = getattr(self.model.config, "model_type", None) in CAUSAL_DECODERS
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id or 0

    @abstractmethod
    def _load_model(self, path: str, trust_remote_code: bool) -> Any:
        """The family's model class loaded from ``path``."""

    @abstractmethod
    def _step_probs(self, input_ids: Any, attention_mask: Any, rows: Any, cols: Any) -> Any:
        """P(correct) at (rows, cols) of the padded batch."""

    def encode(self, problem: str, steps: list[str]) -> tuple[list[int], list[int]]:
        return self.input.encode(problem, steps)

    # -- scoring -------------------------------------------------------------------------
    def score(self, problem: str, steps: list[str]) -> list[float]:
        return self.score_batch([(problem, steps)])[0]

    def score_batch(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        return [r.scores for r in self.score_batch_with_status(items)]

    def score_batch_with_status(self, items: list[tuple[str, list[str]]]) -> list[PRMScores]:
        import torch

        encoded = [self.encode(problem, list(steps)) for problem, steps in items]
        results, work = split_for_context(encoded, self.max_length)
        lengths = [len(ids) for _, ids, _ in work]
        for batch in pack_by_length(lengths, self.batch_tokens):
            longest = max(lengths[j] for j in batch)
            input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            rows, cols, owners = [], [], []
            for r, j in enumerate(batch):
                i, ids, pos = work[j]
                input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[r, : len(ids)] = 1
                for k, p in enumerate(pos):
                    if p < len(ids):
                        rows.append(r)
                        cols.append(p)
                        owners.append((i, k))
            if not rows:
                continue
            with torch.inference_mode():
                probs = self._step_probs(
                    input_ids.to(self.device), None if self.causal else mask.to(self.device),
                    torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device),
                )
            for (i, k), p in zip(owners, probs.float().cpu().tolist(), strict=True):
                results[i].scores[k] = p
        return mark_nan(results)


class HFClsPRM(_HFPRM):
    """Qwen2.5-Math-PRM style: 2-class head read at each separator token."""

    family = "cls"

    def _load_model(self, path: str, trust_remote_code: bool) -> Any:
        from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        archs = getattr(config, "architectures", None) or []
        if trust_remote_code:
            return AutoModel.from_pretrained(
                path, trust_remote_code=True, dtype=self.torch_dtype, use_safetensors=True
            )
        if any("ProcessRewardModel" in a for a in archs):
            raise ValueError(
                f"{self.spec}: architecture {archs} is defined by the model's own code; pass "
                "--trust-remote-code to load it with transformers, or use vllm:<model>"
            )
        return AutoModelForTokenClassification.from_pretrained(
            path, dtype=self.torch_dtype, use_safetensors=True
        )

    def _step_probs(self, input_ids: Any, attention_mask: Any, rows: Any, cols: Any) -> Any:
        import torch

        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits if hasattr(out, "logits") else out[0]
        picked = logits[rows, cols].float()
        if picked.shape[-1] == 1:
            return torch.sigmoid(picked[:, 0])
        return torch.softmax(picked, dim=-1)[:, 1]


class HFTagPRM(_HFPRM):
    """Math-Shepherd style: P(good) / (P(good) + P(bad)) from the LM logits at each step tag."""

    family = "tag"

    def _load_model(self, path: str, trust_remote_code: bool) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=self.torch_dtype,
            use_safetensors=True,
        )

    def _step_probs(self, input_ids: Any, attention_mask: Any, rows: Any, cols: Any) -> Any:
        import torch

        # Only the good/bad rows of the LM head are needed: z = h @ W[[good, bad]].T (+ b).
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = self.model.get_output_embeddings()
        ids = torch.tensor([self.input.good_id, self.input.bad_id], device=hidden.device)
        z = hidden[rows, cols] @ head.weight[ids].T
        if getattr(head, "bias", None) is not None:
            z = z + head.bias[ids]
        return torch.softmax(z.float(), dim=-1)[:, 0]
