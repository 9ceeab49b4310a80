"""``forge``: make a lock from a base model and safety preference pairs.

1. Each pair becomes two texts, prompt + safe answer and prompt + unsafe answer, in the
   model's chat template (or a plain "User:/Assistant:" template for base models).
2. Forward-pre-hooks on every layer's o_proj (stock transformers, no custom modeling)
   capture the o_proj input at the last N tokens of each text. Positions come from the
   attention mask and position ids are derived from it, so either padding side gives
   each sequence's real last tokens.
3. A logistic probe per (layer, head) is trained on the pairs of a training split and
   scored on held-out pairs (the split is by pair: tokens of one pair never straddle it).
   All heads train at once as one batched tensor problem.
4. The K heads with the best held-out accuracy are kept (``selection="accuracy"``, SafetyLock's way), or
   the K best of the probes' shortlist by measured effect per unit of cost (``"effect"``,
   ``"effect-greedy"``: ``selection.py``). Each gets the unit direction mean(safe) - mean(unsafe) and, as
   scale, the std of all activations along it.

``position="prompt"`` takes the activations at the last tokens of the *prompt* instead (where a model
decides whether to refuse); there a pair's two texts are the same, so the contrast is between the pairs'
prompts (the side a lock pushes towards) and benign prompts (``default_prompts/forge_benign.txt`` or the
user's), each split by prompt as pairs are.

transformers is needed (``pip install weightlock[forge]``); apply never imports this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightlock import __version__
from weightlock.core.bounds import check_fields
from weightlock.core.families import shape_from_config, spec_for_config
from weightlock.core.lock import Lock, build_lock, source_model_from_config
from weightlock.errors import InvalidInputError, MissingDependencyError
from weightlock.lab.batches import in_batches, out_of_memory_refused
from weightlock.lab.pairs import Pair, load_pairs

PLAIN_USER, PLAIN_ASSISTANT = "User: ", "Assistant: "


@dataclass
class ForgeSettings:
    heads: int = 24
    last_tokens: int = 5
    seed: int = 0
    holdout: float = 0.25  # fraction of pairs held out to score the probes
    template: str = "chat"  # "chat" (the tokenizer's template) or "plain"
    system_prompt: str | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None  # "auto" spreads a model too big for one device
    gguf_file: str | None = None
    default_alpha: float = 6.0
    probe_steps: int = 200
    probe_lr: float = 0.05
    probe_l2: float = 1e-3
    limit: int | None = None  # use only the first N pairs
    # The defaults won issue 16's comparison (README, "Which heads?"); "accuracy" + "answer" is SafetyLock's way.
    selection: str = "effect"  # "accuracy", "effect" or "effect-greedy" (selection.py)
    position: str = "prompt"  # "answer": last tokens of each answer; "prompt": last tokens of each prompt
    benign_prompts: str | None = None  # forge's benign prompts; None: default_prompts/forge_benign.txt
    # effect selection: candidates = this many best heads by probe accuracy; None: 64 (every head of a model
    # with fewer). A number above the model's heads is refused.
    shortlist: int | None = None
    effect_alpha: float = 1.0  # strength each candidate is measured at
    effect_pairs: int = 16  # held-out pairs whose answers measure the effect
    effect_benign: int = 16  # benign prompts whose answers measure the cost (KL)
    effect_answer_tokens: int = 8  # answer tokens scored per pair text
    greedy_pool: int = 8  # effect-greedy: candidates tried per step
    effect_batch: int | None = None  # candidates measured per forward pass, at most; None: as many as fit


SELECTIONS = ("accuracy", "effect", "effect-greedy")
POSITIONS = ("answer", "prompt")


def _transformers():
    try:
        import torch
        import transformers
    except ImportError:
        raise MissingDependencyError("forge needs transformers", hint="pip install 'weightlock[forge]'") from None
    return torch, transformers


def load_model(location: str, settings: ForgeSettings):
    torch, transformers = _transformers()
    kwargs = {"dtype": getattr(torch, settings.dtype)}
    if settings.gguf_file:
        kwargs["gguf_file"] = settings.gguf_file
    if settings.device_map:
        kwargs["device_map"] = settings.device_map
    tokenizer = load_tokenizer(location, settings.gguf_file)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as e:
        raise InvalidInputError(
            f"cannot load the model {location}: {e}",
            hint="pass a local folder, a cached Hub id, or --gguf-file for a GGUF file",
        ) from None
    if not settings.device_map:
        model = model.to(settings.device)
    model.eval()
    return model, tokenizer


def load_tokenizer(location: str, gguf_file: str | None = None):
    """The model's tokenizer through transformers, with a pad token (the end-of-sequence one where it has none)."""
    _, transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            location, **({"gguf_file": gguf_file} if gguf_file else {})
        )
    except (OSError, ValueError) as e:
        raise InvalidInputError(
            f"cannot load the tokenizer of {location}: {e}",
            hint="pass a local folder, a cached Hub id, or --gguf-file for a GGUF file",
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def prompt_text(tokenizer, pair: Pair, settings: ForgeSettings, where: str = "a pair") -> str:
    return render_prompt(tokenizer, pair.messages, settings.template, settings.system_prompt, where)


def render_prompt(tokenizer, messages, template: str, system_prompt: str | None, where: str = "a prompt") -> str:
    """The text a model sees before its answer, for (role, content) messages. eval renders its prompts
    with this too, so a lock is measured on the same kind of text it was forged from. A chat template that
    fails on them (a ``raise_exception`` in the template, a broken template) is the input's fault: an
    InvalidInputError naming ``where`` (e.g. "pair 3 of pairs.jsonl")."""
    messages = list(messages)
    if system_prompt and messages[0][0] != "system":
        messages.insert(0, ("system", system_prompt))
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError("the tokenizer has no chat template", hint="pass --plain-template for base models")
        try:
            text = tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja2's TemplateError, or whatever the template's code raises
            raise InvalidInputError(
                f"the model's chat template fails on {where}: {type(e).__name__}: {str(e)[:200]}",
                hint="fix or leave out that item, pass --system-prompt only if the template accepts a system "
                "message, or use --plain-template",
            ) from None
        if not isinstance(text, str):
            raise InvalidInputError(
                f"the model's chat template gave {type(text).__name__}, not text, for {where}",
                hint="use --plain-template",
            )
        return text
    lines = [
        (content if role == "system" else f"{PLAIN_USER if role == 'user' else PLAIN_ASSISTANT}{content}")
        for role, content in messages
    ]
    return "\n".join(lines) + "\n" + PLAIN_ASSISTANT


def encode(tokenizer, pairs: list[Pair], settings: ForgeSettings):
    """Token ids of every text (safe then unsafe per pair) and the length of each answer in tokens."""
    ids, answer_lengths, labels, pair_index = [], [], [], []
    for i, pair in enumerate(pairs):
        prompt = prompt_text(tokenizer, pair, settings, f"item {i} of the pairs file")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for label, answer in ((1, pair.safe), (0, pair.unsafe)):
            full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            ids.append(full)
            answer_lengths.append(max(1, len(full) - len(prompt_ids)))
            labels.append(label)
            pair_index.append(i)
    return ids, answer_lengths, np.array(labels), np.array(pair_index)


def encode_prompts(tokenizer, pairs: list[Pair], benign: list[str], settings: ForgeSettings):
    """Prompt-position texts: each pair's prompt (label 1, the side a lock pushes towards) and each benign
    prompt (label 0); every position of a prompt may be sampled. Groups: pair i is i, benign j is n + j."""
    texts = [prompt_text(tokenizer, pair, settings, f"item {i} of the pairs file") for i, pair in enumerate(pairs)]
    texts += [
        render_prompt(tokenizer, (("user", p),), settings.template, settings.system_prompt, f"benign prompt {j}")
        for j, p in enumerate(benign)
    ]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    labels = np.array([1] * len(pairs) + [0] * len(benign))
    return ids, [len(i) for i in ids], labels, np.arange(len(texts))


def capture(model, tokenizer, ids, answer_lengths, settings: ForgeSettings, progress: bool = False):
    """o_proj inputs at each text's last tokens: (activations [T, layers, heads, head_dim], text of each row)."""
    torch, _ = _transformers()
    config = model.config.to_dict()
    spec = spec_for_config(config)
    shape = shape_from_config(config, spec)
    captured: dict[int, Any] = {}
    where: dict[str, Any] = {}

    def hook_for(layer):
        def hook(module, args):
            # Kept on the model's device: one host copy per batch, not one (and a GPU sync) per layer.
            captured[layer] = args[0][where["rows"], where["positions"]].float()

        return hook

    handles = [
        model.get_submodule(spec.output_module(layer)).register_forward_pre_hook(hook_for(layer))
        for layer in range(shape.num_layers)
    ]
    rows_out, owners = [], []
    device = next(model.parameters()).device
    # Only the o_proj inputs are wanted: skip the vocabulary projection of every position when the class allows.
    import inspect

    last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def run(start, chunk):
        batch = tokenizer.pad({"input_ids": list(chunk)}, return_tensors="pt", padding=True)
        mask = batch["attention_mask"]
        rows, positions, batch_owners = [], [], []
        for b in range(len(chunk)):
            real = torch.nonzero(mask[b]).flatten()
            take = min(settings.last_tokens, answer_lengths[start + b], len(real))
            rows += [b] * take
            positions += real[-take:].tolist()
            batch_owners += [start + b] * take
        where["rows"], where["positions"] = torch.tensor(rows), torch.tensor(positions)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids.to(device),
                **last_logits_only,
            )
        # Layers may sit on different devices (device_map): bring each to the first layer's.
        first = captured[0].device
        rows_out.append(torch.stack([captured[layer].to(first) for layer in range(shape.num_layers)], dim=1).cpu())
        owners.extend(batch_owners)  # only once the batch has run: a batch split for memory leaves no trace
        bar.update(len(chunk))

    from tqdm import tqdm

    bar = tqdm(total=len(ids), desc="capturing activations", disable=not progress, leave=False)
    try:
        with bar:
            in_batches(
                ids,
                settings.batch_size,
                run,
                what="capturing activations",
                hint="use shorter pairs (or --limit fewer), or a bigger device (or --device-map auto)",
                notify=_note,
            )
    finally:
        for handle in handles:
            handle.remove()
    acts = torch.cat(rows_out).reshape(-1, shape.num_layers, shape.num_heads, shape.head_dim)
    return acts.numpy(), np.array(owners)


