"""Text, numbers and patterns from an input, as a hostile user writes them (issue 24, classes 7 to 11).

- class 8: every string the model card quotes goes through ``card.md`` and every number through ``card.number``:
  cases are generated from schemas/eval.schema.json (every string field, every ``sets`` key, every number
  field) and from the provenance and lock fields the card names; the rendered card (markdown-it-py, as the Hub
  renders CommonMark and tables) has no link but the paper's, no image, no HTML but the section markers, no bare
  URL an autolinker would take, no "nan", and shows each hostile string as the text it is;
- class 7: NaN, Infinity and 10^400 in any JSON weightlock reads (``untrusted.parse_json``) are refused; empty
  prompts, empty QA answers (which would score every answer correct) and empty pairs are refused at load;
- class 9: an input's regular expressions (compressed-tensors ``re:`` rules) are compiled only when their
  backtracking is bounded (``untrusted.bounded_pattern``): the (a+)+$ family is refused in milliseconds,
  real patterns match exactly as ``re.match`` does;
- class 10: a source card's YAML front matter that is a list, broken, tagged ``!!python/object``, cyclic, or
  of the wrong types (every key ModelCardData reads as text) is refused with exit 3, never run;
- class 11: forged section markers in the source card are dropped (the card check passes), markers in its
  metadata and a card too large for the section are refused with exit 3, and a 24 MB eval report makes a card
  of a few kilobytes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time

import pytest
from conftest import apply_cli, make_llama, make_model, random_lock, run_cli
from markdown_it import MarkdownIt

from weightlock import apply_lock, save_lock, verify_checkpoint
from weightlock.errors import CheckpointError, InvalidInputError
from weightlock.formats.safetensors.card import (
    _TEXT_KEYS,
    _TEXT_LIST_KEYS,
    BEGIN,
    END,
    MAX_CARD_BYTES,
    MAX_QUOTED_CHARS,
    card_lock_sha256,
    locked_card,
    read_eval_report,
)
from weightlock.io.schema import load_schema
from weightlock.io.untrusted import MAX_MATCHED_NAME_CHARS, BoundedMatcher, bounded_pattern, parse_json

PAPER = "https://arxiv.org/abs/2410.10343"  # the one link weightlock's own section has
HOSTILE_TEXT = [
    "[click me](https://evil.example/x)",
    "![tracker](https://evil.example/p.png)",
    "[ref][x] and [x]: https://evil.example/ref",
    "<img src=https://evil.example/p.png onerror=alert(1)>",
    "<script>alert(1)</script>",
    "<https://evil.example/autolink>",
    "https://evil.example/bare and http://evil.example",
    "www.evil.example",
    "someone@evil.example",
    "javascript:alert(1)",
    "evil.example/file.py",
    "`code` **bold** _em_ ~~gone~~ $x^2$ {attr}",
    "a | b | c",
    "line one\n# heading\n\n---\n> quote\n- item\r\nline two\u2028three\x85four",
    f"{END}\n| lock sha256 | `{'0' * 64}` |\n{BEGIN}",
    "&lt;b&gt; &#x3C;img src=x&#x3E; &amp;",
    "\\[escaped\\] \\<b\\>",
    "\u202egnp.exe \x00\x1b[31mred\x7f \ufeff",
    "x" * 10_000 + "[tail](https://evil.example)",
    "",
]
URLISH = ("evil.example", "https://", "http://", "www.e", "@evil")  # what autolinkers (GFM, linkify) take
HOSTILE_NUMBERS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 10**400, 10**300, 1e-320]


def visible_text(tokens) -> str:
    return "".join(
        visible_text(t.children) if t.children else t.content
        for t in tokens
        if t.type in ("text", "code_inline", "inline", "softbreak") or t.children
    )


def assert_inert(card: str, payloads=()) -> str:
    """``card`` rendered as CommonMark with tables: no link but the paper's, no image, no HTML but the two markers,
    nothing an autolinker would take; each payload shown as its own text. Returns the visible text."""
    renderer = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    tokens = renderer.parse(card)
    stack = list(tokens)
    while stack:
        token = stack.pop()
        stack.extend(token.children or ())
        assert token.type != "image", card
        assert token.type != "html_inline", token.content
        if token.type == "link_open":
            assert token.attrGet("href") == PAPER, token.attrGet("href")
        if token.type == "html_block":
            assert token.content.strip() in (BEGIN, END), token.content
    text = visible_text(tokens)
    for urlish in URLISH:
        assert urlish not in text, f"{urlish!r} would be autolinked in: {text[:300]}"
    assert card.count(BEGIN) == 1 and card.count(END) == 1
    shown = text.replace("\u200b", "")
    for payload in payloads:
        expected = " ".join(re.sub("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202e\ufeff]", " ", payload).split())
        expected = expected[:MAX_QUOTED_CHARS]
        assert expected in shown, f"{expected[:80]!r} is not shown as it is"
    return text


def assert_no_bad_number(card: str) -> None:
    text = assert_inert(card).replace(card_lock_sha256(card) or "-", "")
    assert not re.search(r"(?i)\b(nan|inf|infinity)\b|\d{17,}", text), text


# ---------------------------------------------------------------------------------------------------------------
# A locked checkpoint whose provenance and lock the card is made from


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile-text")
    src = make_llama(base / "src")
    lock = random_lock(src)
    result = apply_lock(src, lock, out=base / "out")
    save_lock(lock, base / "l.wlock")
    return {"src": src, "lock": lock, "provenance": result.provenance, "base": base}


def base_report() -> dict:
    row = {
        "alpha": 1.0,
        "harmful_compliance": 0.35,
        "over_refusal": 0.5,
        "degenerate": 0.0,
        "qa_accuracy": 0.5,
        "kl": 0.11,
        "seconds": 1.0,
        "harmful_answers": 0.2,
    }
    indistinct = {"alphas": [1.0, 0.0], "rate": "harmful_compliance", "n": 40, "intervals": [], "message": "close"}
    return {
        "weightlock_version": "0.9",
        "model": "org/model",
        "lock": "lock.wlock",
        "judge": "keywords",
        "settings": {},
        "sets": {
            "harmful": {"source": "advbench.csv", "count": 40, "layout": "harmbench", "categories": {"crime": 40}},
            "qa": {"source": "qa.jsonl", "count": 20},
        },
        "results": [row, {**row, "alpha": None, "kl": None, "qa_accuracy": None}],
        "choice": {"alpha": 1.0, "bounds": {}, "verdicts": [], "indistinct": [indistinct]},
    }


def schema_leaves(schema: dict, root: dict, path=()):
    """(path, type) for every leaf of the eval report schema: "*" an array item, "{key}" / "{value}" a key or
    value of an object's additionalProperties."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    for option in schema.get("oneOf", ()):
        yield from schema_leaves(option, root, path)
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "object" in types:
        for key, sub in schema.get("properties", {}).items():
            yield from schema_leaves(sub, root, (*path, key))
        if isinstance(schema.get("additionalProperties"), dict):
            yield (*path, "{key}"), "string"
            yield from schema_leaves(schema["additionalProperties"], root, (*path, "{value}"))
    if "array" in types and isinstance(schema.get("items"), dict):
        yield from schema_leaves(schema["items"], root, (*path, "*"))
    for leaf in ("string", "number", "integer"):
        if leaf in types:
            yield path, leaf


