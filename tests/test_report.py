"""`batchpipe report`: text and a self-contained HTML page, opened in headless Chromium.

Runs a labelled job on the in-process emulator through the CLI, renders the report, checks
the HTML has no external assets, then has Chromium (Debian's ``chromium`` package; `.ci/run`
installs it) load it from disk, dump its DOM and take a screenshot.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from test_pipeline import write_docs

from batchpipe.cli import cli
from batchpipe.pipeline import MAX_LABELS

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "report.png"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def finished_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Path]:
    """A done job (120 labelled reviews), and the root CLI args that reach its database."""
    src = tmp_path / "reviews.jsonl"
    write_docs(src, 120)
    monkeypatch.chdir(tmp_path)
    root = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    result = CliRunner().invoke(
        cli,
        [
            *root,
            "run",
            str(src),
            "--job",
            "reviews",
            "--prompt",
            "Classify the sentiment of: {{ body }}",
            "--model",
            "claude-haiku-4-5",
            "--max-tokens",
            "12",
            "--labels",
            "positive,negative,mixed,unclear",
            "--id-column",
            "doc_id",
            "--emulate",
            "-o",
            str(tmp_path / "labels.parquet"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    return root, tmp_path


def test_text_report(finished_job: tuple[list[str], Path]) -> None:
    root, _ = finished_job
    result = CliRunner().invoke(cli, [*root, "report", "reviews", "--sample", "5"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "labels (label):" in out
    assert re.search(r"^  (positive|negative|mixed|unclear) +\d+ +\d+\.\d%$", out, re.M)
    assert "status and errors:" in out
    assert "attempts per row: 1: 120" in out
    assert re.search(r"cost \$\d+\.\d{4} \(batch prices, table \d{4}-\d\d-\d\d\); per 1,000", out)
    assert out.count("\n  row ") == 5
    assert "body=review" in out  # the sampled rows' input, for review
    # Rows are numbered from 1, as validation numbers them: row N is line N of the input.
    lines = (finished_job[1] / "reviews.jsonl").read_text().splitlines()
    report = CliRunner().invoke(cli, [*root, "report", "reviews", "--json"])
    sample = json.loads(report.stdout)["sample"]
    assert sample
    for row in sample:
        assert json.loads(lines[row["row"] - 1])["doc_id"] == row["key"]


def test_html_report_in_headless_chromium(finished_job: tuple[list[str], Path]) -> None:
    root, tmp_path = finished_job
    page = tmp_path / "report.html"
    result = CliRunner().invoke(cli, [*root, "report", "reviews", "--html", str(page)])
    assert result.exit_code == 0, result.stderr
    html = page.read_text()
    # Self-contained: no scripts, links, remote images or fonts.
    assert not re.search(
        r"<script|<link|<img|@import|url\(|https?://(?!www\.w3\.org/2000/svg)", html
    )
    assert "<svg" in html
    assert "<style>" in html
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does)")
    profile = tmp_path / "chromium-profile"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
    assert "Job 1: reviews" in dom
    assert "label distribution" in dom
    assert "Sample for review (10 random rows)" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1100,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
        env=env,
        check=True,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a rendered page, not a blank one
    if os.environ.get("BATCHPIPE_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(data)  # refresh docs/report.png for the README


def test_free_text_answers_are_not_shown_as_labels(tmp_path: Path) -> None:
    """Every answer differs: a distribution would be a copy of the answers (and a counter
    that grows with the job), so the report says so instead."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, MAX_LABELS + 20)
    root = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    args = ["run", str(src), "--job", "free", "--prompt", "Summarise: {{ body }}"]
    args += ["--model", "claude-haiku-4-5", "--max-tokens", "12", "--emulate"]
    assert CliRunner().invoke(cli, [*root, *args]).exit_code == 0
    text = CliRunner().invoke(cli, [*root, "report", "free"])
    assert text.exit_code == 0, text.stderr
    assert f"labels (answer): more than {MAX_LABELS} distinct answers, so free text" in text.stdout
    assert "--labels or --output-schema asks for labels" in text.stdout
    as_json = json.loads(CliRunner().invoke(cli, [*root, "report", "free", "--json"]).stdout)
    assert as_json["labels"] == []
    assert as_json["too_many_labels"] is True


