"""Evaluation metrics: streaming mIoU, depth errors, panoptic quality, classification accuracy."""

from hbird.metrics.classification import knn_accuracy, mean_per_class_accuracy, top1_accuracy
from hbird.metrics.depth import DepthMetrics, DepthScores
from hbird.metrics.panoptic import PanopticQuality, PanopticScores
from hbird.metrics.protocol import StreamingMetric
from hbird.metrics.segmentation import ConfusionMatrix, SegmentationScores

__all__ = [
    "ConfusionMatrix",
    "DepthMetrics",
    "DepthScores",
    "PanopticQuality",
    "PanopticScores",
    "SegmentationScores",
    "StreamingMetric",
    "knn_accuracy",
    "mean_per_class_accuracy",
    "top1_accuracy",
]
