"""Every family weightlock claims: the edited checkpoint, loaded by stock AutoModelForCausalLM with no
missing or unexpected keys, equals the original with the lock applied at run time by o_proj hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import logits, make_model, random_lock, random_lock_for, run_cli, stored_bytes

from weightlock import SourceModel, apply_lock, build_lock, save_lock, verify_checkpoint
from weightlock.core.families import ARCHITECTURES, output_declaration
from weightlock.engines.serving_table import (
    APPLIES,
    DROPS,
    ENGINES,
    MISCONVERTS,
    REFUSES,
    SAFETENSORS,
    family_verdict,
    row_for,
)
from weightlock.errors import UnsupportedError

STATUS = {APPLIES: "pass", REFUSES: "warn", DROPS: "fail", MISCONVERTS: "fail"}
FAMILIES_OF = {"starcoder2-nobias": "starcoder2"}  # a test model's name -> its family row

# family -> (output model_type, redeclared?)
CLAIMED = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3_text",
    "olmo2": "olmo2",
    "granite": "granite",
    "cohere": "cohere",
    "starcoder2": "starcoder2",
    "starcoder2-nobias": "starcoder2",
    "gpt_neox": "gpt_neox",
    "phi": "phi",
    "gpt_oss": "gpt_oss",
    "phi3": "llama",
    "mixtral": "granitemoe",
}


def statuses(report):
    return {c.name: c.status for c in report.checks}


@pytest.mark.parametrize("family", sorted(CLAIMED))
def test_family_edit_equals_runtime_hooks(tmp_path, family):
    # Cohere as published: the output tied to the embeddings (mlx-lm's Cohere has no lm_head; the table's
    # condition for an untied one is tests/test_mlx.py's)
    src = make_model(tmp_path / "src", family, shard_kb=40, tie=family == "cohere")
    lock = random_lock(src, n_heads=5)
    result = apply_lock(src, lock, out=tmp_path / "out", alpha=3.0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == CLAIMED[family]
    assert "sliding_window" not in config or CLAIMED[family] != "llama", "a Llama config must not carry a window"

    reference, unlocked = logits(src, lock=lock, alpha=3.0), logits(src)
    edited = logits(tmp_path / "out")  # asserts no missing / unexpected / mismatched keys
    scale = unlocked.abs().max().item()
    gap = (edited - reference).abs().max().item()
    assert gap <= 2e-5 * scale, f"{family}: edited vs hooked logits differ by {gap} (scale {scale})"
    assert (reference - unlocked).abs().max().item() > 100 * max(gap, 1e-5 * scale)

    # a family with o_proj biases: originals checked; transformers and vLLM serve every family locked
    report = verify_checkpoint(tmp_path / "out", source=src, engines="transformers,vllm")
    assert report.ok, report.failures()
    assert statuses(report)["transformers_names"] == "pass"
    # Every claimed family reaches vLLM with the lock: one whose own vLLM class drops the bias is declared
    # as vLLM's Transformers backend, which transformers ignores (it picked the class by model_type above).
    spec = next(s for s in ARCHITECTURES if CLAIMED[family] in s.model_types)
    assert (row_for("vllm", SAFETENSORS, spec.classes[0]).verdict == DROPS) == (spec.serve_as is not None)
    expected_class = spec.serve_as or spec.classes[0]
    assert config["architectures"] == [expected_class]
    assert statuses(report)["serving:vllm"] == statuses(report)["serving:transformers"] == "pass"
    # every engine of the serving table: verify says of this output what the table (and README.md) says
    everyone = {c.name: c.status for c in verify_checkpoint(tmp_path / "out", source=src, loader_check=False).checks}
    source_spec = next(s for s in ARCHITECTURES if s.family == FAMILIES_OF.get(family, family))
    target, declared = output_declaration(source_spec)
    for engine in ENGINES.values():
        if SAFETENSORS in engine.picks:
            found, _ = family_verdict(engine, source_spec, target, declared)
            assert everyone[f"serving:{engine.name}"] == STATUS[found], (engine.name, found)
    silent = [e.title for e in ENGINES.values() if everyone.get(f"serving:{e.name}") == "fail"]
    assert all(any(title in w for w in result.plan.warnings) for title in silent), result.plan.warnings


def test_existing_biases_are_added_to_and_their_shards_rewritten(tmp_path):
    src = make_model(tmp_path / "src", "starcoder2", shard_kb=40)  # use_bias: every projection has a bias
    lock = random_lock(src)
    result = apply_lock(src, lock, out=tmp_path / "out", alpha=2.0)
    assert result.plan.replaced and result.written.rewritten
    assert not [b for b in result.plan.biases if b.base is None], "nothing new to create"
    assert (logits(tmp_path / "out") - logits(src, lock=lock, alpha=2.0)).abs().max() < 1e-4
    # a tensor name never stands in two files (open_checkpoint refuses that), and undo data is kept
    assert (tmp_path / "out" / "weightlock" / "originals.wlt").is_file()


def test_bf16_redeclared_mistral(tmp_path):
    src = make_model(tmp_path / "src", "mistral", dtype="bfloat16")
    lock = random_lock(src)
    apply_lock(src, lock, out=tmp_path / "out")
    reference = logits(src, lock=lock, dtype="bfloat16")
    edited = logits(tmp_path / "out", dtype="bfloat16")
    assert (edited - reference).abs().max().item() <= 2e-2 * reference.abs().max().item()


@pytest.mark.parametrize(
    "family,settings,reason",
    [
        ("mixtral", dict(sliding_window=32), "sliding window of 32"),  # GraniteMoe attends to everything
        ("phi3", dict(sliding_window=32), "sliding window of 32"),
        ("phi3", dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    ],
)
def test_configs_without_an_exact_edit_are_refused_from_the_cli(tmp_path, capsys, family, settings, reason):
    src = make_model(tmp_path / "src", family, **settings)
    config = json.loads((src / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    lock = build_lock(
        [0],
        [0],
        np.ones((1, head_dim)),
        [1.0],
        SourceModel(config["architectures"][0], family, 3, 4, head_dim, 64),
        default_alpha=1.0,
    )
    save_lock(lock, tmp_path / "l.wlock")
    code, _, err = run_cli(
        capsys, "apply", str(src), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / "out")
    )
    assert code == 4 and reason in err and "lock_hooks" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_mistral_with_an_active_sliding_window_is_refused(tmp_path):
    src = make_model(tmp_path / "src", "mistral", sliding_window=32)  # shorter than the 128-token context
    with pytest.raises(UnsupportedError, match="sliding window of 32"):
        apply_lock(src, random_lock(src), out=tmp_path / "out")


def test_mistral_config_without_sliding_window_key_uses_the_class_default(tmp_path):
    src = make_model(tmp_path / "src", "mistral", max_position_embeddings=8192)
    config = json.loads((src / "config.json").read_text())
    del config["sliding_window"]  # MistralConfig then assumes 4096, which is active below 8192
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="sliding window of 4096"):
        apply_lock(src, random_lock(src), out=tmp_path / "out")


def test_qwen2_sliding_window_value_becomes_null_and_active_one_is_refused(tmp_path):
    src = make_model(tmp_path / "src", "qwen2")
    apply_lock(src, random_lock(src), out=tmp_path / "out")
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"} & set(out_config)
    active = make_model(tmp_path / "active", "qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=1)
    with pytest.raises(UnsupportedError, match="sliding window"):
        apply_lock(active, random_lock(active), out=tmp_path / "out2")


def _byte_level_tokenizer(folder, tokenizer_class):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(c) if chr(c).isalnum() else f"<{c}>": i for i, c in enumerate(range(32, 127))}
    tokenizer = Tokenizer(models.BPE(vocab={**vocab, "<unk>": len(vocab)}, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"model_max_length": 128, "unk_token": "<unk>"}
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "family,declared",
    [
        ("qwen2", "Qwen2Tokenizer"),
        ("qwen2", None),
        ("qwen2", "PreTrainedTokenizerFast"),
        ("mistral", "LlamaTokenizer"),
        ("mistral", None),
        ("qwen3", None),  # declared as vLLM's TransformersForCausalLM: model_type, not architectures, decides
        ("qwen3_moe", None),
        ("cohere", None),
        ("phi3", None),  # redeclared as Llama
        ("phi3", "LlamaTokenizer"),
        ("mixtral", None),  # redeclared as GraniteMoe
        ("mixtral", "LlamaTokenizer"),
    ],
)
def test_tokenizer_loads_the_same_way_after_redeclaration(tmp_path, family, declared):
    from transformers import AutoTokenizer

    src = make_model(tmp_path / "src", family, extra_files=False)
    _byte_level_tokenizer(src, declared)
    result = apply_lock(src, random_lock(src), out=tmp_path / "out")
    before, after = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(tmp_path / "out")
    assert type(after) is type(before)
    text = "Hello world 123 lock"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    if result.plan.file_edits:
        record = json.loads((tmp_path / "out" / "weightlock" / "provenance.json").read_text())
        assert record["edited_files"]["tokenizer_config.json"] == json.loads(
            (src / "tokenizer_config.json").read_text()
        ), "the original is kept for undo"


def test_a_backend_declaration_changes_nothing_transformers_reads(tmp_path):
    """A locked Qwen3 says "architectures": ["TransformersForCausalLM"] for vLLM's sake; transformers' config,
    model class, tokenizer and text-generation pipeline still resolve by model_type exactly as before, and
    a lock made from the original fits the locked checkpoint (inspect and verify name the real class)."""
    from transformers import AutoConfig, AutoModelForCausalLM, pipeline

    from weightlock import open_checkpoint
    from weightlock.core.lock import source_model_from_config
    from weightlock.formats.safetensors.describe import describe_checkpoint

    src = make_model(tmp_path / "src", "qwen3", extra_files=False)
    _byte_level_tokenizer(src, None)
    lock = random_lock(src)
    apply_lock(src, lock, out=tmp_path / "out", alpha=2.0)
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["TransformersForCausalLM"]
    assert type(AutoConfig.from_pretrained(out)) is type(AutoConfig.from_pretrained(src))
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen3ForCausalLM"
    generate = pipeline("text-generation", model=str(out), tokenizer=str(out))
    assert type(generate.model).__name__ == "Qwen3ForCausalLM"
    text = generate("Hello world", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello world")
    # the class a lock records is the model's, not the route vLLM takes
    fingerprint = source_model_from_config(open_checkpoint(out).config)
    assert fingerprint.architecture == "Qwen3ForCausalLM" == lock.source_model.architecture
    assert describe_checkpoint(open_checkpoint(out))["model"]["architecture"] == "Qwen3ForCausalLM"
    assert describe_checkpoint(open_checkpoint(out))["locked"]["redeclared_from"] == "Qwen3ForCausalLM"
    # a second lock goes on top of the first without --allow-architecture-mismatch
    apply_lock(out, random_lock(src, seed=7), out=tmp_path / "twice", alpha=1.0)
    assert verify_checkpoint(tmp_path / "twice", engines="transformers,vllm").ok  # mlx-lm's sharded loader drops it


# Phi-3 and Phi-4 real configs (config.json of each, the keys that decide exactness)
PHI3_CONFIGS = {
    "Phi-3-mini-4k": (dict(sliding_window=2047, max_position_embeddings=4096), "sliding window of 2047"),
    "Phi-3-medium-4k": (dict(sliding_window=2047, max_position_embeddings=4096), "sliding window of 2047"),
    "Phi-3-mini-128k / Phi-3.5-mini": (
        dict(
            sliding_window=262144,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rope_scaling={"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
        ),
        "'longrope' RoPE scaling",
    ),
    "Phi-4-mini": (
        dict(
            partial_rotary_factor=0.75,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rope_scaling={"type": "longrope", "long_factor": [1.0] * 6, "short_factor": [1.0] * 6},
        ),
        "partial_rotary_factor 0.75",
    ),
}


@pytest.mark.parametrize("model", sorted(PHI3_CONFIGS))
def test_phi3_configs_that_llama_does_not_reproduce_are_refused_with_the_reason(tmp_path, model):
    settings, reason = PHI3_CONFIGS[model]
    src = make_model(tmp_path / "src", "phi3")
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)
    (src / "config.json").write_text(json.dumps({**config, **settings}))
    with pytest.raises(UnsupportedError, match=reason) as refused:
        apply_lock(src, random_lock(src), out=tmp_path / "out")
    assert "lock_hooks" in refused.value.hint
    assert not (tmp_path / "out").exists()


def test_phi4_is_redeclared_as_llama_with_its_fused_weights_split_byte_for_byte(tmp_path):
    """Phi-4's shape (rope_theta 250000, no window, 4 query heads per KV head, a 16k context) is exact as
    Llama: q/k/v and gate/up are row blocks of the fused weights, copied, and the logits equal the hooks."""
    from weightlock import open_checkpoint

    src = make_model(
        tmp_path / "src", "phi3", heads=8, kv_heads=2, rope_theta=250000.0, max_position_embeddings=16384, shard_kb=24
    )
    lock = random_lock(src)
    result = apply_lock(src, lock, out=tmp_path / "out", alpha=2.0)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    reference, unlocked = logits(src, lock=lock, alpha=2.0), logits(src)
    gap = (logits(out) - reference).abs().max().item()
    assert gap <= 2e-5 * unlocked.abs().max().item()
    source = open_checkpoint(src).tensors
    output = open_checkpoint(out).tensors
    assert not any(".qkv_proj." in n or ".gate_up_proj." in n for n in output)
    record = json.loads((out / "weightlock" / "provenance.json").read_text())["tensors"]["split"]
    assert len(record) == 2 * 3 and record == result.plan.split_record

    for fused, parts in record.items():
        assert b"".join(stored_bytes(output[p]) for p in parts) == stored_bytes(source[fused])
    assert verify_checkpoint(out).ok


def test_phi3_in_place_splits_by_swapping_shards_and_revert_restores_them(tmp_path):
    from conftest import tree_hashes

    from weightlock import apply_in_place, revert

    src = make_model(tmp_path / "src", "phi3", shard_kb=24)
    before = tree_hashes(src)
    lock = random_lock(src)
    reference = logits(src, lock=lock, alpha=2.0)
    apply_in_place(src, lock, alpha=2.0)
    assert json.loads((src / "config.json").read_text())["model_type"] == "llama"
    assert (logits(src) - reference).abs().max().item() < 1e-4
    assert verify_checkpoint(src).ok
    revert(src)
    assert tree_hashes(src) == before


def test_mixtral_is_redeclared_as_granitemoe_with_its_experts_stacked_byte_for_byte(tmp_path):
    """Mixtral's per-expert w1/w3 become GraniteMoe's input_linear (gate rows, then up rows, per expert), w2
    its output_linear and the gate its router: concatenations of stored bytes. With shards of a few KB the
    pieces of one stacked tensor lie in several shards, and some shards end up holding nothing at all."""
    from weightlock import apply_in_place, open_checkpoint, revert

    src = make_model(tmp_path / "src", "mixtral", shard_kb=12)
    lock = random_lock(src)
    result = apply_lock(src, lock, out=tmp_path / "out", alpha=2.0)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "granitemoe" and config["architectures"] == ["TransformersMoEForCausalLM"]
    assert config["attention_multiplier"] == 16**-0.5 and config["residual_multiplier"] == 1.0
    source, output = open_checkpoint(src).tensors, open_checkpoint(out).tensors
    assert not any(".experts." in n or n.endswith("block_sparse_moe.gate.weight") for n in output)
    record = json.loads((out / "weightlock" / "provenance.json").read_text())["tensors"]["merged"]
    assert record == result.plan.merge_record and len(record) == 3 * 3

    for target, pieces in record.items():
        assert stored_bytes(output[target]) == b"".join(stored_bytes(source[p]) for p in pieces)
    assert output["model.layers.0.block_sparse_moe.input_linear.weight"].shape == (4, 256, 64)
    emptied = {e.path.name for e in source.values()} - set(result.written.shards)
    assert emptied and not any((out / name).exists() for name in emptied if name not in result.written.shards.values())
    assert verify_checkpoint(out).ok
    # in place: the shards are swapped (an emptied one only moved away) and revert restores every byte
    from conftest import tree_hashes

    before = tree_hashes(src)
    reference = logits(src, lock=lock, alpha=2.0)
    apply_in_place(src, lock, alpha=2.0)
    swapped = json.loads((src / "weightlock" / "in-place.json").read_text())["swapped"]
    assert any(s["to"] is None for s in swapped.values()), "some shard held only expert weights"
    assert (logits(src) - reference).abs().max().item() < 1e-4
    assert verify_checkpoint(src).ok
    revert(src)
    assert tree_hashes(src) == before


@pytest.mark.parametrize("family,key,count", [("phi3", "tensors_split", 6), ("mixtral", "tensors_stacked", 9)])
def test_apply_reports_what_it_split_or_stacked(tmp_path, capsys, family, key, count):
    src = make_model(tmp_path / "src", family)
    save_lock(random_lock(src), tmp_path / "l.wlock")
    code, out, err = run_cli(
        capsys, "apply", str(src), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / "out"), "--json"
    )
    assert code == 0, err
    assert json.loads(out)[key] == count
    code, out, _ = run_cli(
        capsys, "apply", str(src), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / "out2")
    )
    assert code == 0 and ("split 6 fused weights" if family == "phi3" else "stacked 9 tensors") in out


def _rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _drop_or_change_tensor(folder, name, change):
    """Rewrite the single shard with ``name`` dropped (``change`` returns None) or replaced."""
    from conftest import rewrite_safetensors

    def edit(tensors):
        out = []
        for t in tensors:
            if t.name == name:
                replacement = change(t)
                if replacement is not None:
                    out.append(replacement)
            else:
                out.append(t)
        return out

    rewrite_safetensors(folder / "model.safetensors", edit)


def _as(tensor, dtype, shape, data):
    return type(tensor)(tensor.name, dtype, shape, data)


QKV = "model.layers.1.self_attn.qkv_proj.weight"
W3 = "model.layers.2.block_sparse_moe.experts.3.w3.weight"


@pytest.mark.parametrize(
    "family,edit,words",
    [
        # the number of experts: every wrong type and size the config could carry
        *[
            ("mixtral", lambda f, v=value: _rewrite_config(f, num_local_experts=v), "num_local_experts")
            for value in (0, -1, "4", True, 4.0, None, [4], 10**9)
        ],
        ("mixtral", lambda f: _rewrite_config(f, num_local_experts=5), "no model.layers.0.block_sparse_moe.experts.4"),
        ("mixtral", lambda f: _drop_or_change_tensor(f, W3, lambda t: None), "no " + W3),
        (
            "mixtral",  # one expert's piece in another dtype: the stacked tensor would be garbage
            lambda f: _drop_or_change_tensor(f, W3, lambda t: _as(t, "F16", t.shape, t.data[: len(t.data) // 2])),
            "differ in dtype or shape",
        ),
        (
            "mixtral",  # one expert wider than the others
            lambda f: _drop_or_change_tensor(
                f, W3, lambda t: _as(t, t.dtype, (t.shape[0] + 1, t.shape[1]), t.data + t.data[: t.shape[1] * 4])
            ),
            "differ in dtype or shape",
        ),
        ("phi3", lambda f: _drop_or_change_tensor(f, QKV, lambda t: None), "no " + QKV),
        (
            "phi3",  # fused rows that do not add up to q + k + v for the config's heads
            lambda f: _drop_or_change_tensor(
                f, QKV, lambda t: _as(t, t.dtype, (t.shape[0] - 16, t.shape[1]), t.data[: -16 * t.shape[1] * 4])
            ),
            "implies",
        ),
        (
            "phi3",  # the split's names already taken: two layouts in one checkpoint
            lambda f: _add_tensor(f, "model.layers.1.self_attn.q_proj.weight"),
            "both",
        ),
    ],
)
def test_hostile_split_and_stack_inputs_are_refused_before_anything_is_written(tmp_path, capsys, family, edit, words):
    src = make_model(tmp_path / "src", family)
    lock = random_lock(src)
    save_lock(lock, tmp_path / "l.wlock")
    edit(src)
    code, _, err = run_cli(
        capsys, "apply", str(src), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / "out")
    )
    assert code in (3, 4) and words in err and "hint:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "weightlock-partial" in p.name]


def _add_tensor(folder, name):
    from conftest import rewrite_safetensors

    from weightlock.io.safetensors_file import TensorData

    rewrite_safetensors(folder / "model.safetensors", lambda ts: [*ts, TensorData(name, "F32", (2, 2), bytes(16))])


@pytest.mark.parametrize("family", ["mixtral", "phi3", "mistral"])
def test_a_lock_from_the_original_class_goes_on_a_redeclared_output_without_the_mismatch_flag(tmp_path, family):
    """The output of a redeclaration is another class (GraniteMoe, Llama), but its record says what it was made
    from: a second lock made from the original model applies as to the original, and an unrelated one is still
    refused."""
    from weightlock.core.lock import SourceModel
    from weightlock.errors import IncompatibleLockError

    src = make_model(tmp_path / "src", family)
    lock = random_lock(src)
    apply_lock(src, lock, out=tmp_path / "once", alpha=1.0)
    second = random_lock(src, seed=9)
    assert (
        second.source_model.architecture
        != json.loads((tmp_path / "once" / "config.json").read_text())["architectures"][0]
    )
    apply_lock(tmp_path / "once", second, out=tmp_path / "twice", alpha=1.0)
    assert verify_checkpoint(tmp_path / "twice").ok
    reference = logits(src, lock=lock, alpha=1.0)
    assert (logits(tmp_path / "once") - reference).abs().max().item() < 1e-4
    s = second.source_model
    other = random_lock_for(
        SourceModel("OtherForCausalLM", "other", s.num_hidden_layers, s.num_attention_heads, s.head_dim, s.hidden_size)
    )
    with pytest.raises(IncompatibleLockError, match="OtherForCausalLM"):
        apply_lock(tmp_path / "once", other, out=tmp_path / "other")