def test_html_into_a_new_folder_and_bad_values_are_clear(
    finished_job: tuple[list[str], Path],
) -> None:
    root, tmp_path = finished_job
    # A folder that does not exist yet is made, as -o makes the output's folder.
    page = tmp_path / "reports" / "2026" / "reviews.html"
    made = CliRunner().invoke(cli, [*root, "report", "reviews", "--html", str(page)])
    assert made.exit_code == 0, made.stderr
    assert f"wrote {page}" in made.stderr
    assert "<h1>Job 1: reviews</h1>" in page.read_text()
    # A path under a file cannot be written: exit 2, naming it, no traceback.
    (tmp_path / "afile").write_text("x")
    under_file = tmp_path / "afile" / "r.html"
    refused = CliRunner().invoke(cli, [*root, "report", "reviews", "--html", str(under_file)])
    assert refused.exit_code == 2, refused.output
    assert f"error: --html {under_file}: cannot write it" in refused.stderr
    assert "choose another path" in refused.stderr
    assert "Traceback" not in refused.stderr
    # A negative sample size is refused by the option itself; 0 means no sample.
    negative = CliRunner().invoke(cli, [*root, "report", "reviews", "--sample", "-1"])
    assert negative.exit_code == 2
    assert "Invalid value for '--sample': -1 is not in the range x>=0" in negative.stderr
    none = CliRunner().invoke(cli, [*root, "report", "reviews", "--sample", "0"])
    assert none.exit_code == 0, none.stderr
    assert "sample of 0 row(s):" in none.stdout


def test_control_characters_in_rows_are_shown_escaped(tmp_path: Path) -> None:
    """Support tickets carry raw carriage returns, NULs and escape sequences: the sample
    shows them escaped, so a row cannot overwrite or clear the terminal, break the layout
    or put a NUL into the HTML page."""
    src = tmp_path / "tickets.jsonl"
    bodies = ["Line1\nLine2\r\n\ttab", "\x00nul", "\x1b[2Jcleared", "plain 😀"]
    src.write_text("".join(json.dumps({"body": b}) + "\n" for b in bodies), encoding="utf-8")
    root = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    args = ["run", str(src), "--job", "t", "--prompt", "Classify: {{ body }}"]
    args += ["--model", "claude-haiku-4-5", "--max-tokens", "12", "--emulate"]
    assert CliRunner().invoke(cli, [*root, *args]).exit_code == 0
    page = tmp_path / "t.html"
    shown = CliRunner().invoke(cli, [*root, "report", "t", "--sample", "4", "--html", str(page)])
    assert shown.exit_code == 0, shown.stderr
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", shown.stdout)
    samples = [line for line in shown.stdout.splitlines() if "body=" in line]
    assert sorted(line.split("body=", 1)[1] for line in samples) == [
        r"Line1\nLine2\r\n\ttab",
        r"\x00nul",
        r"\x1b[2Jcleared",
        "plain 😀",
    ]
    html_text = page.read_text(encoding="utf-8")
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", html_text)
    assert r"\x00nul" in html_text


def test_a_report_prints_integers_wider_than_64_bits_exactly(tmp_path: Path) -> None:
    """The JSONL reader keeps such integers exact; the report's sample printed them with
    orjson, which refuses them: the report ended in a traceback."""
    src = tmp_path / "big.jsonl"
    big = 123456789012345678901234
    src.write_text(
        json.dumps({"id": "a", "n": big, "meta": {"x": -(10**20)}}) + "\n"
        + json.dumps({"id": "b", "n": 7, "meta": {"x": 1}}) + "\n"
    )  # fmt: skip
    root = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    run = CliRunner().invoke(
        cli,
        [
            *root, "run", str(src), "--job", "big", "--prompt", "Q {{ n }}", "--model",
            "claude-haiku-4-5", "--max-tokens", "16", "--id-column", "id", "--emulate",
            "-o", str(tmp_path / "out.parquet"),
        ],
    )  # fmt: skip
    assert run.exit_code == 0, run.stderr
    text = CliRunner().invoke(cli, [*root, "report", "big", "--sample", "2"])
    assert text.exit_code == 0, text.stderr
    assert f"n={big}" in text.stdout
    assert '{"x":-100000000000000000000}' in text.stdout
    report = CliRunner().invoke(cli, [*root, "report", "big", "--json", "--sample", "2"])
    assert report.exit_code == 0, report.stderr
    assert str(big) in report.stdout


