"""Seeded synthetic LLM-cache traffic and LLM-like values (hit-ratio and compression studies).

Everything here is deterministic given a seed, so a run can be repeated exactly and a
policy change is measured on the very same requests.

Traces (:func:`make_trace`): a request names an object (a distinct prompt) and carries
the size of that object's cached value, fixed per object.  Popularity follows a Zipf
law over a finite catalogue, ranks mapped to object ids by a seeded permutation (so
popularity is independent of size and id).  Variants:

* ``one_hit_fraction``: that share of the requests names a fresh object never asked
  again (a one-hit wonder: a unique question);
* ``shift``: at mid-trace the rank-to-object permutation is redrawn, so the popular set
  changes at once (a new product launch, a new prompt template);
* ``recency``: that share of the requests repeats one of the last few requests
  (retries, a user asking again), which rewards recency;
* ``sizes``: ``"answers"`` (~1.9 KB mean, log-normal, a long tail) or ``"short"``
  (300-600 B: classifications, routing decisions, one-line answers).

Values (:func:`english_text`, :func:`chat_value`): English-ish prose from a seeded word
list, and ``ChatGeneration`` values shaped like a tool-calling chat model's (JSON-ish
tool-call arguments, usage and response metadata), so that compression ratios are
realistic rather than those of repeated bytes.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

__all__ = [
    "GOAL_WORKLOADS",
    "WORKLOADS",
    "Trace",
    "WorkloadSpec",
    "chat_value",
    "corpus",
    "english_text",
    "make_trace",
    "text_slice",
]

# -- sizes ------------------------------------------------------------------------

ANSWER_MEAN_BYTES: Final = 1900
"""Target mean of the "answers" value sizes (the msgpack payload shmcache stores)."""
_ANSWER_SIGMA: Final = 0.7  # log-normal shape: median ~1.5 KB, p99 ~9 KB
_ANSWER_MIN_BYTES: Final = 96
_ANSWER_MAX_BYTES: Final = 32768
_SHORT_MEDIAN_BYTES: Final = 440
_SHORT_SIGMA: Final = 0.2
_SHORT_MIN_BYTES: Final = 300
_SHORT_MAX_BYTES: Final = 600


def _draw_sizes(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "answers":
        mu = np.log(ANSWER_MEAN_BYTES) - _ANSWER_SIGMA**2 / 2
        raw = rng.lognormal(mu, _ANSWER_SIGMA, n)
        return np.clip(raw, _ANSWER_MIN_BYTES, _ANSWER_MAX_BYTES).astype(np.int64)
    if kind == "short":
        raw = rng.lognormal(np.log(_SHORT_MEDIAN_BYTES), _SHORT_SIGMA, n)
        return np.clip(raw, _SHORT_MIN_BYTES, _SHORT_MAX_BYTES).astype(np.int64)
    raise ValueError(f"unknown size distribution {kind!r}; choose answers or short")


# -- workloads ----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    """One kind of traffic."""

    name: str
    alpha: float
    description: str
    one_hit_fraction: float = 0.0
    shift: bool = False
    recency: float = 0.0
    sizes: str = "answers"
    goal: bool = True
    """Part of issue 10's goal set (shmcache <= best online policy)."""


WORKLOADS: Final[tuple[WorkloadSpec, ...]] = (
    WorkloadSpec("zipf0.6", 0.6, "Zipf a=0.6"),
    WorkloadSpec("zipf0.8", 0.8, "Zipf a=0.8"),
    WorkloadSpec("zipf1.0", 1.0, "Zipf a=1.0"),
    WorkloadSpec("zipf0.6-ohw", 0.6, "Zipf a=0.6, 50% one-hit wonders", one_hit_fraction=0.5),
    WorkloadSpec("zipf0.8-ohw", 0.8, "Zipf a=0.8, 50% one-hit wonders", one_hit_fraction=0.5),
    WorkloadSpec("zipf1.0-ohw", 1.0, "Zipf a=1.0, 50% one-hit wonders", one_hit_fraction=0.5),
    WorkloadSpec("shift", 0.8, "Zipf a=0.8, popular set redrawn at mid-trace", shift=True),
    WorkloadSpec("short", 0.8, "Zipf a=0.8, short answers (300-600 B)", sizes="short"),
    WorkloadSpec(
        "recency",
        0.8,
        "Zipf a=0.8, 30% repeats of one of the last ~20 requests (retries; not in the goal set)",
        recency=0.3,
        goal=False,
    ),
)
GOAL_WORKLOADS: Final = tuple(w.name for w in WORKLOADS if w.goal)
_BY_NAME: Final = {w.name: w for w in WORKLOADS}

