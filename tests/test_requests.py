"""Rendering rows into requests, the custom_id scheme and batch packing (batchpipe.requests)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchpipe.cli import cli
from batchpipe.errors import InputError, UsageError
from batchpipe.models import CUSTOM_ID_PATTERN, RESULT_COLUMNS, JobSpec
from batchpipe.requests import (
    BatchPacker,
    RequestRenderer,
    RowProblem,
    check_result_column_clash,
    check_row_key,
    chunk_keys,
    format_custom_id,
    new_job_token,
    own_id_reader,
    parse_custom_id,
)


def make_spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "input": "in.jsonl",
        "prompt": "Summarise: {{ body }}",
        "model": "claude-test",
        "max_tokens": 100,
    }
    fields.update(overrides)
    return JobSpec(**fields)


# ---------------------------------------------------------------- custom ids


def test_custom_id_round_trip() -> None:
    token = new_job_token()
    assert re.fullmatch(r"[0-9a-f]{10}", token)
    assert new_job_token() != token
    for row_index, attempt in [(0, 1), (41, 1), (99_999, 3)]:
        cid = format_custom_id(token, row_index, attempt)
        assert cid == f"{token}-{row_index}-{attempt}"
        assert parse_custom_id(cid) == (token, row_index, attempt)


def test_custom_id_stays_within_the_api_limits() -> None:
    cid = format_custom_id("3f9a0c1b2d", 2**63 - 1, 20)
    assert len(cid) <= 64
    assert re.match(CUSTOM_ID_PATTERN, cid)
    assert parse_custom_id(cid) == ("3f9a0c1b2d", 2**63 - 1, 20)
    with pytest.raises(ValueError, match="not a valid custom_id"):
        format_custom_id("x" * 60, 123_456, 1)
    with pytest.raises(ValueError, match=">= 0"):
        format_custom_id("3f9a0c1b2d", -1, 1)


@pytest.mark.parametrize(
    "foreign",
    ["request-1", "3f9a0c1b2d-01-1", "3f9a0c1b2d-1", "3f9a0c1b2d-1-x", "a b-1-1", "", "x" * 70],
)
def test_foreign_custom_ids_are_not_ours(foreign: str) -> None:
    assert parse_custom_id(foreign) is None


# Ids near the edge of the scheme: the token's reader must take exactly what the regex takes.
TRICKY_IDS = [
    "3f9a0c1b2d-7-2", "3f9a0c1b2d-0-0", "3f9a0c1b2d-0-1", "3f9a0c1b2d-10-20",
    "3f9a0c1b2d-01-1", "3f9a0c1b2d-1-01", "3f9a0c1b2d-00-0", "3f9a0c1b2d-0-00",  # leading zeros
    "3f9a0c1b2d--1", "3f9a0c1b2d-1-", "3f9a0c1b2d-", "3f9a0c1b2d", "3f9a0c1b2d--",  # empty parts
    "3f9a0c1b2d-1-2-3", "3f9a0c1b2d-1--2", "3f9a0c1b2d--1-2", "-3f9a0c1b2d-1-2",  # extra dashes
    "3f9a0c1b2d-\u0661-1", "3f9a0c1b2d-1-\u0661", "3f9a0c1b2d-\u00b2-1",  # '١', '²': isdigit only
    "3f9a0c1b2d-\uff11-1", "3f9a0c1b2d-1-1\n", "3f9a0c1b2d- 1-1", "3f9a0c1b2d-+1-1",
    "3f9a0c1b2d-1_0-1", "3f9a0c1b2d-1-1.0", "3F9A0C1B2D-1-1", "3f9a0c1b2dx-1-1",
    "x3f9a0c1b2d-1-1", "3f9a0c1b2-1-1", "9999999999-7-2", "someone-else", "",
    "3f9a0c1b2d-" + "9" * 53, "3f9a0c1b2d-1-" + "9" * 51, "3f9a0c1b2d-1-" + "9" * 52,  # 64, 65
]  # fmt: skip


def regex_reading(token: str, custom_id: str) -> tuple[int, int] | None:
    parsed = parse_custom_id(custom_id)
    return None if parsed is None or parsed[0] != token else (parsed[1], parsed[2])


@pytest.mark.parametrize("custom_id", TRICKY_IDS)
@pytest.mark.parametrize("token", ["3f9a0c1b2d", "3f9a0c1b2", "T_0", "a-b", "a b", "", "\u0661"])
def test_a_tokens_reader_takes_exactly_what_the_regex_takes(token: str, custom_id: str) -> None:
    """The fast path (a well-formed token) and the general one (any other) agree with
    parse_custom_id on every id, for the token and for ids spelled with another."""
    read = own_id_reader(token)
    for cid in (custom_id, custom_id.replace("3f9a0c1b2d", token, 1)):
        assert read(cid) == regex_reading(token, cid), cid


def test_a_tokens_reader_reads_its_ids() -> None:
    read = own_id_reader("3f9a0c1b2d")
    assert read("3f9a0c1b2d-7-2") == (7, 2)
    assert read(format_custom_id("3f9a0c1b2d", 2**63 - 1, 20)) == (2**63 - 1, 20)
    assert read("3f9a0c1b2d-01-1") is None
    assert read("3f9a0c1b2d-\u0661-1") is None


# ---------------------------------------------------------------- rendering


def test_render_builds_messages_params() -> None:
    spec = make_spec(
        prompt="Title: {{ title }}\n{{ body }}",
        system="Answer in {{ lang }}.",
        temperature=0.3,
        params={"metadata": {"user_id": "u1"}, "stop_sequences": ["END"]},
    )
    renderer = RequestRenderer(spec)
    assert renderer.template_columns() == {"title", "body", "lang"}
    params = renderer.render({"title": "T", "body": "B", "lang": "French", "extra": 1}, 0)
    assert params == {
        "model": "claude-test",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Title: T\nB"}],
        "system": "Answer in French.",
        "temperature": 0.3,
        "metadata": {"user_id": "u1"},
        "stop_sequences": ["END"],
    }


def test_render_without_system_or_temperature_leaves_them_out() -> None:
    params = RequestRenderer(make_spec()).render({"body": "x"}, 0)
    assert isinstance(params, dict)
    assert "system" not in params
    assert "temperature" not in params


def test_non_string_values_are_rendered() -> None:
    renderer = RequestRenderer(make_spec(prompt="{{ n }} {{ f }} {{ ok }} {{ tags }} {{ obj }}"))
    params = renderer.render({"n": 3, "f": 2.5, "ok": True, "tags": ["a"], "obj": {"k": 1}}, 0)
    assert isinstance(params, dict)
    # Objects and arrays go in as JSON, not Python's repr.
    assert params["messages"][0]["content"] == '3 2.5 True ["a"] {"k":1}'


@pytest.mark.parametrize(
    "template",
    [
        "Plain {{ a }} and {{ b }}!\n",
        "  {{- a -}}  \n{{ b }}",
        "{% if a %}yes {{ a }}{% endif %}{{ b | upper }}",
        "{{ a }}{# comment #}{{ b }}{% for i in range(2) %}{{ i }}{% endfor %}",
    ],
)
def test_rendering_matches_jinja2(template: str) -> None:
    """Simple templates skip jinja2's render call; the text must be exactly jinja2's."""
    row = {"a": 7, "b": {"x": [1, None]}}
    params = RequestRenderer(make_spec(prompt=template)).render(row, 0)
    assert isinstance(params, dict)
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        finalize=lambda v: orjson.dumps(v).decode() if isinstance(v, dict | list) else v,
    )
    assert params["messages"][0]["content"] == env.from_string(template).render(row)


def test_missing_and_null_columns_are_row_problems(tmp_path: Path) -> None:
    renderer = RequestRenderer(make_spec(prompt="{{ title }}: {{ body }}", system="{{ lang }}"))
    assert renderer.render({"title": "t", "lang": "en"}, 4) == RowProblem(
        4, None, "column 'body' is missing"
    )
    problem = renderer.render({"title": "t", "body": "b", "lang": None}, 9)
    assert problem == RowProblem(9, None, "column 'lang' is null")
    # Every absent column of a row is named, in column order, so one fix covers them all.
    assert renderer.render({"body": None, "lang": None}, 2) == RowProblem(
        2, None, "column 'body' is null; column 'lang' is null; column 'title' is missing"
    )
    # What a user reads of that row, from the commands that check it: counted from 1, by id.
    rows = [{"k": f"k{i}", "title": "t", "body": "b", "lang": "en"} for i in range(10)]
    rows[9]["lang"] = None
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    args = [
        str(src), "--prompt", "{{ title }}: {{ body }}", "--system", "{{ lang }}",
        "--model", "claude-haiku-4-5", "--max-tokens", "8", "--id-column", "k",
    ]  # fmt: skip
    db = f"sqlite:///{tmp_path / 'state.db'}"
    runner = CliRunner()
    ran = runner.invoke(
        cli, ["--db", db, "run", *args, "--emulate", "-o", str(tmp_path / "o.jsonl")]
    )
    assert ran.exit_code == 1, ran.output
    assert "\n  1 row: column 'lang' is null (row 10 (id 'k9'))\n" in ran.stderr
    estimated = runner.invoke(cli, ["--db", db, "estimate", *args, "--offline"])
    assert estimated.exit_code == 0, estimated.output
    assert "\n  1 row: column 'lang' is null (row 10 (id 'k9'))" in estimated.stderr


def test_a_null_nested_field_is_a_row_problem_not_the_text_none() -> None:
    renderer = RequestRenderer(make_spec(prompt="Language: {{ meta.lang }}"))
    problem = renderer.render({"meta": {"lang": None}}, 5)
    assert isinstance(problem, RowProblem)
    assert problem.message.startswith("template prints a null value")
    assert "meta.lang is null in this row" in problem.message
    assert "{{ meta.lang or '' }}" in problem.message
    allowed = RequestRenderer(make_spec(prompt="Language: {{ meta.lang or 'unknown' }}"))
    params = allowed.render({"meta": {"lang": None}}, 5)
    assert isinstance(params, dict)
    assert params["messages"][0]["content"] == "Language: unknown"


def test_a_null_column_a_template_gives_a_default_for_is_sent_with_it() -> None:
    """`{{ meta.lang or 'unknown' }}` rescued a null nested field, but the same for a
    top-level column was refused before it rendered ("column 'body' is null")."""
    row = {"body": None, "meta": {"lang": "en"}}
    for prompt, sent in [
        ("S {{ body or 'unknown' }}", "S unknown"),
        ("S {{ body | default('d', true) }}", "S d"),
        ("{% if body %}{{ body }}{% else %}none{% endif %}", "none"),
        ("{% if body is none %}none{% else %}{{ body }}{% endif %}", "none"),
        ("{{ meta.lang }}: {{ body or '' }}.", "en: ."),
    ]:
        params = RequestRenderer(make_spec(prompt=prompt)).render(row, 0)
        assert isinstance(params, dict), (prompt, params)
        assert params["messages"][0]["content"] == sent
    # Never the text "None": printed, or turned into text by a filter, the null is refused.
    for prompt in [
        "S {{ body | upper }}",
        "S {{ body ~ '!' }}",
        "{% if meta %}{{ body }}{% endif %}",
    ]:
        problem = RequestRenderer(make_spec(prompt=prompt)).render(row, 3)
        assert problem == RowProblem(
            3,
            None,
            "template prints a null value: body is null in this row; write {{ body or '' }} "
            "where an empty value is fine",
        ), prompt
    # A plain template (the fast path) refuses it before rendering, as it always did.
    plain = RequestRenderer(make_spec(prompt="S {{ body }}")).render(row, 1)
    assert plain == RowProblem(1, None, "column 'body' is null")


def test_a_field_of_a_null_object_is_null_and_takes_the_templates_default() -> None:
    """Before: `{{ meta.lang or 'unknown' }}` failed a row whose meta was null, with an
    internal class name ("'..._Null object' has no attribute 'lang'")."""
    rows = [
        ({"meta": {"lang": "en", "info": {"lang": "fr"}}}, "en fr"),
        ({"meta": {"lang": None, "info": None}}, "unknown unknown"),
        ({"meta": None}, "unknown unknown"),
    ]
    for prompt in [
        "{{ meta.lang or 'unknown' }} {{ meta.info.lang or 'unknown' }}",
        "{% if meta.lang %}{{ meta.lang }}{% else %}unknown{% endif %} "
        "{{ meta['info']['lang'] | default('unknown', true) }}",
        "{{ 'unknown' if meta.lang is none else meta.lang }} "
        "{{ 'unknown' if meta.info.lang is none else meta.info.lang }}",
    ]:
        renderer = RequestRenderer(make_spec(prompt=prompt))
        for row, sent in rows:
            params = renderer.render(row, 0)
            assert isinstance(params, dict), (prompt, row, params)
            assert params["messages"][0]["content"] == sent, (prompt, row)
    equal = RequestRenderer(make_spec(prompt="{{ 'x' if meta.lang == none else 'y' }}"))
    assert equal.render({"meta": {"lang": None}}, 0)["messages"][0]["content"] == "x"  # type: ignore[index]
    # Read from a null, a field is absent too: default() and `is defined` say so.
    absent = RequestRenderer(
        make_spec(prompt="{{ meta.lang | default('none') }} {{ meta.info.lang is defined }}")
    ).render({"meta": None}, 0)
    assert isinstance(absent, dict)
    assert absent["messages"][0]["content"] == "none False"
    # Printed without a default, or used, it is refused, and the message names the null.
    for prompt, row, null in [
        ("{{ meta.info.lang }}", {"meta": None}, "meta"),
        ("{{ meta.info.lang }}", {"meta": {"info": None}}, "meta.info"),
        ("{{ meta.info.lang | length }}", {"meta": None}, "meta"),
    ]:
        problem = RequestRenderer(make_spec(prompt=prompt)).render(row, 4)
        assert problem == RowProblem(
            4,
            None,
            f"template prints a null value: {null} is null, so meta.info.lang is too, in this "
            "row; write {{ meta.info.lang or '' }} where an empty value is fine",
        ), (prompt, row)
    # A null field is never turned into the text "None" by a filter or an operator.
    for prompt, row in [
        ("{{ meta.lang | upper }}", {"meta": {"lang": None}}),
        ("{{ meta.lang ~ '!' }}", {"meta": {"lang": None}}),
        ("{{ row.meta | upper }}", {"meta": None}),
    ]:
        problem = RequestRenderer(make_spec(prompt=prompt)).render(row, 0)
        assert isinstance(problem, RowProblem), prompt
        assert problem.message.startswith("template prints a null value: "), prompt


def test_a_missing_field_fails_the_row_even_where_it_is_only_tested() -> None:
    """A typo in a condition would otherwise drop (or invert) it on every row, paid for;
    `| default` and `is defined` say that a field may be absent."""
    row = {"meta": {"lang": "en"}}
    for prompt in [
        "{% if meta.lagn %}Language: {{ meta.lagn }}{% endif %}x",
        "{{ meta.lagn or 'unknown' }}",
        "{{ meta.lagn | upper }}",
    ]:
        problem = RequestRenderer(make_spec(prompt=prompt)).render(row, 0)
        assert isinstance(problem, RowProblem), prompt
        assert problem.message.startswith("template: meta.lagn is missing (meta has: lang)")
    for prompt, sent in [
        ("{{ meta.region | default('unknown') }}", "unknown"),
        ("{{ meta.region is defined }}", "False"),
    ]:
        params = RequestRenderer(make_spec(prompt=prompt)).render(row, 0)
        assert isinstance(params, dict), prompt
        assert params["messages"][0]["content"] == sent, prompt


def test_a_mistyped_or_null_nested_field_is_named_with_the_fields_there(tmp_path: Path) -> None:
    """A typo in a nested field fails every row: the message names the lookup as the
    template wrote it and the fields the object has, not jinja2's "'dict object' has no
    attribute"; a null nested field is named too."""
    src = tmp_path / "tickets.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"body": "late", "meta": {"lang": "en", "prio": 1}},
                {"body": "broken", "meta": {"lang": None, "prio": 2}},
            ]
        ),
        src,
    )
    db = f"sqlite:///{tmp_path / 'state.db'}"
    common = ["--model", "claude-haiku-4-5", "--max-tokens", "8", "--emulate"]
    typo = CliRunner().invoke(
        cli,
        ["--db", db, "run", str(src), "--prompt", "{{ meta.langg }}: {{ body }}", *common],
    )
    assert typo.exit_code == 1, typo.output
    assert "has no attribute" not in typo.stderr
    assert (
        "\n  2 rows: template: meta.langg is missing (meta has: lang, prio); "
        "fix the template or the data (rows 1, 2)\n"
    ) in typo.stderr
    null = CliRunner().invoke(
        cli,
        ["--db", db, "run", str(src), "--prompt", "[{{ meta.lang }}] {{ body }}", *common],
    )
    assert null.exit_code == 1, null.output
    assert (
        "\n  1 row: template prints a null value: meta.lang is null in this row; "
        "write {{ meta.lang or '' }} where an empty value is fine (row 2)\n"
    ) in null.stderr
    # Through a filter, arithmetic or row["…"], the lookup at fault is named all the same.
    renderer = RequestRenderer(make_spec(prompt='{{ meta.n + 1 }} {{ row["a b"].c }}'))
    problem = renderer.render({"meta": {"m": 1}, "a b": {}}, 0)
    assert isinstance(problem, RowProblem)
    assert problem.message.startswith("template: meta.n is missing (meta has: m)")
    problem = RequestRenderer(make_spec(prompt='{{ row["a b"].c }}')).render({"a b": {}}, 0)
    assert isinstance(problem, RowProblem)
    assert problem.message.startswith('template: row["a b"].c is missing (row["a b"] has: no')


