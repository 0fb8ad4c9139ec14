"""``hotlora diff``: compare two files' results request by request and point at the first divergence.

Results are matched by ``request_id`` (a replay keeps the recorded ids). Compared: every field of the
result (tokens, logprobs, losses, versions, grad norms, adapter shapes, error codes), except what is
not the engine's computation: timestamps and ``reply_to`` (the replay rewrites it), ``weight_sync_s``
(wall time), a ``save_state`` result's ``path`` (each engine has its own checkpoint directory), an
adapter's ``slot``/``resident`` (placement) and an error's ``message`` text (its ``code`` is the
contract). Floats are compared exactly by default (float32 arrays bit for bit), so any difference is
shown: the test workload replays bit for bit on CPU fp32, but sampler logprobs can change in the last
bits when a replay batches decode steps differently (``docs/replay.md``); the report says when every
divergence is float-only, and ``--atol`` accepts those (and runs on another device, dtype or sampler).

"First" is in the order the results were finished in file a (then adapter, then ``seq``), i.e. the
earliest point where the two runs part.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hotlora.replay.format import read_file
from hotlora.replay.messages import ARRAY_DTYPES, Contents, read_contents, request_type
from hotlora.schemas import messages as wire

IGNORED = frozenset({"v", "sent_at_ms", "received_at_ms", "finished_at_ms", "reply_to"})
IGNORED_BY_TYPE: dict[type, frozenset[str]] = {
    wire.OptimStepResult: frozenset({"weight_sync_s"}),
    wire.SaveStateResult: frozenset({"path"}),
    wire.AdapterInfo: frozenset({"slot", "resident"}),
    wire.Error: frozenset({"message"}),
}
WINDOW = 2  # array elements shown either side of the first differing one


@dataclass(frozen=True)
class Mismatch:
    field: str
    a: str
    b: str
    delta: float | None = None  # for float fields: the largest |a - b| in the field (whole array)


@dataclass(frozen=True)
class Divergence:
    """One request whose results differ (``kind`` ``value``) or exist on one side only (``only_a``/``only_b``)."""

    kind: str
    request_id: str
    adapter_id: str
    seq: int
    verb: str
    field: str = ""
    a: str = ""
    b: str = ""
    previous: tuple[int, str, str] | None = None  # (seq, verb, request_id) of the adapter's last equal result
    note: str = ""  # e.g. an error's message text
    delta: float | None = None  # float fields only: the largest |a - b|


@dataclass
class DiffReport:
    compared: int = 0
    equal: int = 0
    only_a: int = 0
    only_b: int = 0
    atol: float | None = None
    divergences: list[Divergence] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.divergences

    @property
    def float_only(self) -> bool:
        """Every divergence is a float value (no token, version, shape or error code differs)."""
        return bool(self.divergences) and all(d.delta is not None for d in self.divergences)

    @property
    def max_delta(self) -> float | None:
        deltas = [d.delta for d in self.divergences if d.delta is not None]
        return max(deltas) if deltas else None


def _show(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, np.floating):
        return repr(float(value))
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _floats_equal(a: float, b: float, atol: float | None) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b if atol is None else abs(a - b) <= atol


def _compare_arrays(path: str, a: np.ndarray, b: np.ndarray, atol: float | None) -> Mismatch | None:
    if a.shape != b.shape:
        return Mismatch(f"{path} (length)", str(a.size), str(b.size))
    if a.dtype.kind == "f":
        same = (
            (a.view(np.uint32) == b.view(np.uint32))
            if atol is None
            else np.isclose(a, b, rtol=0.0, atol=atol, equal_nan=True)
        )
    else:
        same = a == b
    if bool(np.all(same)):
        return None
    i = int(np.argmin(same))
    lo, hi = max(i - WINDOW, 0), i + WINDOW + 1

    def window(x: np.ndarray) -> str:
        items = ", ".join(repr(float(v)) if x.dtype.kind == "f" else str(int(v)) for v in x[lo:hi])
        return f"{x[i].item()!r} (around: [{'..., ' if lo else ''}{items}{', ...' if hi < x.size else ''}])"

    delta = float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.dtype.kind == "f" else None
    return Mismatch(f"{path}[{i}]", window(a), window(b), delta)


def _compare_packed(path: str, a: Any, b: Any, dtype: np.dtype, atol: float | None) -> Mismatch | None:
    """A packed array field, or a list of them (``forward_backward_result.logprobs``)."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return Mismatch(f"{path} (length)", str(len(a)), str(len(b)))
        for i, (va, vb) in enumerate(zip(a, b, strict=True)):
            found = _compare_packed(f"{path}[{i}]", va, vb, dtype, atol)
            if found:
                return found
        return None
    if isinstance(a, bytes) and isinstance(b, bytes):
        return _compare_arrays(path, np.frombuffer(a, dtype), np.frombuffer(b, dtype), atol)
    return compare(a, b, atol, path)


