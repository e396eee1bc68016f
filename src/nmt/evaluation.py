"""The evaluate stage: decode the test split, score it, write reports, log them to the train run.

Scoring (`nmt.metrics`) is corpus-level sacrebleu (BLEU, chrF, TER) on detokenised text against
*every* reference of each distinct test source (the split groups all translations of an English
sentence, see `nmt.data.vectorize`).

Reports (`reports_dir`):
    metrics.json        the headline numbers a user compares (`HEADLINE`: BLEU beam and greedy,
                        chrF, TER, sentences/s beam and greedy): the DVC metrics
    details.json        everything else: sacrebleu signatures, counts, decode seconds and
                        tokens/s, length-cap hits, device, threads, shortlist, precision
    bleu_by_length.csv  BLEU (beam and greedy) per source-length bucket (DVC plot)
    samples.md          the tutorial's examples plus a fixed random sample with references
    hypotheses.txt      best beam hypothesis per distinct test source, in split order
    attention/NN.png    attention heatmaps of the first `heatmaps` sampled sentences
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nmt.checkpoint import ModelDir
from nmt.config import EvaluateConfig
from nmt.data.vectorize import load_split
from nmt.io import atomic_dir, write_json, write_text
from nmt.metrics import corpus_scores
from nmt.shortlist import Shortlist
from nmt.translator import Translation, Translator

log = logging.getLogger(__name__)

TUTORIAL_EXAMPLES = ("Be nice.", "Drop it!", "Get out!")  # from the Keras/PyTorch tutorials
SAMPLE_SEED_SALT = 11  # the sample is drawn with numpy default_rng([seed, SAMPLE_SEED_SALT])


# ------------------------------------------------------------------------------- buckets
def bucket_labels(edges: Sequence[int]) -> list[str]:
    """Labels for source-length buckets, zero-padded so they sort: [5, 10] -> 01-05 06-10 11+."""
    width = len(str(edges[-1] + 1)) if edges else 1
    lows = [1, *(e + 1 for e in edges)]
    labels = [f"{lo:0{width}d}-{hi:0{width}d}" for lo, hi in zip(lows, edges, strict=False)]
    return [*labels, f"{lows[-1]:0{width}d}+"]


def bucket_of(length: int, edges: Sequence[int]) -> int:
    """Index of the bucket holding `length` tokens: bucket i holds (edges[i-1], edges[i]]."""
    return int(np.searchsorted(np.asarray(edges), length, side="left"))


def bleu_by_length(lengths: Sequence[int], references: Sequence[Sequence[str]],
                   systems: dict[str, Sequence[str]], edges: Sequence[int]) -> list[dict]:
    """One row per non-empty bucket: bucket, min/max source tokens, sentences, BLEU per system."""
    labels = bucket_labels(edges)
    index = np.array([bucket_of(n, edges) for n in lengths], dtype=np.int64)
    rows = []
    for b, label in enumerate(labels):
        rows_b = np.flatnonzero(index == b)
        if len(rows_b) == 0:
            continue
        refs = [references[i] for i in rows_b]
        row: dict[str, object] = {
            "bucket": label, "min_src_tokens": int(min(lengths[i] for i in rows_b)),
            "max_src_tokens": int(max(lengths[i] for i in rows_b)), "sentences": len(rows_b)}
        for name, hyps in systems.items():
            row[name] = corpus_scores([hyps[i] for i in rows_b], refs, ("bleu",))["bleu"]
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------- decode
@dataclass(frozen=True)
class Decoded:
    """Translations of one decoding pass with its speed."""

    translations: list[Translation]
    seconds: float

    @property
    def best(self) -> list[str]:
        return [t.text for t in self.translations]

    def metrics(self, suffix: str) -> dict[str, float]:
        n = sum(1 for t in self.translations if t.source)
        tokens = sum(len(t.tokens[0]) + 1 for t in self.translations if t.source)  # + EOS
        s = max(self.seconds, 1e-9)
        return {f"test/sentences_per_s{suffix}": round(n / s, 2),
                f"test/tokens_per_s{suffix}": round(tokens / s, 1),
                f"test/decode_s{suffix}": round(self.seconds, 3),
                f"test/hit_max_len{suffix}": sum(t.hit_max_len for t in self.translations)}


def decode(translator: Translator, sources: Sequence[str], beam_size: int) -> Decoded:
    """Translate with `beam_size` (1 = greedy) and the translator's batch size, timed."""
    start = time.perf_counter()
    out = translator.translate(list(sources), beam_size=beam_size, nbest=1)
    return Decoded(out, time.perf_counter() - start)


