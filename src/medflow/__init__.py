"""medflow: flow-matching segmentation (MedFlowSeg) and aligned synthesis for medical images."""

__version__ = "0.1.0"