def train_probes(x_train, y_train, x_test, y_test, settings: ForgeSettings, device: str = "cpu") -> np.ndarray:
    """Held-out accuracy of a logistic probe per head; all heads trained together.

    x_*: [samples, heads, head_dim] (heads = layers x heads, flattened). Full-batch Adam on
    standardised features with an L2 penalty; deterministic for a given input.
    """
    torch, _ = _transformers()
    xtr = torch.as_tensor(x_train, dtype=torch.float32, device=device)
    xte = torch.as_tensor(x_test, dtype=torch.float32, device=device)
    mean, std = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp(min=1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.as_tensor(y_train, dtype=torch.float32, device=device)[:, None].expand(-1, xtr.shape[1])
    weights = torch.zeros(xtr.shape[1], xtr.shape[2], device=device, requires_grad=True)
    bias = torch.zeros(xtr.shape[1], device=device, requires_grad=True)
    optimiser = torch.optim.Adam([weights, bias], lr=settings.probe_lr)
    for _ in range(settings.probe_steps):
        optimiser.zero_grad()
        logits = torch.einsum("tgd,gd->tg", xtr, weights) + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, ytr, reduction="none").mean(0)
        (loss.sum() + settings.probe_l2 * (weights**2).sum()).backward()
        optimiser.step()
    with torch.no_grad():
        predictions = (torch.einsum("tgd,gd->tg", xte, weights) + bias) > 0
        truth = torch.as_tensor(y_test, device=device)[:, None].bool()
        return (predictions == truth).float().mean(0).cpu().numpy()


