"""What mlx-lm itself (0.32.2, its Linux CPU build: scripts/install_mlx.sh) does with weightlock's outputs, for
every family make_model builds: the serving table's verdict for the `mlx-lm` engine (its strict `load`) is what
mlx-lm does.

Where the table says mlx-lm applies the lock, mlx-lm's next-token logits on the locked output equal mlx-lm on the
unlocked source with the same displacement added at each touched layer's o_proj input at run time (a wrapper
module: tests/mlx_helpers.py), while the lock moves them far more. The tolerance is that of float32: the baked
bias is ``W_o @ d`` summed by weightlock, the wrapper's is ``W_o @ (x + d)`` summed by mlx, the same numbers in
another order (the comparison without a lock is exact: the same file, the same code). Where mlx-lm's own class
computes what transformers' does (the unlocked source agrees within 1e-4), the locked output also equals stock
transformers on the source with the lock by hooks, within twice that gap. Where the table says mlx-lm refuses
the output, loading it raises and the unlocked source loads.

mlx-lm 0.32.2 reads ``rope_theta`` (GPT-NeoX: ``rotary_emb_base``, ``rotary_pct``; Qwen3-MoE: ``num_experts``)
at the top of config.json, where configs written before transformers 5 keep them; transformers 5 writes them
under ``rope_parameters`` (and ``num_local_experts``), and mlx-lm then refuses the folder, or for Llama quietly
takes its default theta, locked or not. The fixtures are written as such a Hub config is (``_as_hub_config``):
what is tested here is the lock, not mlx-lm's reading of new configs.

Skipped without mlx-lm unless WEIGHTLOCK_REQUIRE_MLX=1 (scripts/test.sh sets it: then it cannot pass by
skipping).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import FAMILIES, INPUT_IDS, logits, make_model, random_lock
from mlx_helpers import mlx_hooked_logits, mlx_logits, require_mlx

from weightlock import apply_lock, open_checkpoint
from weightlock.core.families import shape_from_config, spec_for_config
from weightlock.engines.serving import assess_folder
from weightlock.engines.serving_table import APPLIES, REFUSES

ALPHA = 3.0
FLOAT32_ORDER = 1e-4  # float32 sums of O(1) logits in another order, over three tiny layers (observed ~2e-6)


def _as_hub_config(folder, family: str) -> None:
    """config.json as configs written before transformers 5 hold it: the keys mlx-lm 0.32.2 reads at the top."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    if family == "gpt_neox":
        config.setdefault("rotary_emb_base", rope["rope_theta"])
        config.setdefault("rotary_pct", rope.get("partial_rotary_factor", 1.0))
    if "num_local_experts" in config:
        config.setdefault("num_experts", config["num_local_experts"])
    path.write_text(json.dumps(config, indent=2))


def _table_verdict(folder) -> str | None:
    checkpoint = open_checkpoint(folder)
    spec = spec_for_config(checkpoint.config)
    assessment = assess_folder(checkpoint, spec, shape_from_config(checkpoint.config, spec), ("mlx-lm",))
    (verdict,) = assessment.verdicts
    return verdict.verdict


# What mlx-lm's classes take as given, as the published models of each family have it: Cohere and Gemma 1/2 tie
# the output to the embeddings (their classes have no lm_head), GPT-NeoX's MLP is 4x the width (its class
# hard-codes it), and Gemma 3 alternates five sliding-window layers with a global one (its class indexes the
# sixth layer's cache).
_MLX_SHAPES = {
    "cohere": dict(tie=True),
    "gemma": dict(tie=True),
    "gemma2": dict(tie=True),
    "gpt_neox": dict(intermediate_size=256),
    "gemma3_text": dict(layers=6),
}


def _source(tmp_path, family: str):
    settings = {"layers": 3, **_MLX_SHAPES.get(family, {})}
    source = make_model(tmp_path / family, family, **settings)
    _as_hub_config(source, family)
    return source


# gpt_oss: mlx-lm's class quantizes its experts as MXFP4 on load (not a float checkpoint it can take as saved)
MLX_FAMILIES = sorted(f for f in FAMILIES if f not in ("gpt_oss", "starcoder2-nobias"))


