"""The mutation score per module after ``mutmut run`` (``make mutation``), read from mutmut's
own result files (``mutants/**/*.py.meta``), and the surviving mutants by name.

    python scripts/mutation_scores.py [--mutants DIR] [--survivors] [--sample N [--seed S] [--pick]]

Score = (killed + timeout) / (killed + survived + timeout + suspicious), as mutmut counts it;
mutants no test reaches ("no tests") are counted apart. ``--sample N``: only a seeded random
sample of at most N mutants per module (the same names for the same seed and mutants), for a
score in minutes instead of hours; ``--pick`` prints the sampled names not checked yet, for
``mutmut run NAME...`` (mutmut must have generated the mutants: ``make mutation SAMPLE=N``).
Exits 1 if a module scores under ``--floor`` (default 0: report only)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

#: mutmut's exit codes (``mutmut.stats.status_by_exit_code``).
STATUS = {
    1: "killed",
    3: "killed",
    37: "killed",  # caught by the type checker
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    None: "not checked",
}


def results(mutants: Path, sample: int = 0, seed: int = 0) -> dict[str, dict[str, int | None]]:
    """Module path (``gateway/queue/memory.py``) -> {mutant name: mutmut exit code or None};
    with ``sample``, a seeded random ``sample`` of each module's mutants."""
    out: dict[str, dict[str, int | None]] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        if sample and len(codes) > sample:
            picked = random.Random(f"{seed}:{module}").sample(sorted(codes), sample)
            codes = {name: codes[name] for name in sorted(picked)}
        out[module] = codes
    return out


def scores(table: dict[str, dict[str, int | None]]) -> dict[str, Counter[str]]:
    """Module path -> count of its mutants by status."""
    return {
        module: Counter(STATUS.get(code, "suspicious") for code in codes.values())
        for module, codes in table.items()
    }


def survivors(table: dict[str, dict[str, int | None]]) -> list[str]:
    return [
        n for codes in table.values() for n, code in codes.items() if STATUS.get(code) == "survived"
    ]


def _row(name: str, c: Counter[str]) -> tuple[str, float | None]:
    tried = c["killed"] + c["survived"] + c["timeout"] + c["suspicious"]
    score = (c["killed"] + c["timeout"]) / tried if tried else None
    shown = f"{score:.1%}" if score is not None else "n/a"
    unchecked = f" ({c['not checked']} not checked)" if c["not checked"] else ""
    return (
        f"| {name} | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} | "
        f"{shown}{unchecked} |",
        score,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mutants", default="mutants", type=Path)
    ap.add_argument("--survivors", action="store_true", help="also list the surviving mutants")
    ap.add_argument("--floor", type=float, default=0.0, help="fail under this score (0-1)")
    ap.add_argument("--sample", type=int, default=0, help="at most N mutants per module")
    ap.add_argument("--seed", type=int, default=38, help="the sample's seed")
    ap.add_argument("--pick", action="store_true", help="print the sample's unchecked names")
    a = ap.parse_args()
    table = results(a.mutants, a.sample, a.seed)
    if not table:
        print(f"no mutmut results under {a.mutants}/ (run mutmut first)", file=sys.stderr)
        return 2
    if a.pick:
        print("\n".join(n for codes in table.values() for n, code in codes.items() if code is None))
        return 0
    print("| module | killed | survived | timeout | no tests | score |")
    print("| --- | --- | --- | --- | --- | --- |")
    low = []
    for module, counts in scores(table).items():
        line, score = _row(module, counts)
        low += [module] if score is not None and score < a.floor else []
        print(line)
    print(_row("all", sum(scores(table).values(), Counter()))[0])
    if a.survivors:
        print("\n".join(["", "surviving mutants:", *survivors(table)]))
    if low:
        print(f"under {a.floor:.0%}: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