def test_row_reaches_columns_whose_names_are_not_identifiers() -> None:
    renderer = RequestRenderer(make_spec(prompt='{{ row["product name"] }}: {{ body }}'))
    assert renderer.template_columns() == {"body"}
    assert renderer.columns_to_read() is None  # every column: any may be asked for
    params = renderer.render({"product name": "lamp", "body": "bright"}, 0)
    assert isinstance(params, dict)
    assert params["messages"][0]["content"] == "lamp: bright"
    missing = renderer.render({"body": "b"}, 3)
    assert isinstance(missing, RowProblem)
    assert "product name" in missing.message
    # An input column called row is that column, as before.
    plain = RequestRenderer(make_spec(prompt="Row {{ row }}"))
    assert plain.columns_to_read() is None
    named = plain.render({"row": 7}, 0)
    assert isinstance(named, dict)
    assert named["messages"][0]["content"] == "Row 7"
    assert RequestRenderer(make_spec(prompt="{{ body }}")).columns_to_read() == {"body"}


def test_empty_prompt_is_a_row_problem() -> None:
    renderer = RequestRenderer(make_spec(prompt="{{ body }}"))
    assert renderer.render({"body": "  \n"}, 2) == RowProblem(
        2, None, "prompt renders to empty text"
    )


def test_failing_template_expression_is_a_row_problem() -> None:
    renderer = RequestRenderer(make_spec(prompt="{{ body.missing_attr }} {{ n / 0 }}"))
    problem = renderer.render({"body": {"a": 1}, "n": 1}, 3)
    assert isinstance(problem, RowProblem)
    assert problem.row_index == 3
    assert "missing_attr" in problem.message


