"""The mutation score per module after ``mutmut run`` (``make mutation``), read from mutmut's
own result files (``mutants/**/*.py.meta``), and the surviving mutants by name.

    python scripts/mutation_scores.py [--mutants DIR] [--survivors]

Score = killed / (killed + survived + timeout + suspicious); mutants no test reaches ("no
tests") are counted apart, as mutmut does. Exits 1 if a module scores under ``--floor``
(default 0: report only)."""

from __future__ import annotations

import argparse
import json
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


def scores(mutants: Path) -> dict[str, Counter[str]]:
    """Module path (``gateway/queue/memory.py``) -> count of mutants by status."""
    out: dict[str, Counter[str]] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[module] = Counter(STATUS.get(code, "suspicious") for code in codes.values())
    return out


def survivors(mutants: Path) -> list[str]:
    names = []
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        names += [key for key, code in codes.items() if STATUS.get(code) == "survived"]
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mutants", default="mutants", type=Path)
    ap.add_argument("--survivors", action="store_true", help="also list the surviving mutants")
    ap.add_argument("--floor", type=float, default=0.0, help="fail under this score (0-1)")
    a = ap.parse_args()
    table = scores(a.mutants)
    if not table:
        print(f"no mutmut results under {a.mutants}/ (run mutmut first)", file=sys.stderr)
        return 2
    print("| module | killed | survived | timeout | no tests | score |")
    print("| --- | --- | --- | --- | --- | --- |")
    low = []
    total: Counter[str] = Counter()
    for module, c in table.items():
        total += c
        tried = c["killed"] + c["survived"] + c["timeout"] + c["suspicious"]
        score = c["killed"] / tried if tried else 1.0
        low += [module] if score < a.floor else []
        print(
            f"| {module} | {c['killed']} | {c['survived']} | {c['timeout']} | "
            f"{c['no tests']} | {score:.1%} |"
        )
    tried = total["killed"] + total["survived"] + total["timeout"] + total["suspicious"]
    print(f"| all | {total['killed']} | {total['survived']} | {total['timeout']} | "
          f"{total['no tests']} | {total['killed'] / max(tried, 1):.1%} |")  # fmt: skip
    if a.survivors:
        print("\n".join(["", "surviving mutants:", *survivors(a.mutants)]))
    if low:
        print(f"under {a.floor:.0%}: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
