"""Class anchors: the target site's mean intensity of every label class, estimated from the
unlabelled references, that the aligned images' classes are held to (``synth align
--class-anchor-weight``).

Why: the reward compares image statistics over the tissue with no regard to the masks, so
it is met as well by images whose classes lost their contrast (a flat head with the right
histogram tail) as by images with the target's contrast between the right classes. On both
simulated sites the alignment took the first way: the white-minus-grey gap of the aligned
images fell to 0.09-0.19 (segmenter view, mask-flow masks) against 0.61 / 0.44 on the real
target slabs (docs/ALIGNFLOW.md), so the pairs taught masks the images no longer show.

How, without target labels, two estimates:

* **mixture** (:meth:`ClassAnchors.from_mixture`): the references' tissue intensities (as
  the segmenter sees them, at the model's size) are modelled as a mixture with one Gaussian
  per class, each class's weight fixed at its share of the tissue in the stage-1 batch's
  masks (the anatomy does not change with the site), and EM estimates the means and
  variances, started from the stage-1 images' class means. With the weights fixed,
  overlapping components are not split at the histogram's middle as a free mixture splits
  them: on all eight labelled training slabs of each simulated site at native resolution
  (labels used only to check) the estimate is grey/white 0.02 / 0.50 against the true
  0.04 / 0.47 (site-c) and -0.14 / 0.78 against -0.06 / 0.58 (site-b), where a free
  three-component mixture gives -0.30 / 0.58 on site-c. But at the model's 64 x 64 the
  classes blur into each other (site-c's training slices in that view: 0.32 / 0.30 against
  the true 0.19 / 0.62), and on K = 5 single reference slices it is too wide (site-c:
  -0.17 / 1.10 in the view; -0.24 / 1.00 even at native resolution, -0.07 / 0.70 with
  K = 10): a slice's class shares are not the anatomy's. Measured once (site-c, seed 0,
  weight 10): the term kept the classes apart (white minus grey 0.57 against 0.19
  without) and the source segmenter read the pairs at 0.81 (0.62 without), but the
  anchors' source-like contrast held the images away from the target (MMD^2 3.60,
  unaligned 3.44) and the segmenter gained nothing (docs/ALIGNFLOW.md).
* **labels** (:meth:`ClassAnchors.from_labels`, ``AlignConfig.anchor_segmenter``): the
  references' class means under the labels a segmenter gives them (its argmax, by
  :func:`medflow.synthesis.align.segmenter_labels`), e.g. the source segmenter trained
  under strong appearance augmentation, which reads the target at about 0.7 Dice: each
  slice's own classes are found where they are, so the slice's shares no longer matter;
  the estimate errs where the segmenter does (benchmarks/anchor_estimate.py measures both
  estimates against the references' true labels).

Experimental, off by default (``class_anchor_weight`` 0).

The anchor term is ``mean over classes and channels of (m_c - a_c)^2``, ``m_c`` the batch's
mean over its pixels of class ``c`` (from each image's mask, within its tissue) and ``a_c``
the anchor; class 0 inside the tissue is the tissue no label covers (fluid, for the brain).
"""

from __future__ import annotations

import torch

EM_ITERATIONS = 100
MIN_VARIANCE = 1e-4