_RECENCY_MEAN_DISTANCE: Final = 20


@dataclass(frozen=True)
class Trace:
    """A request sequence: object ids and each request's value size (payload bytes)."""

    spec: WorkloadSpec
    seed: int
    n_objects: int
    obj_ids: np.ndarray = field(repr=False)
    sizes: np.ndarray = field(repr=False)

    @property
    def n_requests(self) -> int:
        """Number of requests."""
        return len(self.obj_ids)

    @functools.cached_property
    def distinct(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct object ids, index of each one's first request)."""
        ids, first = np.unique(self.obj_ids, return_index=True)
        return ids, first

    def describe(self) -> dict[str, Any]:
        """Summary figures for the report."""
        ids, first = self.distinct
        _, counts = np.unique(self.obj_ids, return_counts=True)
        sizes = self.sizes[first]
        return {
            "requests": self.n_requests,
            "catalogue": self.n_objects,
            "distinct_objects": len(ids),
            "one_hit_wonder_share": float((counts == 1).sum() / len(ids)),
            "compulsory_misses": len(ids),
            "value_bytes_mean": float(sizes.mean()),
            "value_bytes_median": float(np.median(sizes)),
            "value_bytes_p99": float(np.percentile(sizes, 99)),
            "distinct_value_bytes": int(sizes.sum()),
        }


def _zipf_ranks(rng: np.random.Generator, alpha: float, n_objects: int, n: int) -> np.ndarray:
    weights = np.arange(1, n_objects + 1, dtype=np.float64) ** -alpha
    return rng.choice(n_objects, size=n, p=weights / weights.sum())


def make_trace(
    workload: str | WorkloadSpec, n_requests: int, n_objects: int, seed: int = 0
) -> Trace:
    """Build one seeded trace.

    Args:
        workload: A name from :data:`WORKLOADS` or a spec.
        n_requests: Trace length.
        n_objects: Catalogue size of the Zipf part (one-hit wonders come on top).
        seed: Same seed, same trace.
    """
    spec = _BY_NAME[workload] if isinstance(workload, str) else workload
    # A seed per workload name too, so that two workloads are not the same draws.
    rng = np.random.default_rng([seed, *spec.name.encode()])
    ranks = _zipf_ranks(rng, spec.alpha, n_objects, n_requests)
    perm = rng.permutation(n_objects)
    ids = perm[ranks].astype(np.int64)
    if spec.shift:
        half = n_requests // 2
        ids[half:] = rng.permutation(n_objects)[ranks[half:]]
    n_fresh = 0
    if spec.one_hit_fraction:
        fresh = rng.random(n_requests) < spec.one_hit_fraction
        n_fresh = int(fresh.sum())
        ids[fresh] = n_objects + np.arange(n_fresh, dtype=np.int64)
    if spec.recency:
        repeat = rng.random(n_requests) < spec.recency
        distance = rng.geometric(1.0 / _RECENCY_MEAN_DISTANCE, n_requests)
        out = ids.tolist()
        for i in np.flatnonzero(repeat).tolist():
            j = i - int(distance[i])
            if j >= 0:
                out[i] = out[j]
        ids = np.asarray(out, dtype=np.int64)
    object_sizes = _draw_sizes(rng, spec.sizes, n_objects + n_fresh)
    return Trace(spec, seed, n_objects, ids, object_sizes[ids])


# -- English-ish text and chat values ---------------------------------------------------

_WORDS_TEXT: Final = (
    "the of and to a in is that for it as with was on be by this are or from at which an "
    "not have but can if you your we they their there will would should could more most "
    "some any each other into than then also only over such when where how what why who "
    "these those because about after before between through during without within under "
    "again further once here all both few many much very just first second new old good "
    "best large small long short high low early late next last order orders shipping "
    "status customer account payment refund invoice delivery product price discount "
    "return policy support ticket issue request response answer question summary report "
    "table chart data value values result results cache shared memory process worker "
    "server request model token tokens latency python function class method error "
    "exception file line code test tests bug because however therefore example note step "
    "steps first second third finally please thank help check update review confirm "
    "provide include make sure use using used run running build deploy release version "
    "config setting settings user users team project document documents page section "
    "paragraph list item items number numbers date time day week month year today "
    "yesterday tomorrow quarter revenue growth risk risks market sales cost costs budget "
    "plan plans here's let's it's don't can't you'll we've I'm based following above "
    "below"
)
_WORDS: Final = tuple(_WORDS_TEXT.split())
_PUNCT: Final = (".", ".", ".", ",", ",", ",", ";", ":", "?", "!")


_SYLLABLES_TEXT: Final = (
    "ba be bi bo bu ca ce co cu da de di do fa fe fi fo ga ge go la le li lo lu ma me mi "
    "mo na ne ni no pa pe pi po ra re ri ro sa se si so ta te ti to va ve vi wa we an en "
    "in on ar er or al el il ent ant ment tion sion ness able ible ing ed ly er est ous "
    "ive ize"
)
_SYLLABLES: Final = tuple(_SYLLABLES_TEXT.split())


def _vocabulary(n_tail: int = 8000, seed: int = 7) -> tuple[str, ...]:
    """The word list above (the frequent head), then a long tail of made-up words.

    Real prose draws ~65 % of its tokens from its 300 most frequent words and the rest
    from thousands of others; without the tail a trained dictionary would learn the
    whole vocabulary and flatter compression.
    """
    rng = random.Random(seed)
    seen = set(_WORDS)
    tail: list[str] = []
    while len(tail) < n_tail:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3, 3, 4))))
        if word not in seen:
            seen.add(word)
            tail.append(word)
    return (*_WORDS, *tail)


