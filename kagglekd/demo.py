"""The embedded default: offline corpus, tiny MoE teacher, tiny student, KD vs CE-only on identical data.

``python -m kagglekd demo`` (what ``make demo`` runs) builds the stdlib-docs corpus and tokenizer, pretrains
the tiny Qwen3-MoE teacher once (cached), distils the tiny student with the ``tiny-cpu`` preset, trains the
same student CE-only with the same data, steps and seed, and writes ``runs/demo/``.
``python -m kagglekd demo --ablation`` (``run_ablation``) trains the ``ABLATION_VARIANTS`` (CE-only, KD, KD with
all experts, SAR, KA, SAR+KA) over several seeds and reports mean ± sd of held-out perplexity and agreement.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError
from kagglekd.evaluation import evaluate_run  # noqa: F401 - re-exported: the demo evaluates its runs with it
from kagglekd.metrics import format_table
from kagglekd.rundir import ALIGNMENT_FILE, write_json

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["model", "eval_ppl", "top1_agreement", "train_time_s", "tokens_per_s"]


def run_demo(
    output_dir: str | Path = "runs/demo",
    max_steps: int | None = None,
    preset: str = "tiny-cpu",
    echo: Callable[[str], None] | None = None,
    cross_tokenizer: bool = False,
    cross_teacher: str | None = None,
) -> dict:
    """Run the KD student and its CE-only twin; return (and write) ``results.json``.

    ``cross_tokenizer=True`` swaps the teacher for ``tiny-moe-8k``: the same tiny Qwen3-MoE recipe trained
    with its own 8192-token tokenizer (digits split, like Qwen's), so no token id means the same on both
    sides and KD runs through the offset alignment. Its perplexity is per teacher token. ``cross_teacher``
    replaces that teacher (tests use a tiny random one).
    """
    from kagglekd import models, plots
    from kagglekd.trainer import Distiller

    echo = echo or log.info
    out, base = _prepare(output_dir, preset, max_steps)
    teacher_name = "teacher (tiny Qwen3-MoE)"
    if cross_tokenizer:
        base = base.replace(teacher_model=cross_teacher or models.TINY_MOE_8K, cross_tokenizer=True)
        teacher_name = f"teacher ({base.teacher_model}, own vocabulary; ppl per teacher token)"

    started = time.perf_counter()
    echo(f"1/4 teacher: pretrained tiny Qwen3-MoE {base.teacher_model} (built and cached on first use)")
    models.resolve_model(base.teacher_model, vocab_size=len(models.load_tokenizer(base.student_model)))

    echo("2/4 KD student")
    kd_config = base.replace(output_dir=str(out / "kd"), resume="never")
    kd = Distiller(kd_config, callbacks=[plots.LiveChart(out / "kd")])
    kd_summary = kd.train()

    echo("3/4 CE-only student (same data, steps and seed)")
    ce_config = base.replace(output_dir=str(out / "ce"), resume="never", alpha_kd=0.0, alpha_ce=1.0)
    ce = Distiller(ce_config, callbacks=[plots.LiveChart(out / "ce")])
    ce_summary = ce.train()

    echo("4/4 evaluation on the held-out blocks")
    kd_eval = kd.evaluate()
    ce_eval = kd.evaluate(model=ce.accelerator.unwrap_model(ce.student))
    teacher_ppl = kd.teacher_perplexity()
    results = comparison_results(teacher_ppl, (kd_eval, kd_summary), (ce_eval, ce_summary), started)
    results["cross_tokenizer"] = cross_tokenizer
    if cross_tokenizer:
        results["alignment"] = _alignment_report(out / "kd", echo)
    write_json(out / "results.json", results)
    rows = _result_rows(teacher_name, teacher_ppl, {"CE only": (ce_eval, ce_summary), "KD": (kd_eval, kd_summary)})
    _write_plots(out, results)
    _write_results_table(out, rows, results, echo)
    return results


def comparison_results(teacher_ppl: float, kd: tuple[dict, dict], ce: tuple[dict, dict], started: float) -> dict:
    """``results.json`` of a KD-vs-CE-only comparison from each run's ``(eval metrics, train summary)``:
    perplexities, agreements, steps, times, tokens/s and whether KD won; ``started`` is the demo's
    ``time.perf_counter()`` at its start."""
    (kd_eval, kd_summary), (ce_eval, ce_summary) = kd, ce
    return {
        "teacher_ppl": teacher_ppl,
        "ce_student_ppl": ce_eval["ppl"],
        "kd_student_ppl": kd_eval["ppl"],
        "kd_top1_agreement": kd_eval["top1_agreement"],
        "ce_top1_agreement": ce_eval["top1_agreement"],
        "eval_tokens": kd_eval["tokens"],
        "optimizer_steps": kd_summary["optimizer_steps"],
        "kd_train_time_s": kd_summary["wall_time_s"],
        "ce_train_time_s": ce_summary["wall_time_s"],
        "kd_tokens_per_s": kd_summary["tokens_per_s"],
        "ce_tokens_per_s": ce_summary["tokens_per_s"],
        "total_time_s": time.perf_counter() - started,
        "kd_beats_ce": kd_eval["ppl"] < ce_eval["ppl"],
    }


def _alignment_report(kd_dir: Path, echo: Callable[[str], None]) -> dict:
    """The KD run's ``alignment.json`` (cross-tokenizer runs), with its headline figures echoed."""
    alignment_report = json.loads((kd_dir / ALIGNMENT_FILE).read_text())
    echo(
        f"alignment: {alignment_report['setup']['aligned_fraction']:.1%} of held-out student positions aligned, "
        f"{alignment_report['setup']['teacher_mass_mapped']:.1%} of the teacher's probability on tokens the "
        f"student can spell ({alignment_report['setup']['shared_tokens']} shared tokens)"
    )
    return alignment_report


def _result_rows(teacher_name: str, teacher_ppl: float, students: dict[str, tuple[dict, dict]]) -> list[dict]:
    """The results table's rows: the teacher, then each ``student, <name>`` from its (evaluation, training summary)."""
    rows = [{"model": teacher_name, "eval_ppl": teacher_ppl, "top1_agreement": 1.0}]
    for name, (evaluation, summary) in students.items():
        rows.append(
            {
                "model": f"student, {name}",
                "eval_ppl": evaluation["ppl"],
                "top1_agreement": evaluation["top1_agreement"],
                "train_time_s": summary["wall_time_s"],
                "tokens_per_s": summary["tokens_per_s"],
            }
        )
    return rows


def _write_results_table(out: Path, rows: list[dict], results: dict, echo: Callable[[str], None]) -> None:
    """Write ``results.md`` and echo the table, the KD-vs-CE verdict and where the files are."""
    table = format_table(rows, RESULT_COLUMNS)
    (out / "results.md").write_text(table + "\n")
    echo("\n" + table)
    verdict = "beats" if results["kd_beats_ce"] else "does NOT beat"
    echo(
        f"\nKD student {verdict} the CE-only student on held-out perplexity "
        f"({results['kd_student_ppl']:.3f} vs {results['ce_student_ppl']:.3f})."
    )
    echo(
        f"written: {out / 'results.json'}, {out / 'results.md'}, plots {out / '*.png'} "
        f"(total {results['total_time_s'] / 60:.1f} min)"
    )


# Variants of the ablation: changes to the preset, on identical data and steps, each over the same seeds.
# "KD, all experts" is the control of SAR, which runs every teacher expert while it trains the routers.
ABLATION_VARIANTS = {
    "CE-only": {"alpha_kd": 0.0, "alpha_ce": 1.0},
    "KD": {},
    "KD, all experts": {"all_experts": True},
    "SAR": {"sar": True},
    "KA": {"ka_samples": 2},
    "SAR+KA": {"sar": True, "ka_samples": 2},
    # the student learns on its own continuations of each block's first half, scored by the teacher (no CE on its
    # own samples); GKD mixes them with data blocks under JSD(0.5); sequence-level KD trains on the teacher's
    "on-policy": {"lmbda": 1.0, "alpha_ce": 0.0},
    "GKD": {"lmbda": 0.5, "alpha_ce": 0.0, "divergence": "jsd", "jsd_beta": 0.5},
    "sequence-level KD": {"seq_kd": True},
}
ABLATION_SEEDS = 3
# ablation.csv: one row per variant x seed; ablation_summary.csv: one row per variant, mean and sample sd
# (n - 1, like statistics.stdev; NaN with a single seed) over the seeds, and of the paired difference of held-out
# perplexity to the KD run of the same seed (the seeds' spread is much larger than the variants').
# eval_kd: the student's held-out KD loss to the unadapted teacher (per token, the run's divergence).
ABLATION_COLUMNS = ["variant", "seed", "eval_ppl", "top1_agreement", "eval_kd", "train_time_s", "tokens_per_s"]
SUMMARY_COLUMNS = [
    "variant", "seeds", "eval_ppl_mean", "eval_ppl_sd", "eval_ppl_vs_kd_mean", "eval_ppl_vs_kd_sd",
    "top1_agreement_mean", "top1_agreement_sd", "train_time_s_mean", "tokens_per_s_mean",
]  # fmt: skip
ABLATION_BASELINE = "KD"


def run_ablation(
    output_dir: str | Path = "runs/demo",
    max_steps: int | None = None,
    preset: str = "tiny-cpu",
    echo: Callable[[str], None] | None = None,
    seeds: int | Sequence[int] = ABLATION_SEEDS,
    variants: Sequence[str] | None = None,
) -> dict:
    """Train every variant of ``ABLATION_VARIANTS`` (or the named ``variants``) once per seed; summarise.

    ``seeds``: how many seeds (the preset's ``seed``, ``seed + 1``, ...) or the seeds themselves; each sets the
    config's ``seed`` (student initialisation, batch order, sampling). The held-out blocks are the same for
    every run (they follow ``split_seed``). Every student is judged on them by one plain-KD distiller, whose
    teacher is the unadapted one, so top-1 agreement is against the same teacher for every variant (SAR
    adapts its own teacher's routers). Writes ``ablation.csv`` (one row per variant x seed),
    ``ablation_summary.csv`` (mean and sd over seeds) and ``ablation.png``; returns
    ``{"runs": [row, ...], "summary": [row, ...]}`` with the columns ``ABLATION_COLUMNS`` / ``SUMMARY_COLUMNS``.
    """
    import pandas as pd

    from kagglekd.trainer import Distiller

    echo = echo or log.info
    out, base = _prepare(output_dir, preset, max_steps)
    seed_list = _ablation_seeds(seeds, base.seed)
    chosen = _ablation_variants(variants)
    judge = Distiller(base.replace(output_dir=str(out / "ablation" / "judge")), write_run_dir=False).setup()
    started, runs, total = time.perf_counter(), [], len(chosen) * len(seed_list)
    for seed in seed_list:
        for variant in chosen:
            echo(f"{len(runs) + 1}/{total} {variant}, seed {seed}")
            slug = variant.lower().replace("+", "-").replace(",", "").replace(" ", "-")
            config = base.replace(
                output_dir=str(out / "ablation" / slug / f"seed-{seed}"), resume="never", seed=seed,
                **ABLATION_VARIANTS[variant],
            )  # fmt: skip
            distiller = Distiller(config)
            summary = distiller.train()
            metrics = judge.evaluate(model=distiller.accelerator.unwrap_model(distiller.student), with_ema=False)
            runs.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "eval_ppl": metrics["ppl"],
                    "top1_agreement": metrics.get("top1_agreement", math.nan),
                    "eval_kd": metrics.get("kd", math.nan),
                    "train_time_s": summary["wall_time_s"],
                    "tokens_per_s": summary["tokens_per_s"],
                }
            )
            del distiller  # one run's models at a time
    frame = pd.DataFrame(runs, columns=ABLATION_COLUMNS)
    frame.to_csv(out / "ablation.csv", index=False)
    summary_rows = summarise_ablation(runs)
    pd.DataFrame(summary_rows, columns=SUMMARY_COLUMNS).to_csv(out / "ablation_summary.csv", index=False)
    _plot_ablation(summary_rows, out / "ablation.png", len(seed_list), base.max_steps)
    echo("\n" + _ablation_table(summary_rows))
    echo(
        f"written: {out / 'ablation.csv'}, {out / 'ablation_summary.csv'}, {out / 'ablation.png'} "
        f"({total} runs, {(time.perf_counter() - started) / 60:.1f} min)"
    )
    return {"runs": runs, "summary": summary_rows}


