"""Is an ablation's val_bpb difference real? Compare configs over seeds from run_bench.py's JSONL results.

Usage: python bench/significance.py bench/out/results.jsonl --baseline full [--metric final_bpb]
Runs are grouped by their `name` (run the same config with several SEED values, e.g.
`--config full_s1=SEED=1 --config full_s2=SEED=2 ...` and group with `--strip-suffix _s`). For each group it prints
n, mean, sample std, the difference to the baseline and Welch's two-sided t-test p-value.
"""
import argparse
import json
import math
import sys
from collections import defaultdict


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_one_sided_p(t: float, df: float) -> float:
    """P(T >= t) for Student's t with df degrees of freedom (the upper tail: H1 says the mean is larger)."""
    if math.isnan(t):
        return float("nan")
    half = 0.5 * t_two_sided_p(t, df) if math.isfinite(t) else 0.0
    return half if t >= 0 else 1.0 - half


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n-1); std is nan for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def one_sample_greater(values: list[float], mu0: float = 0.0) -> tuple[float, float, float]:
    """(t, df, one-sided p) of the one-sample t-test of H0: mean <= mu0 against H1: mean > mu0 (df = n-1).

    Needs at least 2 values. With zero spread t is +-inf (p 0 or 1) when the mean differs from mu0, else 0 (p 1).
    """
    if len(values) < 2:
        raise ValueError("a one-sample t-test needs at least 2 values")
    mean, std = mean_std(values)
    df = float(len(values) - 1)
    if std == 0.0:
        if mean > mu0:
            return math.inf, df, 0.0
        return (-math.inf if mean < mu0 else 0.0), df, 1.0
    t = (mean - mu0) / (std / math.sqrt(len(values)))
    return t, df, t_one_sided_p(t, df)


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(t, df, two-sided p) of Welch's test for mean(a) != mean(b); needs at least 2 values in each."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0.0:
        return (math.inf if ma != mb else 0.0), float(len(a) + len(b) - 2), (0.0 if ma != mb else 1.0)
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return t, df, t_two_sided_p(t, df)


def group_results(lines, metric: str, strip_suffix: str | None) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("returncode") != 0 or row.get(metric) is None:
            continue
        name = row["name"]
        if strip_suffix and strip_suffix in name:
            name = name[:name.rindex(strip_suffix)]
        groups[name].append(float(row[metric]))
    return dict(groups)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--metric", default="final_bpb")
    ap.add_argument("--strip-suffix", default=None, help="group names by the part before this suffix, e.g. _s")
    args = ap.parse_args(argv)
    with open(args.results, encoding="utf-8") as f:
        groups = group_results(f, args.metric, args.strip_suffix)
    if args.baseline not in groups:
        print(f"baseline {args.baseline!r} not among {sorted(groups)}", file=sys.stderr)
        return 2
    base = groups[args.baseline]
    print(f"| config | n | mean {args.metric} | std | delta vs {args.baseline} | Welch p |")
    print("|---|---|---|---|---|---|")
    for name, vals in sorted(groups.items()):
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
        p = welch(vals, base)[2] if name != args.baseline and len(vals) > 1 and len(base) > 1 else float("nan")
        print(f"| {name} | {len(vals)} | {mean:.5f} | {std:.5f} | {mean - sum(base) / len(base):+.5f} | {p:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