def test_oversized_request_is_a_row_problem() -> None:
    renderer = RequestRenderer(make_spec(max_batch_bytes=10_000))
    assert isinstance(renderer.render({"body": "x" * 9_000}, 0), dict)
    problem = renderer.render({"body": "x" * 11_000}, 1)
    assert problem == RowProblem(
        1, None, "request is 11 kB, over the 10 kB batch limit; shorten the prompt"
    )
    # Sizes within 10% are given exactly, not "10 kB, over the 10 kB limit".
    near = renderer.render({"body": "x" * 10_000}, 2)
    assert isinstance(near, RowProblem)
    assert re.fullmatch(
        r"request is 10,\d{3} bytes, over the 10,000-byte batch limit; shorten the prompt",
        near.message,
    ), near.message
    # Further over, but still rounding to the limit's figure: exact too.
    mb = RequestRenderer(make_spec(max_batch_bytes=1_000_000)).render({"body": "x" * 1_400_000}, 3)
    assert isinstance(mb, RowProblem)
    assert re.match(r"request is 1,4\d\d,\d{3} bytes, over the 1,000,000-byte", mb.message)


@pytest.mark.parametrize("cache_system", [False, True])
def test_every_request_the_render_accepts_fits_a_batch(cache_system: bool) -> None:
    """Rows near the limit, of characters JSON escapes to six bytes: the render either flags
    the row or the request fits a batch alone, with the longest custom_id."""
    spec = make_spec(
        max_batch_bytes=1024, prompt="{{ body }}", system="{{ note }}", cache_system=cache_system
    )
    renderer = RequestRenderer(spec)
    accepted = 0
    for n in range(100, 180):
        params = renderer.render({"body": "\x01", "note": "\x01" * n}, 0)
        if isinstance(params, RowProblem):
            continue
        accepted += 1
        payload = renderer.request_bytes("a" * 64, params)
        with BatchPacker(1, spec.max_batch_bytes) as packer:
            packer.add(0, "a" * 64, 1, payload)  # raises if no batch can hold it
    assert 0 < accepted < 80