@pytest.mark.parametrize("family", MLX_FAMILIES)
def test_mlx_lm_does_what_the_serving_table_says(tmp_path, family):
    require_mlx()
    source = _source(tmp_path, family)
    lock = random_lock(source, n_heads=5)
    out = tmp_path / f"{family}-locked"
    apply_lock(source, lock, out=out, alpha=ALPHA, loader_check=False)
    verdict = _table_verdict(out)
    assert verdict in (APPLIES, REFUSES), verdict
    unlocked = mlx_logits(source, INPUT_IDS)  # the source itself loads in mlx-lm
    if verdict == REFUSES:
        with pytest.raises(ValueError, match="parameters not in model"):
            mlx_logits(out, INPUT_IDS)
        return
    locked = mlx_logits(out, INPUT_IDS)
    hooked = mlx_hooked_logits(source, lock, ALPHA, INPUT_IDS)
    error = np.abs(locked - hooked).max()
    effect = np.abs(hooked - unlocked).max()
    plain = logits(source).numpy()
    engine_gap = np.abs(unlocked - plain).max()
    line = f"{family}: locked vs run-time wrapper {error:.2e}, lock effect {effect:.2f}"
    line += f", mlx vs transformers unlocked {engine_gap:.2e}"
    if engine_gap < FLOAT32_ORDER:  # mlx-lm's class is transformers' model: the lock is transformers' lock too
        across = np.abs(locked - logits(source, lock=lock, alpha=ALPHA).numpy()).max()
        line += f", locked mlx vs hooked transformers {across:.2e}"
        assert across <= 2 * engine_gap + FLOAT32_ORDER, (across, engine_gap)
    print(line)
    assert error <= FLOAT32_ORDER, (error, effect)
    assert effect > 100 * error, (effect, error)


def test_an_untied_cohere_output_is_refused_as_the_table_says(tmp_path):
    """mlx-lm's Cohere has no lm_head: a Cohere checkpoint with its own is refused, and the table's condition
    says so (before any lock is involved, the source is refused the same way)."""
    require_mlx()
    source = make_model(tmp_path / "cohere", "cohere", layers=2, tie=False)
    _as_hub_config(source, "cohere")
    out = tmp_path / "locked"
    apply_lock(source, random_lock(source, n_heads=3), out=out, alpha=ALPHA, loader_check=False)
    assert _table_verdict(out) == REFUSES
    for folder in (source, out):
        with pytest.raises(ValueError, match="lm_head.weight"):
            mlx_logits(folder, INPUT_IDS)


def test_verify_engine_mlx_passes_what_mlx_lm_serves_locked_and_fails_what_it_refuses(tmp_path, capsys):
    """``verify --engine mlx`` loads the folder in mlx-lm and checks the biases it serves are the stored ones:
    a locked Llama passes (and the record's other checks with it), and so does a locked GPT-NeoX, whose tensors
    mlx-lm's sanitize renames (gpt_neox.layers.N -> model.h.N); a locked Qwen3 (declared for vLLM's
    Transformers backend; mlx-lm's Qwen3 has no o_proj bias) fails with mlx-lm's own refusal, exit 1."""
    require_mlx()
    from conftest import run_cli

    results = {}
    for family in ("llama", "gpt_neox", "qwen3"):
        source = _source(tmp_path, family)
        out = tmp_path / f"{family}-locked"
        apply_lock(source, random_lock(source, n_heads=4), out=out, alpha=ALPHA, loader_check=False)
        code, text, _ = run_cli(
            capsys, "verify", str(out), "--engine", "mlx", "--engines", "mlx-lm", "--source", str(source), "--json"
        )
        checks = {c["name"]: c for c in json.loads(text)["checks"]}
        results[family] = code, checks["mlx_load"]
    for family in ("llama", "gpt_neox"):
        code, check = results[family]
        assert code == 0 and check["status"] == "pass", (family, check)
        assert "holds the 3 stored attention-output biases as stored" in check["message"], check
    code, check = results["qwen3"]
    assert code == 1 and check["status"] == "fail", check
    assert "refuses it" in check["message"] and "parameters not in model" in check["message"]


