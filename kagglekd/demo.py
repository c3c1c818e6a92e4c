"""The embedded default: offline corpus, tiny MoE teacher, tiny student, KD vs CE-only on identical data.

``python -m kagglekd demo`` (what ``make demo`` runs) builds the stdlib-docs corpus and tokenizer, pretrains
the tiny Qwen3-MoE teacher once (cached), distils the tiny student with the ``tiny-cpu`` preset, trains the
same student CE-only with the same data, steps and seed, and writes ``runs/demo/``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kagglekd.config import DistillConfig
from kagglekd.metrics import format_table
from kagglekd.rundir import ALIGNMENT_FILE, CONFIG_FILE, STUDENT_DIR

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
    results = {
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
        "cross_tokenizer": cross_tokenizer,
    }
    if cross_tokenizer:
        results["alignment"] = _alignment_report(out / "kd", echo)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = _result_rows(teacher_name, teacher_ppl, {"CE only": (ce_eval, ce_summary), "KD": (kd_eval, kd_summary)})
    _write_plots(out, results)
    _write_results_table(out, rows, results, echo)
    return results


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


# Variants of the ablation: changes to the preset, on identical data, steps and seed.
ABLATION_VARIANTS = {
    "CE-only": {"alpha_kd": 0.0, "alpha_ce": 1.0},
    "KD": {},
    "KD+feature+attention": {"alpha_feature": 0.1, "alpha_attention": 0.1, "feature_layers": 1, "attention_layers": 1},
    "SAR": {"sar": True},
    "SAR+KA": {"sar": True, "ka_samples": 2},
}


def run_ablation(
    output_dir: str | Path = "runs/demo",
    max_steps: int | None = None,
    preset: str = "tiny-cpu",
    echo: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train every variant of ``ABLATION_VARIANTS``; write ``ablation.csv`` and ``ablation.png``."""
    import pandas as pd

    from kagglekd import plots
    from kagglekd.trainer import Distiller

    echo = echo or log.info
    out, base = _prepare(output_dir, preset, max_steps)
    rows, judge = [], None
    for index, (variant, changes) in enumerate(ABLATION_VARIANTS.items(), 1):
        echo(f"{index}/{len(ABLATION_VARIANTS)} {variant}")
        slug = variant.lower().replace("+", "-").replace(" ", "-")
        config = base.replace(output_dir=str(out / "ablation" / slug), resume="never", **changes)
        distiller = Distiller(config)
        summary = distiller.train()
        if judge is None and distiller.teacher is not None and not config.sar:
            judge = distiller  # its teacher is the unadapted one: agreement is measured against the same teacher
        rows.append({"variant": variant, "distiller": distiller, "tokens_per_s": summary["tokens_per_s"]})
    table = []
    for row in rows:
        student = row["distiller"].accelerator.unwrap_model(row["distiller"].student)
        metrics = judge.evaluate(model=student, with_ema=False)
        table.append(
            {
                "variant": row["variant"],
                "eval_ppl": metrics["ppl"],
                "top1_agreement": metrics["top1_agreement"],
                "tokens_per_s": row["tokens_per_s"],
            }
        )
    frame = pd.DataFrame(table, columns=["variant", "eval_ppl", "top1_agreement", "tokens_per_s"])
    frame.to_csv(out / "ablation.csv", index=False)
    plots.plot_eval_comparison(
        {r["variant"]: r["eval_ppl"] for r in table},
        path=out / "ablation.png",
        title="Ablation: held-out perplexity of the student (lower is better)",
    )
    echo("\n" + format_table(table, ["variant", "eval_ppl", "top1_agreement", "tokens_per_s"]))
    echo(f"written: {out / 'ablation.csv'}, {out / 'ablation.png'}")
    return table


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


def evaluate_run(run_dir: Path) -> list[dict]:
    """Evaluate ``run_dir/student`` (and the teacher) on the run's held-out blocks; write eval.json."""
    from transformers import AutoModelForCausalLM

    from kagglekd.errors import ConfigError
    from kagglekd.evaluation import load_finished_run

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists() or not (run_dir / STUDENT_DIR / "config.json").exists():
        raise ConfigError(f"--run {run_dir}: expected a finished run directory with config.json and student/.")
    distiller = load_finished_run(run_dir)  # a SAR run's teacher gets its adapted routers here
    teacher_state = distiller.teacher_side.describe() if distiller.teacher is not None else {}
    student = AutoModelForCausalLM.from_pretrained(run_dir / STUDENT_DIR).to(distiller.device)
    metrics = distiller.evaluate(model=student, with_ema=False)
    rows = [
        {
            "model": "student",
            "eval_ppl": metrics["ppl"],
            "top1_agreement": metrics.get("top1_agreement"),
            "eval_tokens": metrics["tokens"],
        }
    ]
    if distiller.teacher is not None:
        rows.insert(
            0,
            {
                # across vocabularies the teacher's perplexity is per teacher token: not comparable
                "model": "teacher (ppl per teacher token)" if distiller.cross is not None else "teacher",
                "eval_ppl": distiller.teacher_perplexity(),
                "top1_agreement": 1.0,
                "eval_tokens": metrics["tokens"],
                **teacher_state,  # which routers (original or SAR-adapted) and routing were evaluated
            },
        )
    (run_dir / "eval.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return rows
