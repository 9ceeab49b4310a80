"""Fitting a lock's gate on the aligned base model (``forge --gate``).

For each layer the lock displaces, a linear probe is read on the layer's MLP input (what the baked gate neurons
read), from prompt tokens only: the pairs' requests (harmful) against forge's benign prompts. The gate decides per
token, so the probe must stay low on *every* benign token, not only at a prompt's end: it is fitted on the harmful
prompts' tokens after the prefix all prompts share (system prompt and template start), at most the last
``tail_tokens``, against every benign token (the shared prefix counted once). Its direction is the shrunk LDA
direction ``(S + lambda I)^-1 (mean_harmful - mean_benign)`` or the plain difference of means, whichever separates
the held-out prompts' last tokens better (AUC). Its thresholds come from the training prompts alone:

    low  = the ``benign_quantile`` of the scores of every benign prompt token
    high = the ``harmful_quantile`` of the harmful prompts' last DECISION_TOKENS tokens' scores (the request's end
           and the answer header, where the model decides how to answer)

(Fitting on the last tokens alone, against benign last tokens, gave probes that separate prompts' ends perfectly
but score some benign template tokens higher than harmful ends: on SmolLM2 such gates never opened.) A layer whose
probe does not separate (high <= low) gets ``high = low + the benign scores' spread``: it rarely opens, and the
record says so. The held-out split (forge's own, by pair and by benign prompt) measures each gate on the model
without the lock: AUC, and how often it is open (> 0.5) at the last prompt token and at any benign token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from weightlock.core.bounds import check_fields
from weightlock.core.families import shape_from_config, spec_for_config
from weightlock.core.gate import Gate, gate_value
from weightlock.core.lock import Lock
from weightlock.errors import UnsupportedError
from weightlock.lab.batches import in_batches
from weightlock.lab.forge import (
    ForgeSettings,
    _benign_prompts,
    _note,
    _transformers,
    prompt_text,
    render_prompt,
    split_pairs,
)
from weightlock.lab.pairs import load_pairs


@dataclass
class GateSettings:
    tail_tokens: int = 32  # harmful prompt tokens (after the shared prefix, the last N) the probe is fitted on
    benign_quantile: float = 0.99  # low: this quantile of every benign prompt token's score
    harmful_quantile: float = 0.5  # high: this quantile of the harmful prompts' tail-token scores
    shrinkage: float = 0.1  # LDA: lambda as a fraction of the mean variance


def check_gate_settings(gate: GateSettings) -> None:
    check_fields(
        gate,
        {
            "tail_tokens": "--gate-tail-tokens",
            "benign_quantile": "--gate-benign-quantile",
            "harmful_quantile": "--gate-harmful-quantile",
            "shrinkage": "shrinkage",
        },
    )


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The probability a positive scores above a negative (ties count half)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    scores = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties given their average rank
    return float(
        (ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative))
    )


DECISION_TOKENS = 8  # a prompt's last tokens, where the gate's high threshold is read


def common_prefix(ids: list[list[int]]) -> int:
    """How many leading tokens every text shares (the system prompt and template start)."""
    prefix = 0
    while all(len(i) > prefix + 1 for i in ids) and len({i[prefix] for i in ids}) == 1:
        prefix += 1
    return prefix


def _mlp_module(spec, layer: int) -> str:
    if spec.gated_mlp is None:
        raise UnsupportedError(
            f"forge --gate fits gates for Llama, Mistral and Qwen2 models only (their SwiGLU MLP holds the gate), "
            f"not for a {spec.family} model",
            hint="forge the lock without --gate",
        )
    return spec.gated_mlp.module.format(layer=layer)


def mlp_inputs(
    model, tokenizer, ids: list[list[int]], layers: list[int], batch_size: int, tail: int | None, probes=None, skip=0
):
    """Per text, the MLP inputs of ``layers`` at its tokens after the first ``skip``, the last ``tail`` of them
    (None: all): with ``probes`` None, the vectors ([texts] of [layers, tokens, hidden] float32); with ``probes``
    ([layers, hidden]), the scores ([texts] of [layers, tokens])."""
    torch, _ = _transformers()
    spec = spec_for_config(model.config.to_dict())
    captured: dict = {}
    device = next(model.parameters()).device
    probe_tensors = None if probes is None else torch.as_tensor(np.asarray(probes), dtype=torch.float32)

    def hook_for(i):
        def hook(module, args):
            captured[i] = args[0].detach().float()

        return hook

    handles = [
        model.get_submodule(_mlp_module(spec, layer)).register_forward_pre_hook(hook_for(i))
        for i, layer in enumerate(layers)
    ]
    out: list = []

    def run(start, chunk):
        batch = tokenizer.pad({"input_ids": list(chunk)}, return_tensors="pt", padding=True)
        mask = batch["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids.to(device),
            )
        results = []
        for b in range(len(chunk)):
            real = torch.nonzero(mask[b]).flatten()
            kept = real[skip:]
            positions = kept if tail is None else kept[-min(tail, len(kept)) :]
            stacked = torch.stack([captured[i][b, positions.to(captured[i].device)].cpu() for i in range(len(layers))])
            if probe_tensors is not None:
                stacked = torch.einsum("lth,lh->lt", stacked, probe_tensors)
            results.append(stacked.numpy())
        out.extend(results)

    try:
        in_batches(
            ids,
            batch_size,
            run,
            what="reading the gate's activations",
            hint="use fewer pairs (--limit) or a bigger device",
            notify=_note,
        )
    finally:
        for handle in handles:
            handle.remove()
    return out


def _rounded(value: float) -> float | None:
    """A rate for the manifest (JSON has no NaN: a rate over no held-out prompt is None)."""
    return None if not np.isfinite(value) else round(float(value), 4)


def _direction(harmful: np.ndarray, benign: np.ndarray, shrinkage: float, kind: str) -> np.ndarray:
    difference = harmful.mean(0) - benign.mean(0)
    if kind == "lda":
        centred = np.concatenate([harmful - harmful.mean(0), benign - benign.mean(0)])
        covariance = centred.T @ centred / max(1, len(centred) - 1)
        ridge = shrinkage * float(np.trace(covariance)) / covariance.shape[0]
        difference = np.linalg.solve(covariance + ridge * np.eye(covariance.shape[0]), difference)
    norm = float(np.linalg.norm(difference))
    return difference / norm if norm > 0 else difference


def fit_gate(
    model,
    tokenizer,
    lock: Lock,
    data,
    settings: ForgeSettings | None = None,
    gate_settings: GateSettings | None = None,
) -> Lock:
    """``lock`` with a gate fitted on ``model`` (the aligned model the lock was forged from) with the pairs in
    ``data`` (harmful requests) and forge's benign prompts (``settings.benign_prompts``)."""
    settings = settings or ForgeSettings()
    gate_settings = gate_settings or GateSettings()
    check_gate_settings(gate_settings)
    pairs, data_sha256 = load_pairs(data, settings.limit)
    benign = _benign_prompts(settings)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    config = model.config.to_dict()
    shape = shape_from_config(config, spec_for_config(config))
    lock.check_compatible(shape)
    layers = sorted(set(lock.layers.tolist()))
    harmful_texts = [prompt_text(tokenizer, p, settings, f"item {i} of the pairs file") for i, p in enumerate(pairs)]
    benign_texts = [
        render_prompt(tokenizer, (("user", p),), settings.template, settings.system_prompt, f"benign prompt {j}")
        for j, p in enumerate(benign.items)
    ]
    encode = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
    harmful_ids, benign_ids = encode(harmful_texts), encode(benign_texts)
    train_h, held_h = split_pairs(len(pairs), settings)
    train_b, held_b = split_pairs(len(benign_texts), settings)
    prefix = common_prefix(harmful_ids + benign_ids)
    tail = gate_settings.tail_tokens
    tails_h = mlp_inputs(model, tokenizer, harmful_ids, layers, settings.batch_size, tail, skip=prefix)
    tails_b = mlp_inputs(model, tokenizer, benign_ids, layers, settings.batch_size, None, skip=prefix)
    # the shared prefix's vectors are the same in every text (a causal model): counted once, as benign
    shared = mlp_inputs(model, tokenizer, benign_ids[:1], layers, 1, None)[0][:, :prefix]

    def stack(tails, which, i, last=None):
        return np.concatenate([tails[t][i][-last if last else 0 :] for t in which]).astype(np.float64)

    probes, kinds = [], []
    for i in range(len(layers)):
        h_train = stack(tails_h, train_h, i)
        b_train = np.concatenate([stack(tails_b, train_b, i), shared[i].astype(np.float64)])
        h_held, b_held = stack(tails_h, held_h, i, last=1), stack(tails_b, held_b, i, last=1)
        best = None
        for kind in ("lda", "mean"):
            direction = _direction(h_train, b_train, gate_settings.shrinkage, kind)
            score = auc(h_held @ direction, b_held @ direction)
            if best is None or score > best[0]:
                best = (score, kind, direction)
        assert best is not None
        probes.append(best[2])
        kinds.append(best[1])
    probes_array = np.stack(probes).astype(np.float32)
    probes_array /= np.linalg.norm(probes_array.astype(np.float64), axis=1, keepdims=True).astype(np.float32)
    # every token's score, for the thresholds (benign, training prompts) and the held-out rates
    scores_h = mlp_inputs(model, tokenizer, harmful_ids, layers, settings.batch_size, None, probes_array)
    scores_b = mlp_inputs(model, tokenizer, benign_ids, layers, settings.batch_size, None, probes_array)
    low, high, per_layer = [], [], []
    for i, layer in enumerate(layers):
        benign_all = np.concatenate([scores_b[t][i] for t in train_b])
        harmful_tail = np.concatenate([scores_h[t][i][-DECISION_TOKENS:] for t in train_h])
        lo = float(np.quantile(benign_all, gate_settings.benign_quantile))
        hi = float(np.quantile(harmful_tail, gate_settings.harmful_quantile))
        separates = hi > lo
        if not separates:
            hi = lo + max(float(np.std(benign_all)), 1e-3 * max(1.0, abs(lo)))
        low.append(lo)
        high.append(hi)
        last_h = np.array([scores_h[t][i][-1] for t in held_h])
        last_b = np.array([scores_b[t][i][-1] for t in held_b])
        benign_tokens = np.concatenate([scores_b[t][i] for t in held_b])
        per_layer.append(
            {
                "layer": layer,
                "probe": kinds[i],
                "separates": separates,
                "heldout_auc": _rounded(auc(last_h, last_b)),
                "heldout_open_last_harmful": _rounded(float(np.mean(gate_value(last_h, lo, hi) > 0.5))),
                "heldout_open_last_benign": _rounded(float(np.mean(gate_value(last_b, lo, hi) > 0.5))),
                "heldout_open_benign_tokens": _rounded(float(np.mean(gate_value(benign_tokens, lo, hi) > 0.5))),
            }
        )
    details = {
        "method": "forge --gate",
        "data_sha256": data_sha256,
        "pairs": len(pairs),
        "benign_prompts": {"source": benign.name, "sha256": benign.sha256, "count": len(benign.items)},
        "settings": asdict(gate_settings),
        "shared_prefix_tokens": prefix,
        # each gate alone, on the model without the lock: earlier layers' pushes move later layers' scores
        "rates_measured_on": "the model without the lock",
        "split": {
            "train_pairs": len(train_h),
            "heldout_pairs": len(held_h),
            "train_benign": len(train_b),
            "heldout_benign": len(held_b),
        },
        "layers": per_layer,
    }
    gated = lock.without_gate()
    gated.gate = Gate(
        np.array(layers, dtype=np.int64), probes_array, np.array(low, np.float32), np.array(high, np.float32), details
    )
    from weightlock.core.lock import _validate

    _validate(gated, "the gated lock")
    return gated


def forge_gated_lock(
    location: str, data, settings: ForgeSettings, gate_settings: GateSettings, progress=False, run=None
) -> Lock:
    """forge's lock, and its gate fitted on the same model and data (the model is loaded once)."""
    from weightlock.lab.forge import check_settings, forge_from_model, load_model

    check_settings(settings)
    check_gate_settings(gate_settings)
    load_pairs(data, settings.limit)  # refuse bad data before spending minutes loading a model
    _benign_prompts(settings)
    model, tokenizer = load_model(location, settings)
    lock = forge_from_model(model, tokenizer, data, settings, name=str(location), progress=progress, run=run)
    return fit_gate(model, tokenizer, lock, data, settings, gate_settings)
