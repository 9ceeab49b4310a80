"""Choosing a lock's heads by what they do, not by how well a probe reads them.

Held-out probe accuracy saturates (many heads reach 1.0 on SmolLM2), so "the K most accurate heads" is close
to an arbitrary choice among heads that read the answer's wording. Effect-based selection scores each
candidate (the probes' shortlist) by its direction added *alone* to the model, at strength ``alpha``
(``alpha * scale * direction`` in its o_proj input slice, exactly as a lock adds it):

- effect: the change in the model's preference for the safe answer over the unsafe one on held-out pairs:
  mean log-probability per token of the safe answer's first tokens minus the unsafe answer's, averaged over
  pairs (nats/token), with the head minus without it. Positive = pushes towards the safe answer.
- cost: KL(without || with) of next-token distributions over benign prompts and the model's own greedy
  answers to them (nats/token). The prompts are forge's own (``default_prompts/forge_benign.txt``), never
  an eval set.
- score = effect / sqrt(cost). To first order in alpha the effect grows linearly and KL quadratically, so
  this ratio does not depend on the strength it is measured at; effect / KL would favour heads that do
  nothing at all.

``effect`` keeps the K best scores. ``effect-greedy`` grows the set one head at a time: at each step it
measures the current set plus each of the ``pool`` best-scored remaining candidates and keeps the one
whose set has the best effect / sqrt(cost); the set, not the head, is judged, so heads that duplicate
each other stop paying off.

Every measurement is a forward pass of stock transformers with ``runtime.displacement_hooks``: exact, and
slow on a CPU (SmolLM2-135M: about 4 s per candidate), which is why the measuring set is small and capped.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from weightlock.core.lock import head_displacements
from weightlock.engines.hooks import displacement_hooks
from weightlock.errors import InvalidInputError

KL_FLOOR = 1e-12  # nats/token; a head with no measurable cost still gets a finite score


@dataclass(frozen=True)
class Candidate:
    layer: int
    head: int
    direction: np.ndarray  # unit, [head_dim]
    scale: float
    probe_accuracy: float


@dataclass(frozen=True)
class _Text:
    ids: list[int]
    first: int  # first logit position used (it predicts ids[first + 1])
    count: int  # logit positions used
    pair: int  # index of the pair (harmful texts), -1 for benign texts
    safe: bool


class EffectMeter:
    """Measures (effect, cost) of any set of displacements against the model without them."""

    def __init__(
        self,
        model,
        tokenizer,
        prompts: list[str],
        safe: list[str],
        unsafe: list[str],
        benign_prompts: list[str],
        *,
        answer_tokens: int = 8,
        benign_answer_tokens: int = 16,
        batch_size: int = 8,
    ):
        import torch

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.num_pairs = len(prompts)
        texts: list[_Text] = []
        for i, (prompt, *answers) in enumerate(zip(prompts, safe, unsafe, strict=True)):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for is_safe, answer in zip((True, False), answers, strict=True):
                full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
                take = min(answer_tokens, max(1, len(full) - len(prompt_ids)))
                start = max(1, len(full) - max(1, len(full) - len(prompt_ids)))  # first answer token
                texts.append(_Text(full[: start + take], start - 1, take, i, is_safe))
        for prompt_ids, answer_ids in zip(*self._benign_answers(benign_prompts, benign_answer_tokens), strict=True):
            texts.append(_Text(prompt_ids + answer_ids, len(prompt_ids) - 1, len(answer_ids), -1, False))
        self.texts = texts
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._base: dict[int, torch.Tensor] = {}
        self.base_margin, _ = self._run({})

    def _benign_answers(self, prompts: list[str], max_new_tokens: int):
        """Token ids of each prompt and of the model's greedy answer to it (through the first end token)."""
        import torch

        tokenizer = self.tokenizer
        stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        prompt_ids, answers = [], []
        try:
            for start in range(0, len(prompts), self.batch_size):
                chunk = [
                    tokenizer(p, add_special_tokens=False)["input_ids"]
                    for p in prompts[start : start + self.batch_size]
                ]
                batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt", padding=True)
                with torch.no_grad():
                    out = self.model.generate(
                        input_ids=batch["input_ids"].to(self.device),
                        attention_mask=batch["attention_mask"].to(self.device),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                for row, ids in zip(out[:, batch["input_ids"].shape[1] :].tolist(), chunk, strict=True):
                    end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                    prompt_ids.append(ids)
                    answers.append(row[: max(1, end)])
        finally:
            tokenizer.padding_side = side
        return prompt_ids, answers

    def measure(self, displacements: dict[int, np.ndarray]) -> tuple[float, float]:
        """(effect, cost) of running the model with ``displacements`` (layer -> o_proj input vector)."""
        margin, kl = self._run(displacements)
        return margin - self.base_margin, kl

    def _run(self, displacements: dict[int, np.ndarray]) -> tuple[float, float]:
        import torch

        pad = self.tokenizer.pad_token_id
        log_probs = np.zeros(len(self.texts))
        kl_total, kl_count = 0.0, 0
        with displacement_hooks(self.model, displacements), torch.no_grad():
            for start in range(0, len(self.texts), self.batch_size):
                chunk = self.texts[start : start + self.batch_size]
                width = max(len(t.ids) for t in chunk)
                # Left padding puts every text's scored positions at the end: only those logits are computed.
                keep = max(len(t.ids) - t.first for t in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, t in enumerate(chunk):
                    ids[b, width - len(t.ids) :] = torch.tensor(t.ids)
                    mask[b, width - len(t.ids) :] = 1
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=position_ids.to(self.device),
                    **({"logits_to_keep": keep} if self._keep_arg else {}),
                )
                logits = out.logits[:, -keep:].double()  # float64: KL of single heads is small
                for b, t in enumerate(chunk):
                    offset = keep - len(t.ids) + t.first
                    lp = torch.log_softmax(logits[b, offset : offset + t.count], -1)
                    index = start + b
                    if t.pair >= 0:
                        targets = torch.tensor(t.ids[t.first + 1 : t.first + 1 + t.count], device=lp.device)
                        log_probs[index] = lp.gather(1, targets[:, None]).mean().item()
                    elif index not in self._base:
                        self._base[index] = lp.float().cpu()
                    else:
                        base = self._base[index].to(lp.device).double()
                        kl_total += (base.exp() * (base - lp)).sum().item()
                        kl_count += t.count
        margins = [
            log_probs[i] - log_probs[i + 1] for i in range(0, 2 * self.num_pairs, 2)
        ]  # texts come as (safe, unsafe) per pair
        return float(np.mean(margins)), (kl_total / kl_count if kl_count else 0.0)


def displacements_of(candidates: list[Candidate], alpha: float, num_heads: int) -> dict[int, np.ndarray]:
    return head_displacements(
        [c.layer for c in candidates],
        [c.head for c in candidates],
        [c.direction for c in candidates],
        [c.scale for c in candidates],
        alpha,
        num_heads,
    )


def score(effect: float, kl: float) -> float:
    return effect / float(np.sqrt(max(kl, KL_FLOOR)))


def select_by_effect(
    meter: EffectMeter,
    candidates: list[Candidate],
    k: int,
    *,
    num_heads: int,
    alpha: float = 1.0,
    greedy: bool = False,
    pool: int = 8,
    progress: bool = False,
) -> tuple[list[int], dict]:
    """Indices into ``candidates`` of the heads to keep, and the record of every score used."""
    from tqdm import tqdm

    rows = []
    for c in tqdm(candidates, desc="measuring head effects", disable=not progress, leave=False):
        effect, kl = meter.measure(displacements_of([c], alpha, num_heads))
        if not (np.isfinite(effect) and np.isfinite(kl)):
            raise InvalidInputError(
                f"measuring head {c.layer}.{c.head} gave a non-finite effect or KL ({effect}, {kl})",
                hint="forge in float32 (--dtype float32), or lower --effect-alpha",
            )
        rows.append(
            {
                "layer": c.layer,
                "head": c.head,
                "probe_accuracy": round(float(c.probe_accuracy), 4),
                "effect": effect,
                "kl": kl,
                "score": score(effect, kl),
            }
        )
    ranked = sorted(range(len(candidates)), key=lambda i: -rows[i]["score"])  # stable: ties keep accuracy order
    steps = None
    if not greedy:
        chosen = ranked[:k]
    else:
        chosen, steps = [], []
        remaining = list(ranked)
        for _ in tqdm(range(k), desc="growing the head set", disable=not progress, leave=False):
            tried = []
            for i in remaining[:pool]:
                effect, kl = meter.measure(displacements_of([candidates[j] for j in chosen + [i]], alpha, num_heads))
                tried.append((score(effect, kl), i, effect, kl))
            best_ratio, best, effect, kl = max(tried, key=lambda t: t[0])
            chosen.append(best)
            remaining.remove(best)
            c = candidates[best]
            steps.append(
                {
                    "layer": c.layer,
                    "head": c.head,
                    "set_effect": effect,
                    "set_kl": kl,
                    "set_score": best_ratio,
                    "tried": len(tried),
                }
            )
    record = {
        "method": "effect-greedy" if greedy else "effect",
        "alpha": alpha,
        "effect": "change in mean per-token log-prob of the safe minus the unsafe answer's first tokens, "
        "held-out pairs (nats/token)",
        "cost": "KL(without || with) on forge's benign prompts and the model's own answers (nats/token)",
        "score": "effect / sqrt(cost)",
        "baseline_margin": meter.base_margin,
        "candidates": rows,
        "greedy_steps": steps,
        "greedy_pool": pool if greedy else None,
    }
    return chosen, record
