"""The serving table (weightlock/engines/serving_table.py): which engine applies, drops or refuses an
attention-output bias, as data that `verify` enforces per engine and `apply` reports.

No engine is run here (the rows name their own evidence: a test that runs the engine, or the source read); what
is proven is that the table is complete and self-consistent, that it agrees with the family table and the GGUF
architecture table, that verify passes, warns and fails per engine on real outputs written by apply, that
`--engines` refuses what is not a list of known engines, and that README.md shows the table as it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import make_llama, make_model, random_lock, run_cli
from gguf_helpers import lock_for_gguf, write_gguf

from weightlock import apply_lock, save_lock, verify_checkpoint
from weightlock.core.families import ARCHITECTURES
from weightlock.core.report import FAIL, PASS, WARN
from weightlock.engines import serving_table as table
from weightlock.engines.serving_table import (
    APPLIES,
    CONDITIONS,
    DROPS,
    ENGINES,
    GGUF,
    MISCONVERTS,
    REFUSES,
    ROWS,
    SAFETENSORS,
    VERDICTS,
    dispatch_key,
    family_outputs,
    family_verdict,
    row_for,
)
from weightlock.errors import InvalidInputError
from weightlock.formats.gguf.architectures import GGUF_ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
STATUS = {APPLIES: PASS, REFUSES: WARN, DROPS: FAIL, MISCONVERTS: FAIL}


def serving(report) -> dict[str, tuple[str, str]]:
    """engine name -> (status, message) of the report's per-engine serving checks."""
    return {c.name.split(":", 1)[1]: (c.status, c.message) for c in report.checks if c.name.startswith("serving:")}


def _locked(tmp_path: Path, family: str, **settings) -> Path:
    source = make_model(tmp_path / family, family, **settings)
    apply_lock(source, random_lock(source, n_heads=3), out=tmp_path / f"{family}-locked", loader_check=False)
    return tmp_path / f"{family}-locked"


# ------------------------------------------------------------------------------------------ the table itself


def test_every_row_names_its_engine_version_and_evidence():
    tests = {}
    for row in ROWS:
        engine = ENGINES[row.engine]
        assert row.version, row
        assert row.verdict in VERDICTS and row.format in engine.picks, row
        assert row.why and row.evidence, row
        assert row.fix is None or row.verdict == DROPS, row  # a fix is for what drops
        assert row.misconverts_if is None or row.misconverts_if in CONDITIONS, row
        assert row.refuses_if is None or (row.refuses_if in CONDITIONS and row.verdict == APPLIES and row.note), row
        assert row.reads is None or row.verdict == APPLIES, row
        cited = re.findall(r"tests/(\w+\.py)::(\w+)", row.evidence)
        read = "read in the source at" in row.evidence
        inferred = row.evidence.startswith("inferred:") and engine.runs is not None
        assert cited or read or inferred, f"{row.engine} {row.target}: no test, no source named: {row.evidence}"
        for file, name in cited:
            text = tests.setdefault(file, (ROOT / "tests" / file).read_text())
            assert f"def {name}(" in text, f"{row.engine} {row.target} cites {file}::{name}, which does not exist"
    keys = [(r.engine, r.format, r.target) for r in ROWS]
    assert len(keys) == len(set(keys)), "two rows for one engine and target"
    for engine in ENGINES.values():
        assert engine.version and engine.picks and set(engine.picks) | set(engine.not_read) == {SAFETENSORS, GGUF}
        assert engine.runs is None or engine.runs in ENGINES and engine.runs_evidence


def test_every_output_weightlock_writes_has_a_row_for_every_engine():
    """Each family's output, as it declares itself, and each GGUF architecture weightlock locks: every engine
    that loads the format has a row for what it picks its code by."""
    for spec, target, declared in family_outputs():
        for engine in ENGINES.values():
            if SAFETENSORS in engine.picks:
                found, row = family_verdict(engine, spec, target, declared)
                assert row is not None, f"{engine.name} has no row for the {spec.family} output ({declared})"
    for arch in GGUF_ARCHITECTURES:
        for engine in ENGINES.values():
            if GGUF in engine.picks and arch.bias is not None:
                assert row_for(engine.name, GGUF, arch.name) is not None, (engine.name, arch.name)


