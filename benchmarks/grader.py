"""Grader agreement on the bundled evaluation sets, false-positive controls, and grading throughput.

Agreement (each must be about 100%; every miss is listed with a reason):

* ``reference``: each row's own reference graded against its gold answer. Math500 and AIME24 use
  the ``solution`` write-up, Minerva Math its full-solution text; Olympiad Bench (whose solutions
  rarely box the answer) and AMC23 (no solutions) use a synthetic completion
  ``"... The answer is \\boxed{<gold>}"``.
* ``self_consistency``: that synthetic completion for every row of every set (must be 100%).
* ``raw_gold``: the same completion against the gold exactly as the JSONL file stores it
  (OlympiadBench's ``["$...$"]`` lists, AMC23's floats, Minerva's whole solutions).

False-positive controls (acceptances are listed):

* ``cross_rows``: row i+1's boxed gold graded against row i's gold, counting acceptances where the
  two stored answers differ as strings (some are the same value written differently).
* ``perturbed``: each gold containing a digit, with its first digit changed, must be rejected.

Olympiad Bench's own solution texts are also graded, for information only (``solution_text``).

Throughput (answers/s, single thread) is measured on the common case (``\\boxed{<int>}`` after a
few hundred characters of reasoning, 70% correct), on boxed fractions against ``a/b`` golds, on
answers that need SymPy (radicals, all distinct so never cached), and over all reference pairs with
a cold cache.

    python benchmarks/grader.py [--output benchmarks/results/grader.json] [--timeout 5]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gvm_trl.answers import extraction, symbolic  # noqa: E402
from gvm_trl.rewards import extract_answer, grade_answer  # noqa: E402

SETS = ("math500", "minerva_math", "olympiad_bench", "aime24", "amc23")
SYNTHETIC_REFERENCE = {"olympiad_bench", "amc23"}
RAW_DIRS = (REPO / "gvm_trl" / "data", Path("/work/shared/data/eval"))

# Rows whose reference solution does not state the gold answer in a form any extractor could use.
KNOWN_REASONS: dict[tuple[str, str], str] = {
    ("aime24", "60"): "the AoPS write-up never boxes or restates 204 at the end; it closes with the "
    "author's signature '-sepehr2010', so the last-number fall-back reads 2010",
}


def load_raw_golds(name: str) -> list:
    """The ``answer`` field of every row exactly as the JSONL file stores it."""
    path = next(d / f"{name}.jsonl" for d in RAW_DIRS if (d / f"{name}.jsonl").exists())
    return [json.loads(line)["answer"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_rows(name: str) -> list[dict]:
    """Rows with string ``answer`` and (optional) ``solution``: the package loader, else the raw files."""
    try:
        from gvm_trl.data import load_eval_dataset

        return list(load_eval_dataset(name))
    except ImportError:
        pass
    path = next(d / f"{name}.jsonl" for d in RAW_DIRS if (d / f"{name}.jsonl").exists())
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        if name == "minerva_math":
            row["solution"], row["answer"] = row["answer"], extraction.extract_boxed(row["answer"])
        if isinstance(row.get("solution"), list):
            row["solution"] = "\n".join(row["solution"])
        row["answer"] = extraction.gold_text(row["answer"])
    return rows


def row_id(name: str, index: int, row: dict) -> str:
    return str(row.get("unique_id") or row.get("id") or row.get("idx") or index)


def synthetic(gold: str) -> str:
    return f"Let me work through this carefully. ... The answer is \\boxed{{{gold}}}."


def grade_rows(name: str, pairs: list[tuple[str, str, str]], timeout: float) -> dict:
    """Grade (id, completion, gold) pairs; return the rate and the misses with reasons."""
    misses = []
    for rid, completion, gold in pairs:
        if grade_answer(completion, gold, timeout=timeout):
            continue
        extracted = extract_answer(completion)
        reason = KNOWN_REASONS.get((name, rid))
        if reason is None:
            reason = "no final answer found" if extracted is None else "extracted answer judged not equivalent"
        misses.append({"id": rid, "gold": gold, "extracted": extracted, "reason": reason})
    n = len(pairs)
    return {"n": n, "agree": n - len(misses), "rate": (n - len(misses)) / n if n else 1.0, "misses": misses}


def evaluate_set(name: str, timeout: float) -> dict:
    rows = load_rows(name)
    golds = [(row_id(name, i, r), str(r["answer"])) for i, r in enumerate(rows)]
    if name in SYNTHETIC_REFERENCE:
        reference = [(rid, synthetic(g), g) for rid, g in golds]
    else:
        reference = [(rid, r["solution"], g) for (rid, g), r in zip(golds, rows)]
    result = {
        "reference_kind": "synthetic \\boxed{gold}" if name in SYNTHETIC_REFERENCE else "row solution",
        "reference": grade_rows(name, reference, timeout),
        "self_consistency": grade_rows(name, [(rid, synthetic(g), g) for rid, g in golds], timeout),
    }
    raw = load_raw_golds(name)
    result["raw_gold"] = grade_rows(name, [(rid, synthetic(g), r) for (rid, g), r in zip(golds, raw)], timeout)
    result["cross_rows"] = cross_rows(golds, timeout)
    result["perturbed"] = perturbed(golds, timeout)
    if name in SYNTHETIC_REFERENCE and rows and rows[0].get("solution"):
        informational = grade_rows(name, [(rid, r["solution"], g) for (rid, g), r in zip(golds, rows)], timeout)
        result["solution_text"] = {k: informational[k] for k in ("n", "agree", "rate")}
    return result


def cross_rows(golds: list[tuple[str, str]], timeout: float) -> dict:
    """Row i+1's boxed gold graded against row i's gold: acceptances of differing answers."""
    accepted = []
    for (rid, gold), (_, other) in zip(golds, golds[1:] + golds[:1]):
        if other.strip() != gold.strip() and grade_answer(synthetic(other), gold, timeout=timeout):
            accepted.append({"id": rid, "gold": gold, "accepted": other})
    return {"n": len(golds), "accepted_different": len(accepted), "cases": accepted}


def perturbed(golds: list[tuple[str, str]], timeout: float) -> dict:
    """Each gold with its first digit changed must be rejected."""
    accepted, n = [], 0
    for rid, gold in golds:
        digit = re.search(r"\d", gold)
        if digit is None:
            continue
        d = int(digit.group(0))
        wrong = gold[: digit.start()] + str(d + 1 if d < 9 else 8) + gold[digit.end() :]
        n += 1
        if grade_answer(synthetic(wrong), gold, timeout=timeout):
            accepted.append({"id": rid, "gold": gold, "accepted": wrong})
    return {"n": n, "accepted": len(accepted), "cases": accepted}


def throughput(pairs: list[tuple[str, str]], timeout: float, repeat: int = 1) -> float:
    """Answers graded per second over *pairs* (symbolic cache cleared first)."""
    symbolic.CACHE.clear()
    start = time.perf_counter()
    for _ in range(repeat):
        for completion, gold in pairs:
            grade_answer(completion, gold, timeout=timeout)
    return repeat * len(pairs) / (time.perf_counter() - start)


def throughput_cases(all_pairs: list[tuple[str, str]], n: int) -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(0)
    filler = "We compute step by step. " * 20
    ints, fracs, radicals = [], [], []
    for k in range(n):
        a, b = rng.randint(-999, 99999), rng.randint(1, 999)
        gold = str(a if rng.random() < 0.7 else a + 1)
        ints.append((f"{filler}So the result is $\\boxed{{{a}}}$.", gold))
        fracs.append((f"{filler}Hence $\\boxed{{\\frac{{{a}}}{{{b}}}}}$.", f"{a}/{b}"))
        if k < max(n // 10, 1):  # distinct, so the symbolic cache never hits
            radicals.append((f"{filler}Hence $\\boxed{{\\sqrt{{{2 * (k + 2) ** 2}}}}}$.", f"{k + 2}\\sqrt{{2}}"))
    return {"common_int": ints, "fraction": fracs, "symbolic_radicals": radicals, "overall_reference_pairs": all_pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "grader.json"))
    parser.add_argument("--timeout", type=float, default=5.0, help="grade_answer timeout per answer (s)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--throughput-n", type=int, default=5000, help="synthetic answers per throughput case")
    args = parser.parse_args(argv)

    symbolic.WORKER.start()
    results: dict = {"sets": {}, "timeout_s": args.timeout}
    all_pairs: list[tuple[str, str]] = []
    for name in args.sets:
        started = time.perf_counter()
        res = evaluate_set(name, args.timeout)
        res["seconds"] = round(time.perf_counter() - started, 2)
        results["sets"][name] = res
        ref, selfc = res["reference"], res["self_consistency"]
        print(f"{name:15s} reference ({res['reference_kind']}): {ref['agree']}/{ref['n']} = {ref['rate']:.2%}   "
              f"self-consistency: {selfc['agree']}/{selfc['n']} = {selfc['rate']:.2%}   ({res['seconds']} s)")
        raw, cross = res["raw_gold"], res["cross_rows"]
        print(f"{'':15s} raw-file gold: {raw['agree']}/{raw['n']} = {raw['rate']:.2%}   "
              f"cross-row acceptances of a different answer: {cross['accepted_different']}/{cross['n']}")
        pert = res["perturbed"]
        print(f"{'':15s} one-digit perturbations of the gold accepted: {pert['accepted']}/{pert['n']}")
        for label, cases in (("cross-row", cross["cases"]), ("perturbed", pert["cases"])):
            for case in cases:
                print(f"    {label} {case['id']}: gold={case['gold']!r} accepted {case['accepted']!r}")
        if "solution_text" in res:
            info = res["solution_text"]
            print(f"{'':15s} (information) own solution texts: {info['agree']}/{info['n']} = {info['rate']:.2%}")
        for kind in ("reference", "self_consistency", "raw_gold"):
            for miss in res[kind]["misses"]:
                print(f"    {kind} miss {miss['id']}: gold={miss['gold']!r} extracted={miss['extracted']!r}"
                      f" -- {miss['reason']}")
        rows = load_rows(name)
        if name in SYNTHETIC_REFERENCE:
            all_pairs += [(synthetic(str(r["answer"])), str(r["answer"])) for r in rows]
        else:
            all_pairs += [(r["solution"], str(r["answer"])) for r in rows]

    speeds = {}
    for case, pairs in throughput_cases(all_pairs, args.throughput_n).items():
        speeds[case] = round(throughput(pairs, args.timeout), 1)
        print(f"throughput {case:24s} {speeds[case]:>10.1f} answers/s  ({len(pairs)} answers)")
    results["throughput_answers_per_s"] = speeds

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