def test_eval_engine_mlx_gives_the_answers_and_kl_transformers_gives(tmp_path):
    """``eval --engine mlx`` bakes each alpha and runs it in mlx-lm: its greedy answers equal the hooked
    transformers answers (the same token ids in, the same tokenizer out), its KL on the benign text equals
    transformers' within float32 noise, the lock changes some answers, and the baked copies are removed."""
    require_mlx()
    from test_eval import make_chat_model, small_sets

    from weightlock import save_lock
    from weightlock.lab.evaluate import EvalSettings, evaluate_model

    model = make_chat_model(tmp_path / "chat", vocab=128, hidden=128, heads=2, kv_heads=1, head_dim=64)
    _as_hub_config(model, "llama")
    save_lock(random_lock(model, n_heads=2, seed=5), tmp_path / "l.wlock")
    files = {k: str(v) for k, v in small_sets(tmp_path).items()}
    reports = {
        engine: evaluate_model(
            str(model),
            lock=str(tmp_path / "l.wlock"),
            alphas=[0.0, 6.0],
            prompt_files=files,
            settings=EvalSettings(max_new_tokens=10, engine=engine),
        )
        for engine in ("transformers", "mlx")
    }
    answers = {
        engine: [{k: [a["answer"] for a in v] for k, v in r.answers.items()} for r in report.results]
        for engine, report in reports.items()
    }
    assert answers["mlx"] == answers["transformers"]
    unlocked, locked = answers["mlx"]
    assert any(unlocked[k] != locked[k] for k in unlocked)
    kl = {engine: [r.kl for r in report.results] for engine, report in reports.items()}
    assert kl["mlx"][0] == pytest.approx(0.0, abs=1e-6) and kl["mlx"][1] > 1e-3, kl
    assert kl["mlx"][1] == pytest.approx(kl["transformers"][1], rel=1e-3), kl
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".weightlock-eval-")]  # baked copies removed


def test_eval_engine_mlx_refuses_a_gguf_file(tmp_path, capsys):
    from conftest import run_cli

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code, _, err = run_cli(capsys, "eval", str(gguf), "--engine", "mlx", "--limit", "1")
    assert code == 2 or code == 3, err
    assert "--engine mlx runs safetensors folders" in err and "Traceback" not in err


def test_a_qwen2_config_written_by_transformers_5_is_served_by_mlx_lm_as_the_same_model_locked(tmp_path):
    """transformers 5 writes Qwen2's rope_theta only under rope_parameters; mlx-lm reads only a top-level one and
    defaults it per class (Qwen2's 1e6, Llama's 1e4). The output is declared Llama, so weightlock writes the
    source's theta at the top too: mlx-lm then serves the locked output as the source model plus the lock (a
    theta of 1e4 would move the logits by far more than the tolerance)."""
    require_mlx()
    source = make_model(tmp_path / "qwen2", "qwen2", layers=3, rope_theta=1e6)
    config = json.loads((source / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 1e6
    lock = random_lock(source, n_heads=5)
    out = tmp_path / "locked"
    apply_lock(source, lock, out=out, alpha=ALPHA, loader_check=False)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 1e6
    error = np.abs(mlx_logits(out, INPUT_IDS) - mlx_hooked_logits(source, lock, ALPHA, INPUT_IDS)).max()
    across = np.abs(mlx_logits(out, INPUT_IDS) - logits(source, lock=lock, alpha=ALPHA).numpy()).max()
    assert error <= FLOAT32_ORDER and across <= FLOAT32_ORDER, (error, across)


def test_an_mlx_quantized_output_is_served_by_mlx_lm_alone_and_verify_says_so(tmp_path, capsys):
    """An MLX-quantized folder (mlx-lm's quantize_model, int4 group 64), locked with every default check on:
    the transformers class check is skipped with the reason (transformers cannot load such folders), the
    serving checks pass mlx-lm and warn for every other engine (each refuses the folder at load, which is no
    silent loss), and ``verify --engine mlx`` passes: mlx-lm serves the stored biases."""
    require_mlx()
    from conftest import run_cli
    from mlx_helpers import quantize_with_mlx

    from weightlock.engines.serving_table import ENGINES

    source = quantize_with_mlx(_source(tmp_path, "qwen2"), tmp_path / "q4", 4, 64)
    out = tmp_path / "locked"
    apply_lock(source, random_lock(source, n_heads=4), out=out, alpha=ALPHA)  # the class check on
    capsys.readouterr()  # what mlx-lm's quantize_model printed
    code, text, _ = run_cli(capsys, "verify", str(out), "--engine", "mlx", "--json")
    checks = {c["name"]: c for c in json.loads(text)["checks"]}
    assert code == 0, text
    assert checks["transformers_names"]["status"] == "skip"
    assert "cannot load MLX-quantized folders" in checks["transformers_names"]["message"]
    assert checks["mlx_load"]["status"] == "pass"
    for name in ENGINES:
        if ENGINES[name].picks.get("safetensors") is None:
            continue
        expected = "pass" if name.startswith("mlx-lm") else "warn"
        assert checks[f"serving:{name}"]["status"] == expected, checks[f"serving:{name}"]
        if expected == "warn":
            assert "refuses it with an error at load" in checks[f"serving:{name}"]["message"]


def test_eval_and_tune_engine_mlx_on_an_mlx_quantized_folder_from_the_cli(tmp_path, capsys):
    """An MLX-quantized chat model, which transformers cannot load: ``eval --engine mlx`` and ``tune --engine mlx``
    run it whole in mlx-lm (tokenizer from transformers): KL 0 at alpha 0 and above 0 with the lock baked, and
    tune picks an alpha from the sweep."""
    require_mlx()
    import shutil

    from conftest import run_cli
    from mlx_helpers import quantize_with_mlx
    from test_eval import make_chat_model, small_sets

    from weightlock import save_lock

    model = make_chat_model(tmp_path / "chat", vocab=128, hidden=128, heads=2, kv_heads=1, head_dim=64)
    _as_hub_config(model, "llama")
    quantized = quantize_with_mlx(model, tmp_path / "q4", 4, 32)
    for path in model.iterdir():  # the tokenizer and its chat template, as mlx_lm.convert copies them
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, quantized / path.name)
    save_lock(random_lock(model, n_heads=2, seed=5), tmp_path / "l.wlock")
    files = small_sets(tmp_path)
    common = [f"--{k.replace('kl', 'kl-text')}={v}" for k, v in files.items()] + ["--max-new-tokens", "6"]
    capsys.readouterr()
    code, out, err = run_cli(
        capsys, "eval", str(quantized), "--lock", str(tmp_path / "l.wlock"), "--alpha", "0", "--alpha", "6",
        "--engine", "mlx", "--json", *common,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out)["results"]
    assert results[0]["kl"] == pytest.approx(0.0, abs=1e-6) and results[1]["kl"] > 1e-3, results
    code, out, err = run_cli(
        capsys, "tune", str(quantized), "--lock", str(tmp_path / "l.wlock"), "--alphas", "0,6", "--engine", "mlx",
        "--target-refusal", "0", "--max-kl", "100", "--max-over-refusal", "1", "--max-degenerate", "1", *common,
    )  # fmt: skip
    assert code == 0, (out, err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".weightlock-eval-")]


