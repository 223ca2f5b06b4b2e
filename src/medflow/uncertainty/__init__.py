"""Ensembles of noise draws and what they say about a prediction.

* :mod:`~medflow.uncertainty.fusion`: running statistics of ``S`` soft masks (one noise
  draw each), fused by their mean or by majority vote;
* :mod:`~medflow.uncertainty.maps`: per-pixel variance across samples and predictive
  entropy, and one number per case;
* :mod:`~medflow.uncertainty.calibration`: expected calibration error and the AUROC with
  which uncertainty ranks error pixels.

Everything here is plain array code: no files, no models (docs/UNCERTAINTY.md).
"""
