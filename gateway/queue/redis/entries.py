"""The entry codec: a request cut into stream entries, and an entry's lists back into inputs.

An entry holds up to :data:`INPUTS_PER_ENTRY` consecutive inputs of one request and
:data:`TOKENS_PER_ENTRY` estimated tokens (an input over it is an entry of its own), as three
lists in input order (``lua/helpers.lua`` says why): their estimated tokens and indices in the
request, comma-separated, and their specs as JSON, one per line (JSON text has no raw
newline). A 2,048-input request is 64 entries, not 2,048."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.protocol import ItemSpec

#: Inputs of one request per stream entry at most; one entry is leased as a whole unless it is
#: more than a pull can take.
INPUTS_PER_ENTRY = 32
#: Estimated tokens per stream entry at most (an input over it is an entry of its own).
TOKENS_PER_ENTRY = 4096


@dataclass(frozen=True)
class Entry:
    """A stream entry to add: its inputs and their estimated tokens, and its three lists."""

    inputs: int
    tokens: int
    k: str  # estimated tokens per input
    x: str  # indices in the request
    s: str  # specs, JSON, one per line

    def args(self) -> list[Any]:
        """The SUBMIT script's five arguments for this entry."""
        return [self.inputs, self.tokens, self.k, self.x, self.s]


def cut(specs: list[ItemSpec]) -> list[Entry]:
    """A request's inputs cut into stream entries. Raises ValueError for a spec that cannot
    be encoded as JSON."""
    cuts: list[tuple[int, int, list[int]]] = []  # (first input, its end, estimated tokens)
    first, tokens = 0, [spec.estimate_tokens() for spec in specs]
    total = 0
    for i, t in enumerate(tokens):
        if i > first and (i - first >= INPUTS_PER_ENTRY or total + t > TOKENS_PER_ENTRY):
            cuts.append((first, i, tokens[first:i]))
            first, total = i, 0
        total += t
    cuts.append((first, len(specs), tokens[first:]))
    return [
        Entry(
            inputs=end - start,
            tokens=sum(est),
            k=",".join(map(str, est)),
            x=",".join(map(str, range(start, end))),
            s="\n".join(s.model_dump_json(exclude_none=True) for s in specs[start:end]),
        )
        for start, end, est in cuts
    ]


@dataclass(frozen=True)
class Input:
    """One input of an entry as a pull hands it out: its item id
    (``<entry id>/<input>@<stream>``), estimated tokens, index in its request, spec (JSON)."""

    item_id: str
    est_tokens: int
    index: str
    spec: bytes


def inputs(
    key: str, entry_id: str, ks: bytes, tokens: bytes, indices: bytes, specs: bytes
) -> list[Input]:
    """Inputs of an entry from its lists: all of them (``ks`` empty) or the part ``ks``
    (comma-separated input numbers). Raises ValueError if the lists differ in length."""
    est = tokens.split(b",")
    numbers = ks.decode().split(",") if ks else range(1, len(est) + 1)
    return [
        Input(f"{entry_id}/{k}@{key}", int(t), x.decode(), spec)
        for k, t, x, spec in zip(numbers, est, indices.split(b","), specs.split(b"\n"), strict=True)
    ]
