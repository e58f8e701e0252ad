"""`batchpipe report JOB`: labels, outcomes, attempts, cost and a sample, as text or HTML.

The HTML page is self-contained (inline CSS, inline SVG bar charts, no scripts, fonts or
other external assets), so it can be mailed or archived as one file.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import click

from batchpipe import pipeline
from batchpipe.cli.app import State, cli, handle_errors
from batchpipe.cli.dbcheck import require_database
from batchpipe.cli.wiring import pipeline_context
from batchpipe.errors import OutputNotWritable, UsageError

_BAR_COLOURS = ("#3b6ea5", "#d9822b", "#3f9142", "#b8434e", "#7b5ea7", "#8c6d46", "#5b8d99")


# Control characters (C0, DEL, C1) as the escapes a reader knows. Input rows and answers
# are untrusted text: a raw "\r" or "\x1b[2J" in a sampled ticket would overwrite or clear
# the terminal, a NUL is invalid in HTML, and a newline would break the one-line layout.
_CONTROL_ESCAPES = {
    c: ("\\n" if c == 10 else "\\r" if c == 13 else "\\t" if c == 9 else f"\\x{c:02x}")
    for c in [*range(0x20), *range(0x7F, 0xA0)]
}


def _shown(value: object) -> str:
    """``value`` as text with its control characters escaped (``Line1\\nLine2``)."""
    return str(value).translate(_CONTROL_ESCAPES)


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _too_many(r: pipeline.Report) -> str:
    hint = "" if r.label_field else "; --labels or --output-schema asks for labels"
    return f"more than {pipeline.MAX_LABELS} distinct answers, so free text: no distribution{hint}"


def render_text(report: pipeline.Report) -> str:
    """The report for a terminal."""
    r = report
    out = [f"job {r.job_id} ({r.job_name}): {r.status}, {r.rows} rows, model {r.model}"]
    if r.error:
        out.append(f"error: {_shown(r.error)}")
    if r.labels:
        total = sum(n for _, n in r.labels)
        out.append(f"\nlabels ({r.label_field or 'answer'}):")
        out += [f"  {_shown(label):<24} {n:>8}  {_pct(n, total):>6}" for label, n in r.labels]
    elif r.too_many_labels:
        out.append(f"\nlabels ({r.label_field or 'answer'}): {_too_many(r)}")
    out.append("\nstatus and errors:")
    for status, error, n in r.statuses:
        out.append(f"  {status + (f' ({_shown(error)})' if error else ''):<40} {n:>8}")
    attempts = ", ".join(f"{a}: {n}" for a, n in r.attempts.items()) or "none (no rows)"
    out.append(f"\nattempts per row: {attempts}")
    out.append(f"truncated at max_tokens: {r.truncated}")
    per_k = f"${r.cost_per_1000_rows:.4f}" if r.cost_per_1000_rows is not None else "-"
    if r.cost_usd is None:
        out.append(f"cost unknown: {r.cost_unknown}")
    else:
        out.append(
            f"cost ${r.cost_usd:.4f} (batch prices, table {r.price_table}); per 1,000 rows {per_k}"
        )
    out.append(f"\nsample of {len(r.sample)} row(s):")
    for row in r.sample:
        what = _shown(row["label"] or row["answer"] or row["error"] or "")
        inputs = "; ".join(f"{_shown(k)}={_shown(v)}" for k, v in row["input"].items())
        out.append(f"  row {row['row']} [{row['status']}] {what}")
        if inputs:
            out.append(f"      {inputs}")
    return "\n".join(out)


def _bars(items: list[tuple[str, int]], title: str) -> str:
    """An inline SVG horizontal bar chart."""
    if not items:
        return ""
    top = max(n for _, n in items) or 1
    total = sum(n for _, n in items)
    height = 28 * len(items) + 10
    parts = [
        f'<svg role="img" aria-label="{html.escape(title)}" width="640" height="{height}" '
        f'viewBox="0 0 640 {height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, (name, n) in enumerate(items):
        y = 5 + 28 * i
        width = max(2, round(320 * n / top))  # leaves room for the count after the bar
        colour = _BAR_COLOURS[i % len(_BAR_COLOURS)]
        parts.append(
            f'<text x="0" y="{y + 17}" font-size="13">{html.escape(_shown(name)[:28])}</text>'
            f'<rect x="190" y="{y}" width="{width}" height="22" rx="3" fill="{colour}"/>'
            f'<text x="{196 + width}" y="{y + 17}" font-size="13">{n} '
            f"({_pct(n, total)})</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;
max-width:960px;color:#1d2330;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.1rem;margin-top:2rem;
border-bottom:1px solid #dde2ea;padding-bottom:.3rem}
.meta{color:#5a6578}.cards{display:flex;gap:1rem;flex-wrap:wrap;margin-top:1rem}
.card{background:#f4f6fa;border-radius:8px;padding:.7rem 1rem;min-width:140px}
.card b{display:block;font-size:1.3rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.35rem .5rem;
border-bottom:1px solid #e6e9ef;vertical-align:top}th{background:#f4f6fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.status-succeeded{color:#2f7d32}.status-invalid_output,.status-errored{color:#b3261e}
small{color:#5a6578}.error{color:#b3261e}
"""