def set_at(report, path, value) -> bool:
    """Set every place ``path`` names in ``report`` to ``value``; False when the report has none."""
    if not path:
        return False
    head, rest = path[0], path[1:]
    if head == "*":
        if not rest:  # the items themselves (a list of numbers)
            report[:] = [value] * len(report)
            return bool(report)
        return any([set_at(item, rest, value) for item in report])
    if head == "{key}":
        items = list(report.items())
        report.clear()
        report.update({f"{value}{i or ''}": v for i, (_, v) in enumerate(items)})
        return bool(items)
    if head == "{value}":
        if not rest:  # the values themselves (a map of counts)
            report.update(dict.fromkeys(report, value))
            return bool(report)
        return any([set_at(v, rest, value) for v in report.values()])
    if head not in report or report[head] is None and rest:
        return False
    if rest:
        return set_at(report[head], rest, value)
    report[head] = value
    return True


EVAL_SCHEMA = load_schema("eval")
LEAVES = sorted(set(schema_leaves(EVAL_SCHEMA, EVAL_SCHEMA)))
STRING_LEAVES = [p for p, t in LEAVES if t == "string"]
NUMBER_LEAVES = [p for p, t in LEAVES if t in ("number", "integer")]


def test_the_schema_walk_finds_what_the_card_quotes():
    assert ("model",) in STRING_LEAVES and ("sets", "{key}") in STRING_LEAVES
    assert ("sets", "{value}", "source") in STRING_LEAVES
    assert ("results", "*", "kl") in NUMBER_LEAVES and ("sets", "{value}", "count") in NUMBER_LEAVES


