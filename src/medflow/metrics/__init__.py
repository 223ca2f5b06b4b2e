"""Segmentation quality: overlap (Dice, IoU), surface distances (HD95, ASSD), summaries."""