def _ablation_seeds(seeds: int | Sequence[int], first: int) -> list[int]:
    """The seeds of the ablation: ``seeds`` consecutive ones from the preset's ``first``, or the given list."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds = {seeds}: the ablation needs at least 1 seed (3 give a mean and an sd).")
        return [first + offset for offset in range(seeds)]
    seed_list = [int(seed) for seed in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list) or min(seed_list) < 0:
        raise ConfigError(f"seeds = {list(seeds)}: give distinct non-negative seeds, or a count like 3.")
    return seed_list


def _ablation_variants(variants: Sequence[str] | None) -> list[str]:
    """The named variants in ``ABLATION_VARIANTS`` order (all of them for ``None``); unknown names are an error."""
    if variants is None:
        return list(ABLATION_VARIANTS)
    unknown = [name for name in variants if name not in ABLATION_VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"variants = {list(variants)}: choose from {', '.join(ABLATION_VARIANTS)}.")
    return [name for name in ABLATION_VARIANTS if name in variants]


def summarise_ablation(runs: list[dict]) -> list[dict]:
    """One row per variant (first-seen order) of ``SUMMARY_COLUMNS``: number of seeds, mean and sample sd (n - 1)
    of held-out perplexity and top-1 agreement, of the per-seed perplexity difference to the KD run of the same
    seed (``eval_ppl_vs_kd_*``; NaN without KD runs), mean training seconds and tokens/s. sd is NaN for one seed.
    """

    def mean_sd(values: list[float]) -> tuple[float, float]:
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan

    baseline = {run["seed"]: float(run["eval_ppl"]) for run in runs if run["variant"] == ABLATION_BASELINE}
    rows = []
    for variant in dict.fromkeys(run["variant"] for run in runs):
        mine = [run for run in runs if run["variant"] == variant]
        row = {"variant": variant, "seeds": len(mine)}
        for metric in ("eval_ppl", "top1_agreement"):
            row[f"{metric}_mean"], row[f"{metric}_sd"] = mean_sd([float(run[metric]) for run in mine])
        paired = [float(run["eval_ppl"]) - baseline[run["seed"]] for run in mine if run["seed"] in baseline]
        row["eval_ppl_vs_kd_mean"], row["eval_ppl_vs_kd_sd"] = mean_sd(paired)
        row["train_time_s_mean"] = statistics.fmean(float(run["train_time_s"]) for run in mine)
        row["tokens_per_s_mean"] = statistics.fmean(float(run["tokens_per_s"]) for run in mine)
        rows.append(row)
    return rows


def _ablation_table(summary_rows: list[dict]) -> str:
    """The summary as a text table, each metric as ``mean ± sd``."""

    def spread(row: dict, metric: str, digits: int, sign: str = "") -> str:
        mean, sd = row[f"{metric}_mean"], row[f"{metric}_sd"]
        if math.isnan(mean):
            return "-"
        shown = f"{mean:{sign}.{digits}f}"
        return shown if math.isnan(sd) else f"{shown} ± {sd:.{digits}f}"

    table = [
        {
            "variant": row["variant"],
            "seeds": row["seeds"],
            "held-out ppl": spread(row, "eval_ppl", 2),
            "ppl - KD, same seed": spread(row, "eval_ppl_vs_kd", 2, sign="+"),
            "top-1 agreement": spread(row, "top1_agreement", 4),
            "train s": row["train_time_s_mean"],
            "tokens/s": row["tokens_per_s_mean"],
        }
        for row in summary_rows
    ]
    columns = ["variant", "seeds", "held-out ppl", "ppl - KD, same seed", "top-1 agreement", "train s", "tokens/s"]
    return format_table(table, columns)


def _plot_ablation(summary_rows: list[dict], path: Path | None, seeds: int, steps: int | None):
    """Two bar charts, held-out perplexity and top-1 agreement, mean with ± sd error bars over the seeds; returns
    the Figure (written to ``path`` as a PNG when given). Every axes has a title and a y label, like ``plots``."""
    import matplotlib
    from matplotlib.figure import Figure

    from kagglekd.schedule import count_noun

    names = [row["variant"] for row in summary_rows]
    colours = matplotlib.colormaps["tab10"](range(len(names)))
    fig = Figure(figsize=(max(8, 2.2 * len(names)), 4.2), layout="constrained")
    panels = (
        ("eval_ppl", "held-out perplexity (lower is better)", "perplexity"),
        ("top1_agreement", "top-1 agreement with the teacher (higher is better)", "top-1 agreement (fraction)"),
    )
    for index, (metric, title, unit) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 2, index)
        means = [float(row[f"{metric}_mean"]) for row in summary_rows]
        sds = [0.0 if math.isnan(row[f"{metric}_sd"]) else float(row[f"{metric}_sd"]) for row in summary_rows]
        ax.bar(names, means, yerr=sds, capsize=4, color=colours)
        ax.set_ylim(*_ablation_limits(means, sds))
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    after = f"after {count_noun(steps, 'step')}" if steps else "after its planned steps"
    fig.suptitle(f"Ablation: student {after}, mean ± sd over {count_noun(seeds, 'seed')}", fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _ablation_limits(means: list[float], sds: list[float]) -> tuple[float, float]:
    """y limits around the error bars with 15 % room; a span under 10 % of the values (one variant, one seed,
    equal means) widens to that, so bars of equal height do not sit on a 1e-9 axis; no numbers: 0..1."""
    ends = [value for m, s in zip(means, sds) for value in (m - s, m + s) if math.isfinite(value)]
    if not ends:
        return 0.0, 1.0
    low, high = min(ends), max(ends)
    span = max(high - low, 0.1 * max(abs(low), abs(high)), 1e-6)
    middle = (low + high) / 2
    return middle - 0.65 * span, middle + 0.65 * span


def _prepare(output_dir: str | Path, preset: str, max_steps: int | None) -> tuple[Path, DistillConfig]:
    """The output directory (created) and the preset's config, capped at ``max_steps`` when given."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = DistillConfig.load(preset)
    return out, base if max_steps is None else base.replace(max_steps=max_steps)


def _write_plots(out: Path, results: dict) -> None:
    from kagglekd import plots
    from kagglekd.metrics import read_history

    plots.plot_history(read_history(out / "kd"), path=out / "kd_history.png")
    plots.plot_history(read_history(out / "ce"), path=out / "ce_history.png")
    plots.plot_eval_comparison(
        {
            "teacher": results["teacher_ppl"],
            "CE-only student": results["ce_student_ppl"],
            "KD student": results["kd_student_ppl"],
        },
        path=out / "eval_ppl.png",
        title="Held-out perplexity (lower is better)",
    )
