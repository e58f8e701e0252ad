"""What tokens cost: a versioned price table per model and the Message Batches discount.

Prices are Anthropic's public list prices in US dollars per million tokens (MTok), as
published on the pricing page (platform.claude.com/docs/en/about-claude/pricing); the table
version is the date they were last checked against it: **2026-12-01** (Opus 4.6, Opus 4.7
and Sonnet 4.6 added; the earlier rows unchanged since ``2025-11-24``). Prompt cache
writes are priced at the 5-minute TTL rate (1.25x input); cache reads at 0.1x input.
Message Batches bill every kind of token at 50% of these prices, cache tokens included.

Model ids are matched by their longest known prefix, so dated snapshots
(``claude-haiku-4-5-20251001``) and aliases (``claude-haiku-4-5``) price alike. An unknown
model has no price: callers report its cost as unknown rather than guess.

No I/O here; the pipeline and the CLI use it to estimate, cap and report spend.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass

PRICE_TABLE_VERSION = "2026-12-01"
BATCH_DISCOUNT = 0.5  # Message Batches cost half the standard price
_PER = 1_000_000.0
# A rough tokenizer for offline estimates: English text averages about four characters per
# token with Claude's tokenizers; JSON framing makes request bytes overstate it slightly.
CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Standard (non-batch) prices of one model family in USD per million tokens."""

    input: float
    output: float
    cache_write: float
    cache_read: float


# Longest-prefix match on the model id. Keep the list sorted by family for review.
# An Opus 4.x newer than the ones listed would fall under ``claude-opus-4`` ($15/$75, the
# price of Opus 4.0): every new 4.x id needs its own row.
PRICES: dict[str, ModelPrice] = {
    "claude-opus-4-7": ModelPrice(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-6": ModelPrice(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-5": ModelPrice(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-1": ModelPrice(15.0, 75.0, 18.75, 1.50),
    "claude-opus-4": ModelPrice(15.0, 75.0, 18.75, 1.50),
    "claude-3-opus": ModelPrice(15.0, 75.0, 18.75, 1.50),
    "claude-sonnet-4-6": ModelPrice(3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4-5": ModelPrice(3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4": ModelPrice(3.0, 15.0, 3.75, 0.30),
    "claude-3-7-sonnet": ModelPrice(3.0, 15.0, 3.75, 0.30),
    "claude-3-5-sonnet": ModelPrice(3.0, 15.0, 3.75, 0.30),
    "claude-haiku-4-5": ModelPrice(1.0, 5.0, 1.25, 0.10),
    "claude-3-5-haiku": ModelPrice(0.80, 4.0, 1.0, 0.08),
    "claude-3-haiku": ModelPrice(0.25, 1.25, 0.30, 0.03),
}


@functools.lru_cache(maxsize=256)
def price_for(model: str | None) -> ModelPrice | None:
    """The price of ``model`` (longest matching prefix), or None when it is not in the table.

    Cached: collect prices every result line, and a job sees one or two model names.
    """
    if not model:
        return None
    best = max((p for p in PRICES if model.startswith(p)), key=len, default=None)
    return PRICES[best] if best is not None else None


def unpriced(model: str | None) -> str | None:
    """Why ``model``'s cost is unknown, for messages (with the priced id it is closest to,
    as a typo like ``claude-haiku-4.5`` is likely); None when the table prices it."""
    if price_for(model) is not None:
        return None
    close = difflib.get_close_matches(model or "", PRICES, n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"model {model!r} is not in the price table {PRICE_TABLE_VERSION}{hint}"


def unknown_cost(model: str | None, unpriced_rows: bool) -> str | None:
    """Why a job's cost is unknown, for messages: its ``model`` is not in the table, or
    (``unpriced_rows``) some rows had an answer the table could not price, say from the
    model a re-run moved away from; None when every attempt was priced. Either way those
    rows' ``cost_usd`` is null, and a total of the rest would read as all that was paid."""
    reason = unpriced(model)
    if reason is None and unpriced_rows:
        reason = f"some answers came from a model not in the price table {PRICE_TABLE_VERSION}"
    return reason


def cost_usd(
    model: str | None,
    *,
    input_tokens: int | None = 0,
    output_tokens: int | None = 0,
    cache_creation_input_tokens: int | None = 0,
    cache_read_input_tokens: int | None = 0,
    batch: bool = True,
) -> float | None:
    """Dollars for one request's usage (None for an unknown model); batch discount by default."""
    price = price_for(model)
    if price is None:
        return None
    return usage_cost(
        price,
        input_tokens,
        output_tokens,
        cache_creation_input_tokens,
        cache_read_input_tokens,
        batch=batch,
    )


def usage_cost(
    price: ModelPrice,
    input_tokens: int | None,
    output_tokens: int | None,
    cache_creation_input_tokens: int | None,
    cache_read_input_tokens: int | None,
    *,
    batch: bool = True,
) -> float:
    """:func:`cost_usd` for a price already looked up (collect looks it up once per model,
    not once per line); positional, as keyword arguments cost a call more."""
    dollars = (
        (input_tokens or 0) * price.input
        + (output_tokens or 0) * price.output
        + (cache_creation_input_tokens or 0) * price.cache_write
        + (cache_read_input_tokens or 0) * price.cache_read
    ) / _PER
    return dollars * BATCH_DISCOUNT if batch else dollars


def approx_tokens(text_or_bytes: str | bytes | int) -> int:
    """Offline token estimate for a text, a serialised request, or a length in characters."""
    n = text_or_bytes if isinstance(text_or_bytes, int) else len(text_or_bytes)
    return math.ceil(n / CHARS_PER_TOKEN)