# ------------------------------------------------------------------------------- reports
def _sample_indices(n: int, size: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, SAMPLE_SEED_SALT])
    return sorted(rng.choice(n, size=min(size, n), replace=False).tolist())


def samples_markdown(examples: Sequence[str], example_out: tuple[Decoded, Decoded],
                     sources: Sequence[str], references: Sequence[Sequence[str]],
                     picked: Sequence[int], test_out: tuple[Decoded, Decoded],
                     beam_size: int, seed: int) -> str:
    """samples.md: examples (beam and greedy), then sampled test sentences with references."""
    beam, greedy = example_out
    lines = ["# Test translations", "",
             f"Beam search (beam {beam_size}) and greedy decoding of the tutorial's examples and "
             f"of {len(picked)} test sentences drawn with seed {seed}.", "", "## Examples", ""]
    for i, src in enumerate(examples):
        lines += [f"- **{src}**", f"  - beam: {beam.translations[i].text}",
                  f"  - greedy: {greedy.translations[i].text}"]
    lines += ["", "## Test sentences", ""]
    beam, greedy = test_out
    for k, i in enumerate(picked, 1):
        t = beam.translations[i]
        flags = "".join([" (cut at length cap)" if t.hit_max_len else "",
                         " (source truncated)" if t.truncated else ""])
        lines += [f"{k}. **{sources[i]}**", f"   - beam: {t.text}{flags}",
                  f"   - greedy: {greedy.translations[i].text}"]
        lines += [f"   - reference: {r}" for r in references[i]]
    return "\n".join(lines) + "\n"