# ---------------------------------------------------------------------------------------------------------------
# class 8: the card


# strings of an eval report the model card does not show (the per-category counts, the layout a set was read as,
# tune's "cannot be told apart" notes are in the report itself): still inert, and nowhere on the card
NOT_ON_THE_CARD = {
    ("choice", "indistinct", "*", "message"),
    ("choice", "indistinct", "*", "rate"),
    ("sets", "{value}", "categories", "{key}"),
    ("sets", "{value}", "layout"),
}


@pytest.mark.parametrize("path", STRING_LEAVES, ids="/".join)
def test_every_string_of_an_eval_report_is_quoted_inert(locked, tmp_path, path):
    for i, payload in enumerate(HOSTILE_TEXT):
        report = base_report()
        if not set_at(report, path, payload):
            pytest.skip(f"the base report has no {path}")
        file = tmp_path / f"report{i}.json"
        file.write_text(json.dumps(report))
        read = read_eval_report(file)  # a real file through the real reader
        card = locked_card(None, locked["provenance"], locked["lock"], read)
        quoted = path != ("lock",) or payload  # "lock": "" is no lock, not quoted; every other string is
        if path in NOT_ON_THE_CARD:
            assert len(payload) < 8 or payload not in assert_inert(card), (path, payload)
            continue
        assert_inert(card, [payload] if quoted else [])


@pytest.mark.parametrize("path", NUMBER_LEAVES, ids="/".join)
def test_every_number_of_an_eval_report_is_finite_or_refused(locked, tmp_path, path):
    for value in HOSTILE_NUMBERS:
        report = base_report()
        if not set_at(report, path, value):
            pytest.skip(f"the base report has no {path}")
        # handed in by code: shown as "n/a" or a short number, never "nan" or 400 digits
        assert_no_bad_number(locked_card(None, locked["provenance"], locked["lock"], copy.deepcopy(report)))
        file = tmp_path / "report.json"
        file.write_text(json.dumps(report))  # Python writes NaN, Infinity and every digit of 10^400
        try:
            read = read_eval_report(file)
        except CheckpointError as e:
            assert e.exit_code == 3 and e.hint
            continue
        assert value == value and abs(value) <= 1.8e308, f"{value!r} at {path} was accepted"
        assert_no_bad_number(locked_card(None, locked["provenance"], locked["lock"], read))


@pytest.mark.parametrize("payload", HOSTILE_TEXT, ids=range(len(HOSTILE_TEXT)))
def test_names_from_the_source_and_the_lock_are_quoted_inert(locked, payload):
    provenance = copy.deepcopy(locked["provenance"])
    # a source's name is a Hub repo id (checked when the source is opened) and goes into the YAML as base_model
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", payload)
    provenance["source"].update(name=payload if hub_id else None, revision=payload or None)
    provenance.update(created_at=payload, tool=payload)
    lock = dataclasses.replace(
        locked["lock"],
        source_model=dataclasses.replace(locked["lock"].source_model, name=payload or None),
        creation={"method": payload},
    )
    card = locked_card(f"---\nlicense: mit\n---\n{payload}\n", provenance, lock, None)
    section = card[card.index(BEGIN) : card.index(END) + len(END)]
    assert_inert(section, [payload])
    assert card_lock_sha256(card) == provenance["lock"]["sha256"]


