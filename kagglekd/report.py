"""Evaluation report of a finished run (what ``03_evaluate`` shows): perplexity and agreement of the teacher,
the KD student and (when its run dir exists) the CE-only baseline on the same held-out blocks; greedy sample
generations side by side; size and speed; and the model card ``student/README.md``.

Every model is measured on the run's own held-out blocks through the run's ``Distiller`` (same tokenizer,
same packing, same eval code as training), so the numbers are comparable with ``history.csv``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kagglekd.config import DistillConfig
from kagglekd.data import next_token_batch
from kagglekd.errors import ConfigError
from kagglekd.metrics import format_table
from kagglekd.rundir import CONFIG_FILE, DATA_FILE, STUDENT_DIR, SUMMARY_FILE, to_json_text, write_json

TEACHER = "teacher"
STUDENT = "student (KD)"
BASELINE = "student (CE only)"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
EVAL_COLUMNS = ["model", "eval_ppl", "top1_agreement", "eval_tokens"]
SIZE_SPEED_COLUMNS = ["model", "parameters_m", "mb_on_disk", "forward_tokens_per_s", "generate_tokens_per_s"]


@dataclass
class Evaluation:
    """A finished run loaded for evaluation: its Distiller (teacher, tokenizer, eval blocks) and the models."""

    run_dir: Path
    config: DistillConfig
    distiller: object  # kagglekd.trainer.Distiller, set up
    models: dict[str, torch.nn.Module]
    weight_dirs: dict[str, Path | None]
    rows: list[dict] = field(default_factory=list)
    generation_speed: dict[str, float] = field(default_factory=dict)  # new tokens / s, set by side_by_side

    @property
    def tokenizer(self):
        return self.distiller.tokenizer

    @property
    def device(self) -> torch.device:
        return self.distiller.device


def load_evaluation(run_dir: str | Path, ce_run_dir: str | Path | None = None) -> Evaluation:
    """Load ``run_dir/student`` (and ``ce_run_dir/student`` when it exists) beside the run's teacher."""
    from transformers import AutoModelForCausalLM

    from kagglekd.evaluation import load_finished_run

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / STUDENT_DIR / "config.json").is_file():
        raise ConfigError(
            f"{run_dir}: expected a finished run directory with config.json and student/ "
            "(run 02_train, or `python -m kagglekd train`, to the end first)."
        )
    distiller = load_finished_run(run_dir)  # a SAR run's teacher gets its adapted routers here
    config = distiller.config
    models: dict[str, torch.nn.Module] = {}
    weight_dirs: dict[str, Path | None] = {}
    if distiller.teacher is not None:
        models[TEACHER] = distiller.teacher
        weight_dirs[TEACHER] = _local_weights_dir(config.teacher_model, distiller.teacher)
    for name, directory in ((STUDENT, run_dir / STUDENT_DIR), (BASELINE, Path(ce_run_dir or "") / STUDENT_DIR)):
        if ce_run_dir is None and name == BASELINE:
            continue
        if not (directory / "config.json").is_file():
            continue
        models[name] = AutoModelForCausalLM.from_pretrained(directory).to(distiller.device).eval()
        weight_dirs[name] = directory
    return Evaluation(run_dir, config, distiller, models, weight_dirs)


