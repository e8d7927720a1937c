"""The CI gate behind `sd2 compare NEW BASELINE --max-mal-drop 0.05`.

Results are matched by (drafter, gamma, temperature). A setting regresses when:
- its MAL dropped by more than ``max_mal_drop``, relative to the baseline: (base - new) / base;
- it was lossless in the baseline and is not now, or is not checked now (temperature 0; a MAL-only
  report, ``evaluate.decode: false``, checks no losslessness);
- it is in the baseline but missing from the new report.
MAL is the gate because it is deterministic (greedy) and machine-independent; wall-clock speedup is
shown for information only, since it moves with the machine and its load.
Exit codes (for CI): 0 no regression, 1 regression, 2 unusable input.
"""

from __future__ import annotations

from dataclasses import dataclass

from sd2.core.report import Report


@dataclass
class Row:
    key: tuple[str, int, float]
    base_mal: float | None
    new_mal: float | None
    base_speedup: float | None
    new_speedup: float | None
    new_lossless: bool | None
    status: str          # ok | REGRESSION: ... | new (only in NEW)

    @property
    def regressed(self) -> bool:
        return self.status.startswith("REGRESSION")


def compare(new: Report, base: Report, max_mal_drop: float = 0.05) -> list[Row]:
    n_idx, b_idx = {r.key: r for r in new.results}, {r.key: r for r in base.results}
    rows = []
    for key in sorted(set(n_idx) | set(b_idx)):
        n, b = n_idx.get(key), b_idx.get(key)
        if n is None:
            rows.append(Row(key, b.mal, None, b.speedup, None, None, "REGRESSION: missing in NEW"))
            continue
        if b is None:
            rows.append(Row(key, None, n.mal, None, n.speedup, n.lossless, "new"))
            continue
        problems = []
        bm, nm = b.mal, n.mal
        if bm and nm is not None and (bm - nm) / bm > max_mal_drop:
            problems.append(f"MAL -{100 * (bm - nm) / bm:.1f}% > {100 * max_mal_drop:g}%")
        if b.lossless is True and n.lossless is False:
            problems.append("no longer lossless")
        elif b.lossless is True and n.lossless is None and n.temperature == 0:
            problems.append("lossless in BASELINE, not checked in NEW (a MAL-only report, evaluate.decode: false: "
                            "compare it with a MAL-only baseline)")
        rows.append(Row(key, bm, nm, b.speedup, n.speedup, n.lossless,
                        "REGRESSION: " + "; ".join(problems) if problems else "ok"))
    return rows


def _lossless(r: Row) -> str:
    if r.new_lossless is None:
        return "not checked" if r.key[2] == 0 and r.new_mal is not None else "-"   # MAL only, T>0, or missing
    return "yes" if r.new_lossless else "NO"


def table(rows: list[Row]) -> str:
    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    head = f"{'drafter':<16} {'γ':>3} {'T':>5}  {'MAL base':>9} {'MAL new':>9} {'Δ%':>7}  {'speedup base':>12} {'new':>7}  {'lossless':>11}  status"
    out = [head, "-" * len(head)]
    for r in rows:
        d, g, t = r.key
        delta = f"{100 * (r.new_mal - r.base_mal) / r.base_mal:+.1f}" if r.base_mal and r.new_mal is not None else "-"
        out.append(f"{d:<16} {g:>3} {t:>5g}  {f(r.base_mal):>9} {f(r.new_mal):>9} {delta:>7}  "
                   f"{f(r.base_speedup, 2):>12} {f(r.new_speedup, 2):>7}  {_lossless(r):>11}  {r.status}")
    return "\n".join(out)