def test_a_hostile_report_through_the_cli_makes_a_card_that_verifies(locked, tmp_path, capsys):
    report = base_report()
    report.update(model=HOSTILE_TEXT[0], judge=HOSTILE_TEXT[1], weightlock_version=HOSTILE_TEXT[13])
    report["sets"] = {HOSTILE_TEXT[3]: {"source": HOSTILE_TEXT[6], "count": 3}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    code, _, err = apply_cli(
        capsys, locked["src"], locked["base"] / "l.wlock", tmp_path / "out", "--eval-report", str(tmp_path / "r.json")
    )
    assert code == 0, err
    assert_inert((tmp_path / "out" / "README.md").read_text(), [HOSTILE_TEXT[0], HOSTILE_TEXT[6]])
    assert verify_checkpoint(tmp_path / "out", loader_check=False).ok


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400])
def test_a_report_with_a_non_finite_number_is_refused_by_the_cli(locked, tmp_path, capsys, literal):
    text = json.dumps(base_report()).replace('"kl": 0.11', f'"kl": {literal}')
    assert literal in text
    (tmp_path / "r.json").write_text(text)
    code, _, err = apply_cli(
        capsys, locked["src"], locked["base"] / "l.wlock", tmp_path / "out", "--eval-report", str(tmp_path / "r.json")
    )
    assert code == 3 and "hint:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# class 11: forged markers and sizes


FAKE = f"| lock sha256 | `{'0' * 64}` |"
FORGED_BODIES = [
    f"# Model\n{BEGIN}\n{FAKE}\n",  # an opened section that never closes
    f"# Model\n{END}\ntext\n",
    f"# Model\n{END}\n{BEGIN}\n{FAKE}\n",
    f"# Model\n{BEGIN}\n{BEGIN}\n{FAKE}\n{END}\n",  # nested: the inner pair is a section, the outer begin stray
    f"{BEGIN}{BEGIN}{END}{END}",
    f"# Model\n```\n{BEGIN}\n{FAKE}\n```\n",  # in a code block, still the marker's text
    f"<!-- weightlock:{END}begin -->\n{FAKE}\n",  # dropping the end marker joins the text into a begin marker
]


@pytest.mark.parametrize("body", FORGED_BODIES, ids=range(len(FORGED_BODIES)))
def test_forged_markers_in_the_source_card_are_dropped(locked, body):
    card = locked_card(f"---\nlicense: mit\n---\n{body}", locked["provenance"], locked["lock"], None)
    assert card.count(BEGIN) == 1 and card.count(END) == 1
    assert card_lock_sha256(card) == locked["provenance"]["lock"]["sha256"]