def test_llama_cpp_rows_are_the_gguf_architecture_table():
    """llama.cpp applies the bias exactly where the GGUF table says its graph has one, and refuses the rest;
    the engines that run llama.cpp's code have llama.cpp's rows."""
    rows = {r.target: r for r in ROWS if r.engine == "llama.cpp"}
    assert set(rows) == {a.name for a in GGUF_ARCHITECTURES}
    for arch in GGUF_ARCHITECTURES:
        assert (rows[arch.name].verdict == APPLIES) == (arch.bias is not None), arch.name
    for engine in ENGINES.values():
        if engine.runs is not None:
            mine = {r.target: r.verdict for r in ROWS if r.engine == engine.name}
            assert mine == {t: r.verdict for t, r in rows.items()}, engine.name


def test_the_family_table_routes_to_the_transformers_backend_exactly_where_vllm_drops_the_bias():
    """families.py's serve_as is the writing decision; the serving table is why: vLLM drops the bias with the
    family's own class exactly where the family declares a Transformers backend instead, the row names that
    declaration as its fix, and vLLM and SGLang apply what every family's output declares."""
    for spec, target, declared in family_outputs():
        own = row_for("vllm", SAFETENSORS, target.classes[0])
        assert own is not None, target.family
        assert (own.verdict == DROPS) == (target.serve_as is not None), target.family
        if target.serve_as is not None:
            assert own.fix == target.serve_as == declared, target.family
        for name in ("vllm", "sglang"):
            row = row_for(name, SAFETENSORS, declared)
            assert row is not None and (row.verdict == APPLIES or name == "sglang"), (name, spec.family)


def test_transformers_gguf_rows_are_what_transformers_builds(tmp_path):
    """transformers' own GGUF reader (the forge extra): a llama file's config has attention_bias off, so
    attn_output.bias maps to no parameter (dropped); starcoder2's has use_bias on (mapped); the other
    architectures weightlock locks are refused. SGLang's GGUF loader takes its config from the same reader."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    for arch in GGUF_ARCHITECTURES:
        if arch.bias is None:
            continue
        row = row_for("transformers", GGUF, arch.name)
        path = write_gguf(tmp_path / f"{arch.name}.gguf", arch=arch.name, bias=True, extra={"general.name": "tiny"})
        if row.verdict == REFUSES:
            with pytest.raises(ValueError):
                AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
            continue
        config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        mapped = get_gguf_hf_weights_map(model, TensorProcessor(config={}))
        assert ("blk.0.attn_output.bias" in mapped) == (row.verdict == APPLIES), arch.name
        assert "blk.0.attn_output.weight" in mapped, arch.name


def test_readme_shows_the_table_as_it_is():
    """README.md's engine tables are rendered from the table (scripts/serving_table.py rewrites them)."""
    text = (ROOT / "README.md").read_text()
    assert table.README_BEGIN in text and table.README_END in text
    shown = text[text.index(table.README_BEGIN) : text.index(table.README_END) + len(table.README_END)]
    assert shown == table.readme_section(), "README.md is stale: run .venv/bin/python scripts/serving_table.py"


# ------------------------------------------------------------------------------------------ verify and apply


def test_a_llama_output_is_served_locked_by_every_engine_and_an_unlocked_model_has_nothing_to_lose(tmp_path):
    locked = _locked(tmp_path, "llama")
    report = verify_checkpoint(locked, loader_check=False)
    assert report.ok, report.failures()
    found = serving(report)
    assert set(found) == {e.name for e in ENGINES.values() if SAFETENSORS in e.picks}
    assert all(status == PASS for status, _ in found.values()), found
    unlocked = verify_checkpoint(make_llama(tmp_path / "plain"), loader_check=False)
    assert unlocked.ok and not serving(unlocked)
    assert [c.status for c in unlocked.checks if c.name == "serving"] == [PASS]