def compare(a: Any, b: Any, atol: float | None = None, path: str = "") -> Mismatch | None:
    """The first field where two decoded results differ, or None (rules in the module docstring)."""
    if type(a) is not type(b):
        if isinstance(a, msgspec.Struct) and isinstance(b, msgspec.Struct) and not path:
            return Mismatch("type", wire.tag_of(type(a)), wire.tag_of(type(b)))
        if not (isinstance(a, int | float) and isinstance(b, int | float)):  # msgpack may give 1 for 1.0
            return Mismatch(path or "value", _show(a), _show(b))
    if isinstance(a, msgspec.Struct):
        skip = IGNORED | IGNORED_BY_TYPE.get(type(a), frozenset())
        for name in a.__struct_fields__:
            if name in skip:
                continue
            va, vb = getattr(a, name), getattr(b, name)
            where = f"{path}.{name}" if path else name
            dtype = ARRAY_DTYPES.get((type(a), name))
            if dtype is not None and va is not None and vb is not None:
                found = _compare_packed(where, va, vb, np.dtype(dtype), atol)
            else:
                found = compare(va, vb, atol, where)
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return Mismatch(f"{path} (length)", str(len(a)), str(len(b)))
        for i, (va, vb) in enumerate(zip(a, b, strict=True)):
            found = compare(va, vb, atol, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, dict):
        if sorted(a) != sorted(b):
            return Mismatch(f"{path} (keys)", _show(sorted(a)), _show(sorted(b)))
        for key in sorted(a):
            found = compare(a[key], b[key], atol, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(a, float) or isinstance(b, float):
        if _floats_equal(float(a), float(b), atol):
            return None
        return Mismatch(path, _show(a), _show(b), abs(float(a) - float(b)))
    return None if a == b else Mismatch(path, _show(a), _show(b))


def float_delta(a: Any, b: Any) -> float | None:
    """The largest |a - b| over every float of two results that differ only in floats; None if anything
    else differs (a token, a version, a shape): then a tolerance cannot make them equal."""
    worst = 0.0
    mismatch = compare(a, b)
    while mismatch is not None:
        if mismatch.delta is None:
            return None
        worst = max(worst, mismatch.delta)
        mismatch = compare(a, b, atol=worst)  # the next field that still differs beyond the worst so far
    return worst


def _round_up(x: float) -> float:
    """``x`` rounded up to two significant digits, so a suggested tolerance really covers it."""
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / scale) * scale


def _verb(request_id: str, result: wire.Message, *sides: Contents) -> str:
    for contents in sides:
        if request_id in contents.requests:
            return wire.tag_of(type(contents.requests[request_id][1]))
    return request_type(result)