def render_html(report: pipeline.Report) -> str:
    """The report as one self-contained HTML page."""
    r = report

    def e(value: object) -> str:
        return html.escape(_shown(value))

    per_k = f"${r.cost_per_1000_rows:.4f}" if r.cost_per_1000_rows is not None else "-"
    cards = [
        ("rows", f"{r.rows:,}"),
        ("status", r.status),
        ("cost", "unknown" if r.cost_usd is None else f"${r.cost_usd:.4f}"),
        ("per 1,000 rows", per_k),
        ("truncated", str(r.truncated)),
    ]
    status_rows = "".join(
        f'<tr><td class="status-{e(s)}">{e(s)}</td><td>{e(err or "")}</td>'
        f'<td class="num">{n}</td></tr>'
        for s, err, n in r.statuses
    )
    attempt_rows = "".join(
        f'<tr><td>{a}</td><td class="num">{n}</td></tr>' for a, n in r.attempts.items()
    )
    sample_rows = "".join(
        f"<tr><td>{row['row']}</td><td>{e(row['key'])}</td>"
        f'<td class="status-{e(row["status"])}">{e(row["status"])}</td>'
        f"<td>{e(row['label'] or '')}</td>"
        f"<td>{'<br>'.join(f'<b>{e(k)}</b>: {e(v)}' for k, v in row['input'].items())}</td>"
        f"<td>{e(row['error'] or row['answer'] or '')}</td></tr>"
        for row in r.sample
    )
    card_html = "".join(
        f"<div class='card'><small>{e(k)}</small><b>{e(v)}</b></div>" for k, v in cards
    )
    u = r.usage
    tokens = (
        f"input {u.get('input_tokens', 0):,}, output {u.get('output_tokens', 0):,}, "
        f"cache write {u.get('cache_creation_input_tokens', 0):,}, "
        f"cache read {u.get('cache_read_input_tokens', 0):,}"
    )
    total = (
        f"${r.cost_usd:.4f} in total" if r.cost_usd is not None else f"unknown: {r.cost_unknown}"
    )
    total = e(total)
    no_labels = _too_many(r) if r.too_many_labels else "No labels (the job has no output schema)."
    status_chart = _bars(
        [(f"{s}{' / ' + err if err else ''}", n) for s, err, n in r.statuses], "rows by status"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>batchpipe report: {e(r.job_name)}</title><style>{_CSS}</style></head>
<body>
<h1>Job {r.job_id}: {e(r.job_name)}</h1>
<div class="meta">model {e(r.model)} · batch prices, price table {e(r.price_table)}</div>
{f'<p class="error">error: {e(r.error)}</p>' if r.error else ""}
<div class="cards">{card_html}</div>
<h2>Labels{f" ({e(r.label_field)})" if r.label_field else ""}</h2>
{_bars(r.labels, "label distribution") or f"<p>{e(no_labels)}</p>"}
<h2>Status and errors</h2>
{status_chart}
<table><tr><th>status</th><th>error type</th><th>rows</th></tr>{status_rows}</table>
<h2>Attempts per row</h2>
<table><tr><th>attempts</th><th>rows</th></tr>{attempt_rows}</table>
<h2>Cost</h2>
<p>{total}, {per_k} per 1,000 rows; tokens: {tokens}.</p>
<h2>Sample for review ({len(r.sample)} random rows)</h2>
<table><tr><th>row</th><th>key</th><th>status</th><th>label</th><th>input</th>
<th>answer / error</th></tr>
{sample_rows}</table>
</body></html>
"""


def write_html(path: Path, page: str) -> None:
    """Write the page to ``path``, making its folder first, as ``-o`` does for outputs.

    A path that cannot be written (its folder is a file, no permission) is a usage error
    naming it, not a traceback.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise OutputNotWritable(
            f"--html {path}: cannot write it ({why}: {exc.filename or path}); choose another path"
        ) from None


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path),
    help="Also write HTML here (its folder is made if missing, as for -o).",
)
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Rows to sample (0: none).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.pass_obj
@handle_errors
def report(
    state: State,
    /,
    *,
    job_ref: str,
    html_path: Path | None,
    sample: int,
    seed: int,
    as_json: bool,
) -> None:
    """A job's report: label distribution, status and errors, attempts, cost, a sample.

    Printed as text (or --json); --html writes a self-contained page (inline CSS and SVG).
    """
    require_database(state)
    with pipeline_context(state) as ctx:
        job = ctx.store.get_job(job_ref)
        if job is None:
            raise UsageError(f"no job {job_ref!r}; `batchpipe jobs` lists them")
        found = pipeline.build_report(ctx, job, sample=sample, seed=seed)
    if html_path is not None:
        write_html(html_path, render_html(found))
        click.echo(f"wrote {html_path}", err=True)
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2, default=str))
    else:
        click.echo(render_text(found))