_VOCABULARY: Final = _vocabulary()
_CUM_WEIGHTS: Final = tuple(np.cumsum([1.0 / (k + 1) for k in range(len(_VOCABULARY))]).tolist())


def english_text(seed: int, n_chars: int) -> str:
    """Deterministic English-ish prose, exactly ``n_chars`` ASCII characters.

    Word frequencies are Zipf-like over an 8,300-word vocabulary (300 real frequent
    words, then made-up ones), with sentence punctuation,
    capitals, numbers and the odd markdown list item, so that it compresses roughly
    like model output (zlib-6 about 2x on a couple of kilobytes), not like repeated
    bytes.
    """
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    start_sentence = True
    while total <= n_chars:  # total counts a space after each word: join is total - 1
        batch = n_chars // 5 + 8
        words = rng.choices(_VOCABULARY, cum_weights=_CUM_WEIGHTS, k=batch)
        for word, roll, mark in zip(
            words,
            [rng.random() for _ in range(batch)],
            [rng.random() for _ in range(batch)],
            strict=True,
        ):
            if roll < 0.03:
                word = str(int(roll * 300_000) + 1)
            elif roll < 0.035:
                word = f"\n\n{int(mark * 5) + 1}. **{word.capitalize()}**"
            if start_sentence:
                word = word[:1].upper() + word[1:]
                start_sentence = False
            if mark < 0.12:
                p = _PUNCT[int(mark / 0.12 * len(_PUNCT))]
                word += p
                start_sentence = p in ".?!"
            parts.append(word)
            total += len(word) + 1
            if total > n_chars:
                break
    return " ".join(parts)[:n_chars]