def save_heatmap(path: Path, weights: np.ndarray, src_labels: list[str],
                 trg_labels: list[str], title: str) -> None:
    """Attention heatmap PNG: output pieces (rows) against source pieces (columns).

    Uses the Agg canvas directly (no pyplot global state), so it is safe in any process.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = weights.shape
    fig = Figure(figsize=(max(4.0, 0.45 * cols + 2), max(3.0, 0.4 * rows + 1.5)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), src_labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(rows), trg_labels, fontsize=8)
    ax.set_xlabel("source pieces")
    ax.set_ylabel("output pieces")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_heatmaps(folder: Path, translator: Translator, sources: Sequence[str],
                   translations: Sequence[Translation]) -> list[Path]:
    """Replace `folder` with one PNG per translation (names 00.png, 01.png, ...)."""
    written = []
    with atomic_dir(folder) as tmp:
        for k, (src, t) in enumerate(zip(sources, translations, strict=True)):
            name = f"{k:02d}.png"
            save_heatmap(tmp / name, t.attention.numpy(), translator.source_pieces(src),
                         translator.target_pieces(t.tokens[0]),
                         f"{_clip(src)}\n{_clip(t.text)}")
            written.append(folder / name)
    return written


def _clip(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    fields = list(rows[0]) if rows else ["bucket", "sentences"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


# -------------------------------------------------------------------------------- stage
def evaluate(cfg: EvaluateConfig, seed: int, model_dir: Path, processed_dir: Path,
             reports_dir: Path, examples: Sequence[str] = TUTORIAL_EXAMPLES,
             device: str = "cpu") -> dict[str, float | str]:
    """Decode and score the test split, write `reports_dir`, log all of it to the train run.

    The decoding settings come from `cfg.search` (params.yaml), the model's maximum source length
    from the model folder's own config. Returns every metric (metrics.json + details.json).
    Raises FileNotFoundError (model folder, run.json or test split missing) and
    tracking.TrackingError (store unreachable) before anything is decoded.
    """
    model_dir, reports_dir = Path(model_dir), Path(reports_dir)
    run_json = ModelDir(model_dir).run_file
    base = Translator.from_model_dir(model_dir, device=device, precision="fp32")
    if not run_json.is_file():
        raise FileNotFoundError(f"{run_json} not found: the model folder has no MLflow run "
                                "to log into; rerun `dvc repro train`")
    from nmt import tracking  # lazily: scoring and reports import without MLflow

    tracking.check_reachable(tracking.read_run_json(run_json).tracking_uri)  # fail before decoding
    translator = Translator(base.model, base.src_tok, base.trg_tok, cfg.search,
                            base.max_src_tokens, base.shortlist)
    sources, references = load_split(processed_dir, "test").references()
    beam_size = cfg.search.beam_size
    log.info("decoding %d distinct test sources (beam %d, then greedy) on %s", len(sources),
             beam_size, device)
    beam, greedy = decode(translator, sources, beam_size), decode(translator, sources, 1)
    metrics = _metrics(sources, references, beam, greedy)
    metrics.update({"decode/device": str(device), "decode/cpu_threads": torch.get_num_threads(),
                    "decode/shortlist": _describe(translator.shortlist),
                    "decode/precision": translator.precision})
    lengths = [len(translator.src_tok.encode(s)) for s in sources]  # before any truncation
    by_length = bleu_by_length(lengths, references, {"bleu": beam.best,
                                                     "bleu_greedy": greedy.best},
                               cfg.length_buckets)
    picked = _sample_indices(len(sources), cfg.sample_size, seed)
    ex_out = (decode(translator, examples, beam_size), decode(translator, examples, 1))
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_json(reports_dir / "metrics.json", {k: metrics[k] for k in HEADLINE})
    write_json(reports_dir / "details.json",
               {k: v for k, v in metrics.items() if k not in HEADLINE})
    _write_csv(reports_dir / "bleu_by_length.csv", by_length)
    write_text(reports_dir / "samples.md", samples_markdown(
        examples, ex_out, sources, references, picked, (beam, greedy), beam_size, seed))
    write_text(reports_dir / "hypotheses.txt", "".join(f"{h}\n" for h in beam.best))
    shown = picked[: cfg.heatmaps]
    write_heatmaps(reports_dir / "attention", translator, [sources[i] for i in shown],
                   [beam.translations[i] for i in shown])
    _log_to_run(run_json, metrics, by_length, cfg, reports_dir)
    log.info("test/bleu %.2f (greedy %.2f), chrF %.2f, TER %.2f; %.1f sentences/s (beam)",
             metrics["test/bleu"], metrics["test/bleu_greedy"], metrics["test/chrf"],
             metrics["test/ter"], metrics["test/sentences_per_s"])
    return metrics


# what `dvc metrics show` / `dvc exp show` list for the evaluate stage (metrics.json)
HEADLINE = ("test/bleu", "test/bleu_greedy", "test/chrf", "test/ter", "test/sentences_per_s",
            "test/sentences_per_s_greedy")


def _describe(shortlist: Shortlist | None) -> str:
    if shortlist is None:
        return "off (full vocabulary)"
    return f"top_k={shortlist.top_k}, frequent={shortlist.frequent}"


def _metrics(sources: Sequence[str], references: Sequence[Sequence[str]], beam: Decoded,
             greedy: Decoded) -> dict[str, float | str]:
    scores = corpus_scores(beam.best, references)
    greedy_scores = corpus_scores(greedy.best, references, ("bleu", "chrf"))
    metrics: dict[str, float | str] = {f"test/{k}" if "/" not in k else k: v
                                       for k, v in scores.items()}
    metrics.update({"test/bleu_greedy": greedy_scores["bleu"],
                    "test/chrf_greedy": greedy_scores["chrf"],
                    "test/sentences": len(sources),
                    "test/references": sum(len(r) for r in references),
                    "test/truncated": sum(t.truncated for t in beam.translations),
                    "test/unk_tokens": sum(t.unk_count for t in beam.translations)})
    metrics.update(beam.metrics(""))
    metrics.update(greedy.metrics("_greedy"))
    return metrics


def _log_to_run(run_json: Path, metrics: dict[str, float | str], by_length: list[dict],
                cfg: EvaluateConfig, reports_dir: Path) -> None:
    """Numbers as metrics, signatures and search settings as tags, the reports as artifacts."""
    numbers = {k: float(v) for k, v in metrics.items() if not isinstance(v, str)}
    numbers.update({f"test/bleu_len_{row['bucket'].replace('+', '_up')}": float(row["bleu"])
                    for row in by_length})  # MLflow metric names allow no "+"
    tags = {k.replace("signature/", "sacrebleu/"): v for k, v in metrics.items()
            if isinstance(v, str)}  # sacrebleu/bleu, ..., decode/device
    tags["evaluate/search"] = json.dumps(asdict(cfg.search), sort_keys=True)
    from nmt import tracking  # lazily: scoring and reports import without MLflow

    with tracking.open_run(run_json) as run:
        run.log_metrics(numbers)
        run.set_tags(tags)
        run.log_artifact(reports_dir, "reports/evaluate")
        log.info("logged test metrics and reports to MLflow run %s", run.ref.run_id)