def test_a_template_that_is_not_valid_text_is_refused_up_front() -> None:
    with pytest.raises(UsageError, match="prompt template is not valid text"):
        RequestRenderer(make_spec(prompt="Summarise \udcff: {{ body }}"))


@pytest.mark.parametrize("which", ["prompt", "system"])
def test_template_syntax_error_names_template_and_line(which: str) -> None:
    broken = "line one\nline two {{ body "
    overrides = {"prompt": broken} if which == "prompt" else {"system": broken}
    with pytest.raises(UsageError, match=rf"{which} template, line 2: "):
        RequestRenderer(make_spec(**overrides))


def test_templates_run_in_a_sandbox() -> None:
    renderer = RequestRenderer(make_spec(prompt="{{ body.__class__.__mro__ }}"))
    assert isinstance(renderer.render({"body": "x"}, 0), RowProblem)


def test_request_bytes_and_canonical_form() -> None:
    renderer = RequestRenderer(make_spec(params={"metadata": {"user_id": "u", "a": 1}}))
    params = renderer.render({"body": "é"}, 0)
    assert isinstance(params, dict)
    raw = renderer.request_bytes("tok-0-1", params)
    assert orjson.loads(raw) == {"custom_id": "tok-0-1", "params": params}
    canonical = renderer.canonical_request(params)
    # Stable: same params in another key order give the same form.
    assert renderer.canonical_request(dict(reversed(list(params.items())))) == canonical
    changed = renderer.render({"body": "e"}, 0)
    assert isinstance(changed, dict)
    assert renderer.canonical_request(changed) != canonical
    other_model = RequestRenderer(make_spec(model="claude-other")).render({"body": "é"}, 0)
    assert isinstance(other_model, dict)
    assert renderer.canonical_request(other_model) != canonical


