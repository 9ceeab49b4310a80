"""forge's effect measurement as it was before candidates were batched: one set of displacements per
pass over every text (left-padded batches in the texts' own order, the full model run from the first
layer). Kept verbatim as the reference the batched, packed and replayed ``EffectMeter`` must equal
(tests/test_effect_batching.py). Where a model's RoPE changes with the longest position in a batch (dynamic,
longrope past the original context) its numbers depended on which texts shared a batch; there the reference
is this meter with one text per batch (each text alone)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from weightlock.engines.hooks import displacement_hooks


@dataclass(frozen=True)
class _Text:
    ids: list[int]
    first: int  # first logit position used (it predicts ids[first + 1])
    count: int  # logit positions used
    pair: int  # index of the pair (harmful texts), -1 for benign texts
    safe: bool


class OneAtATimeMeter:
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