def _local_weights_dir(reference: str, model: torch.nn.Module) -> Path | None:
    """Where a loaded model's weights are on disk: the resolved tiny preset, a local dir, or the hub cache."""
    from kagglekd import models

    candidates = [getattr(model, "name_or_path", None), getattr(model.config, "_name_or_path", None)]
    try:
        candidates.append(models.resolve_model(reference, vocab_size=model.config.vocab_size))
    except (ConfigError, OSError):
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(reference, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached / not a hub id: size on disk unknown
        return None


# ---- perplexity and agreement ----------------------------------------------------------------------------
def perplexity_rows(evaluation: Evaluation) -> list[dict]:
    """Eval perplexity (exp of token-weighted CE) and top-1 agreement with the teacher, per model."""
    distiller = evaluation.distiller
    rows = []
    for name, model in evaluation.models.items():
        if name == TEACHER:
            ppl, agreement, tokens = distiller.teacher_perplexity(), 1.0, None
        else:
            metrics = distiller.evaluate(model=model, with_ema=False)
            ppl, agreement, tokens = metrics["ppl"], metrics.get("top1_agreement", math.nan), metrics["tokens"]
        rows.append({"model": name, "eval_ppl": ppl, "top1_agreement": agreement, "eval_tokens": tokens})
    tokens = next((r["eval_tokens"] for r in rows if r["eval_tokens"] is not None), None)
    for row in rows:
        row["eval_tokens"] = tokens if row["eval_tokens"] is None else row["eval_tokens"]
    evaluation.rows = rows
    write_json(evaluation.run_dir / "eval.json", rows)
    return rows


# ---- generations -----------------------------------------------------------------------------------------
def eval_prompts(evaluation: Evaluation, count: int = 3, prompt_tokens: int = 16) -> list[torch.Tensor]:
    """The first ``prompt_tokens`` tokens of ``count`` held-out blocks, spread over the eval set."""
    blocks = evaluation.distiller.eval_blocks
    if len(blocks) == 0:
        raise ConfigError("the run has no held-out blocks to take prompts from; raise eval_fraction.")
    length = min(prompt_tokens, blocks.shape[1] - 1)
    picks = sorted({round(i * (len(blocks) - 1) / max(1, count - 1)) for i in range(count)})
    return [blocks[i, :length].clone() for i in picks]


@torch.no_grad()
def _generate(model, prompt: torch.Tensor, max_new_tokens: int, eos_id: int | None) -> tuple[torch.Tensor, float]:
    device = next(model.parameters()).device
    input_ids = prompt.unsqueeze(0).to(device)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=eos_id,
    )
    _sync(device)
    return out[0, input_ids.shape[1] :].cpu(), time.perf_counter() - start


def side_by_side(evaluation: Evaluation, prompts: list[torch.Tensor], max_new_tokens: int = 24) -> list[dict]:
    """Greedy continuations of each prompt by every model: one row per prompt, one column per model.

    All models share the run's tokenizer (the trainer refuses pairs whose vocabularies differ). Also
    records each model's generation speed (new tokens / s) for ``size_speed_rows``.
    """
    tokenizer = evaluation.tokenizer
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    rows = [{"prompt": tokenizer.decode(p, skip_special_tokens=True)} for p in prompts]
    speed: dict[str, float] = {}
    for name, model in evaluation.models.items():
        was_training = model.training
        model.eval()
        new_tokens, seconds = 0, 0.0
        for row, prompt in zip(rows, prompts):
            generated, elapsed = _generate(model, prompt, max_new_tokens, eos_id)
            row[name] = tokenizer.decode(generated, skip_special_tokens=True)
            new_tokens += len(generated)
            seconds += elapsed
        model.train(was_training)
        speed[name] = new_tokens / seconds if seconds > 0 else math.nan
    evaluation.generation_speed = speed
    return rows