# ---------------------------------------------------------------- row checks


def test_row_key() -> None:
    assert check_row_key({"a": 1}, None, 17) == "17"
    assert check_row_key({"id": 42}, "id", 0) == "42"
    assert check_row_key({"id": "abc"}, "id", 0) == "abc"
    for row, word in [({}, "missing"), ({"id": None}, "null"), ({"id": " "}, "empty")]:
        problem = check_row_key(row, "id", 5)
        assert isinstance(problem, RowProblem)
        assert problem.row_index == 5
        assert f"column 'id' (the id column) is {word}" in problem.message


def test_result_column_clash() -> None:
    check_result_column_clash(["body", "title"], RESULT_COLUMNS)
    with pytest.raises(InputError, match=r"'custom_id', 'model'.*rename"):
        check_result_column_clash(["custom_id", "body", "model"], RESULT_COLUMNS)


# ---------------------------------------------------------------- packing


def pack(packer: BatchPacker, payloads: list[bytes]) -> list[Any]:
    batches = []
    for i, payload in enumerate(payloads):
        full = packer.add(i, f"t-{i}-1", 1, payload)
        if full is not None:
            batches.append(full)
    last = packer.flush()
    if last is not None:
        batches.append(last)
    return batches


def payload_of(size: int, i: int) -> bytes:
    head = orjson.dumps({"custom_id": f"t-{i}-1", "params": {"t": ""}})
    return head[:-3] + b"x" * (size - len(head)) + head[-3:]


