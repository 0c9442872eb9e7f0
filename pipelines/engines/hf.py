"""`hf:<path-or-hub-id>`: sampling with a transformers causal LM, the CPU default and test path.

A small sampling loop over `model(input_ids, past_key_values=cache)` (what `model.generate`
does, minus its generality) so that every sample is reproducible on its own and its log-probs
are exact:

- every sample i of a request gets its own random stream, seeded `request.seed + i` (the same
  rule vLLM uses for the children of an n > 1 request), drawn up front; the t-th token is the
  inverse-CDF draw of uniform u_t from the processed distribution. So a sample depends on its
  seed, prompt and the model, not on the other rows of its batch (up to the last-bit float noise
  that a different batch shape can cause in the matmuls) nor on torch's global RNG;
- the processed distribution at temperature T, top-k k and nucleus p is (vLLM's order)
      softmax(logits / T), restricted to the tokens whose logit is >= the k-th largest
      (k = 0: all), renormalised, then restricted to the smallest top set of mass >= p,
      renormalised again: q,
  and the behaviour log-prob of token y is log q(y), the renormalised ("processed") log-prob.
  With top_p = 1 and top_k off this is exactly `log_softmax(logits / T)[y]`, what the trainer
  recomputes; otherwise it is larger by -log(kept mass) (vLLM's `processed_logprobs` follows
  the same rule). T = 0 is greedy
  (argmax) and reports `log_softmax(logits)[y]` (T = 1), like vLLM;
- rows are sorted by length and batched with left padding (position ids from the attention
  mask, as `generate` computes them); finished rows leave the KV cache in bulk (once a
  quarter of the batch has finished);
- a sample stops at an EOS token (kept as the last token id, with its log-prob, finish_reason
  "stop") or after max_new_tokens ("length"). `text` is decoded without special tokens.

`prefix_token_ids` are fed after the prompt and only the new tokens are returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.engines.base import GenerationRequest, GenerationResult, check_remote_code
from pipelines.engines.spec import EngineSpec, load_tokenizer, local_model_path, resolve


@dataclass
class _Sample:
    index: tuple[int, int]  # (request index, sample index)
    input_ids: list[int]
    seed: int
    temperature: float
    top_p: float
    max_new_tokens: int
    top_k: int = 0


def process_logits(logits: Any, temperature: Any, top_p: Any, nucleus: bool = True,
                   top_k: Any = None) -> Any:
    """Log-probs of the processed distribution, rows of `logits` (B, V).

    `temperature`, `top_p`, `top_k`: (B, 1) tensors (top_k <= 0: off; None: off for every row);
    temperature 0 rows use T = 1 (greedy rows). `nucleus=False` skips the top-k/top-p steps (a
    fast path when every row has top_p = 1 and top_k off).
    """
    import torch

    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logp = torch.log_softmax(logits.float() / t, dim=-1)
    if nucleus and top_k is not None and bool((top_k > 0).any()):
        vocab = logp.shape[-1]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).long()
        kth = torch.sort(logp, dim=-1, descending=True).values.gather(-1, k - 1)
        logp = torch.log_softmax(logp.masked_fill(logp < kth, float("-inf")), dim=-1)
    if nucleus and bool((top_p < 1).any()):
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_logp.exp(), dim=-1) - sorted_logp.exp()
        drop_sorted = (mass_before >= top_p) & (top_p < 1)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def sample_tokens(logp: Any, u: Any) -> Any:
    """Inverse-CDF draw of one token per row of log-probs `logp` (B, V), `u` (B, 1) uniform in
    [0, 1): the first token whose CDF reaches (1 - u) * total mass. The threshold lies in
    (0, total], so a zero-probability token is never chosen and no index runs past the end."""
    import torch

    cdf = torch.cumsum(logp.exp(), dim=-1)
    return torch.searchsorted(cdf, (1 - u) * cdf[:, -1:]).squeeze(-1)


def load_model_and_tokenizer(
    spec: EngineSpec, *, device: str, dtype: str | None, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Load `AutoModelForCausalLM` (safetensors) + its tokenizer in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in stage output
    source = local_model_path(str(resolve(spec).model_path))
    check_remote_code(source, trust_remote_code)
    torch_dtype = getattr(torch, dtype or ("float32" if device == "cpu" else "bfloat16"))
    try:
        tok = load_tokenizer(source, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {spec.target!r}: {e}") from None
    return model.to(device).eval(), tok


class HFGenerationEngine:
    """Batched sampling with a transformers model; see the module docstring for the maths."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 64,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        **_ignored: Any,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.spec = spec
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_model_and_tokenizer(
            spec, device=self.device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.batch_size = batch_size
        config_len = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or config_len, config_len)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)

    def generate(self, requests: list[GenerationRequest]) -> list[list[GenerationResult]]:
        """One list of `n` results per request, in request order."""
        samples = []
        for r, req in enumerate(requests):
            ids = list(req.prompt_token_ids) + list(req.prefix_token_ids)
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"request {r}: {len(ids)} prompt+prefix tokens do not fit max_model_len "
                    f"{self.max_model_len}"
                )
            room = min(req.max_new_tokens, self.max_model_len - len(ids))
            for i in range(req.n):
                samples.append(_Sample((r, i), ids, req.seed + i, req.temperature, req.top_p,
                                       room, req.top_k))
        samples.sort(key=lambda s: (len(s.input_ids), s.index))
        out: dict[tuple[int, int], GenerationResult] = {}
        for start in range(0, len(samples), self.batch_size):
            batch = samples[start : start + self.batch_size]
            for s, result in zip(batch, self._generate_batch(batch), strict=True):
                out[s.index] = result
        return [[out[(r, i)] for i in range(req.n)] for r, req in enumerate(requests)]

    def _generate_batch(self, batch: list[_Sample]) -> list[GenerationResult]:
        import torch
        from transformers import DynamicCache

        dev = self.device
        width = max(len(s.input_ids) for s in batch)
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(s.input_ids)) + s.input_ids for s in batch], device=dev
        )
        mask = torch.tensor(
            [[0] * (width - len(s.input_ids)) + [1] * len(s.input_ids) for s in batch], device=dev
        )
        steps = max(s.max_new_tokens for s in batch)
        # per live row (re-indexed only when rows finish): uniforms, temperature, top-p
        u = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s.seed))
                         for s in batch]).to(dev)
        temp = torch.tensor([[s.temperature] for s in batch], device=dev)
        top_p = torch.tensor([[s.top_p] for s in batch], device=dev)
        top_k = torch.tensor([[s.top_k] for s in batch], device=dev)
        nucleus = any(s.top_p < 1 or s.top_k > 0 for s in batch)
        any_greedy = any(s.temperature <= 0 for s in batch)
        greedy = temp[:, 0] <= 0
        rows = list(range(len(batch)))  # batch row of each cache row
        live = [True] * len(batch)  # per cache row: still sampling
        tokens: list[list[int]] = [[] for _ in batch]
        logprobs: list[list[float]] = [[] for _ in batch]
        finish = ["length"] * len(batch)
        cache = DynamicCache(config=self.model.config)
        step_ids, step_pos = input_ids, (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            for t in range(steps):
                logits = self.model(
                    input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                    past_key_values=cache, use_cache=True, logits_to_keep=1,
                ).logits[:, -1, :]
                logp = process_logits(logits, temp, top_p, nucleus, top_k)
                nxt = sample_tokens(logp, u[:, t : t + 1])
                if any_greedy:
                    nxt = torch.where(greedy, logp.argmax(-1), nxt)
                chosen = logp.gather(-1, nxt[:, None]).squeeze(-1)
                for j, (row, tok, lp) in enumerate(
                    zip(rows, nxt.tolist(), chosen.tolist(), strict=True)
                ):
                    if not live[j]:
                        continue
                    tokens[row].append(tok)
                    logprobs[row].append(lp)
                    if tok in self.eos_ids:
                        finish[row] = "stop"
                        live[j] = False
                    elif len(tokens[row]) >= batch[row].max_new_tokens:
                        live[j] = False
                keep = [j for j, alive in enumerate(live) if alive]
                if not keep:
                    break
                if 4 * (len(rows) - len(keep)) >= len(rows):  # drop finished rows in bulk
                    idx = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(idx)
                    rows, live = [rows[j] for j in keep], [True] * len(keep)
                    mask, nxt, step_pos = mask[idx], nxt[idx], step_pos[idx]
                    u, temp, top_p, greedy = u[idx], temp[idx], top_p[idx], greedy[idx]
                    top_k = top_k[idx]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                step_pos = step_pos[:, -1:] + 1
                step_ids = nxt[:, None]
        return [
            GenerationResult(tok, self.tokenizer.decode(tok, skip_special_tokens=True), lp, fin)
            for tok, lp, fin in zip(tokens, logprobs, finish, strict=True)
        ]

    def update_weights(self, model_dir: str) -> None:
        """Load another version's safetensors into the running model (same architecture).

        Every parameter must be in the file except output embeddings tied to the input ones;
        a file with unknown or missing tensors is refused and the engine keeps its weights."""
        import torch

        from pipelines.engines.base import read_safetensors

        state = read_safetensors(model_dir)
        own = dict(self.model.named_parameters())
        tied = {n for n, p in own.items()
                if p is self.model.get_input_embeddings().weight and n not in state}
        missing = sorted(set(own) - set(state) - tied)
        unknown = sorted(set(state) - set(self.model.state_dict()))
        if missing or unknown:
            raise ValueError(f"{model_dir}: weights do not match the running model "
                             f"(missing {missing[:3]}, unknown {unknown[:3]})")
        with torch.no_grad():
            self.model.load_state_dict(state, strict=False)

    def close(self) -> None:
        self.model = None


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the model has no eos_token_id (generation_config or tokenizer)")
    return ids