def _run(tmp_path: Path, src: Path, job: str) -> tuple[list[str], Result]:
    """`run` of a small job over ``src`` (emulated), in a state database of ``tmp_path``;
    the root options that name that database, and the result."""
    root = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    run = CliRunner().invoke(
        cli,
        [
            *root, "run", str(src), "--job", job, "--prompt", "Q {{ body }}", "--model",
            "claude-haiku-4-5", "--max-tokens", "16", "--emulate",
            "-o", str(tmp_path / "out.parquet"),
        ],
    )  # fmt: skip
    return root, run


def test_a_report_of_a_job_without_rows_says_so(tmp_path: Path) -> None:
    """An empty partition makes a done job of 0 rows; its report printed an empty
    `attempts per row:` line."""
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    root, run = _run(tmp_path, src, "empty")
    assert run.exit_code == 0, run.stderr
    report = CliRunner().invoke(cli, [*root, "report", "empty"])
    assert report.exit_code == 0, report.stderr
    assert "job 1 (empty): done, 0 rows" in report.stdout
    assert "\nattempts per row: none (no rows)\n" in report.stdout


def test_a_report_of_a_stopped_job_says_why_it_stopped(tmp_path: Path) -> None:
    """`status` gave a failed job's error and `report` did not: a report of 0 rows with no
    word of why."""
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    root, run = _run(tmp_path, src, "broken")
    assert run.exit_code == 1
    report = CliRunner().invoke(cli, [*root, "report", "broken"])
    assert report.exit_code == 0, report.stderr
    lines = report.stdout.splitlines()
    assert lines[0] == "job 1 (broken): failed, 0 rows, model claude-haiku-4-5"
    assert lines[1].startswith(f"error: cannot read {src}")
    page = tmp_path / "r.html"
    html_run = CliRunner().invoke(cli, [*root, "report", "broken", "--html", str(page)])
    assert html_run.exit_code == 0, html_run.stderr
    assert f'<p class="error">error: cannot read {src}' in page.read_text()
    as_json = CliRunner().invoke(cli, [*root, "report", "broken", "--json"])
    assert json.loads(as_json.stdout)["error"].startswith(f"cannot read {src}")


def test_a_sample_shows_times_and_decimals_as_text_not_quoted_json(tmp_path: Path) -> None:
    """A Parquet input's timestamp and decimal columns were printed as JSON strings inside
    the sample's text (`"ts": "\\"2024-01-01 …\\""`), quoted twice."""
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table(
            {
                "body": ["one", "two"],
                "ts": pa.array(
                    [dt.datetime(2024, 1, 1, 0, 0, 3, tzinfo=dt.UTC)] * 2, pa.timestamp("us", "UTC")
                ),
                "price": pa.array([decimal.Decimal("1.23")] * 2, pa.decimal128(5, 2)),
                "n": [48, 49],
            }
        ),
        src,
    )
    root, run = _run(tmp_path, src, "typed")
    assert run.exit_code == 0, run.stderr
    report = CliRunner().invoke(cli, [*root, "report", "typed", "--json", "--sample", "2"])
    assert report.exit_code == 0, report.stderr
    first = json.loads(report.stdout)["sample"][0]["input"]
    assert first == {"body": "one", "ts": "2024-01-01 00:00:03+00:00", "price": "1.23", "n": "48"}
    text = CliRunner().invoke(cli, [*root, "report", "typed", "--sample", "1"])
    assert "ts=2024-01-01 00:00:03+00:00; price=1.23; n=48" in text.stdout