def _probe_device_for_dispatched() -> str:
    torch, _ = _transformers()
    return "cuda" if torch.cuda.is_available() else "cpu"


def split_pairs(n_pairs: int, settings: ForgeSettings) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(settings.seed).permutation(n_pairs)
    held = min(n_pairs - 2, max(2, int(round(n_pairs * settings.holdout))))
    return np.sort(order[held:]), np.sort(order[:held])


def _benign_prompts(settings: ForgeSettings):
    """forge's benign prompts (a PromptSet with the sha256 of its text), read before any model is loaded."""
    import hashlib

    from weightlock.lab.prompt_sets import load_prompt_set

    prompts = load_prompt_set("forge-benign", settings.benign_prompts)
    if len(prompts.items) < 4:
        raise InvalidInputError(
            f"the benign prompts {prompts.name} hold {len(prompts.items)} prompts; forge needs at least 4",
            hint="pass --benign-prompts with more prompts (16-64 is usual)",
        )
    digest = hashlib.sha256("\n".join(prompts.items).encode()).hexdigest()
    return _BenignPrompts(prompts.name, prompts.items, digest)


@dataclass(frozen=True)
class _BenignPrompts:
    name: str
    items: list
    sha256: str  # of the prompts joined by newlines, as read


def _choose_by_effect(
    model, tokenizer, pairs, held_pairs, benign, by_accuracy, accuracy, direction_and_scale, settings, progress, run
) -> tuple[np.ndarray, dict]:
    """Flat indices (layer * heads + head) of the heads effect selection keeps, and its record."""
    from weightlock.lab.selection import Candidate, EffectMeter, select_by_effect

    num_heads = accuracy.shape[1]
    shortlist = by_accuracy[: shortlist_size(settings, accuracy.size)]
    candidates, kept_flat = [], []
    for flat in shortlist:
        layer, head = divmod(int(flat), num_heads)
        direction, scale = direction_and_scale(layer, head)
        if not np.any(direction):  # the two sides are identical there: nothing to add
            continue
        candidates.append(Candidate(layer, head, direction, scale, float(accuracy[layer, head])))
        kept_flat.append(int(flat))
    if len(candidates) < settings.heads:
        raise InvalidInputError(
            f"only {len(candidates)} of the {len(shortlist)} shortlisted heads see any difference between the "
            f"two sides, fewer than --heads {settings.heads}",
            hint="lower --heads, raise --shortlist, or use pairs whose two answers differ more",
        )
    measured_pairs = [pairs[int(i)] for i in held_pairs[: settings.effect_pairs]]
    meter = EffectMeter(
        model,
        tokenizer,
        [prompt_text(tokenizer, pair, settings) for pair in measured_pairs],
        [pair.safe for pair in measured_pairs],
        [pair.unsafe for pair in measured_pairs],
        [
            render_prompt(tokenizer, (("user", p),), settings.template, settings.system_prompt)
            for p in benign[: settings.effect_benign]
        ],
        answer_tokens=settings.effect_answer_tokens,
        batch_size=settings.batch_size,
        candidates_per_pass=settings.effect_batch,
        notify=_note,
    )
    picked, record = select_by_effect(
        meter,
        candidates,
        settings.heads,
        num_heads=num_heads,
        alpha=settings.effect_alpha,
        greedy=settings.selection == "effect-greedy",
        pool=settings.greedy_pool,
        progress=progress,
    )
    if run is not None:
        run["measurement"] = meter.run_facts()
    record.update(
        shortlist=len(candidates),
        measured_on={
            "heldout_pairs": held_pairs[: settings.effect_pairs].tolist(),
            "benign_prompts": min(settings.effect_benign, len(benign)),
            "answer_tokens": settings.effect_answer_tokens,
        },
    )
    return np.array([kept_flat[i] for i in picked]), record


DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SHORTLIST = 64


def shortlist_size(settings: ForgeSettings, total_heads: int) -> int:
    """The candidates effect selection measures: --shortlist, or 64 (every head of a smaller model)."""
    return settings.shortlist if settings.shortlist is not None else min(DEFAULT_SHORTLIST, total_heads)


def _note(message: str) -> None:
    """A line on stderr about how forge adapted its work (e.g. split to fit memory); stdout stays the result's."""
    import sys

    from weightlock.io.text import printable

    sys.stderr.write(f"note: {printable(message)}\n")


def check_device(device: str) -> None:
    """Refuse a device torch does not know or this machine does not have, before any model is loaded."""
    torch, _ = _transformers()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInputError(
            f"--device {str(device)[:40]!r} is not a device torch knows", hint="use cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch.backends, parsed.type, None) if parsed.type == "mps" else getattr(torch, parsed.type, None)
    try:
        available = bool(backend is not None and backend.is_available())
        count = backend.device_count() if backend is not None and available and hasattr(backend, "device_count") else 1
    except Exception:  # a backend that fails to initialise is not available either
        available, count = False, 0
    if not available:
        raise InvalidInputError(
            f"--device {device}: this machine has no usable {parsed.type} device (or torch was built without it)",
            hint="use --device cpu, or install a torch build for that device",
        )
    if parsed.index is not None and parsed.index >= count:
        raise InvalidInputError(
            f"--device {device}: there are only {count} {parsed.type} device(s)",
            hint=f"use an index below {count}",
        )


def check_settings(settings: ForgeSettings) -> None:
    """Refuse settings that cannot work, before any model is loaded."""
    if settings.template not in ("chat", "plain"):
        raise InvalidInputError(f"unknown template {settings.template!r}", hint="use 'chat' or 'plain'")
    if settings.selection not in SELECTIONS:
        raise InvalidInputError(f"unknown selection {settings.selection!r}", hint="use " + ", ".join(SELECTIONS))
    if settings.position not in POSITIONS:
        raise InvalidInputError(f"unknown position {settings.position!r}", hint="use 'answer' or 'prompt'")
    check_fields(settings)  # every number against bounds.BOUNDS, as the CLI's options are
    if settings.dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype {settings.dtype!r}", hint="use " + ", ".join(DTYPES))
    if not settings.device_map:
        check_device(settings.device)


def forge_lock(
    location: str,
    data: str | Path,
    settings: ForgeSettings | None = None,
    progress: bool = False,
    run: dict | None = None,
) -> Lock:
    """Forge a lock from the model at ``location`` and the pairs in ``data``. ``run``, when given, receives
    how the work ran on this machine (effect selection: ``run["measurement"]``), which the lock does not hold."""
    settings = settings or ForgeSettings()
    check_settings(settings)
    load_pairs(data, settings.limit)  # refuse bad data before spending minutes loading a model
    _benign_prompts(settings)
    model, tokenizer = load_model(location, settings)
    return forge_from_model(model, tokenizer, data, settings, name=str(location), progress=progress, run=run)


def forge_from_model(
    model,
    tokenizer,
    data: str | Path,
    settings: ForgeSettings | None = None,
    *,
    name: str | None = None,
    progress: bool = False,
    run: dict | None = None,
) -> Lock:
    """Forge from a model and tokenizer already loaded (stock transformers classes); ``run`` as for forge_lock."""
    settings = settings or ForgeSettings()
    check_settings(settings)
    pairs, data_sha256 = load_pairs(data, settings.limit)
    benign = _benign_prompts(settings)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    config = model.config.to_dict()
    spec = spec_for_config(config)
    shape = shape_from_config(config, spec)
    total = shape.num_layers * shape.num_heads
    if not 1 <= settings.heads <= total:
        raise InvalidInputError(f"--heads must lie in 1..{total}", hint="24 or 48 heads are the usual choices")
    effect_based = settings.selection != "accuracy"
    if effect_based and settings.shortlist is not None and settings.shortlist > total:
        raise InvalidInputError(
            f"--shortlist {settings.shortlist} is more than the {total} heads the model has "
            f"({shape.num_layers} layers x {shape.num_heads} heads)",
            hint=f"pass --shortlist {total} or less, or leave it out (64, or every head of a smaller model)",
        )
    if effect_based and not settings.heads <= shortlist_size(settings, total):
        raise InvalidInputError(
            f"--heads {settings.heads} is more than the --shortlist {shortlist_size(settings, total)} it is "
            "chosen from",
            hint="raise --shortlist (96-128 is usual on a GPU) or lower --heads",
        )
    if settings.position == "answer":
        ids, answer_lengths, labels, group_of_text = encode(tokenizer, pairs, settings)
        group_of_text = np.asarray(group_of_text)
    else:
        ids, answer_lengths, labels, group_of_text = encode_prompts(tokenizer, pairs, benign.items, settings)
    acts, owner = capture(model, tokenizer, ids, answer_lengths, settings, progress)
    sample_label, sample_group = labels[owner], group_of_text[owner]
    train_pairs, held_pairs = split_pairs(len(pairs), settings)
    train_groups, held_groups = train_pairs, held_pairs
    if settings.position == "prompt":
        train_benign, held_benign = split_pairs(len(benign.items), settings)
        train_groups = np.concatenate([train_pairs, len(pairs) + train_benign])
        held_groups = np.concatenate([held_pairs, len(pairs) + held_benign])
    train, held = np.isin(sample_group, train_groups), np.isin(sample_group, held_groups)
    groups = acts.reshape(acts.shape[0], -1, shape.head_dim)
    # A dispatched model (device_map) leaves settings.device at its default; the probes still belong on a GPU.
    probe_device = settings.device if not settings.device_map else _probe_device_for_dispatched()
    with out_of_memory_refused(
        f"training {groups.shape[1]} probes on {int(train.sum())} samples ran out of memory",
        hint="use fewer pairs (--limit) or --last-tokens, or a bigger device",
    ):
        accuracy = train_probes(
            groups[train], sample_label[train], groups[held], sample_label[held], settings, probe_device
        ).reshape(shape.num_layers, shape.num_heads)
    by_accuracy = np.argsort(-accuracy.reshape(-1), kind="stable")
    safe, unsafe = sample_label == 1, sample_label == 0

    def direction_and_scale(layer: int, head: int) -> tuple[np.ndarray, float]:
        x = acts[:, layer, head, :].astype(np.float64)
        direction = x[safe].mean(0) - x[unsafe].mean(0)
        direction /= np.linalg.norm(direction) or 1.0
        return direction, float(np.std(x @ direction))

    selection: dict[str, Any] = {"method": "accuracy"}
    if not effect_based:
        chosen = by_accuracy[: settings.heads]
    else:
        chosen, selection = _choose_by_effect(
            model,
            tokenizer,
            pairs,
            held_pairs,
            benign.items,
            by_accuracy,
            accuracy,
            direction_and_scale,
            settings,
            progress,
            run,
        )
    layers, heads = chosen // shape.num_heads, chosen % shape.num_heads
    directions, scales = [], []
    for layer, head in zip(layers, heads, strict=True):
        direction, scale = direction_and_scale(int(layer), int(head))
        directions.append(direction)
        scales.append(scale)
    details = {
        "model": name,
        "data_file": Path(data).name,
        "data_sha256": data_sha256,
        "pairs": len(pairs),
        "last_tokens": settings.last_tokens,
        "heads": settings.heads,
        "seed": settings.seed,
        "position": settings.position,
        "selection": selection,
        "split": {"by": "pair", "train_pairs": train_pairs.tolist(), "heldout_pairs": held_pairs.tolist()}
        | (
            {"train_benign": train_benign.tolist(), "heldout_benign": held_benign.tolist()}
            if settings.position == "prompt"
            else {}
        ),
        "benign_prompts": None
        if settings.position == "answer" and not effect_based
        else {"source": benign.name, "sha256": benign.sha256, "count": len(benign.items)},
        "samples": {"train": int(train.sum()), "heldout": int(held.sum())},
        "template": settings.template,
        "system_prompt": settings.system_prompt,
        "probe": {
            "kind": "logistic",
            "steps": settings.probe_steps,
            "lr": settings.probe_lr,
            "l2": settings.probe_l2,
            "standardised": True,
        },
        "probe_accuracy": np.round(accuracy, 4).tolist(),
        "settings": {k: v for k, v in asdict(settings).items() if k in ("dtype", "device", "batch_size")},
    }
    return build_lock(
        layers,
        heads,
        np.stack(directions),
        scales,
        source_model_from_config(config, name=name),
        default_alpha=settings.default_alpha,
        creation={"method": "forge", "tool": f"weightlock {__version__}", "details": details},
    )
