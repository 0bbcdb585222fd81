r"""The answer verifier: agreement, false acceptances, speed and hostile inputs, against a baseline.

Agreement (every miss is listed with a reason):

* ``reference``: each row's own reference graded against its gold answer. Math500 and AIME24 use the
  ``solution`` write-up, Minerva Math its full-solution text; Olympiad Bench (whose solutions rarely box
  the answer) and AMC23 (no solutions) use a synthetic completion ``"... The answer is \\boxed{<gold>}"``.
* ``self_consistency``: that synthetic completion for every row of every set (must be 100%).
* ``raw_gold``: the same completion against the gold exactly as the JSONL file stores it.
* ``families``: the answer-family table of ``tests/test_answer_families.py``, both orientations, per family.
* ``restated``: each gold restated in an equivalent but different form (see ``restate``), as a completion.

False acceptances (each rate must stay at or below 0.5%; the accepted pairs are listed):

* ``cross_gold``: every gold against the boxed gold of a different row whose answer differs
  (rows i and i+1, and rows i and i+7, of each set).
* ``perturbed``: every gold against perturbed copies of itself: its first digit changed, its last digit
  changed, its sign flipped, and for answers without digits a letter changed.

Speed (answers/s, one thread, from cold caches and a fresh warmed-up SymPy worker): the realistic mix
(every restated gold plus a perturbed copy of every gold), its restated and its wrong answers alone, its
part that needs SymPy now, the part that needed SymPy before too (the old verifier rejects many restated
answers without trying, which is fast but wrong), ``\\boxed{int}`` after a few hundred characters of
reasoning, and boxed radicals. With
``--baseline REV`` (default: the verifier before the answer-family work) the same pairs are graded by that
revision's ``gvm_trl/rewards.py`` in the same run, alternating with the current one chunk by chunk so that
both see the same machine load; its agreement on the family table and the restated golds is reported as
"before". A revision whose verifier is the ``gvm_trl/answers`` package, or one that needs another LaTeX parser
than this environment has, runs in another Python: ``--baseline REV --baseline-python PY`` (PY needs only SymPy
and that revision's parser; ``benchmarks/verifier_server.py`` serves it, and times its chunks itself).

math-verify (TRL's ``accuracy_reward``, where ``math_verify`` is installed; ``--math-verify none`` skips it) is
graded side by side on the same pairs: agreement with the bundled golds, false acceptances, the family table and
the restated golds, and the same throughput cases. Its gold is passed as TRL's ``solution`` column would be,
``$gold$``; a gold it cannot parse gives ``None`` (TRL skips the row), counted here as not accepted.

Hostile inputs: the worst wall time of one call over power towers, deep nesting, megabyte texts, long
relation chains, thousands of boxes and matrices (the timeout is 2 s).

Batches (``--throughput``, nothing else is run): rows/s of ``grade_answer`` one row at a time against
``grade_answers`` in batches (``--batch-size``, SymPy rows on ``--workers`` worker processes at once) in the same
run, on the realistic mix (alternating chunk by chunk, warmed-up workers, each chunk from empty caches) and
on one batch holding ``--expensive`` correct answers whose check outlasts ``--timeout`` among realistic rows;
with the ratio and whether the verdicts are identical.

    python benchmarks/grader.py [--quick] [--output benchmarks/results/grader.json] [--baseline REV|none]
        [--baseline-python PY] [--math-verify auto|none]
    python benchmarks/grader.py --throughput [--batch-size 64] [--workers N] [--expensive 16] [--timeout 5]
        [--output benchmarks/results/grader_throughput.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gvm_trl.answers import extraction, symbolic  # noqa: E402
from gvm_trl.rewards import extract_answer, grade_answer, grade_answers  # noqa: E402

SETS = ("math500", "minerva_math", "olympiad_bench", "aime24", "amc23")
SYNTHETIC_REFERENCE = {"olympiad_bench", "amc23"}
RAW_DIRS = (REPO / "gvm_trl" / "data", Path("/work/shared/data/eval"))
DEFAULT_BASELINE = "65835f2"  # gvm_trl/rewards.py as a single file, before the answer-family work
MAX_FALSE_ACCEPTANCE = 0.005


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


def row_id(index: int, row: dict) -> str:
    return str(row.get("unique_id") or row.get("id") or row.get("idx") or index)


def synthetic(gold: str) -> str:
    return f"Let me work through this carefully. ... The answer is \\boxed{{{gold}}}."


def load_family_table():
    """CASES, ONE_WAY and FAMILIES of tests/test_answer_families.py, or None when pytest is not installed."""
    spec = importlib.util.spec_from_file_location("answer_families", REPO / "tests" / "test_answer_families.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module.CASES, module.ONE_WAY, module.FAMILIES


def load_baseline(revision: str):
    """``gvm_trl/rewards.py`` at *revision* as a module (None when git or that file is unavailable)."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{revision}:gvm_trl/rewards.py"],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    if "_WORKER_BOOT" not in source:
        return None  # not the self-contained single-file verifier
    path = Path(tempfile.mkdtemp(prefix="grader_baseline_")) / "rewards_baseline.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("rewards_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Verifier:
    """A verifier under test: its grade function, a way to empty its caches, and its timing of a chunk."""

    def grade(self, completion: str, gold, timeout: float) -> bool:
        raise NotImplementedError

    def cold(self) -> None:
        pass

    def time_chunk(self, pairs: list, timeout: float) -> float:
        began = time.perf_counter()
        for completion, gold in pairs:
            self.grade(completion, gold, timeout)
        return time.perf_counter() - began

    def sympy_pairs(self, pairs: list, timeout: float) -> list[bool]:
        """Whether grading each pair sent a request to the SymPy worker."""
        raise NotImplementedError


