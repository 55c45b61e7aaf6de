"""The retrieval protocol (Balazevic et al. 2023, §4 and appendix A).

Prompt = a dataset's training split, queries = its validation split. The prompt is
encoded into a memory bank (sampled, augmented), each query is predicted by eq. 1 and
scored at its original resolution with a streaming metric. With a run folder, the bank
and every finished query batch are kept, so an interrupted run resumes where it stopped.
Under ``torchrun`` the ranks build the bank together and split the queries; rank 0 alone
writes the run folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hbird import distributed
from hbird.data.pairs import DatasetPairs
from hbird.encoders import Encoder
from hbird.errors import InputError
from hbird.eval.config import EvalConfig
from hbird.eval.inputs import prepare
from hbird.eval.report import Report, save_picture
from hbird.eval.scoring import Scored, new_metric, score_queries, scores_from_metric
from hbird.io.files import write_json
from hbird.predictor import InContextPredictor
from hbird.specs import RUNTIME_SEARCH

# settings that may change between a run and its resumption without changing its numbers
RESUMABLE_CHANGES = {"overlays", "max_queries", *RUNTIME_SEARCH}


def check_run_folder(out: Path, cfg: EvalConfig, dataset: str) -> dict[str, Any]:
    """Refuse a run folder holding a run with other settings; return this run's record
    (written as ``config.json`` once the run has a result: a failed start writes none)."""
    record = {"config": cfg.to_dict(), "dataset": dataset}
    path = out / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(
            k
            for k in set(old["config"]) | set(record["config"])
            if k not in RESUMABLE_CHANGES and old["config"].get(k) != record["config"].get(k)
        )
        if changed or old.get("dataset") != dataset:
            raise InputError(
                f"{out} holds a run with other settings ({', '.join(changed) or 'dataset'} differ); "
                "choose a new --out folder, or delete this one to start over"
            )
    return record


def fitted_predictor(
    cfg: EvalConfig,
    encoder: str | Encoder | None,
    prompt: Any,
    out: Path | None,
    progress: bool,
    bank_folder: str = "bank",
) -> InContextPredictor:
    """A predictor fitted on ``prompt``; with a run folder its bank is ``out/bank_folder``,
    built once (resumably) and loaded when the run is resumed."""
    kwargs = cfg.predictor_kwargs()
    if encoder is not None:
        kwargs["encoder"] = encoder
    predictor = InContextPredictor(**kwargs, progress=progress and distributed.is_main())
    if out is None:
        return predictor.fit_dataset(prompt)
    bank = out / bank_folder
    if not (bank / "manifest.json").is_file():
        predictor.build_bank(DatasetPairs(prompt), prompt.label_spec, bank)
        kwargs["encoder"] = predictor.encoder_  # built once
    # rank 0 first, as it alone keeps a built index in the bank; a sharded bank: together
    turns = ("all",) if cfg.shard_bank else ("main", "others")
    for turn in turns:
        if turn == "all" or (turn == "main") == distributed.is_main():
            loaded = InContextPredictor.load(
                bank,
                encoder=kwargs["encoder"],
                device=cfg.device,
                progress=progress and distributed.is_main(),
                index_params=cfg.index_params,
                batch_size=cfg.batch_size,
                shard_bank=cfg.shard_bank,
            )
        distributed.barrier()
    loaded.timings = predictor.timings
    return loaded


def score_run(
    predict: Any,
    queries: Any,
    metric: Any,
    cfg: EvalConfig,
    timings: Any,
    out: Path | None,
    draw: Any,
    build_seconds: float,
    progress: bool,
) -> Scored:
    """:func:`score_queries` as a protocol runs it: ``cfg``'s batch size, query limit and
    picture count; with a run folder, its ``progress.json`` and ``draw(query, prediction)``
    pictures; the memory's build seconds kept for a resumed run."""
    return score_queries(
        predict,
        queries,
        metric,
        batch_size=cfg.batch_size,
        limit=cfg.max_queries,
        timings=timings,
        overlay=None if out is None else draw,
        overlays=cfg.overlays,
        progress_file=None if out is None else out / "progress.json",
        extra={"build_memory": build_seconds},
        progress=progress,
        workers=cfg.workers,
    )


def run_timings(scored: Scored) -> dict[str, float]:
    """The memory's build seconds (the first run's when resumed, not this run's bank
    loading) and the seconds per query of every stage."""
    return {
        "build_memory": scored.extra["build_memory"],
        **{f"per_query_{k}": v / max(scored.done, 1) for k, v in scored.seconds.items()},
    }


def evaluate(
    encoder: str | Encoder | None,
    dataset: str | tuple[Any, Any],
    out: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    prompt_indices: list[int] | None = None,
    progress: bool = True,
    **config: Any,
) -> Report:
    """Run the retrieval protocol; write the run folder if ``out`` is given.

    Args:
        encoder: a registry name or an :class:`Encoder` (None: ``config['encoder']``).
        dataset: a spec string (``"voc:root=/data/VOC2012"``) or ``(prompt, queries)``.
        out: run folder (config, bank, progress, metrics, summary, pictures).
        preset: a preset name (``hummingbird``, ``hummingbird_lowdata``) or YAML path.
        overrides, **config: :class:`EvalConfig` fields (``k=50``...).
        prompt_indices: evaluate with this subset of the prompt (few-shot fractions).
    """
    cfg, prompt, queries, description = prepare(
        encoder, dataset, preset, overrides, config, prompt_indices
    )
    out = Path(out) if out is not None else None
    if out is not None:
        record = check_run_folder(out, cfg, description)
    start = time.perf_counter()
    predictor = fitted_predictor(
        cfg, encoder if isinstance(encoder, Encoder) else None, prompt, out, progress
    )
    if out is not None and distributed.is_main():  # the bank is the run's first result
        write_json(out / "config.json", record)
    build_seconds = time.perf_counter() - start
    predictor.timings.reset()
    predictor.progress = False
    spec = predictor.label_spec_
    scored = score_run(
        predictor.predict_dense,
        queries,
        new_metric(spec),
        cfg,
        predictor.timings,
        out,
        lambda q, p: save_picture(out, q, p, spec),
        build_seconds,
        progress,
    )
    metrics, per_class, notes = scores_from_metric(scored.metric)
    skipped = [*getattr(prompt, "skipped_files", []), *getattr(queries, "skipped_files", [])]
    if skipped:
        notes.append(f"Skipped {len(skipped)} unusable file(s) (skip_bad): {'; '.join(skipped)}")
    report = Report(
        task=spec.task,
        dataset=description,
        metrics=metrics,
        per_class=per_class,
        config=cfg.to_dict(),
        counts={
            "prompt_images": len(prompt),
            "memory_entries": predictor.index_.ntotal if cfg.shard_bank else len(predictor.bank_),
            "queries": scored.done,
        },
        timings=run_timings(scored),
        notes=notes,
        pictures=scored.overlays,
        search=predictor.index_.describe(),
    )
    if out is not None and distributed.is_main():
        report.write(out)
    return report