def test_eval_says_which_engine_runs_an_mlx_folder_and_refuses_a_baked_negative_alpha_up_front(tmp_path, capsys):
    """transformers cannot load an MLX-quantized folder: eval under the default engine says to use --engine mlx
    (exit 4). A baking engine takes a negative alpha as taking a lock off, which an unlocked model does not carry:
    refused before the sweep runs (exit 3), with the hook-based engine named."""
    require_mlx()
    from conftest import run_cli
    from mlx_helpers import quantize_with_mlx

    from weightlock import save_lock

    source = _source(tmp_path, "llama")
    quantized = quantize_with_mlx(source, tmp_path / "q4", 4, 32)
    save_lock(random_lock(source, n_heads=2), tmp_path / "l.wlock")
    capsys.readouterr()
    code, _, err = run_cli(capsys, "eval", str(quantized), "--limit", "1")
    assert code == 4 and "transformers does not load" in err and "--engine mlx" in err, err
    code, _, err = run_cli(
        capsys, "eval", str(source), "--lock", str(tmp_path / "l.wlock"), "--alpha", "3", "--alpha", "-3",
        "--engine", "mlx", "--limit", "1",
    )  # fmt: skip
    assert code == 3 and "negative alpha (-3)" in err and "--engine transformers" in err, err


@pytest.mark.parametrize("command", ["verify", "eval"])
def test_engine_mlx_without_mlx_says_how_to_get_it(tmp_path, command):
    """With neither mlx nor mlx-lm importable (shadowed by packages that raise ImportError, as an environment
    without them does), ``verify --engine mlx`` and ``eval --engine mlx`` exit 7 with the install hint."""
    import subprocess
    import sys

    for package in ("mlx", "mlx_lm"):
        (tmp_path / "shadow" / package).mkdir(parents=True)
        (tmp_path / "shadow" / package / "__init__.py").write_text(f"raise ImportError('no {package} here')\n")
    source = make_model(tmp_path / "llama", "llama", layers=2)
    args = [str(source), "--engine", "mlx"] + (["--limit", "1"] if command == "eval" else [])
    done = subprocess.run(
        [sys.executable, "-m", "weightlock", command, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "shadow")},
    )
    assert done.returncode == 7, done.stderr
    assert "needs mlx-lm" in done.stderr and "mlx-lm[cpu]" in done.stderr and "Traceback" not in done.stderr
