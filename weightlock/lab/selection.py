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

Every measurement is a forward pass of stock transformers with the lock's displacement added by hooks: exact.
``EffectMeter`` makes it affordable: the unperturbed baseline runs once, each pass carries many candidates
(one per block of batch rows) and starts at the lowest layer they touch, the layers below handing on the
hidden state the baseline kept. The measuring set stays small and capped all the same.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightlock.core.families import shape_from_config, spec_for_config
from weightlock.core.lock import head_displacements
from weightlock.errors import InvalidInputError
from weightlock.lab.batches import in_batches, out_of_memory_refused

KL_FLOOR = 1e-12  # nats/token; a head with no measurable cost still gets a finite score
ROW_TOKENS = 384  # tokens per packed row: more shares more beginnings, at attention's quadratic cost


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
    """Measures (effect, cost) of sets of displacements against the model without them, many sets per pass.

    Three savings, all exact (the numbers equal one-candidate-per-pass measurement up to float rounding:
    tests/test_effect_batching.py, against the previous meter, itself checked against each sequence run alone
    in tests/test_selection.py):

    - Packed rows. Texts that begin alike (the chat template's system prompt, a pair's prompt for its two
      answers) share those tokens: a row holds a tree of texts, each token attending only to its own text's
      earlier tokens (a custom attention mask) at its own position. Where the model has a sliding window
      the texts reach, or where the first row disagrees with its texts run alone under the model's own
      mask (a model that ignores custom masks), every text gets a row of its own.
    - Many candidates per pass. The batch holds a copy of the row per candidate, and the hook adds to each
      copy its own candidate's displacement (``row_displacement_hooks``).
    - Passes start late. A displacement first acts at the lowest layer it touches, so the layers below
      compute what the baseline computed: the baseline (run once, shared by every measurement) keeps the
      hidden state entering every layer (or every few, within a memory budget), and a pass starts at the
      deepest kept layer at or below its candidates' lowest, the layers before it handing on the kept state.

    Memory: the kept states and each pass are sized from the memory the device has free; a pass that still
    runs out of memory is split (fewer candidates per pass) and says so (``notes``, ``notify``).
    """

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
        candidates_per_pass: int | None = None,
        memory_budget: int | None = None,
        row_tokens: int = ROW_TOKENS,
        notify=None,
    ):
        import time

        import torch

        started = time.perf_counter()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.num_pairs = len(prompts)
        self.notes: list[str] = []
        self._notify = notify
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
        config = model.config.to_dict()
        self._spec = spec_for_config(config)
        self._shape = shape_from_config(config, self._spec)
        self._layers = [model.get_submodule(self._spec.decoder_layer(i)) for i in range(self._shape.num_layers)]
        longest = max(len(t.ids) for t in texts)
        window = _attention_window(config)
        rope = _length_dependent_rope(config)
        if window is not None and longest >= window:
            # A packed row's mask replaces the model's own, sliding window included: pack only texts that
            # fit in the window, where the two masks agree.
            row_tokens = 0
            self.notes.append(f"texts reach the model's attention window ({window}): one text per row")
        elif rope is not None and longest > rope[1]:
            # Dynamic and long RoPE pick their frequencies by the longest position in the batch: a text in a
            # row with a longer one would be rotated as it never is alone.
            row_tokens = 0
            self.notes.append(
                f"texts pass the length ({rope[1]}) where the model's {rope[0]} RoPE changes: one text per row"
            )
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._budget = memory_budget if memory_budget is not None else _free_memory(self.device) // 4
        self._requested = candidates_per_pass
        self.candidates_per_pass = 1
        self.passes = 0
        self._base_log_probs = np.zeros(len(texts))
        self._base: dict[int, torch.Tensor] = {}  # benign text -> log-softmax at its scored positions
        self._kept: dict[int, list] = {}  # layer -> per row, the hidden state entering that layer
        self._returns: tuple | None = None  # how a decoder layer returns its hidden state
        with out_of_memory_refused(
            "running the measuring texts once without a lock ran out of memory",
            hint="lower --effect-pairs or --effect-benign, or use a bigger device",
        ):
            self._rows = self._pack(row_tokens)
            self._baseline()
            if not self._packing_agrees():
                self.notes.append(
                    "packed rows disagree with their texts run alone under the model's own attention: one text per row"
                )
                self._rows = self._pack(0)
                self._base.clear()
                self._baseline()
        self.base_margin = self._margin(self._base_log_probs)
        self.seconds = time.perf_counter() - started  # the meter's own time: its set-up and every measurement

    def _benign_answers(self, prompts: list[str], max_new_tokens: int):
        """Token ids of each prompt and of the model's greedy answer to it (through the first end token)."""
        import torch

        tokenizer = self.tokenizer
        stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        prompt_ids, answers = [], []

        def answer(start, texts):
            chunk = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in texts]
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

        try:
            in_batches(
                prompts,
                self.batch_size,
                answer,
                what="answering the benign prompts",
                hint="lower --effect-benign, or use a bigger device",
                notify=self._say,
            )
        finally:
            tokenizer.padding_side = side
        return prompt_ids, answers

    def _pack(self, row_tokens: int) -> list[_Row]:
        """The texts packed into rows: texts that share a beginning (the chat template's system prompt, a
        pair's prompt) share its tokens, each token attending only to its own text's earlier tokens. Texts
        sorted in token order are added to a row while its tokens stay within ``row_tokens`` (0: one text
        per row)."""
        order = sorted(range(len(self.texts)), key=lambda i: self.texts[i].ids)
        rows: list[_Row] = []
        members: list[int] = []
        size, previous = 0, None
        for index in order:
            ids = self.texts[index].ids
            shared = 0 if previous is None else len(os.path.commonprefix([previous, ids]))
            if members and size + len(ids) - shared > row_tokens:
                rows.append(self._row(members))
                members, size, shared = [], 0, 0
            members.append(index)
            size += len(ids) - shared
            previous = ids
        rows.append(self._row(members))
        return rows

    def _row(self, members: list[int]) -> _Row:
        """One row: the tokens of ``members`` as a tree (a token per distinct beginning), each text's path
        through it, and the additive attention mask that lets a token see its own path and nothing else."""
        import torch

        node_of: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        depth: list[int] = []
        parent: list[int] = []
        paths = []
        for index in members:
            node, path = -1, []
            for position, token in enumerate(self.texts[index].ids):
                key = (node, token)
                if key not in node_of:
                    node_of[key] = len(tokens)
                    tokens.append(token)
                    depth.append(position)
                    parent.append(node)
                node = node_of[key]
                path.append(node)
            paths.append(path)
        size = len(tokens)
        sees = torch.zeros((size, size), dtype=torch.bool)
        for node in range(size):  # a parent always comes before its children
            if parent[node] >= 0:
                sees[node] = sees[parent[node]]
            sees[node, node] = True
        scored = sorted({p for index, path in zip(members, paths, strict=True) for p in self._scored(index, path)})
        where = {p: k for k, p in enumerate(scored)}
        return _Row(
            len(members) > 1,
            members,
            torch.tensor(tokens)[None],
            torch.tensor(depth)[None],
            sees,
            torch.tensor(scored),
            [[where[p] for p in self._scored(index, path)] for index, path in zip(members, paths, strict=True)],
        )

    def _packing_agrees(self) -> bool:
        """The first packed row's baseline distributions against its last two texts run alone under the
        model's own mask (the texts that see most of the others, were the mask not honoured). Compared by
        total variation at each scored position: rounding moves it by ~1e-6 in float32 and up to ~0.04 in
        bfloat16 (SmolLM2-135M); a model whose attention ignored the row's mask lets texts see each other,
        which moved it by 0.92-0.997 on the same model. (Checking every text of every row cost 8 s there,
        a sixth of the measurement; what makes rows differ from one another, a sliding window or a RoPE
        that changes with length, is decided from the config before packing.)"""
        import torch

        row = next((r for r in self._rows if r.packed), None)
        if row is None:
            return True
        tolerance = 0.01 if self.model.dtype in (torch.float32, torch.float64) else 0.25
        with torch.no_grad():
            packed = self._log_softmaxes(row, self._forward(row, 1))
            for number in range(len(row.members))[-2:]:
                alone = self._row([row.members[number]])
                (separate,) = self._log_softmaxes(alone, self._forward(alone, 1))
                variation = 0.5 * (packed[number].exp() - separate.exp()).abs().sum(-1).max().item()
                if not variation <= tolerance:
                    return False
        return True

    def _log_softmaxes(self, row: _Row, logits) -> list:
        """Per member of ``row`` (first copy), float64 log-softmax at its scored positions."""
        import torch

        return [torch.log_softmax(logits[0, positions].double(), -1) for positions in row.positions]

    def _scored(self, index: int, path: list[int]) -> list[int]:
        t = self.texts[index]
        return path[t.first : t.first + t.count]

    def _forward(self, row: _Row, copies: int):
        """Logits at ``row``'s scored positions, for ``copies`` copies of it in one batch."""
        import torch

        if row.packed:
            dtype = self.model.dtype
            mask = torch.zeros(row.sees.shape, dtype=dtype).masked_fill(~row.sees, torch.finfo(dtype).min)
            mask = mask[None, None].expand(copies, 1, -1, -1)
        else:  # one text: the model's own mask (causal, and its sliding window where it has one)
            mask = torch.ones((copies, row.ids.shape[1]), dtype=torch.long)
        inputs = {
            "input_ids": row.ids.expand(copies, -1).to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": row.position_ids.expand(copies, -1).to(self.device),
            "use_cache": False,
        }
        scored = row.scored.to(self.device)
        if self._keep_arg:
            return self.model(**inputs, logits_to_keep=scored).logits
        return self.model(**inputs).logits[:, scored]

    def _baseline(self) -> None:
        """One pass without displacements: the baseline numbers and the hidden state entering each layer."""
        import torch

        num_layers = len(self._layers)
        per_layer = sum(r.ids.numel() * self._shape.hidden_size * self.model.dtype.itemsize for r in self._rows)
        # Keep every stride-th layer's input, as many as the budget holds (layer 0's input is the embedding).
        stride = next(
            (s for s in range(1, num_layers + 1) if (num_layers - 1) // s * per_layer <= self._budget // 2),
            num_layers,
        )
        kept_layers = list(range(stride, num_layers, stride))
        kept: dict[int, list] = {layer: [] for layer in kept_layers}
        first_inputs: dict[int, Any] = {}  # the first batch's input to every layer, for the chain check
        first_outputs: dict[int, Any] = {}
        number = 0

        def entering(layer):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if layer in kept:
                    kept[layer].append(hidden.detach().clone())
                if number == 0:
                    first_inputs[layer] = hidden.detach().clone()

            return hook

        def leaving(layer):
            def hook(module, args, output):
                if number == 0:
                    first_outputs[layer] = output

            return hook

        handles = []
        for layer, module in enumerate(self._layers):
            handles.append(module.register_forward_pre_hook(entering(layer), with_kwargs=True))
            handles.append(module.register_forward_hook(leaving(layer)))
        try:
            with torch.no_grad():
                for number, row in enumerate(self._rows):  # noqa: B007 (read by the hooks)
                    self._score(row, self._forward(row, 1), 1, self._base_log_probs[None], None)
        finally:
            for handle in handles:
                handle.remove()
        # Replaying is exact only if each layer's input is the previous layer's output and nothing runs
        # between them (true of every family in the table; checked here on the first batch, not assumed).
        chained = len(first_outputs) == num_layers and all(
            torch.equal(_hidden_of(first_outputs[layer]), first_inputs[layer + 1]) for layer in range(num_layers - 1)
        )
        if chained:
            first = first_outputs[0]
            self._returns = (type(first), len(first) if isinstance(first, tuple) else 0)
            self._kept = kept
        else:
            self.notes.append("the model's layers do not simply chain: every pass starts at the first layer")

    def _score(self, row: _Row, logits, copies: int, log_probs: np.ndarray, kl: np.ndarray | None) -> None:
        """Scored numbers of ``copies`` copies of ``row``: log-probs of pair texts into ``log_probs[copy]``;
        for benign texts the baseline is stored (``kl`` None) or KL added to ``kl[copy]``."""
        import torch

        for copy in range(copies):
            for index, positions in zip(row.members, row.positions, strict=True):
                t = self.texts[index]
                # float64: the KL of a single head is small
                lp = torch.log_softmax(logits[copy, positions].double(), -1)
                if t.pair >= 0:
                    targets = torch.tensor(t.ids[t.first + 1 : t.first + 1 + t.count], device=lp.device)
                    log_probs[copy, index] = lp.gather(1, targets[:, None]).mean().item()
                elif kl is None:
                    self._base[index] = lp.float().cpu()
                else:
                    base = self._base[index].to(lp.device).double()
                    kl[copy] += (base.exp() * (base - lp)).sum().item()

    def _margin(self, log_probs: np.ndarray) -> float:
        # texts come as (safe, unsafe) per pair
        return float(np.mean([log_probs[i] - log_probs[i + 1] for i in range(0, 2 * self.num_pairs, 2)]))

    def _start_layer(self, displacements: dict) -> int:
        lowest = min(displacements)
        return max((layer for layer in self._kept if layer <= lowest), default=0)

    def _per_pass_limit(self) -> int:
        """Candidates one pass may carry: what the budget holds (activations of the widest batch, its
        logits), at most what was asked for."""
        widest = max(self._rows, key=lambda r: r.ids.numel())
        tokens = widest.ids.numel()
        itemsize = self.model.dtype.itemsize
        shape = self._shape
        intermediate = shape.intermediate_size or 4 * shape.hidden_size
        per_candidate = tokens * itemsize * (8 * shape.hidden_size + 4 * intermediate) + (
            len(widest.scored) * int(self.model.config.vocab_size) * 4 + tokens * tokens * 4 * shape.num_heads
        )
        fits = max(1, int(self._budget // max(per_candidate, 1)))
        if self._requested is not None and self._requested < fits:
            return self._requested
        return fits

    def measure(self, displacements: dict[int, np.ndarray]) -> tuple[float, float]:
        """(effect, cost) of running the model with ``displacements`` (layer -> o_proj input vector)."""
        return self.measure_many([displacements])[0]

    def measure_many(self, configurations: list[dict[int, np.ndarray]], progress=None) -> list[tuple[float, float]]:
        """(effect, cost) of each set of displacements, as many sets per forward pass as memory allows."""
        import time

        started = time.perf_counter()
        try:
            return self._measure_many(configurations, progress)
        finally:
            self.seconds += time.perf_counter() - started

    def _measure_many(self, configurations, progress) -> list[tuple[float, float]]:
        results: list[tuple[float, float] | None] = [None] * len(configurations)
        by_start: dict[int, list[int]] = {}
        for i, displacements in enumerate(configurations):
            if not displacements:
                results[i] = (0.0, 0.0)
            else:
                by_start.setdefault(self._start_layer(displacements), []).append(i)
        limit = self._per_pass_limit()
        if self._requested is not None and limit < self._requested:
            self._say(f"measuring {limit} candidates per pass, not {self._requested}: more do not fit in memory")
        for start, members in sorted(by_start.items()):

            def measure(_, take, start=start):
                measured = self._run([configurations[i] for i in take], start)
                for i, value in zip(take, measured, strict=True):
                    results[i] = value
                self.candidates_per_pass = max(self.candidates_per_pass, len(take))
                if progress is not None:
                    progress(len(take))

            limit = in_batches(
                members,
                limit,
                measure,
                what="measuring candidates",
                hint="lower --effect-pairs or --effect-benign, or use a bigger device",
                notify=self._say,
                split="a pass of {tried} candidates ran out of memory: measuring {size} per pass",
                single="measuring one candidate at a time ran out of memory",
            )
        return [r for r in results if r is not None]

    def run_facts(self) -> dict:
        """How the measurement ran: depends on the machine's free memory and speed, so it is reported with the
        run (forge's --json), never stored in the lock, whose bytes depend on its inputs alone."""
        return {
            "candidates_per_pass": self.candidates_per_pass,
            "forward_passes": self.passes,
            "seconds": round(self.seconds, 2),
            "notes": list(self.notes),
        }

    def _say(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            if self._notify is not None:
                self._notify(message)

    def _run(self, configurations: list[dict[int, np.ndarray]], start: int) -> list[tuple[float, float]]:
        import torch

        from weightlock.engines.hooks import row_displacement_hooks

        copies = len(configurations)
        width = self._shape.attention_width
        vectors = {}
        for layer in sorted({layer for c in configurations for layer in c}):
            stacked = np.zeros((copies, width))
            for copy, displacements in enumerate(configurations):
                if layer in displacements:
                    stacked[copy] = displacements[layer]
            vectors[layer] = torch.as_tensor(stacked)
        log_probs = np.zeros((copies, len(self.texts)))
        kl = np.zeros(copies)
        rows_per_vector = [1]  # a copy of a row per candidate
        handed_on: dict[str, object] = {}
        with row_displacement_hooks(self.model, vectors, rows_per_vector), self._replaying(start, handed_on):
            with torch.no_grad():
                for number, row in enumerate(self._rows):
                    if start:
                        handed_on["hidden"] = self._kept[start][number].repeat(copies, 1, 1)
                    self._score(row, self._forward(row, copies), copies, log_probs, kl)
                    self.passes += 1
        count = sum(t.count for t in self.texts if t.pair < 0)
        return [
            (self._margin(log_probs[copy]) - self.base_margin, float(kl[copy]) / count if count else 0.0)
            for copy in range(copies)
        ]

    @contextmanager
    def _replaying(self, start: int, handed_on: dict):
        """Layers below ``start`` hand on the kept hidden state instead of computing it."""
        kind, length = self._returns or (None, 0)

        def replay(*args, **kwargs):
            hidden = handed_on["hidden"]
            return (hidden,) + (None,) * (length - 1) if kind is tuple else hidden

        saved = []
        try:
            for layer in self._layers[:start]:
                saved.append((layer, layer.__dict__.get("forward", _UNSET)))
                layer.forward = replay
            yield
        finally:
            for layer, forward in saved:
                if forward is _UNSET:
                    del layer.forward
                else:
                    layer.forward = forward


@dataclass(frozen=True)
class _Row:
    packed: bool  # more than one text: the row's own attention mask replaces the model's
    members: list[int]  # indices into EffectMeter.texts
    ids: Any  # [1, tokens] torch tensors from here on (torch is imported lazily: Any, not torch.Tensor)
    position_ids: Any  # [1, tokens]: each token's position in its own text
    sees: Any  # [tokens, tokens] bool: which tokens each token attends to
    scored: Any  # [k] the tokens whose logits are computed
    positions: list[list[int]]  # per member, its scored positions as indices into ``scored``


def _length_dependent_rope(config: dict) -> tuple[str, int] | None:
    """(kind, length) when the config's RoPE changes with the longest position in a batch (transformers'
    "dynamic" NTK scaling past the original context, "longrope" past its original context), else None."""
    found = []

    def visit(value, depth=0):
        if isinstance(value, dict) and depth < 4:
            kind = value.get("rope_type", value.get("type"))
            if kind in ("dynamic", "longrope"):
                found.append((kind, value))
            for inner in value.values():
                visit(inner, depth + 1)

    visit({k: config.get(k) for k in ("rope_scaling", "rope_parameters")})
    if not found:
        return None
    kind, block = found[0]
    lengths = [
        v
        for v in (
            block.get("original_max_position_embeddings"),
            config.get("original_max_position_embeddings"),
            config.get("max_position_embeddings"),
        )
        if isinstance(v, int) and not isinstance(v, bool) and v > 0
    ]
    return kind, min(lengths) if lengths else 0


def _attention_window(config: dict) -> int | None:
    """The narrowest attention window the config names (sliding or chunked attention), or None."""
    windows: list[int] = []
    for key in ("sliding_window", "attention_chunk_size", "sliding_window_size"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            windows.append(value)
    return min(windows) if windows else None


_UNSET = object()


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _free_memory(device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the host's available memory."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


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

    bar = tqdm(total=len(candidates), desc="measuring head effects", disable=not progress, leave=False)
    with bar:
        measured = meter.measure_many([displacements_of([c], alpha, num_heads) for c in candidates], bar.update)
    rows = []
    for c, (effect, kl) in zip(candidates, measured, strict=True):
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
            pool_now = remaining[:pool]
            sets = [displacements_of([candidates[j] for j in chosen + [i]], alpha, num_heads) for i in pool_now]
            tried = [
                (score(effect, kl), i, effect, kl)
                for i, (effect, kl) in zip(pool_now, meter.measure_many(sets), strict=True)
            ]
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
