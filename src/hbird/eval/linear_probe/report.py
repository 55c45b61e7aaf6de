"""The linear probe's report: a :class:`~hbird.eval.report.Report` with its own heading."""

from __future__ import annotations

from dataclasses import asdict

from hbird.eval.config import EvalConfig
from hbird.eval.linear_probe.patches import PatchTable
from hbird.eval.linear_probe.settings import ProbeSettings
from hbird.eval.report import Report, fmt, layers_text
from hbird.eval.scoring import Scored, scores_from_metric
from hbird.labelspec import LabelSpec


class LinearProbeReport(Report):
    """A :class:`Report` whose heading describes the linear probe's settings."""

    def heading(self) -> list[str]:
        cfg, probe = self.config, self.config.get("linear_probe", {})
        return [
            f"# Linear probe: {cfg.get('encoder')} on {self.dataset}",
            "",
            f"Linear head on frozen patch features (layers {layers_text(cfg.get('layers'))}, input short side "
            f"{cfg.get('image_size')}), trained with SGD (momentum {probe.get('momentum')}, lr {probe.get('lr')}, "
            f"{probe.get('schedule')} schedule, weight decay {probe.get('weight_decay')}) for {probe.get('epochs')} "
            f"epoch(s) over mini-batches of {probe.get('patch_batch_size')} patches, seed {probe.get('seed')}; "
            "no augmentation. Query logits are upsampled bilinearly before the argmax.",
            f"Prompt: {self.counts.get('prompt_images')} images → {self.counts.get('train_patches')} labelled patches "
            f"({fmt(self.counts.get('cache_bytes', 0) / 2**20, 1)} MiB cached); queries scored: "
            f"{self.counts.get('queries')} at their original resolution.",
        ]


def probe_report(
    spec: LabelSpec,
    description: str,
    cfg: EvalConfig,
    settings: ProbeSettings,
    table: PatchTable,
    losses: list[float],
    scores: Scored,
    timings: dict[str, float],
) -> LinearProbeReport:
    """The report of one probe, from its patch table, training losses and scored queries."""
    metrics, per_class, notes = scores_from_metric(scores.metric)
    metrics = {**metrics, "train_loss": losses[-1], "train_loss_per_epoch": losses}
    done = max(scores.done, 1)
    return LinearProbeReport(
        task=spec.task,
        dataset=description,
        metrics=metrics,
        per_class=per_class,
        config={**cfg.to_dict(), "protocol": "linear", "linear_probe": asdict(settings)},
        counts={
            "prompt_images": int(table.seconds.numel()),
            "train_patches": len(table),
            "cache_bytes": table.nbytes,
            "queries": scores.done,
        },
        timings={**timings, **{f"per_query_{k}": v / done for k, v in scores.seconds.items()}},
        notes=notes,
        pictures=scores.overlays,
    )