class CurrentVerifier(Verifier):
    """This checkout's ``gvm_trl.rewards``."""

    def grade(self, completion, gold, timeout):
        return grade_answer(completion, gold, timeout=timeout)

    def cold(self):
        cold_current()

    def sympy_pairs(self, pairs, timeout):
        return [bool(p) for p in needs_sympy_flags(pairs, grade_answer, symbolic.CACHE, timeout)]


class ModuleBaseline(Verifier):
    """A single-file ``gvm_trl/rewards.py`` revision loaded in this process (``load_baseline``)."""

    def __init__(self, module):
        self.module = module
        module._WORKER.start()

    def grade(self, completion, gold, timeout):
        return self.module.grade_answer(completion, gold, timeout=timeout)

    def cold(self):
        cold_baseline(self.module)

    def sympy_pairs(self, pairs, timeout):
        return needs_sympy_flags(pairs, self.module.grade_answer, self.module._CACHE, timeout)


class ProcessBaseline(Verifier):
    """A revision's ``gvm_trl`` served by ``benchmarks/verifier_server.py`` under another Python."""

    def __init__(self, revision: str, python: str):
        folder = Path(tempfile.mkdtemp(prefix="grader_baseline_"))
        archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "gvm_trl"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        self.proc = subprocess.Popen([python, str(REPO / "benchmarks" / "verifier_server.py"), str(folder)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        if json.loads(self.proc.stdout.readline() or "null") != "ready":
            raise RuntimeError(f"the baseline verifier did not start under {python}: does it have SymPy and the "
                               f"LaTeX parser that revision {revision} imports?")

    def _ask(self, *request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def grade(self, completion, gold, timeout):
        return self._ask("grade", [[completion, gold]], timeout)[0]

    def cold(self):
        self._ask("cold", WARM_UP)

    def time_chunk(self, pairs, timeout):
        return self._ask("time", pairs, timeout)

    def sympy_pairs(self, pairs, timeout):
        return self._ask("sympy", pairs, timeout)


class MathVerify(Verifier):
    """TRL's ``accuracy_reward`` (math-verify), one completion at a time, the gold as a ``solution`` ``$gold$``."""

    def __init__(self):
        from trl.rewards import accuracy_reward

        self.reward = accuracy_reward

    def grade(self, completion, gold, timeout):
        gold_text = gold[0] if isinstance(gold, (list, tuple)) and gold else gold
        value = self.reward([[{"role": "assistant", "content": completion}]], [f"${gold_text}$"])[0]
        return value == 1.0

    def cold(self):
        import math_verify.parser

        for value in vars(math_verify.parser).values():
            if hasattr(value, "cache_clear"):
                value.cache_clear()


def math_verify_available() -> bool:
    return importlib.util.find_spec("math_verify") is not None and importlib.util.find_spec("trl") is not None


# --------------------------------------------------------------------------------------------
# Restated golds and perturbed copies
# --------------------------------------------------------------------------------------------


def _top_level_terms(s: str) -> list[str] | None:
    """``a + b - c`` -> ["a", "+b", "-c"] when the signs are outside all brackets, else None."""
    terms, depth, last = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch in "({["
        depth -= ch in ")}]"
        if depth == 0 and ch in "+-" and i > 0 and s[i - 1] not in "^_{(eE\\":
            terms.append(s[last:i].strip())
            last = i
    terms.append(s[last:].strip())
    return terms if len(terms) > 1 and all(terms) else None


def restate(gold: str, rng: random.Random) -> str:
    """An equivalent answer in a different form, inside a short concluding sentence or a box."""
    g = gold.strip().strip("$").strip()
    if re.fullmatch(r"-?\d+", g):
        form = rng.choice([f"x = {g}", f"{g}.0", f"{int(g):,}" if abs(int(g)) >= 1000 else f"+{g}", f"\\text{{{g}}}"])
    elif m := re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", g):
        sign, a, b = m.groups()
        form = f"{sign}{a}/{b}" if rng.random() < 0.5 else f"{sign}\\dfrac{{{int(a) * 2}}}{{{int(b) * 2}}}"
    elif m := re.fullmatch(r"(\d*)\\sqrt\{(\d+)\}", g):
        k, n = m.groups()
        form = f"{k or 1} \\cdot {n}^{{1/2}}"
    elif not re.search(r"[=<>,]|\\(?:begin|pm|mp|in|cup|le|ge)", g) and (terms := _top_level_terms(g)):
        first, rest = terms[0], terms[1:]
        form = " ".join([rest[0].lstrip("+"), *rest[1:], first if first.startswith("-") else "+" + first])
    elif g.startswith("(") and g.endswith(")") and "," in g:
        form = "\\left" + g[0] + " " + g[1:-1].replace(",", " , ") + " \\right" + g[-1]
    elif "," in g and not re.search(r"[(\[{]", g):
        form = ", ".join(reversed([part.strip() for part in g.split(",")]))
    else:
        form = f"y = {g}" if re.search(r"[a-z]", g) and "=" not in g else f"{{{g}}}"
    if rng.random() < 0.5:
        return f"Putting the pieces together, the result is ${form}$."
    return f"Putting the pieces together, the result is $\\boxed{{{form}}}$."


def perturbations(gold: str) -> list[str]:
    """Wrong copies of a gold: first digit, last digit, sign; a letter for answers without digits."""
    out = []
    digits = list(re.finditer(r"\d", gold))
    for m in digits[:1] + digits[-1:] if digits else []:
        d = int(m.group(0))
        out.append(gold[: m.start()] + str(d + 1 if d < 9 else 8) + gold[m.end() :])
    stripped = gold.strip()
    number = re.fullmatch(r"-?[\d.]+", stripped)
    is_zero = bool(number) and float(stripped) == 0
    if digits and not is_zero and not re.search(r"[=<>,]|\\pm|\\le|\\ge", stripped):
        out.append(stripped[1:] if stripped.startswith("-") else "-" + stripped)
    if not digits:
        letters = list(re.finditer(r"(?<![\\A-Za-z])[a-zA-Z](?![A-Za-z])", gold))
        if letters:
            m = letters[-1]
            out.append(gold[: m.start()] + ("q" if m.group(0) != "q" else "r") + gold[m.end() :])
    return list(dict.fromkeys(p for p in out if p != gold))


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def grade_rows(grade, pairs: list[tuple[str, str, object]], timeout: float) -> dict:
    """Grade (id, completion, gold) pairs; return the rate and the misses."""
    misses = []
    for rid, completion, gold in pairs:
        if grade(completion, gold, timeout=timeout):
            continue
        extracted = extract_answer(completion)
        reason = "no final answer found" if extracted is None else "extracted answer judged not equivalent"
        misses.append({"id": rid, "gold": gold, "extracted": extracted, "reason": reason})
    n = len(pairs)
    return {"n": n, "agree": n - len(misses), "rate": (n - len(misses)) / n if n else 1.0, "misses": misses}


def evaluate_set(name: str, rows: list[dict], timeout: float) -> dict:
    golds = [(row_id(i, r), str(r["answer"])) for i, r in enumerate(rows)]
    if name in SYNTHETIC_REFERENCE:
        reference = [(rid, synthetic(g), g) for rid, g in golds]
    else:
        reference = [(rid, r["solution"], g) for (rid, g), r in zip(golds, rows)]
    result = {
        "reference_kind": "synthetic \\boxed{gold}" if name in SYNTHETIC_REFERENCE else "row solution",
        "reference": grade_rows(grade_answer, reference, timeout),
        "self_consistency": grade_rows(grade_answer, [(rid, synthetic(g), g) for rid, g in golds], timeout),
    }
    raw = load_raw_golds(name)
    result["raw_gold"] = grade_rows(grade_answer, [(rid, synthetic(g), r) for (rid, g), r in zip(golds, raw)], timeout)
    if name in SYNTHETIC_REFERENCE and rows and rows[0].get("solution"):
        informational = grade_rows(grade_answer, [(rid, r["solution"], g) for (rid, g), r in zip(golds, rows)], timeout)
        result["solution_text"] = {k: informational[k] for k in ("n", "agree", "rate")}
    return result


def cross_gold(golds: list[tuple[str, str]], grade, timeout: float) -> dict:
    """Each gold against the boxed gold of rows 1 and 7 further on, where the two answers differ."""
    accepted, n = [], 0
    for shift in (1, 7):
        for (rid, gold), (_, other) in zip(golds, golds[shift:] + golds[:shift]):
            if re.sub(r"\s", "", other) == re.sub(r"\s", "", gold):
                continue
            n += 1
            if grade(synthetic(other), gold, timeout=timeout):
                accepted.append({"id": rid, "gold": gold, "accepted": other})
    return {"n": n, "accepted": len(accepted), "rate": len(accepted) / n if n else 0.0, "cases": accepted}


def perturbed(golds: list[tuple[str, str]], grade, timeout: float) -> dict:
    accepted, n = [], 0
    for rid, gold in golds:
        for wrong in perturbations(gold):
            n += 1
            if grade(synthetic(wrong), gold, timeout=timeout):
                accepted.append({"id": rid, "gold": gold, "accepted": wrong})
    return {"n": n, "accepted": len(accepted), "rate": len(accepted) / n if n else 0.0, "cases": accepted}


def family_agreement(grade, timeout: float, table) -> dict:
    cases, one_way, families = table
    per: dict = {f: {"n": 0, "agree": 0} for f in families}
    misses = []
    for family, cid, pred, gold, expected in cases:
        orientations = [(pred, gold)] + ([] if cid in one_way else [(gold, pred)])
        for k, (p, g) in enumerate(orientations):
            per[family]["n"] += 1
            if grade(p, g, timeout=timeout) is expected:
                per[family]["agree"] += 1
            else:
                misses.append(f"{family}-{cid}{' (swapped)' if k else ''}")
    total = sum(v["n"] for v in per.values())
    agree = sum(v["agree"] for v in per.values())
    for v in per.values():
        v["rate"] = v["agree"] / v["n"] if v["n"] else 1.0
    return {"n": total, "agree": agree, "rate": agree / total, "per_family": per, "misses": misses}


WARM_UP = [(f"\\boxed{{\\sqrt{{{2 * m * m}}}+x}}", f"x+{m}\\sqrt{{2}}") for m in range(5001, 5041)]


def cold_current() -> None:
    """Empty every cache of the current verifier; a fresh SymPy worker, warmed up on unrelated answers."""
    symbolic.WORKER.close()
    clear_caches()
    for completion, gold in WARM_UP:  # a started, warmed-up worker that has seen none of the pairs
        grade_answer(completion, gold)
    symbolic.CACHE.clear()


def cold_baseline(module) -> None:
    """The same for the baseline module."""
    module._WORKER.close()
    module._CACHE.clear()
    for cached in (module._normalise, module._key):
        cached.cache_clear()
    for completion, gold in WARM_UP:
        module.grade_answer(completion, gold)
    module._CACHE.clear()


def throughput_side_by_side(versions: list[Verifier], pairs: list[tuple[str, object]], timeout: float,
                             chunks: int = 20) -> list[float]:
    """Answers/s of each verifier over the same pairs, graded in alternating chunks.

    The machine is shared, so its speed drifts within a run; alternating the versions chunk by chunk
    (each version still sees every pair once, from cold caches) gives both the same conditions.
    """
    for version in versions:
        version.cold()
    spent = [0.0] * len(versions)
    size = max(1, -(-len(pairs) // chunks))
    for k, start in enumerate(range(0, len(pairs), size)):
        chunk = pairs[start : start + size]
        order = list(range(len(versions)))
        if k % 2:
            order.reverse()
        for i in order:
            spent[i] += versions[i].time_chunk(chunk, timeout)
    return [len(pairs) / t if t else float("inf") for t in spent]


def hostile_inputs() -> list[tuple[str, str, str]]:
    deep = "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}"
    return [
        ("power_tower", r"\boxed{9^{9^{9^{9}}}}", r"9^{9^{9^{9}}}+1"),
        ("huge_factorial", r"\boxed{(10^{7})!}", "3"),
        ("symbolic_power", r"\boxed{(x+1)^{100000}}", "x"),
        ("expansion", r"\boxed{(a+b+c+d+f+g+h+k)^{20}}", "(a+b+c+d+f+g+h+k)^{19}(a+b+c+d+f+g+h) + (a+b+c+d+f+g+h+k)^{19} k"),  # equal: no shortcut
        ("deep_braces", deep, "1"),
        ("deep_parens", r"\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}", "1"),
        ("many_boxes", r"\boxed{1}, " * 20000, "1"),
        ("relation_chain", r"\boxed{" + " < ".join(f"x_{i}" for i in range(120)) + "}", "x_1 < x_2"),
        ("interval_union", r"\boxed{" + r" \cup ".join(f"({i},{i + 1}]" for i in range(60)) + "}", "(0, 300)"),
        ("big_matrix", r"\boxed{\begin{pmatrix}" + r"\\".join("&".join("x" for _ in range(30)) for _ in range(30))
         + r"\end{pmatrix}}", r"\begin{pmatrix} 1 \end{pmatrix}"),
        ("matrix_product", "$" + (r"\begin{pmatrix}" + r"\\".join("&".join("x" for _ in range(8)) for _ in range(8))
         + r"\end{pmatrix}") * 40 + "$", r"\begin{pmatrix} x \end{pmatrix}"),
        ("megabyte_dollars", "$" * 1_000_000, "1"),
        ("megabyte_sentence", "the value is 7 and " * 60_000 + "so it is 8.", "8"),
        ("megabyte_braces", "{" * 1_000_000, "1"),
        ("unbalanced_boxes", "\\boxed{" * 2000, "1"),
        ("long_list", r"\boxed{" + ",".join(f"x+{i}" for i in range(150)) + "}", ",".join(f"{i}+x" for i in range(149, -1, -1))),
    ]


def worst_call(grade, timeout: float = 2.0) -> dict:
    times = {}
    for name, completion, gold in hostile_inputs():
        start = time.monotonic()
        grade(completion, gold, timeout=timeout)
        times[name] = round(time.monotonic() - start, 3)
    worst = max(times, key=times.get)
    return {"timeout_s": timeout, "worst_s": times[worst], "worst_case": worst, "per_case_s": times}


def speed_cases(golds: list[str], n: int, seed: int = 0) -> dict[str, list[tuple[str, object]]]:
    rng = random.Random(seed)
    mix = []
    for gold in golds:
        mix.append((restate(gold, rng), gold))
        for wrong in perturbations(gold)[:1]:
            mix.append((synthetic(wrong), gold))
    rng.shuffle(mix)
    filler = "We compute step by step. " * 20
    ints, radicals = [], []
    for k in range(n):
        a = rng.randint(-999, 99999)
        ints.append((f"{filler}So the result is $\\boxed{{{a}}}$.", str(a if rng.random() < 0.7 else a + 1)))
        if k < max(n // 10, 1):  # distinct, so the symbolic cache never hits
            radicals.append((f"{filler}Hence $\\boxed{{\\sqrt{{{2 * (k + 2) ** 2}}}}}$.", f"{k + 2}\\sqrt{{2}}"))
    return {"realistic_mix": mix, "common_int": ints, "symbolic_radicals": radicals}


def needs_sympy_flags(pairs: list[tuple[str, object]], grade, cache, timeout: float) -> list[bool]:
    """Whether grading each pair sends at least one request to the SymPy worker (*cache*: its result cache)."""
    out = []
    for completion, gold in pairs:
        cache.clear()
        grade(completion, gold, timeout=timeout)
        out.append(bool(cache))
    return out


def clear_caches() -> None:
    """Empty the current verifier's caches: the SymPy results and every cached function of ``gvm_trl.answers``
    (its SymPy workers keep running)."""
    from gvm_trl.answers import comparison, normalisation, screening

    symbolic.CACHE.clear()
    for module in (extraction, normalisation, comparison, screening):
        for value in vars(module).values():
            if hasattr(value, "cache_clear"):
                value.cache_clear()


def expensive_correct(count: int) -> list[tuple[str, str]]:
    """*count* correct answers whose check outlasts any timeout of a few seconds: an eight-variable sum to the
    20th power against the same power with one factor split off (equal, so no cheap numeric check decides it; the
    expansion has ~10^6 terms). The last variable differs from row to row, so no result is cached."""
    letters = "mnpqrstuvwyzjlox"
    rows = []
    for k in range(count):
        s = "a+b+c+d+f+g+h+" + letters[k % len(letters)] * (1 + k // len(letters))
        last = s.rsplit("+", 1)[1]
        rows.append((f"Expanding, the result is $\\boxed{{({s})^{{20}}}}$.",
                     f"({s})^{{19}}({s.rsplit('+', 1)[0]}) + ({s})^{{19}} {last}"))
    return rows


def _graded(pairs: list, timeout: float, batch_size: int | None, workers: int) -> list[bool]:
    """The verdicts of *pairs*: one ``grade_answer`` call each (*batch_size* None), else ``grade_answers`` batches."""
    if batch_size is None:
        return [grade_answer(c, g, timeout=timeout) for c, g in pairs]
    out: list[bool] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        out += grade_answers([c for c, _ in batch], [g for _, g in batch], timeout=timeout, workers=workers)
    return out


def warm_workers(pairs: list, count: int, timeout: float) -> None:
    """Start *count* SymPy workers and let each check every symbolic request of *pairs* once, as workers that have
    served a while in training have: what SymPy and the parser load and build on first use is then not timed."""
    from gvm_trl import rewards

    symbolic.POOL.close()
    symbolic.POOL.start(count, wait=True)
    symbolic.CACHE.clear()
    needs_sympy = []
    for completion, gold in pairs:
        try:
            rewards._grade(completion, gold, timeout, rewards._cached_or_defer)
        except rewards._NeedsWorker:
            needs_sympy.append((completion, gold))
        except Exception:  # noqa: BLE001 - as grade_answer
            pass
    for worker in symbolic.POOL.members()[:count]:
        symbolic.CACHE.clear()
        backend = functools.partial(symbolic.symbolic_remote, worker=worker)
        for completion, gold in needs_sympy:
            rewards._grade_or_false(completion, gold, timeout, backend)
    forget(count)


def forget(count: int) -> None:
    """Empty every cache: ours and the parse cache of the first *count* workers (started if one is not running:
    a worker killed for overrunning is back before the clock runs)."""
    clear_caches()
    symbolic.POOL.start(count, wait=True)
    for worker in symbolic.POOL.members()[:count]:
        worker.request(["forget"], 30.0)


def serial_vs_batched(pairs: list, timeout: float, batch_size: int, workers: int, chunks: int = 20,
                      warm_up: list | None = None) -> dict:
    """Rows/s one row at a time and in batches over the same pairs, alternating chunk by chunk (the machine's speed
    drifts). The workers are first warmed up on *warm_up* (when given); each chunk then starts from empty caches,
    the workers' parse caches included (``forget``)."""
    if warm_up is not None:
        warm_workers(warm_up, workers, timeout)
    size = max(batch_size, -(-len(pairs) // chunks) // batch_size * batch_size)
    spent, verdicts = [0.0, 0.0], [[], []]
    for k, start in enumerate(range(0, len(pairs), size)):
        chunk = pairs[start : start + size]
        for i in ((0, 1) if k % 2 == 0 else (1, 0)):
            forget(workers)
            began = time.perf_counter()
            verdicts[i].append(_graded(chunk, timeout, None if i == 0 else batch_size, workers))
            spent[i] += time.perf_counter() - began
    serial, batched = ([v for part in verdicts[i] for v in part] for i in (0, 1))
    return {"n": len(pairs), "serial_s": round(spent[0], 3), "batched_s": round(spent[1], 3),
            "serial_rows_per_s": round(len(pairs) / spent[0], 1), "batched_rows_per_s": round(len(pairs) / spent[1], 1),
            "ratio": round(spent[0] / spent[1], 2), "identical": serial == batched,
            "accepted": sum(batched)}


def throughput_report(args) -> dict:
    """``--throughput``: the realistic mix and one batch with expensive correct rows, serial against batched."""
    golds = [str(r["answer"]) for name in args.sets for r in load_rows(name)[: 40 if args.quick else None]]
    mix = speed_cases(golds, args.throughput_n)["realistic_mix"]
    workers = args.workers or symbolic.default_pool_size()
    report = {"timeout_s": args.timeout, "batch_size": args.batch_size, "workers": workers,
              "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    print(f"batches of {args.batch_size}, {workers} SymPy workers, timeout {args.timeout} s, {report['cpus']} CPUs")
    report["realistic_mix"] = serial_vs_batched(mix, args.timeout, args.batch_size, workers, warm_up=mix)
    expensive = expensive_correct(args.expensive)
    rng = random.Random(1)
    batch = expensive + rng.sample(mix, max(args.batch_size - len(expensive), 0))
    rng.shuffle(batch)
    report["expensive_batch"] = serial_vs_batched(batch, args.timeout, len(batch), workers, chunks=1)
    report["expensive_batch"]["expensive_rows"] = len(expensive)
    for case, title in (("realistic_mix", "realistic mix"),
                        ("expensive_batch", f"one batch, {len(expensive)} expensive correct rows")):
        r = report[case]
        print(f"{title:40s} serial {r['serial_rows_per_s']:>9.1f} rows/s ({r['serial_s']} s)   batched "
              f"{r['batched_rows_per_s']:>9.1f} rows/s ({r['batched_s']} s)   ratio {r['ratio']:.2f}x   "
              f"verdicts identical: {r['identical']}   ({r['n']} rows)")
    return report


def false_acceptance_summary(parts: dict[str, list[dict]]) -> dict:
    summary = {}
    for label, items in parts.items():
        n = sum(x["n"] for x in items)
        accepted = sum(x["accepted"] for x in items)
        summary[label] = {"n": n, "accepted": accepted, "rate": accepted / n if n else 0.0}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "grader.json"))
    parser.add_argument("--timeout", type=float, default=5.0, help="grade_answer timeout per answer (s)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--throughput-n", type=int, default=5000, help="synthetic answers per speed case")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with, or 'none'")
    parser.add_argument("--baseline-python", default=None,
                        help="run the baseline revision's verifier under this Python (its own LaTeX parser)")
    parser.add_argument("--math-verify", choices=("auto", "none"), default="auto",
                        help="grade with math-verify (TRL's accuracy_reward) too, where it is installed")
    parser.add_argument("--quick", action="store_true", help="smoke test: 40 rows per set, small speed cases")
    parser.add_argument("--throughput", action="store_true",
                        help="only rows/s of grade_answer one row at a time against grade_answers in batches")
    parser.add_argument("--batch-size", type=int, default=64, help="--throughput: rows per grade_answers batch")
    parser.add_argument("--workers", type=int, default=None,
                        help="--throughput: SymPy workers per batch (default: symbolic.default_pool_size())")
    parser.add_argument("--expensive", type=int, default=16,
                        help="--throughput: correct rows whose check outlasts the timeout in the expensive batch")
    args = parser.parse_args(argv)
    if args.quick:
        args.throughput_n = min(args.throughput_n, 300)
    if args.throughput:
        if args.output == parser.get_default("output"):
            args.output = str(REPO / "benchmarks" / "results" / "grader_throughput.json")
        report = throughput_report(args)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
        return 0 if all(report[k]["identical"] for k in ("realistic_mix", "expensive_batch")) else 1

    symbolic.WORKER.start()
    current = CurrentVerifier()
    baseline: Verifier | None = None
    if args.baseline != "none":
        if args.baseline_python:
            baseline = ProcessBaseline(args.baseline, args.baseline_python)
        elif (module := load_baseline(args.baseline)) is not None:
            baseline = ModuleBaseline(module)
    mv = MathVerify() if args.math_verify == "auto" and math_verify_available() else None
    results: dict = {"sets": {}, "timeout_s": args.timeout, "baseline": None if baseline is None else args.baseline,
                     "baseline_python": args.baseline_python if baseline is not None else None,
                     "math_verify": None}
    if mv is not None:
        results["math_verify"] = {"version": importlib.metadata.version("math-verify"), "sets": {}}
    all_golds: list[str] = []
    cross_total: dict = {"now": [], "before": [], "math_verify": []}
    perturbed_total: dict = {"now": [], "before": [], "math_verify": []}
    for name in args.sets:
        rows = load_rows(name)[: 40 if args.quick else None]
        started = time.perf_counter()
        res = evaluate_set(name, rows, args.timeout)
        golds = [(row_id(i, r), str(r["answer"])) for i, r in enumerate(rows)]
        all_golds += [g for _, g in golds]
        res["cross_gold"] = cross_gold(golds, grade_answer, args.timeout)
        res["perturbed"] = perturbed(golds, grade_answer, args.timeout)
        cross_total["now"].append(res["cross_gold"])
        perturbed_total["now"].append(res["perturbed"])
        if baseline is not None:
            res["cross_gold_before"] = cross_gold(golds, lambda c, g, timeout: baseline.grade(c, g, timeout), args.timeout)
            res["perturbed_before"] = perturbed(golds, lambda c, g, timeout: baseline.grade(c, g, timeout), args.timeout)
            cross_total["before"].append(res["cross_gold_before"])
            perturbed_total["before"].append(res["perturbed_before"])
        res["seconds"] = round(time.perf_counter() - started, 2)
        results["sets"][name] = res
        ref, selfc, raw = res["reference"], res["self_consistency"], res["raw_gold"]
        print(f"{name:15s} reference ({res['reference_kind']}): {ref['agree']}/{ref['n']} = {ref['rate']:.2%}   "
              f"self-consistency: {selfc['agree']}/{selfc['n']} = {selfc['rate']:.2%}   "
              f"raw-file gold: {raw['agree']}/{raw['n']} = {raw['rate']:.2%}   ({res['seconds']} s)")
        if "solution_text" in res:
            info = res["solution_text"]
            print(f"{'':15s} (information) own solution texts: {info['agree']}/{info['n']} = {info['rate']:.2%}")
        for kind in ("reference", "self_consistency", "raw_gold"):
            for miss in res[kind]["misses"]:
                print(f"    {kind} miss {miss['id']}: gold={miss['gold']!r} extracted={miss['extracted']!r}"
                      f" -- {miss['reason']}")
        if mv is not None:
            mv_grade = lambda c, g, timeout: mv.grade(c, g, timeout)  # noqa: E731
            if name in SYNTHETIC_REFERENCE:
                reference = [(rid, synthetic(g), g) for rid, g in golds]
            else:
                reference = [(rid, r["solution"], g) for (rid, g), r in zip(golds, rows)]
            mres = {
                "reference": grade_rows(mv_grade, reference, args.timeout),
                "self_consistency": grade_rows(mv_grade, [(rid, synthetic(g), g) for rid, g in golds], args.timeout),
                "cross_gold": cross_gold(golds, mv_grade, args.timeout),
                "perturbed": perturbed(golds, mv_grade, args.timeout),
            }
            results["math_verify"]["sets"][name] = mres
            cross_total["math_verify"].append(mres["cross_gold"])
            perturbed_total["math_verify"].append(mres["perturbed"])
            print(f"{'':15s} math-verify: reference {mres['reference']['agree']}/{mres['reference']['n']} = "
                  f"{mres['reference']['rate']:.2%}   self-consistency {mres['self_consistency']['agree']}/"
                  f"{mres['self_consistency']['n']} = {mres['self_consistency']['rate']:.2%}")

    summary = false_acceptance_summary(
        {f"{label}_{when}": items for label, parts in (("cross_gold", cross_total), ("perturbed", perturbed_total))
         for when, items in parts.items() if items}
    )
    for label in ("cross_gold", "perturbed"):
        now = summary[f"{label}_now"]
        extra = ""
        for when, title in (("before", "before"), ("math_verify", "math-verify")):
            if f"{label}_{when}" in summary:
                other = summary[f"{label}_{when}"]
                extra += f"   ({title}: {other['accepted']}/{other['n']} = {other['rate']:.2%})"
        print(f"false acceptances, {label:10s}: {now['accepted']}/{now['n']} = {now['rate']:.2%}{extra}")
        for name, res in results["sets"].items():
            for case in res[label]["cases"]:
                print(f"    {name} {case['id']}: gold={case['gold']!r} accepted {case['accepted']!r}")
    results["false_acceptance"] = summary
    if mv is not None:
        mv_sets = results["math_verify"]["sets"].values()
        for kind in ("reference", "self_consistency"):
            n = sum(x[kind]["n"] for x in mv_sets)
            agree = sum(x[kind]["agree"] for x in mv_sets)
            results["math_verify"][kind] = {"n": n, "agree": agree, "rate": agree / n if n else 1.0}
        ours = {kind: (sum(r[kind]["agree"] for r in results["sets"].values()), sum(r[kind]["n"] for r in results["sets"].values()))
                for kind in ("reference", "self_consistency")}
        results["agreement_now"] = {k: {"agree": a, "n": n, "rate": a / n if n else 1.0} for k, (a, n) in ours.items()}
        print(f"agreement with the bundled golds, all sets: reference {ours['reference'][0]}/{ours['reference'][1]}"
              f"   (math-verify: {results['math_verify']['reference']['agree']}/{results['math_verify']['reference']['n']}), "
              f"self-consistency {ours['self_consistency'][0]}/{ours['self_consistency'][1]}   (math-verify: "
              f"{results['math_verify']['self_consistency']['agree']}/{results['math_verify']['self_consistency']['n']})")

    table = load_family_table()
    if table is None:
        print("family table: skipped (tests/test_answer_families.py needs pytest)")
    else:
        families = family_agreement(grade_answer, args.timeout, table)
        results["families"] = families
        line = f"family table: {families['agree']}/{families['n']} = {families['rate']:.2%}"
        if baseline is not None:
            before = family_agreement(lambda c, g, timeout: baseline.grade(c, g, timeout), args.timeout, table)
            results["families_before"] = before
            line += f"   (before: {before['agree']}/{before['n']} = {before['rate']:.2%})"
        if mv is not None:
            mv_families = family_agreement(lambda c, g, timeout: mv.grade(c, g, timeout), args.timeout, table)
            results["math_verify"]["families"] = mv_families
            line += f"   (math-verify: {mv_families['agree']}/{mv_families['n']} = {mv_families['rate']:.2%})"
        print(line)
        for family, v in families["per_family"].items():
            b = results.get("families_before", {}).get("per_family", {}).get(family)
            m = results["math_verify"]["families"]["per_family"][family] if mv is not None else None
            print(f"    {family:12s} {v['agree']:3d}/{v['n']:3d} = {v['rate']:.2%}" + (f"   (before {b['rate']:.2%})" if b else "")
                  + (f"   (math-verify {m['rate']:.2%})" if m else ""))
        for miss in families["misses"]:
            print(f"    family miss: {miss}")

    cases = speed_cases(all_golds, args.throughput_n)
    restated = [(c, g) for c, g in cases["realistic_mix"] if "Putting the pieces together" in c]
    agreement = sum(grade_answer(c, g, timeout=args.timeout) for c, g in restated) / len(restated)
    results["restated"] = {"n": len(restated), "rate": agreement}
    line = f"restated golds accepted: {agreement:.2%} of {len(restated)}"
    for key_name, title, version in (("rate_before", "before", baseline), ("rate_math_verify", "math-verify", mv)):
        if version is not None:
            rate = sum(version.grade(c, g, args.timeout) for c, g in restated) / len(restated)
            results["restated"][key_name] = rate
            line += f"   ({title}: {rate:.2%})"
    print(line)
    cases["realistic_mix_restated"] = restated
    cases["realistic_mix_wrong"] = [(c, g) for c, g in cases["realistic_mix"] if "Putting the pieces together" not in c]
    flags = current.sympy_pairs(cases["realistic_mix"], args.timeout)
    cases["realistic_mix_sympy"] = [p for p, f in zip(cases["realistic_mix"], flags) if f]
    if baseline is not None:
        old_flags = baseline.sympy_pairs(cases["realistic_mix"], args.timeout)
        cases["realistic_mix_sympy_in_both"] = [p for p, f, o in zip(cases["realistic_mix"], flags, old_flags) if f and o]

    speeds: dict = {}
    versions: list[tuple[str, Verifier]] = [("now", current)]
    if baseline is not None:
        versions.append(("before", baseline))
    if mv is not None:
        versions.append(("math_verify", mv))
    for case, pairs in cases.items():
        rates = throughput_side_by_side([v for _, v in versions], pairs, args.timeout)
        speeds[case] = {"n": len(pairs)} | {label: round(rate, 1) for (label, _), rate in zip(versions, rates)}
        line = f"throughput {case:27s} {rates[0]:>10.1f} answers/s"
        for (label, _), rate in zip(versions[1:], rates[1:]):
            line += f"   ({label.replace('_', '-')}: {rate:>10.1f})"
        print(line + f"   ({len(pairs)} answers)")
    results["throughput_answers_per_s"] = speeds

    cold_current()
    results["hostile"] = worst_call(grade_answer)
    line = f"hostile inputs: worst call {results['hostile']['worst_s']} s ({results['hostile']['worst_case']}, timeout 2 s)"
    if baseline is not None:
        baseline.cold()
        results["hostile_before"] = worst_call(lambda c, g, timeout: baseline.grade(c, g, timeout))
        line += f"   (before: {results['hostile_before']['worst_s']} s, {results['hostile_before']['worst_case']})"
    print(line)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    over = [k for k in ("cross_gold_now", "perturbed_now") if summary[k]["rate"] > MAX_FALSE_ACCEPTANCE]
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