def diff_contents(a: Contents, b: Contents, atol: float | None = None, common: bool = False) -> DiffReport:
    """Compare results by request id; ``common`` ignores results that only one side has."""
    report = DiffReport(atol=atol)
    ids = set(a.results) & set(b.results) if common else set(a.results) | set(b.results)

    def order(rid: str) -> tuple[int, str, int, str]:
        message = (a.results.get(rid) or b.results[rid])[1]
        return (message.finished_at_ms, message.adapter_id, message.seq, rid)

    found: list[Divergence] = []
    equal_by_adapter: dict[str, list[tuple[int, str, str]]] = {}
    for rid in sorted(ids, key=order):
        in_a, in_b = a.results.get(rid), b.results.get(rid)
        message = (in_a or in_b)[1]  # type: ignore[index]
        verb = _verb(rid, message, a, b)
        if in_a is None or in_b is None:
            report.only_a += in_b is None
            report.only_b += in_a is None
            kind = "only_a" if in_b is None else "only_b"
            found.append(Divergence(kind, rid, message.adapter_id, message.seq, verb))
            continue
        report.compared += 1
        mismatch = compare(in_a[1], in_b[1], atol)
        if mismatch is None:
            report.equal += 1
            equal_by_adapter.setdefault(message.adapter_id, []).append((message.seq, verb, rid))
            continue
        notes = [
            f"{side}: {m.code}: {m.message}"
            for side, m in (("a", in_a[1]), ("b", in_b[1]))
            if isinstance(m, wire.Error)
        ]
        found.append(
            Divergence(
                "value",
                rid,
                message.adapter_id,
                message.seq,
                verb,
                mismatch.field,
                mismatch.a,
                mismatch.b,
                note="; ".join(notes),
                delta=float_delta(in_a[1], in_b[1]) if mismatch.delta is not None else None,
            )
        )
    # The preceding match is the adapter's last equal result before the divergence in seq order.
    for d in found:
        earlier = [e for e in equal_by_adapter.get(d.adapter_id, []) if e[0] < d.seq]
        report.divergences.append(dataclasses.replace(d, previous=max(earlier) if earlier else None))
    return report


def diff_files(a: str | Path, b: str | Path, atol: float | None = None, common: bool = False) -> DiffReport:
    return diff_contents(read_contents(read_file(a)[1]), read_contents(read_file(b)[1]), atol, common)


def render(report: DiffReport, a: str, b: str, console: Console, show: int = 10) -> None:
    """Counts, then the first divergence with its context, then a table of the next ones."""
    tolerance = "exact (float32 bit for bit)" if report.atol is None else f"atol={report.atol:g}"
    console.print(
        f"compared {report.compared} results ({tolerance}): {report.equal} equal, "
        f"{report.compared - report.equal} differ; only in a: {report.only_a}, only in b: {report.only_b}"
    )
    if report.identical:
        console.print(f"[green]identical[/green]: {escape(a)} and {escape(b)} agree on every result")
        return
    first = report.divergences[0]
    where = escape(f"adapter {first.adapter_id!r} seq {first.seq} {first.verb} (request {first.request_id})")
    console.print(f"[red]first divergence[/red]: {where}")
    if first.kind == "value":
        console.print(f"  field: {escape(first.field)}")
        console.print(f"  a ({escape(a)}): {escape(first.a)}")
        console.print(f"  b ({escape(b)}): {escape(first.b)}")
        if first.note:
            console.print(f"  {escape(first.note)}")
    else:
        console.print(f"  result only in {'a' if first.kind == 'only_a' else 'b'}")
    if first.previous:
        seq, verb, rid = first.previous
        console.print(escape(f"  preceding match: adapter {first.adapter_id!r} seq {seq} {verb} (request {rid})"))
    else:
        console.print("  preceding match: none (the adapter's first compared result already differs)")
    if report.float_only:
        console.print(
            f"every divergence is a float value (tokens, versions, shapes and error codes all agree); the largest "
            f"|a - b| is {report.max_delta:.3g}: --atol {_round_up(report.max_delta or 0.0):.2g} calls them equal"
        )
    rest = report.divergences[1 : 1 + show]
    if rest:
        table = Table(
            "adapter",
            "seq",
            "request",
            "kind",
            "field",
            title=f"next {len(rest)} of {len(report.divergences) - 1} more",
        )
        for d in rest:
            table.add_row(d.adapter_id, str(d.seq), d.verb, d.kind, d.field)
        console.print(table)