@pytest.mark.parametrize("max_bytes", [1000, 1015, 1016, 4096])
def test_packer_respects_byte_limit_exactly(max_bytes: int) -> None:
    payloads = [payload_of(100 + (i * 37) % 400, i) for i in range(200)]
    batches = pack(BatchPacker(max_requests=1000, max_bytes=max_bytes), payloads)
    seen = []
    for n, batch in enumerate(batches):
        body = batch.body()
        assert batch.count > 0
        assert len(body) == batch.nbytes <= max_bytes
        decoded = orjson.loads(body)["requests"]
        assert [r["custom_id"] for r in decoded] == [cid for _, cid, _ in batch.items]
        if n + 1 < len(batches):
            # Greedy: the next request would not have fitted.
            assert batch.nbytes + 1 + len(batches[n + 1].payloads[0]) > max_bytes
        seen.extend(batch.items)
    assert [i for i, _, _ in seen] == list(range(200))


def test_packer_fills_a_batch_to_exactly_the_byte_limit() -> None:
    # 10 payloads of 99 bytes: 13 + 10 * 99 + 9 commas + 2 = 1014 bytes.
    payloads = [payload_of(99, i) for i in range(20)]
    batches = pack(BatchPacker(max_requests=1000, max_bytes=1014), payloads)
    assert [b.count for b in batches] == [10, 10]
    assert [b.nbytes for b in batches] == [1014, 1014]


