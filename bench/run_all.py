"""All benchmarks (what `make bench` runs): prints medians and ratios, writes bench/results.json and a scaling plot.

    python bench/run_all.py [--quick] [--repeats N] [--threads N] [--skip-training]

(a) KD loss forward + backward at B=4, T=256, V=49152 (H=576 for the lm_head cases), full vocab and top-k 256:
    the kit vs a naive full-[B,T,V] implementation vs TRL's GKD loss. Each case runs in a fresh subprocess
    (bench/kd_cases.py documents the timing and peak-RSS method).
(b)/(c) Training steps on tiny models (bench/training.py): the kit's forward-KL step vs TRL's GKDTrainer step
    (lmbda=0, beta=0), the kit's fused KD step over its floor, and the cached-teacher epoch over the live-teacher one.
(d) Scaling of time and extra peak memory with T (B=1, V=49152) and V (B=1, T=256): bench/scaling.png.
Timing assertions never live in tests; this script only reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = {"B": 4, "T": 256, "V": 49152, "H": 576, "k": 256}
LOSS_CASES = [
    ("naive_full", {}), ("trl_fkl", {}), ("trl_jsd", {}), ("kit_full", {}), ("kit_jsd", {}), ("kit_topk", {}),
    ("kit_topk_cached", {}), ("naive_full_head", {}), ("kit_full_head", {}), ("fused_full", {}),
    ("fused_full", {"chunk": 256}), ("fused_topk_cached", {"chunk": 256}),
]  # fmt: skip
SCALING_CASES = [("naive_full", {}), ("kit_full", {}), ("kit_topk_cached", {}), ("fused_topk_cached", {"chunk": 256})]


def run_case(spec: dict, timeout: float = 900) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "kd_cases.py"), json.dumps(spec)], capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no output"}
    return json.loads(lines[-1])


def label(result: dict) -> str:
    return result["case"] + (f"[chunk={result['chunk']}]" if "chunk" in result else "")


def print_table(results: list[dict]) -> None:
    print(f"{'case':32s} {'median s':>9s} {'extra peak MB':>14s}  times")
    for r in results:
        if "median_s" in r:
            print(f"{label(r):32s} {r['median_s']:9.3f} {r['extra_peak_mb']:14.0f}  {r['times_s']}")
        else:
            print(f"{label(r):32s} {r.get('error') or r.get('skipped')}")


def ratios(results: list[dict]) -> dict:
    by = {label(r): r for r in results if "median_s" in r}

    def ratio(slow, fast, key="median_s"):
        if slow in by and fast in by and by[fast][key] > 0:
            return round(by[slow][key] / by[fast][key], 2)
        return None

    pairs = {
        "naive_full / kit_full (time)": ("naive_full", "kit_full"),
        "trl_fkl / kit_full (time)": ("trl_fkl", "kit_full"),
        "trl_jsd / kit_jsd (time)": ("trl_jsd", "kit_jsd"),
        "naive_full / kit_topk_cached (time)": ("naive_full", "kit_topk_cached"),
        "naive_full_head / fused_full (time)": ("naive_full_head", "fused_full"),
        "naive_full_head / fused_topk_cached[chunk=256] (time)": ("naive_full_head", "fused_topk_cached[chunk=256]"),
        "kit_full_head / fused_full (time)": ("kit_full_head", "fused_full"),
    }
    table = {name: ratio(*pair) for name, pair in pairs.items()}
    memory_pairs = {
        "kit_full / naive_full (extra peak memory)": ("kit_full", "naive_full"),
        "kit_full / trl_fkl (extra peak memory)": ("kit_full", "trl_fkl"),
        "fused_full[chunk=256] / naive_full_head (extra peak memory)": ("fused_full[chunk=256]", "naive_full_head"),
        "fused_topk_cached[chunk=256] / naive_full_head (extra peak memory)": (
            "fused_topk_cached[chunk=256]", "naive_full_head"),
    }  # fmt: skip
    table.update({name: ratio(*pair, key="extra_peak_mb") for name, pair in memory_pairs.items()})
    return table


def scaling(repeats: int, threads: int, quick: bool) -> list[dict]:
    seqs = [128, 512, 2048] if quick else [128, 256, 512, 1024, 2048]
    vocabs = [8192, 49152, 152064] if quick else [8192, 32768, 49152, 98304, 152064]
    specs = [{"B": 1, "T": t, "V": 49152, "sweep": "T"} for t in seqs]
    specs += [{"B": 1, "T": 256, "V": v, "sweep": "V"} for v in vocabs]
    results = []
    for spec in specs:
        for case, extra in SCALING_CASES:
            result = run_case({**spec, **extra, "case": case, "H": 576, "k": 256, "repeats": repeats,
                               "threads": threads})  # fmt: skip
            results.append(result)
            seconds, megabytes = result.get("median_s", float("nan")), result.get("extra_peak_mb", float("nan"))
            print(f"  {spec['sweep']}: T={spec['T']:5d} V={spec['V']:6d} {label(result):30s} {seconds:8.3f} s "
                  f"{megabytes:8.0f} MB")  # fmt: skip
    return results


def plot_scaling(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (sweep, x_key) in enumerate((("T", "T"), ("V", "V"))):
        for name in sorted({label(r) for r in results}):
            rows = sorted((r for r in results if r.get("sweep") == sweep and label(r) == name and "median_s" in r),
                          key=lambda r: r[x_key])  # fmt: skip
            xs = [r[x_key] for r in rows]
            axes[0][col].plot(xs, [r["median_s"] for r in rows], marker="o", label=name)
            axes[1][col].plot(xs, [r["extra_peak_mb"] for r in rows], marker="o", label=name)
        for row, ylabel in enumerate(("median s (fwd + bwd)", "extra peak RSS, MB")):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel(f"{x_key} ({'B=1, V=49152' if sweep == 'T' else 'B=1, T=256'})")
            axes[row][col].set_ylabel(ylabel)
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("KD loss forward + backward: scaling with sequence length and vocabulary (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer scaling points (keeps the run near 10 min)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (after one warm-up)")
    parser.add_argument("--scaling-repeats", type=int, default=None, help="default: 3 with --quick, else --repeats")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per case; 1 keeps medians stable on a shared machine")  # fmt: skip
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--output", default=str(HERE / "results.json"), help="where the JSON report goes")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict = {"args": vars(args)}

    print(f"(a) KD loss fwd+bwd, B={SHAPE['B']} T={SHAPE['T']} V={SHAPE['V']} H={SHAPE['H']} k={SHAPE['k']}, "
          f"{args.repeats} repeats, {args.threads} thread(s)")  # fmt: skip
    loss_results = []
    for case, extra in LOSS_CASES:
        loss_results.append(run_case({**SHAPE, **extra, "case": case, "repeats": args.repeats,
                                      "threads": args.threads}))  # fmt: skip
        print_table(loss_results[-1:])
    report["loss"] = loss_results
    report["loss_ratios"] = ratios(loss_results)
    print("\nratios (>1 = the second is faster / the first uses more memory):")
    for name, value in report["loss_ratios"].items():
        print(f"  {name:70s} {value}")

    if not args.skip_training:
        print("\n(b)/(c) training steps on tiny models")
        out = subprocess.run([sys.executable, str(HERE / "training.py"), str(args.repeats), str(args.threads)],
                             capture_output=True, text=True, timeout=1800)  # fmt: skip
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        training = json.loads(lines[-1]) if lines else {"error": out.stderr.strip()[-500:]}
        if lines:
            training["kit_over_floor"] = round(training["kit_epoch_s"] / training["floor_epoch_s"], 2)
            training["cached_over_live_tokens_per_s"] = round(
                training["cached_tokens_per_s"] / training["live_tokens_per_s"], 2
            )
            training["teacher_over_student_forward"] = round(
                training["teacher_forward_s"] / training["student_forward_s"], 2
            )
            if "trl_tokens_per_s" in training:
                training["kit_kd_over_trl_tokens_per_s"] = round(
                    training["kit_kd_tokens_per_s"] / training["trl_tokens_per_s"], 2
                )
        report["training"] = training
        print(json.dumps(training, indent=2))

    if not args.skip_scaling:
        print("\n(d) scaling")
        scaling_repeats = args.scaling_repeats or (3 if args.quick else args.repeats)
        report["scaling"] = scaling(scaling_repeats, args.threads, args.quick)
        plot_scaling(report["scaling"], HERE / "scaling.png")
        print(f"plot: {HERE / 'scaling.png'}")

    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"\ntotal {report['seconds']} s; results in {args.output}")


if __name__ == "__main__":
    main()
