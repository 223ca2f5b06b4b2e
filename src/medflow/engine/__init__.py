"""What every trainer and predictor here shares, whatever it trains: the device, threads and
mixed precision (:mod:`.runtime`), processes under torchrun (:mod:`.distributed`), checkpoint
files (:mod:`.checkpoint`), the learning-rate schedule and the weight average
(:mod:`.schedule`) and the training log (:mod:`.logs`).

``segmentation`` and ``synthesis`` both import from here; nothing here imports from them.
"""