def test_packer_respects_request_limit() -> None:
    payloads = [payload_of(50, i) for i in range(25)]
    batches = pack(BatchPacker(max_requests=10, max_bytes=10**6), payloads)
    assert [b.count for b in batches] == [10, 10, 5]


def test_packer_never_emits_an_empty_batch() -> None:
    packer = BatchPacker(max_requests=1, max_bytes=10**6)
    assert packer.flush() is None
    assert packer.add(0, "t-0-1", 1, payload_of(50, 0)) is None
    first = packer.add(1, "t-1-1", 1, payload_of(50, 1))
    assert first is not None
    assert first.items == [(0, "t-0-1", 1)]
    last = packer.flush()
    assert last is not None
    assert last.items == [(1, "t-1-1", 1)]
    assert packer.flush() is None


def test_packer_refuses_a_request_bigger_than_a_batch() -> None:
    packer = BatchPacker(max_requests=10, max_bytes=1000)
    with pytest.raises(ValueError, match="no batch of 1000 bytes holds it"):
        packer.add(0, "t-0-1", 1, payload_of(990, 0))
    assert packer.flush() is None


# ---------------------------------------------------------------- chunks, column by column


class _Columns:
    """A RowSource over plain columns that counts how often it was asked for row dicts."""

    def __init__(self, columns: dict[str, list[Any]], texts: bool = True) -> None:
        self._columns = columns
        self._texts = texts
        self.rows_asked = 0

    def __len__(self) -> int:
        return len(next(iter(self._columns.values())))

    def rows(self) -> list[dict[str, Any]]:
        self.rows_asked += 1
        names = list(self._columns)
        columns = self._columns.values()
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]

    def texts(self, name: str) -> list[str] | None:
        values = self._columns.get(name)
        if not self._texts or values is None or not all(type(v) is str for v in values):
            return None
        return values

    def ids(self, name: str) -> list[str] | list[int] | None:
        values = self._columns.get(name)
        if values is None or None in values:
            return None
        if all(type(v) is int for v in values):
            return values
        return self.texts(name)


TRICKY_TEXTS = ["plain", "", "  \n", "é ünïcode ✓", "\x01" * 160, "x" * 600, "a\nb"]


@pytest.mark.parametrize(
    ("prompt", "system", "by_columns"),
    [
        ("Classify: {{ body }}", None, True),
        ("{{ body }}", None, True),  # blank rows render to empty text
        ("{{ body }} / {{ title }} / {{ body }}", "Sys {{ title }}", True),
        ("{{ body }}", "{{ title }}", True),  # a blank system prompt is left out
        ("{{ body | upper }}", None, False),  # jinja2: row by row
        ("{{ row['body'] }}", None, False),
    ],
)
@pytest.mark.parametrize("positions", [None, [0, 2, 4, 5]])
def test_a_chunk_renders_as_its_rows_do(
    prompt: str, system: str | None, by_columns: bool, positions: list[int] | None
) -> None:
    """render_chunk gives exactly what render gives row by row (texts, problems, sizes),
    whether it works column by column or falls back to the rows."""
    spec = make_spec(prompt=prompt, system=system, max_batch_bytes=1024, temperature=0.5)
    renderer = RequestRenderer(spec)
    chunk = _Columns({"body": TRICKY_TEXTS, "title": list(reversed(TRICKY_TEXTS))})
    rows = chunk.rows()
    picks = range(len(rows)) if positions is None else positions
    expected = [renderer.render(rows[p], 10 + p) for p in picks]
    assert any(isinstance(e, RowProblem) for e in expected)  # the tricky rows do fail
    assert any(isinstance(e, dict) for e in expected)
    chunk.rows_asked = 0
    got = renderer.render_chunk(chunk, 10, positions)
    assert got == expected
    assert [list(g) if isinstance(g, dict) else g for g in got] == [
        list(e) if isinstance(e, dict) else e for e in expected
    ]  # keys in the same order: the request bytes are the same
    assert chunk.rows_asked == (0 if by_columns else 1)
    if positions is None:
        problems = [e if isinstance(e, RowProblem) else None for e in expected]
        assert renderer.check_chunk(chunk, 10) == problems