# ---- size and speed --------------------------------------------------------------------------------------
def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def weights_mb(directory: Path | None) -> float:
    """MB (10^6 bytes) of weight files in ``directory`` (symlinks of the hub cache followed); NaN if unknown."""
    if directory is None or not Path(directory).is_dir():
        return math.nan
    files = [p for p in Path(directory).rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6 if files else math.nan


@torch.no_grad()
def forward_tokens_per_s(
    model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8, max_batches: int = 4, min_seconds: float = 0.5
) -> float:
    """Tokens per second of a plain forward pass over held-out blocks (after one warm-up batch), repeated
    until ``min_seconds`` have been timed."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts = range(0, len(blocks), batch_size)[: max_batches + 1]
    batches = [next_token_batch(blocks[i : i + batch_size])[0].to(device) for i in starts]
    model(input_ids=batches[0])  # warm-up: kernels, allocator
    timed = batches[1:] or batches
    tokens, elapsed = 0, 0.0
    while elapsed < min_seconds or tokens == 0:  # repeat short measurements: one tiny batch is all noise
        _sync(device)
        start = time.perf_counter()
        for batch in timed:
            model(input_ids=batch)
        _sync(device)
        elapsed += time.perf_counter() - start
        tokens += sum(b.numel() for b in timed)
    model.train(was_training)
    return tokens / elapsed if elapsed > 0 else math.nan


def size_speed_rows(evaluation: Evaluation, batch_size: int = 8, max_batches: int = 4) -> list[dict]:
    """Parameters (M), MB of weights on disk, forward tokens/s, greedy generation tokens/s, per model."""
    speed = evaluation.generation_speed
    rows = []
    for name, model in evaluation.models.items():
        rows.append(
            {
                "model": name,
                "parameters_m": parameter_count(model) / 1e6,
                "mb_on_disk": weights_mb(evaluation.weight_dirs.get(name)),
                "forward_tokens_per_s": forward_tokens_per_s(
                    model, evaluation.distiller.eval_blocks, batch_size, max_batches
                ),
                "generate_tokens_per_s": speed.get(name, math.nan),
            }
        )
    teacher = next((r for r in rows if r["model"] == TEACHER), None)
    for row in rows:
        if teacher is not None:
            row["size_vs_teacher"] = row["parameters_m"] / teacher["parameters_m"]
            row["speedup_vs_teacher"] = row["forward_tokens_per_s"] / teacher["forward_tokens_per_s"]
    return rows


SIZE_SPEED_PANELS = (  # (column, title, y label) of each panel of plot_size_speed
    ("parameters_m", "size: parameters", "parameters (millions)"),
    ("forward_tokens_per_s", "speed: forward pass", "tokens / s (forward)"),
    ("generate_tokens_per_s", "speed: greedy generation", "new tokens / s (generate)"),
)


def plot_size_speed(rows: list[dict], path: str | Path | None = None):
    """Bar panels, one per measure in ``rows`` (``size_speed_rows``): parameters (M), forward tokens/s and, when
    measured, greedy generation tokens/s; each bar carries its value, a missing one reads "n/a"."""
    from matplotlib.figure import Figure

    names = [r["model"] for r in rows]
    panels = [p for p in SIZE_SPEED_PANELS if any(math.isfinite(float(r.get(p[0], math.nan))) for r in rows)]
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.8), layout="constrained")
    for index, (column, title, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        values = [float(r.get(column, math.nan)) for r in rows]
        bars = ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(names)])
        for bar, value in zip(bars, values):
            finite = math.isfinite(value)
            ax.annotate(
                (f"{value:,.0f}" if value >= 100 else f"{value:.3g}") if finite else "n/a",
                xy=(bar.get_x() + bar.get_width() / 2, value if finite else 0.0),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=9,
            )
        ax.margins(y=0.12)  # room for the values above the bars
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Size and speed (same device, same held-out blocks)", fontsize=12)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


# ---- model card ------------------------------------------------------------------------------------------
CARD_CONFIG_KEYS = (
    "teacher_model",
    "student_model",
    "dataset",
    "dataset_config",
    "dataset_subset_size",
    "max_length",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "num_epochs",
    "max_steps",
    "alpha_kd",
    "alpha_ce",
    "temperature",
    "divergence",
    "kd_top_k",
    "seed",
)


def write_model_card(
    evaluation: Evaluation,
    eval_rows: list[dict],
    size_rows: list[dict] | None = None,
    samples: list[dict] | None = None,
    path: str | Path | None = None,
) -> Path:
    """``student/README.md``: what the student is, the data, the config, and the measured numbers."""
    run_dir, cfg = evaluation.run_dir, evaluation.config
    path = Path(path) if path is not None else run_dir / STUDENT_DIR / "README.md"
    student = next((r for r in eval_rows if r["model"] == STUDENT), {})
    lines = _card_front_matter(cfg)
    lines += _card_data(cfg, _read_json(run_dir / DATA_FILE))
    teacher = evaluation.distiller.teacher_side.describe() if evaluation.distiller.teacher is not None else {}
    lines += _card_training(cfg, _read_json(run_dir / SUMMARY_FILE), teacher)
    lines += _card_results(evaluation, eval_rows, size_rows, samples)
    lines += _card_use_and_limitations(student, run_dir / STUDENT_DIR)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, the hub's repo id form


def _hub_id(reference: str) -> str | None:
    """``reference`` when it is a hub repo id (``owner/name``) and no local path of that name exists, else None
    (local dirs, absolute paths, tiny presets and stdlib corpora are no hub ids)."""
    return reference if HUB_ID.fullmatch(reference) and not Path(reference).exists() else None


def _card_front_matter(cfg: DistillConfig) -> list[str]:
    """The hub's YAML header: library, task, tags, and the base model / dataset when they are hub ids.

    Values are written as JSON strings (valid YAML scalars whatever characters an id holds);
    ``tests/test_report.py`` parses the header with ``yaml.safe_load``."""
    front = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- knowledge-distillation",
        "- kagglekd",
    ]
    if _hub_id(cfg.student_model):
        front.append(f"base_model: {json.dumps(cfg.student_model)}")
    if _hub_id(cfg.dataset):
        front += ["datasets:", f"- {json.dumps(cfg.dataset)}"]
    front.append("---")
    return front


def _card_data(cfg: DistillConfig, data_info: dict) -> list[str]:
    """The title, what was distilled how, and the data section (with the run's ``data.json`` counts)."""
    dataset_line = cfg.dataset + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
    lines = [
        "",
        f"# {cfg.student_model} distilled from {cfg.teacher_model}",
        "",
        f"A causal LM student ({cfg.student_model}) trained with knowledge distillation from the teacher "
        f"{cfg.teacher_model} with kagglekd (KD weight {cfg.alpha_kd}, CE weight {cfg.alpha_ce}, "
        f"temperature {cfg.temperature}, {cfg.divergence}"
        + (f", top-{cfg.kd_top_k} teacher targets" if cfg.kd_top_k else "")
        + ").",
        "",
        "## Data",
        "",
        f"- dataset: {dataset_line}, split `{cfg.dataset_split}`, column `{cfg.text_column}`"
        + (f", first {cfg.dataset_subset_size} documents" if cfg.dataset_subset_size else ""),
        f"- packed into blocks of {cfg.max_length} tokens; {cfg.eval_fraction:.0%} of the documents held out for eval",
    ]
    for key in ("documents", "train_blocks", "eval_blocks", "train_tokens", "eval_tokens"):
        if key in data_info:
            lines.append(f"- {key.replace('_', ' ')}: {data_info[key]}")
    return lines


def _card_training(cfg: DistillConfig, summary: dict, teacher: dict | None = None) -> list[str]:
    """The training section: the run's ``summary.json`` in a sentence, then the key config values."""
    lines = ["", "## Training", ""]
    if summary:
        lines.append(
            f"{summary.get('optimizer_steps')} optimizer steps of {summary.get('planned_steps')} planned, "
            f"{summary.get('train_tokens', 0):,} training tokens, {float(summary.get('wall_time_s', 0)) / 60:.1f} min, "
            f"median {float(summary.get('tokens_per_s', math.nan)):,.0f} tokens/s, "
            f"{summary.get('skipped', 0)} skipped (non-finite) steps."
        )
        lines.append("")
    if teacher:  # which routers and routing the teacher had when these numbers were measured
        lines += [f"Teacher routers: {teacher['teacher_routers']}; routing: {teacher['teacher_routing']}.", ""]
    lines += ["| key | value |", "|---|---|"]
    lines += [f"| {key} | {to_json_text(getattr(cfg, key), indent=None).strip()} |" for key in CARD_CONFIG_KEYS]
    lines += ["", "The full config is `config.json` of the run directory; the LR plan is `plan.json`."]
    return lines


def _card_results(
    evaluation: Evaluation, eval_rows: list[dict], size_rows: list[dict] | None, samples: list[dict] | None
) -> list[str]:
    """Held-out perplexity and agreement, then size and speed and sample generations when given."""
    lines = ["", "## Results (held-out blocks)", "", format_table(eval_rows, EVAL_COLUMNS), ""]
    lines.append(
        "Perplexity is exp of the token-weighted mean cross-entropy on the held-out blocks; top-1 agreement "
        "is the fraction of positions where the model's argmax token equals the teacher's."
    )
    if size_rows:
        lines += [
            "",
            "## Size and speed",
            "",
            format_table(size_rows, SIZE_SPEED_COLUMNS),
            "",
            f"Measured on {evaluation.device} ({'fp32' if str(evaluation.device) == 'cpu' else 'as loaded'}).",
        ]
    if samples:
        names = [name for name in evaluation.models]
        lines += ["", "## Sample generations (greedy)", ""]
        for sample in samples:
            lines.append(f"**prompt:** {_one_line(sample['prompt'])}")
            lines.append("")
            lines += [f"- *{name}:* {_one_line(sample.get(name, ''))}" for name in names]
            lines.append("")
    return lines


KAGGLE_WORKING_DIR = Path("/kaggle/working")  # a kernel's saved output; attached elsewhere under /kaggle/input


def _card_use_and_limitations(student: dict, student_dir: Path) -> list[str]:
    """How to load the student from ``student_dir`` (the exported folder, as an absolute path; under
    /kaggle/working also where it appears once the kernel's output is attached), and what the numbers do not show."""
    where = student_dir.resolve()
    use = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if KAGGLE_WORKING_DIR in where.parents:
        relative = where.relative_to(KAGGLE_WORKING_DIR)
        use.append(f"# in another notebook (Add Input > this notebook's output): /kaggle/input/<notebook>/{relative}")
    use += [
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(str(where))})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(str(where))})",
        "```",
    ]
    return [
        "",
        "## Use",
        "",
        *use,
        "",
        "## Limitations",
        "",
        f"Evaluated only on held-out text of the training dataset (student perplexity "
        f"{float(student.get('eval_ppl', math.nan)):.4g}); no downstream benchmarks. A distilled student inherits "
        "the teacher's errors and biases.",
        "",
    ]


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