@pytest.mark.parametrize(
    "family,engine,verdict,words",
    [
        ("granite", "sglang", DROPS, "WITHOUT its attention-output biases"),
        ("gemma", "tgi", DROPS, "WITHOUT its attention-output biases"),
        ("qwen3", "mlx-lm-distributed", DROPS, "skipping the tensor"),
        ("qwen2", "ollama-create", MISCONVERTS, "another model"),
    ],
)
def test_verify_fails_an_engine_that_would_serve_it_unlocked_and_apply_names_it(
    tmp_path, capsys, family, engine, verdict, words
):
    """The output is right, so apply publishes it and names the engine; verify fails for that engine unless
    the engines deployed to leave it out; an engine that refuses the file only warns."""
    source = make_model(tmp_path / family, family)
    save_lock(random_lock(source, n_heads=3), tmp_path / "l.wlock")
    code, out, err = run_cli(
        capsys, "apply", str(source), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / "o"), "--json"
    )
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert any(ENGINES[engine].title in w and "verify OUT --engines" in w for w in warnings), warnings
    report = verify_checkpoint(tmp_path / "o", loader_check=False)
    status, message = serving(report)[engine]
    assert status == STATUS[verdict] and words in message and not report.ok, message
    assert [f for f in report.failures() if f.startswith("serving:")] == [f"serving:{engine}: {message}"]
    assert all(s == WARN for name, (s, _) in serving(report).items() if name != engine and s != PASS)
    others = [e.name for e in ENGINES.values() if SAFETENSORS in e.picks and e.name != engine]
    deployed = verify_checkpoint(tmp_path / "o", loader_check=False, engines=others)
    assert deployed.ok and engine not in serving(deployed), deployed.failures()
    code, out, _ = run_cli(capsys, "verify", str(tmp_path / "o"), "--no-loader-check", "--engines", engine)
    assert code == 1 and f"[FAIL] serving:{engine}:" in out and "hint: serve it with an engine" in out


def test_a_family_own_class_that_vllm_drops_fails_and_names_the_declaration(tmp_path):
    """A config declaring the family's own class again (an edit by hand, or an output of an older weightlock):
    vLLM would drop the bias; the failure names the declaration that fixes it."""
    locked = _locked(tmp_path, "qwen3")
    config = json.loads((locked / "config.json").read_text())
    config["architectures"] = ["Qwen3ForCausalLM"]
    (locked / "config.json").write_text(json.dumps(config))
    status, message = serving(verify_checkpoint(locked, loader_check=False, engines="vllm,sglang"))["vllm"]
    assert status == FAIL and '"architectures": ["TransformersForCausalLM"]' in message, message


def test_conditions_a_flag_off_and_a_logits_scaling_change_the_verdict(tmp_path):
    """An o_proj bias under attention_bias off (the reference implementation's mistake) is dropped by the engines
    whose class reads the flag; a Transformers backend serves a GraniteMoe whose logits_scaling is not 1 as
    another model."""
    locked = _locked(tmp_path, "llama")
    config = json.loads((locked / "config.json").read_text())
    (locked / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    found = serving(verify_checkpoint(locked, loader_check=False))
    assert found["vllm"][0] == FAIL and "only with attention_bias on" in found["vllm"][1]
    assert found["mlx-lm"][0] == WARN and found["exllamav3"][0] == PASS  # strict load refuses; any .bias is used
    moe = _locked(tmp_path, "mixtral")  # redeclared as GraniteMoe with logits_scaling 1: exact
    assert {n: s for n, (s, _) in serving(verify_checkpoint(moe, loader_check=False)).items()}["vllm"] == PASS
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "logits_scaling": 8.0}))
    found = serving(verify_checkpoint(moe, loader_check=False, engines=["vllm", "sglang", "transformers"]))
    assert found["vllm"][0] == found["sglang"][0] == FAIL and "another model" in found["vllm"][1]
    assert found["transformers"][0] == PASS


def test_a_quantized_folder_is_judged_like_its_class(tmp_path):
    from quant_helpers import write_fp8

    source = write_fp8(make_llama(tmp_path / "src"), tmp_path / "fp8", "channel")
    apply_lock(source, random_lock(source, n_heads=3), out=tmp_path / "locked", loader_check=False)
    report = verify_checkpoint(tmp_path / "locked", loader_check=False, engines="vllm,tgi")
    assert report.ok, report.failures()
    assert {n: s for n, (s, _) in serving(report).items()} == {"vllm": PASS, "tgi": PASS}