@functools.lru_cache(maxsize=4)
def corpus(n_chars: int = 1 << 18, seed: int = 12345) -> str:
    """A long English-ish text to cut values from (built once per process)."""
    return english_text(seed, n_chars)


def text_slice(obj_id: int, n_chars: int) -> str:
    """``n_chars`` of :func:`corpus` at an offset fixed by ``obj_id`` (cheap, distinct)."""
    text = corpus()
    if n_chars >= len(text):
        return (text * (n_chars // len(text) + 1))[:n_chars]
    start = (obj_id * 7919) % (len(text) - n_chars)
    return text[start : start + n_chars]


_TOOLS: Final = (
    ("get_order_status", lambda r: {"order_id": f"A-{r.randrange(10**5):05d}", "verbose": True}),
    (
        "search_docs",
        lambda r: {
            "query": english_text(r.randrange(1 << 30), 40),
            "top_k": 5,
            "filters": {"lang": "en", "section": r.choice(_WORDS)},
        },
    ),
    (
        "create_ticket",
        lambda r: {
            "title": english_text(r.randrange(1 << 30), 30),
            "priority": r.choice(["low", "normal", "high"]),
            "labels": [r.choice(_WORDS) for _ in range(3)],
        },
    ),
    (
        "run_sql",
        lambda r: {
            "sql": f"SELECT id, status, total FROM orders WHERE customer_id = "
            f"{r.randrange(10**6)} ORDER BY created_at DESC LIMIT 10"
        },
    ),
)


def _tool_call(rng: random.Random) -> dict[str, Any]:
    name, args = rng.choice(_TOOLS)
    call_id = "".join(
        rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
        for _ in range(24)
    )
    return {"name": name, "args": args(rng), "id": f"call_{call_id}", "type": "tool_call"}


def chat_value(
    seed: int,
    content_chars: int,
    *,
    tool_calls: int = 0,
    json_content: bool = False,
    prose: str | None = None,
) -> list[Any]:
    """A ``[ChatGeneration]`` like a tool-calling OpenAI-style chat model returns.

    Args:
        seed: Selects text, ids and token counts.
        content_chars: Length of the message content (prose, or a JSON document).
        tool_calls: Number of tool calls (JSON-ish arguments).
        json_content: Content is a JSON structured-output document instead of prose.
        prose: The content to use (else ``english_text(seed, content_chars)``).
    """
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration

    rng = random.Random(seed)
    if json_content:
        doc: dict[str, Any] = {"answer": "", "items": []}
        while len(json.dumps(doc)) < content_chars:
            doc["items"].append(
                {
                    "id": rng.randrange(10**6),
                    "name": english_text(rng.randrange(1 << 30), 18),
                    "status": rng.choice(["shipped", "pending", "delivered", "returned"]),
                    "score": round(rng.random(), 3),
                }
            )
        content = json.dumps(doc)[:content_chars]
    else:
        content = prose if prose is not None else english_text(seed, content_chars)
    input_tokens = 200 + rng.randrange(2000)
    output_tokens = 10 + content_chars // 4
    run = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    message = AIMessage(
        content=content,
        tool_calls=[_tool_call(rng) for _ in range(tool_calls)],
        usage_metadata={
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_token_details": {"cache_read": rng.randrange(0, input_tokens), "audio": 0},
            "output_token_details": {"reasoning": 0, "audio": 0},
        },
        response_metadata={
            "finish_reason": "tool_calls" if tool_calls else "stop",
            "model_name": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0ba0d124f1",
            "model_provider": "openai",
            "token_usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        },
        id=f"lc_run--{run[:8]}-{run[8:12]}-{run[12:16]}-{run[16:20]}-{run[20:]}",
    )
    return [
        ChatGeneration(message=message, generation_info={"finish_reason": "stop", "logprobs": None})
    ]
