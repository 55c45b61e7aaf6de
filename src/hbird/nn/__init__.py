"""Layers for long-range backbones (Wang 2021, thesis chapters 2-3), as plain ``nn.Module`` s.

* :mod:`hbird.nn.axial`: position-sensitive axial attention (eq. 3.3-3.4) and the axial
  bottleneck block;
* :mod:`hbird.nn.axial_resnet`: Axial-ResNet S/M/L/XL, its output-stride-16
  Axial-DeepLab backbone and the tiny seeded ``test_axial``;
* :mod:`hbird.nn.elastic`: ELASTIC scale policies (eq. 2.3) in ResNe(X)t bottlenecks,
  ELASTIC-ResNeXt-50, sELASTIC, ELASTIC-ResNet-50 and the tiny seeded ``test_elastic``.
* :mod:`hbird.nn.dual_path`: MaX-DeepLab's dual-path transformer block (pixel path +
  global memory; P2P, P2M eq. 4.13, M2P + M2M eq. 4.14, memory FFN).

Models here know nothing of hbird's encoders; ``hbird.encoders.conv_backbone`` puts any
backbone exposing stages behind the encoder contract. Nothing is imported eagerly.
"""