def test_gguf_engines(tmp_path):
    """A locked llama GGUF: llama.cpp and what runs it apply the bias; transformers' and SGLang's GGUF loaders
    drop it (verify fails by default; apply names them); an engine that loads no GGUF only warns when named."""
    source = write_gguf(tmp_path / "src.gguf")
    save_lock(lock_for_gguf(source), tmp_path / "l.wlock")
    result = apply_lock(source, tmp_path / "l.wlock", out=tmp_path / "locked.gguf")
    assert any("transformers 5.23.0" in w and "SGLang" in w for w in result.plan.warnings), result.plan.warnings
    report = verify_checkpoint(tmp_path / "locked.gguf")
    found = {n: s for n, (s, _) in serving(report).items()}
    assert found == {
        "transformers": FAIL,
        "sglang": FAIL,
        "llama.cpp": PASS,
        "llama-cpp-python": PASS,
        "ollama": PASS,
        "lm-studio": PASS,
    }
    assert not report.ok
    deployed = verify_checkpoint(tmp_path / "locked.gguf", engines="llama.cpp,ollama,vllm")
    assert deployed.ok, deployed.failures()
    status, message = serving(deployed)["vllm"]
    assert status == WARN and "does not load GGUF files" in message
    starcoder = write_gguf(tmp_path / "sc.gguf", arch="starcoder2", bias=True)
    save_lock(lock_for_gguf(starcoder, model_type="starcoder2"), tmp_path / "sc.wlock")
    apply_lock(starcoder, tmp_path / "sc.wlock", out=tmp_path / "sc-locked.gguf")
    found = serving(verify_checkpoint(tmp_path / "sc-locked.gguf", source=starcoder))
    assert all(status == PASS for status, _ in found.values()), found


def test_dispatch_keys_come_from_what_the_checkpoint_declares():
    config = {"model_type": "qwen3", "architectures": ["TransformersForCausalLM"]}
    assert dispatch_key(ENGINES["vllm"], SAFETENSORS, config) == "TransformersForCausalLM"
    assert dispatch_key(ENGINES["mlx-lm"], SAFETENSORS, config) == "qwen3"
    assert dispatch_key(ENGINES["llama.cpp"], GGUF, gguf_architecture="llama") == "llama"
    for hostile in ({}, {"model_type": 3, "architectures": "LlamaForCausalLM"}, {"architectures": [None]}):
        assert dispatch_key(ENGINES["vllm"], SAFETENSORS, hostile) is None
        assert dispatch_key(ENGINES["tgi"], SAFETENSORS, hostile) is None


def test_a_class_the_table_does_not_know_is_a_warning(tmp_path):
    locked = _locked(tmp_path, "llama")
    config = json.loads((locked / "config.json").read_text())
    (locked / "config.json").write_text(json.dumps({**config, "architectures": ["SomethingNewForCausalLM"]}))
    status, message = serving(verify_checkpoint(locked, loader_check=False, engines=["vllm"]))["vllm"]
    assert status == WARN and "not established" in message and "SomethingNewForCausalLM" in message


# ------------------------------------------------------------------------------------------ --engines


HOSTILE_ENGINES = {
    "empty": "",
    "comma": ",",
    "blank": " ",
    "unknown": "nonsense",
    "capitalised": "VLLM",
    "duplicate": "vllm,vllm",
    "empty-item": "vllm,,sglang",
    "trailing-comma": "vllm,",
    "shell": "vllm;rm -rf /",
    "escape": "\x1b[31mvllm\x1b[0m",
    "newline": "vllm\nFAKE LINE",
    "bidi": "vllm\u202e",
    "long": "v" * 10000,
    "path": "../vllm",
}


@pytest.mark.parametrize("label", sorted(HOSTILE_ENGINES))
def test_engines_refuses_what_is_not_a_list_of_known_engines(tiny_llama, capsys, label):
    value = HOSTILE_ENGINES[label]
    code, out, err = run_cli(capsys, "verify", str(tiny_llama), "--no-loader-check", "--engines", value)
    assert code == 2 and "Traceback" not in err + out, err
    assert "--engines" in err and "transformers, vllm, sglang" in err, err
    assert "\x1b" not in err and "\u202e" not in err and "\nFAKE LINE" not in err and len(err) < 2000, err
    with pytest.raises(InvalidInputError):
        verify_checkpoint(tiny_llama, loader_check=False, engines=value)


def test_engines_through_the_api_and_the_cli(tiny_llama, capsys, tmp_path):
    with pytest.raises(InvalidInputError):
        verify_checkpoint(tiny_llama, loader_check=False, engines=[1])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError):
        verify_checkpoint(tiny_llama, loader_check=False, engines=[])
    locked = _locked(tmp_path, "llama")
    code, out, err = run_cli(
        capsys, "verify", str(locked), "--no-loader-check", "--engines", "vllm, llama.cpp", "--json"
    )
    assert code == 0, err
    checks = {c["name"]: c["status"] for c in json.loads(out)["checks"]}
    assert checks["serving:vllm"] == PASS and checks["serving:llama.cpp"] == WARN  # llama.cpp loads no folder
    assert not any(name.startswith("serving:") and name not in ("serving:vllm", "serving:llama.cpp") for name in checks)