def test_a_forged_card_through_the_cli_verifies(locked, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(locked["src"], src)
    (src / "README.md").write_text("".join(FORGED_BODIES[:3]))
    code, _, err = apply_cli(capsys, src, locked["base"] / "l.wlock", tmp_path / "out")
    assert code == 0, err
    code, out, err = run_cli(capsys, "verify", str(tmp_path / "out"), "--no-loader-check")
    assert code == 0, out + err


@pytest.mark.parametrize("marker", [BEGIN, END])
def test_markers_in_the_source_metadata_are_refused(locked, marker):
    with pytest.raises(CheckpointError, match="section markers") as e:
        locked_card(f'---\ndescription: "{marker}"\n---\n# M\n', locked["provenance"], locked["lock"], None)
    assert e.value.exit_code == 3


def test_a_source_card_too_large_for_the_section_is_refused(locked):
    near = "---\nlicense: mit\n---\n" + "x" * (MAX_CARD_BYTES - 100)
    with pytest.raises(CheckpointError, match="too large") as e:
        locked_card(near, locked["provenance"], locked["lock"], None)
    assert e.value.exit_code == 3


def test_a_24_mb_eval_report_makes_a_small_card(locked, tmp_path, capsys):
    report = base_report()
    report["results"] = [dict(report["results"][0], alpha=float(i)) for i in range(2000)]
    report["results"][0]["answers"] = {"harmful": ["y" * 1000] * 25_000}
    report["sets"] = {f"set{i}": {"source": "s" * 300, "count": 1} for i in range(500)}
    (tmp_path / "big.json").write_text(json.dumps(report))
    assert (tmp_path / "big.json").stat().st_size > 24 << 20
    code, _, err = apply_cli(
        capsys, locked["src"], locked["base"] / "l.wlock", tmp_path / "out", "--eval-report", str(tmp_path / "big.json")
    )
    assert code == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    assert len(card.encode()) < 64 << 10 and "more rows, not shown" in card and "and 484 more" in card
    assert verify_checkpoint(tmp_path / "out", loader_check=False).ok


# ---------------------------------------------------------------------------------------------------------------
# class 10: the source card's YAML front matter

BAD_FRONT_MATTER = {
    "list": "- a\n- b",
    "scalar": "just text",
    "broken": "key: [unclosed",
    "python-object": "a: !!python/object/apply:os.system ['touch {pwned}']",
    "python-name": "a: !!python/name:os.system",
    "cycle": "a: &a [*a]",
    "non-text key": "1: one",
    "deep": "a: " + "[" * 40 + "]" * 40,
}
WRONG_TYPES = [5, True, {"a": 1}, [1, 2], [["x"]]]


def front_matter_cases(tmp_path):
    cases = {name: yaml.replace("{pwned}", str(tmp_path / "pwned")) for name, yaml in BAD_FRONT_MATTER.items()}
    for key in _TEXT_KEYS + _TEXT_LIST_KEYS:  # every key ModelCardData reads, with a value of another type
        for value in WRONG_TYPES:
            if key in _TEXT_LIST_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
                continue
            cases[f"{key}={value!r}"] = f"{key}: {json.dumps(value)}"
    return cases


def test_bad_front_matter_is_refused_and_never_run(locked, tmp_path):
    cases = front_matter_cases(tmp_path)
    assert len(cases) > 50
    for name, yaml in cases.items():
        with pytest.raises(CheckpointError) as e:
            locked_card(f"---\n{yaml}\n---\n# M\n", locked["provenance"], locked["lock"], None)
        assert e.value.exit_code == 3 and "README.md" in e.value.message and e.value.hint, name
    assert not (tmp_path / "pwned").exists()


def test_good_front_matter_is_kept(locked):
    card = locked_card(
        "---\ntags: solo\nlicense: mit\na: &x [1]\nb: *x\n---\n# M\n", locked["provenance"], locked["lock"]
    )
    assert "- solo\n" in card and "license: mit" in card and card.count(BEGIN) == 1


@pytest.mark.parametrize("name", ["list", "python-object", "tags=5"])
def test_bad_front_matter_through_the_cli_is_exit_3(locked, tmp_path, capsys, name):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(locked["src"], src)
    (src / "README.md").write_text(f"---\n{front_matter_cases(tmp_path)[name]}\n---\n# M\n")
    code, _, err = apply_cli(capsys, src, locked["base"] / "l.wlock", tmp_path / "out")
    assert code == 3 and "README.md" in err and "hint:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_bad_front_matter_in_place_leaves_the_folder_as_it_was(locked, tmp_path, capsys):
    import shutil

    from conftest import tree_hashes

    src = tmp_path / "src"
    shutil.copytree(locked["src"], src)
    (src / "README.md").write_text("---\n- a list\n---\n# M\n")
    before = tree_hashes(src)
    code, _, err = run_cli(capsys, "apply", str(src), "--lock", str(locked["base"] / "l.wlock"), "--in-place")
    assert code == 3 and "README.md" in err and "hint:" in err and "Traceback" not in err, err
    assert tree_hashes(src) == before


# ---------------------------------------------------------------------------------------------------------------
# class 7: numbers and empty strings in JSON inputs


@pytest.mark.parametrize(
    "literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 309, "7" * 5000]
)
def test_parse_json_refuses_numbers_no_value_may_be(literal):
    for document in (literal, f'{{"a": [1, {literal}]}}'):
        with pytest.raises(CheckpointError, match="holds the number") as e:
            parse_json(document, "a file")
        assert e.value.exit_code == 3 and e.value.hint


def test_parse_json_keeps_real_numbers():
    # a tokenizer config's model_max_length is 10^30, beyond int64: it must still read
    assert parse_json("[1e308, -0.0, 1e-400, 1000000000000000019884624838656, 12]", "x") == [
        1e308,
        -0.0,
        0.0,
        1000000000000000019884624838656,
        12,
    ]


def test_a_record_with_10_to_the_400_is_refused_by_verify(locked, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(locked["base"] / "out", out)
    record = out / "weightlock" / "provenance.json"
    assert record.exists()
    record.write_text(re.sub(r'"alpha": [^,\n]+', '"alpha": 1' + "0" * 400, record.read_text(), count=1))
    code, out_text, err = run_cli(capsys, "verify", str(out), "--no-loader-check")
    assert code in (1, 3) and "Traceback" not in err and "OverflowError" not in out_text + err, out_text + err
    assert "holds the number 10000" in out_text + err, out_text + err


def write(path, text):
    path.write_text(text)
    return path


def test_empty_prompts_and_answers_are_refused_at_load(tmp_path):
    from weightlock.lab.prompt_sets import load_prompt_set

    bad = {
        "qa": [
            '{"question": "Capital of France?", "answers": [""]}',
            '{"question": "Capital of France?", "answers": ["Paris", "  "]}',
            '{"question": "Capital of France?", "answers": ["-"]}',
            '{"question": "", "answers": ["Paris"]}',
            '{"question": "Capital of France?", "answers": [1]}',
            '{"question": "Capital of France?", "answers": ["Paris"], "x": NaN}',
        ],
        "harmful": ['""', '"   "', '{"prompt": ""}', '{"prompt": 5}', '{"prompt": "x", "n": 1e400}'],
    }
    for kind, items in bad.items():
        for item in items:
            for suffix, text in ((".jsonl", item + "\n"), (".json", f"[{item}]")):
                with pytest.raises(InvalidInputError) as e:
                    load_prompt_set(kind, write(tmp_path / f"set{suffix}", text))
                assert e.value.exit_code == 3 and e.value.hint, item
    good = load_prompt_set("qa", write(tmp_path / "qa.jsonl", '{"question": "Q?", "answers": ["Paris", "7"]}\n'))
    assert good.items == [{"question": "Q?", "answers": ["Paris", "7"]}]


def test_an_empty_accepted_answer_scores_nothing():
    from weightlock.lab.judge import answers_question

    assert not answers_question("I do not know.", ["", " ", "-"])
    assert answers_question("It is Paris.", ["", "Paris"])


def test_empty_pairs_are_refused(tmp_path):
    from weightlock.lab.pairs import load_pairs

    good = {"prompt": "How do I do a bad thing?", "chosen": "No.", "rejected": "Sure."}
    for change in (
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": [{"role": "user", "content": ""}]},
        {"chosen": ""},
        {"rejected": 5},
        {"prompt": [{"role": "user", "content": 5}]},
    ):
        path = write(tmp_path / "pairs.json", json.dumps([good] * 4 + [{**good, **change}]))
        with pytest.raises(InvalidInputError) as e:
            load_pairs(path)
        assert e.value.exit_code == 3 and e.value.hint, change
    with pytest.raises(InvalidInputError, match="holds the number"):
        load_pairs(write(tmp_path / "pairs.json", json.dumps([good] * 4)[:-1] + ', {"n": NaN}]'))


# ---------------------------------------------------------------------------------------------------------------
# class 9: regular expressions from an input

CATASTROPHIC = [
    "(a+)+$",
    "(a*)*b",
    "(a|aa)+$",
    "(a|a)*$",
    r"(\w+\s?)+$",
    "(x+x+)+y",
    r"^(([a-z])+.)+[A-Z]([a-z])+$",
    "(.*a){12}",
    "(a?){30}a{30}",
    ".*a.*a.*a.*a.*b",
    r"(.*\.)+o_proj",
    r"(a)\1",
    r"(?=(a+)+)b",
]


def test_catastrophic_patterns_are_refused_in_milliseconds():
    started = time.perf_counter()
    for pattern in CATASTROPHIC:
        with pytest.raises(ValueError, match="minutes|backreference"):
            bounded_pattern(pattern)
        matcher = BoundedMatcher("config.json quantization_config")
        with pytest.raises(CheckpointError) as e:
            matcher.match(pattern, "a" * 40 + "!")
        assert e.value.exit_code == 3 and e.value.hint
    assert time.perf_counter() - started < 2


REAL_PATTERNS = [
    ".*lm_head",
    r".*self_attn\.(q|k|v|o)_proj$",
    r"model\.layers\.\d+\.mlp\..*",
    r".*layers\.\d+\.(mlp|self_attn)\..*_proj$",
    r"(?!.*mlp).*o_proj",
    "re:not-a-prefix",
    r"^model\.layers\.(0|1)\.",
]
NAMES = [
    "lm_head",
    "model.layers.0.self_attn.o_proj",
    "model.layers.11.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.embed_tokens",
    "x" * MAX_MATCHED_NAME_CHARS,
]


def test_real_patterns_match_as_re_does():
    matcher = BoundedMatcher("config.json quantization_config")
    for pattern in REAL_PATTERNS:
        for name in NAMES:
            assert matcher.match(pattern, name) == (re.match(pattern, name) is not None), (pattern, name)
    with pytest.raises(CheckpointError, match="characters long"):
        matcher.match(".*", "x" * (MAX_MATCHED_NAME_CHARS + 1))


@pytest.fixture(scope="module")
def compressed_tensors_folder(tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    from quant_helpers import write_compressed_tensors

    base = tmp_path_factory.mktemp("ct")
    src = make_model(base / "src", "llama", hidden=256, heads=4, kv_heads=2, head_dim=64, vocab=256, layers=2)
    return write_compressed_tensors(src, base / "ct", "pack-quantized", "channel"), src


@pytest.mark.parametrize("key", ["ignore", "targets"])
def test_a_catastrophic_rule_makes_apply_and_inspect_refuse_fast(compressed_tensors_folder, tmp_path, capsys, key):
    import shutil

    from quant_helpers import rewrite

    folder, src = compressed_tensors_folder
    work = tmp_path / "ct"
    shutil.copytree(folder, work)
    config = json.loads((work / "config.json").read_text())["quantization_config"]
    if key == "ignore":
        config["ignore"] = ["lm_head", "re:(a+)+$"]
    else:
        config["config_groups"]["group_0"]["targets"] = ["re:(.*a){20}"]
    rewrite(work, config={"quantization_config": config})
    save_lock(random_lock(src), tmp_path / "l.wlock")
    started = time.perf_counter()
    code, out, err = run_cli(capsys, "inspect", str(work))  # describes the checkpoint, and why it is not read
    assert code == 0 and "not read by weightlock" in out and "run for minutes" in out, out + err
    code, out, err = run_cli(
        capsys, "apply", str(work), "--lock", str(tmp_path / "l.wlock"), "--out", str(tmp_path / "out")
    )
    assert code == 3 and "pattern" in err and "hint:" in err and "Traceback" not in err, out + err
    assert time.perf_counter() - started < 30 and not (tmp_path / "out").exists()


def test_an_eval_report_with_an_overflowed_kl_is_written_readable(tmp_path):
    """A KL that overflowed (inf) or is NaN is written as null: JSON has no NaN, and the report must read back
    through the same parser --eval-report uses."""
    from weightlock.io.untrusted import parse_json
    from weightlock.lab.evaluate import AlphaResult, EvalReport, report_json

    rows = [
        AlphaResult(a, 0.5, 0.25, 0.0, None, kl, 1.0)
        for a, kl in ((0.0, 0.0), (1.0, float("inf")), (2.0, float("nan")))
    ]
    report = EvalReport("m", "l.wlock", {}, {}, "phrases", rows)
    text = report_json(report)
    assert "NaN" not in text and "Infinity" not in text
    data = parse_json(text, "report")
    assert [r["kl"] for r in data["results"]] == [0.0, None, None]


@pytest.mark.parametrize(
    "body",
    ["```text\n", "~~~\n", "<pre>\n", "<!--\n", "<details>\n<summary>x</summary>\n", "    indented\n", "> quote\n"],
)
def test_a_source_body_cannot_swallow_the_section(locked, body):
    """The section comes before the source's text, so an unclosed fence, HTML block or comment in the source
    card cannot turn it into code or hide it: it renders as a heading and its table."""
    card = locked_card(f"---\nlicense: mit\n---\ntiny model\n\n{body}", locked["provenance"], locked["lock"], None)
    shown = card.split("\n---\n", 1)[1]  # what the Hub renders: the card without its YAML front matter
    tokens = MarkdownIt("commonmark", {"html": True}).enable(["table"]).parse(shown)
    kinds = [t.type for t in tokens]
    assert kinds[:2] == ["html_block", "heading_open"], kinds[:6]  # the begin marker, then "## Safety lock"
    assert "table_open" in kinds[: kinds.index("html_block", 1) + 1]
    assert card_lock_sha256(card) == locked["provenance"]["lock"]["sha256"]


def test_every_hidden_character_is_escaped_in_the_terminal_and_blanked_in_the_card(locked, tmp_path, capsys):
    """The CLI and the card read one table (weightlock/io/text.py): every character it names, in a lock's source
    name, reaches neither `inspect`'s output nor the card as it is (generated from the table itself)."""
    from weightlock.io.text import HIDDEN

    hidden = "".join(chr(c) for c in range(0x110000) if HIDDEN.fullmatch(chr(c)))
    assert len(hidden) > 200 and "\u200b" in hidden and "\u00ad" in hidden and "\U000e0041" in hidden
    lock = dataclasses.replace(
        locked["lock"], source_model=dataclasses.replace(locked["lock"].source_model, name=f"a{hidden}b")
    )
    save_lock(lock, tmp_path / "h.wlock")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "h.wlock"))
    assert code == 0, err
    assert not HIDDEN.search(out.replace("\n", "")), [hex(ord(c)) for c in HIDDEN.findall(out.replace("\n", ""))]
    assert "\\u200b" in out and "\\xad" in out and "\\U000e0041" in out
    card = locked_card(None, locked["provenance"], lock, None)
    assert not HIDDEN.search(card.replace("\n", "").replace("\u200b", ""))


def test_a_source_card_with_a_byte_order_mark_keeps_its_license(locked):
    """Editors on Windows start files with U+FEFF: the front matter after it is still the card's metadata."""
    text = "\ufeff---\nlicense: other\nlicense_name: proprietary-no-redistribution\n---\n# Secret model\n"
    card = locked_card(text, locked["provenance"], locked["lock"], None)
    assert card.startswith("---\n") and "\ufeff" not in card
    assert "license: other" in card and "license_name: proprietary-no-redistribution" in card
    assert card.count("---\n") == 2 and "# Secret model" in card


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".txt", "\x00\n\x00\x00\n"),
        (".jsonl", '{"prompt": "\\u0000"}\n{"prompt": "\\u200b\\u200b"}\n'),
        (".json", '["\\u00ad", "\\u2060"]'),
        (".txt", "x" * 40_000 + "\n"),
        (".json", json.dumps(["ok", "y" * 40_000])),
    ],
    ids=["nul-lines", "invisible-jsonl", "invisible-json", "huge-line", "huge-item"],
)
def test_invisible_and_huge_prompts_are_refused_at_load(tmp_path, suffix, text):
    """A prompt of NUL or invisible characters only is empty to a reader and a judge; one longer than any real
    prompt (a 50 MB line took 24 GB to tokenize) is refused before a model sees it, whatever --limit says."""
    from weightlock.lab.prompt_sets import load_prompt_set

    path = tmp_path / f"set{suffix}"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match="visible|characters long"):
        load_prompt_set("harmful", path, limit=1)  # every item is checked, not only the first --limit