@pytest.mark.parametrize(
    ("prompt", "body", "problems"),
    [
        ("Classify: {{ body }}", "fine", []),  # known good from the lengths alone
        ("Classify: {{ body }}", "x" * 700, []),  # worst case over the limit: rendered
        ("Classify: {{ body }}", "\x01" * 900, [1]),
        ("{{ body }}", "  ", [1]),  # a blank template can render blank: rendered
    ],
)
def test_checking_a_chunk_finds_the_rows_that_would_not_render(
    prompt: str, body: str, problems: list[int]
) -> None:
    renderer = RequestRenderer(make_spec(prompt=prompt, max_batch_bytes=1024))
    chunk = _Columns({"body": ["ok", body, "ok too"]})
    checked = renderer.check_chunk(chunk, 0)
    assert [i for i, p in enumerate(checked) if p is not None] == problems
    assert checked == [
        p if isinstance(p, RowProblem) else None for p in renderer.render_chunk(chunk, 0)
    ]
    assert chunk.rows_asked == 0


def test_a_chunk_with_a_null_or_a_number_goes_row_by_row() -> None:
    renderer = RequestRenderer(make_spec(prompt="{{ body }}"))
    for values in (["a", None, "b"], ["a", 3, "b"]):
        chunk = _Columns({"body": values})
        expected = [renderer.render(r, i) for i, r in enumerate(chunk.rows())]
        assert renderer.render_chunk(chunk, 0) == expected
        assert chunk.rows_asked == 2


def test_chunk_keys_match_the_row_keys() -> None:
    texts = _Columns({"id": ["a", "b", "c"]})
    assert chunk_keys(texts, "id", 5) == ["a", "b", "c"]
    assert chunk_keys(texts, None, 5) == ["5", "6", "7"]
    assert chunk_keys(_Columns({"id": [3, 10]}), "id", 0) == ["3", "10"]
    # Anything row by row would refuse (or that is not plain), the rows must decide.
    for bad in (["a", ""], ["a", " \t"], ["a", None], ["a", 1.5]):
        assert chunk_keys(_Columns({"id": bad}), "id", 0) is None
    assert chunk_keys(_Columns({"id": ["a"]}), "other", 0) is None


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"system": "Be brief about {{ title }}.", "temperature": 0.2},
        {"system": "{{ title }}", "cache_system": True},  # blank for some rows: left out
        {"params": {"metadata": {"user_id": "u"}, "top_k": 5}, "max_batch_bytes": 1024},
        {"output_schema": {"type": "object", "properties": {"label": {"type": "string"}}}},
        {"prompt": "{{ body | trim }}"},  # jinja2: row by row
        {"prompt": "{{ body }}"},  # may render blank: rendered first
    ],
)
@pytest.mark.parametrize("positions", [None, [1, 3, 5]])
def test_request_payloads_are_the_bytes_of_the_rendered_requests(
    overrides: dict[str, Any], positions: list[int] | None
) -> None:
    overrides = {"prompt": "Classify: {{ body }}", **overrides}
    renderer = RequestRenderer(make_spec(**overrides))
    chunk = _Columns({"body": TRICKY_TEXTS, "title": list(reversed(TRICKY_TEXTS))})
    picks = range(len(TRICKY_TEXTS)) if positions is None else positions
    ids = [f"tok-{p}-1" for p in picks]
    expected = [
        p if isinstance(p, RowProblem) else renderer.request_bytes(i, p)
        for i, p in zip(ids, renderer.render_chunk(chunk, 4, positions), strict=True)
    ]
    assert renderer.request_payloads(chunk, 4, positions, ids) == expected
