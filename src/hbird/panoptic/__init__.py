"""Panoptic segmentation pieces shared by retrieval and the specialists (issue 13).

* :mod:`~hbird.panoptic.targets`: Panoptic-DeepLab's training targets from an instance
  map: instance centres of mass, the centre heatmap (a Gaussian, σ = 8 px, at each
  centre) and the per-pixel offsets to the centre;
* :mod:`~hbird.panoptic.grouping`: thing pixels → instances, by connected components
  or Panoptic-DeepLab's grouping (centres, NMS by max-pooling, each thing pixel to the
  nearest centre through its offset, majority-vote classes, area limits);
* :mod:`~hbird.panoptic.retrieval`: in-context panoptic prediction (eq. 1 for the
  semantic map and for the offsets, then grouping);
* :mod:`~hbird.panoptic.losses`: MaX-DeepLab's PQ-style loss (Dice, Hungarian
  matching, L_pos / L_neg) and its auxiliary losses, as pure functions.
* :mod:`~hbird.panoptic.max_deeplab`: the MaX-DeepLab specialist (``max-deeplab``):
  dual-path transformer, mask and class heads, the thesis' inference rules.
"""