def test_scripts_serving_table_rewrites_only_its_section(tmp_path):
    import subprocess
    import sys

    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{table.README_BEGIN}\nstale\n{table.README_END}\nafter\n")
    script = ROOT / "scripts" / "serving_table.py"
    done = subprocess.run([sys.executable, str(script), str(readme)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert readme.read_text() == f"before\n{table.readme_section()}\nafter\n"
    again = subprocess.run([sys.executable, str(script), str(readme)], capture_output=True, text=True, cwd=ROOT)
    assert "up to date" in again.stdout


def test_every_family_is_in_the_readme_matrix():
    section = table.readme_section()
    for spec in ARCHITECTURES:
        if spec.refuse is None:
            assert f"| `{spec.family}` |" in section, spec.family


def test_a_transformers_backend_serves_the_bias_only_where_transformers_class_has_one(tmp_path):
    """vLLM's and SGLang's Transformers backends build transformers' class for the config's model_type: a Qwen2
    folder declared TransformersForCausalLM keeps model_type qwen2, whose class has no o_proj bias, so both
    would drop it (the backend row alone would say it applies)."""
    locked = _locked(tmp_path, "qwen2")
    config = json.loads((locked / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["TransformersForCausalLM"])
    (locked / "config.json").write_text(json.dumps(config))
    verdicts = serving(verify_checkpoint(locked, loader_check=False, engines="vllm,sglang"))
    for engine in ("vllm", "sglang"):
        status, message = verdicts[engine]
        assert status == FAIL and "Transformers backend" in message and "qwen2" in message, message


@pytest.mark.parametrize("family, own_class", [("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_a_redeclared_family_declared_as_itself_again_fails(tmp_path, family, own_class):
    """weightlock writes Qwen2 and Mistral as Llama because their own classes have no o_proj bias; a locked
    folder declaring them again (edited back, or the reference implementation's save) is served unlocked."""
    locked = _locked(tmp_path, family)
    config = json.loads((locked / "config.json").read_text())
    config.update(model_type=family, architectures=[own_class])
    (locked / "config.json").write_text(json.dumps(config))
    verdicts = serving(verify_checkpoint(locked, loader_check=False, engines="transformers,vllm"))
    assert verdicts["transformers"][0] == FAIL, verdicts
    if family == "qwen2":
        assert verdicts["vllm"][0] == FAIL, verdicts


def test_engines_given_twice_are_merged(tiny_llama, capsys):
    code, text, _ = run_cli(capsys, "verify", str(tiny_llama), "--engines", "vllm", "--engines", "sglang", "--json")
    names = {c["name"] for c in json.loads(text)["checks"]}
    assert {"serving:vllm", "serving:sglang"} <= names or "serving" in names, names
    code, _, err = run_cli(capsys, "verify", str(tiny_llama), "--engines", "vllm", "--engines", "sglang,vllm")
    assert code == 2 and "more than once" in err and "Traceback" not in err


def test_a_locked_folder_of_an_unknown_architecture_fails(tmp_path):
    """A locked folder whose model_type weightlock does not know (renamed "Llama"): neither its lock nor which
    engine serves it can be checked, so verify fails instead of passing without a serving line."""
    locked = _locked(tmp_path, "llama")
    config = json.loads((locked / "config.json").read_text())
    config["model_type"] = "Llama"
    (locked / "config.json").write_text(json.dumps(config))
    report = verify_checkpoint(locked, loader_check=False, engines="vllm")
    assert not report.ok and {c.name: c.status for c in report.checks}["architecture"] == FAIL


def test_a_lock_taken_off_leaves_nothing_to_lose(tmp_path):
    """-alpha back to zero: the biases are all zero, so an engine that drops them serves the model as it is."""
    source = make_model(tmp_path / "qwen3", "qwen3")
    lock = random_lock(source, n_heads=3)
    apply_lock(source, lock, out=tmp_path / "on", alpha=2.0, loader_check=False)
    off = apply_lock(tmp_path / "on", lock, out=tmp_path / "off", alpha=-2.0, loader_check=False)
    assert not [w for w in off.summary()["warnings"] if "unlocked" in w]
    report = verify_checkpoint(tmp_path / "off", loader_check=False, engines="mlx-lm-distributed")
    assert report.ok and {c.name for c in report.checks if c.name.startswith("serving")} == {"serving"}