def class_means(
    view: torch.Tensor, fg: torch.Tensor, masks: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the mean of ``view`` over the tissue pixels of each class, pooled over
    the batch, and each class's share of the tissue.

    Args:
        view: ``(B, C, H, W)`` images as the segmenter sees them (differentiable).
        fg: ``(B, 1, H, W)`` bool tissue.
        masks: ``(B, H, W)`` integer labels ``0 .. n_classes - 1``.
        n_classes: number of classes, background (class 0) included.

    Returns:
        ``(means, shares)``: ``means`` ``(C, n_classes)`` (a class with no tissue pixel has
        mean 0), ``shares`` ``(n_classes,)`` summing to 1 (no gradient).
    """
    if masks.shape != (view.shape[0], *view.shape[2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not fit images {tuple(view.shape)}")
    onehot = torch.nn.functional.one_hot(masks.long(), n_classes).permute(0, 3, 1, 2)
    weight = (onehot * fg).to(view.dtype)  # (B, K, H, W)
    counts = weight.sum(dim=(0, 2, 3))  # (K,)
    sums = torch.einsum("bkhw,bchw->ck", weight, view)
    means = sums / counts.clamp_min(1.0)
    return means, (counts / counts.sum().clamp_min(1.0)).detach()


def estimate_anchors(
    values: torch.Tensor, shares: torch.Tensor, init: torch.Tensor, iterations: int = EM_ITERATIONS
) -> torch.Tensor:
    """The class means of a one-dimensional Gaussian mixture fitted by EM to ``values`` with
    the mixing weights held at ``shares`` (module docstring).

    Args:
        values: ``(N,)`` tissue intensities of the references, one channel.
        shares: ``(K,)`` mixing weights (the classes' shares of the tissue), summing to 1,
            or ``(N, K)`` a prior per value (each row summing to 1: e.g. its slice's shares).
        init: ``(K,)`` starting means (stage 1's class means).
        iterations: EM iterations.

    Returns:
        ``(K,)`` the estimated means; a class of weight 0 keeps its starting mean.
    """
    x = values.double()[:, None]
    mu = init.double().clone()
    var = torch.full_like(mu, float(x.var()))
    log_w = shares.double().clamp_min(1e-12).log()
    live = (shares > 0) if shares.dim() == 1 else (shares > 0).any(0)
    for _ in range(iterations):
        log_p = -0.5 * (x - mu) ** 2 / var - 0.5 * var.log() + log_w
        resp = torch.softmax(log_p, dim=1)
        n = resp.sum(0)
        new_mu = (resp * x).sum(0) / n.clamp_min(1e-12)
        mu = torch.where(live, new_mu, mu)
        var = torch.where(
            live, (resp * (x - mu) ** 2).sum(0) / n.clamp_min(1e-12) + MIN_VARIANCE, var
        )
    return mu.to(values.dtype)


def slice_shares(fg: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per tissue pixel of ``fg`` ``(N, 1, H, W)``, the class shares of its slice's tissue
    under ``labels`` ``(N, H, W)``: ``(n_pixels, n_classes)``, in ``view[fg]`` order."""
    onehot = torch.nn.functional.one_hot(labels.long(), n_classes).permute(0, 3, 1, 2)
    counts = (onehot * fg).sum(dim=(2, 3)).double()  # (N, K)
    shares = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
    per_pixel = shares[:, :, None, None].expand(-1, -1, *fg.shape[2:])
    return per_pixel.permute(0, 2, 3, 1)[fg[:, 0]]


class ClassAnchors:
    """The anchor term for one alignment: each class's mean in a batch held to ``anchors``.

    Build it with :meth:`from_mixture` (the references' class means estimated by EM, module
    docstring) or :meth:`from_labels` (their means under labels a segmenter gave them).

    Args:
        anchors: ``(C, n_classes)`` the target's class means, per channel.
        before: ``(C, n_classes)`` stage 1's class means (the record's yardstick).
        shares: ``(n_classes,)`` the classes' shares of stage 1's tissue.
        estimate: how the anchors were estimated ("mixture" or "labels"), for the record.
    """

    def __init__(
        self, anchors: torch.Tensor, before: torch.Tensor, shares: torch.Tensor, estimate: str
    ) -> None:
        if anchors.shape != before.shape:
            raise ValueError(f"anchors {tuple(anchors.shape)} for means {tuple(before.shape)}")
        self.anchors, self.before, self.shares = anchors, before, shares
        self.n_classes = anchors.shape[1]
        self.estimate = estimate

    @classmethod
    def from_mixture(cls, ref_values, view, fg, masks, n_classes: int) -> ClassAnchors:
        """Anchors by the fixed-share mixture (:func:`estimate_anchors`).

        Args:
            ref_values: per channel, the references' tissue intensities ``(N_c,)`` as the
                segmenter sees them.
            view: ``(B, C, H, W)`` a stage-1 batch as the segmenter sees it.
            fg: ``(B, 1, H, W)`` its tissue.
            masks: ``(B, H, W)`` its masks.
            n_classes: number of classes, background included.
        """
        if len(ref_values) != view.shape[1]:
            raise ValueError(f"{len(ref_values)} reference channel(s) for {view.shape[1]}")
        before, shares = class_means(view.detach(), fg, masks, n_classes)
        anchors = torch.stack(
            [
                estimate_anchors(values.to(before), shares, before[c])
                for c, values in enumerate(ref_values)
            ]
        )
        return cls(anchors, before, shares, "mixture")

    @classmethod
    def from_labels(cls, refs, view, fg, masks, n_classes: int) -> ClassAnchors:
        """Anchors as the references' class means under labels given to them (by a
        segmenter: :func:`medflow.synthesis.align.segmenter_labels`); a class the labels
        never give inside the tissue keeps stage 1's mean.

        Args:
            refs: ``(ref_view, ref_fg, ref_labels)``: the references as the segmenter sees
                them ``(N, C, H, W)``, their tissue ``(N, 1, H, W)`` and labels ``(N, H, W)``.
            view, fg, masks, n_classes: the stage-1 batch, as for :meth:`from_mixture`.
        """
        ref_view, ref_fg, ref_labels = refs
        if ref_view.shape[1] != view.shape[1]:
            raise ValueError(f"{ref_view.shape[1]} reference channel(s) for {view.shape[1]}")
        before, shares = class_means(view.detach(), fg, masks, n_classes)
        means, ref_shares = class_means(ref_view.to(before), ref_fg, ref_labels, n_classes)
        anchors = torch.where(ref_shares.to(before.device) > 0, means, before)
        return cls(anchors, before, shares, "labels")

    def __call__(self, view: torch.Tensor, fg: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``mean over classes present and channels of (m_c - a_c)^2`` for a batch."""
        means, shares = class_means(view, fg, masks, self.n_classes)
        present = shares > 0
        return (means - self.anchors.to(means))[:, present].pow(2).mean()

    def record(self) -> dict:
        """Anchors, how they were estimated, stage 1's class means and the class shares, for
        ``align.json``."""
        return {
            "anchors": self.anchors.tolist(),
            "estimate": self.estimate,
            "stage1_means": self.before.tolist(),
            "shares": self.shares.tolist(),
        }
