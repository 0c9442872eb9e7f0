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

from abc import ABC, abstractmethod
from typing import Any

from pipelines.engines.base import PRMScores, check_remote_code
from pipelines.engines.prm_inputs import QWEN_PRM_SYSTEM, PRMInput, mark_nan, split_for_context
from pipelines.engines.spec import EngineSpec, load_tokenizer, resolve


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
