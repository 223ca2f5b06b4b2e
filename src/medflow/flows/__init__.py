"""Flow matching for masks: paths, samplers, losses.

Conventions, fixed once for the whole package:

* Time ``t`` lies in [0, 1]; ``t = 0`` is noise, ``t = 1`` is data.
* The path is straight (conditional optimal transport):
  ``x_t = (1 - t) * x0 + t * x1`` with target velocity ``dx_t = x1 - x0``.
* A velocity model is called as ``model(x_t, t, cond) -> velocity`` with ``t`` of shape
  ``(B,)`` and tensors of shape ``(B, C, H, W)``.
* Masks on disk are integer label maps (0 = background). The flow sees them through one pair
  of functions, :func:`mask_to_flow` (one-hot scaled to [-1, 1]) and :func:`flow_to_mask`
  (argmax over channels).
* The diffusion baseline (:mod:`medflow.flows.diffusion`) keeps DDPM's own conventions
  instead: integer steps ``i = 0 .. 999`` from data to noise, ``x_i = sqrt(abar_i) x_start +
  sqrt(1 - abar_i) eps``, and a network that predicts ``eps``.
* Every sampler, flow or diffusion, is called the same way (:class:`~.samplers.Sampler`):
  ``sampler(field, x_noise, cond, steps) -> x_data``, where ``field`` is the network seen
  through its parameterisation (:class:`~.parameterization.FlowField` for a velocity,
  :class:`~.diffusion.EpsilonField` for DDPM noise) and ``cond`` what the field's
  ``condition(image)`` computed once for all steps. The time convention lives in the field
  and the solver: a diffusion sampler walks DDPM's steps down from noise to data, a flow
  sampler integrates ``t`` up from 0 to 1; the caller sees neither. DDPM alone takes one
  more argument, ``noise``, the fresh noise of its ancestral steps.
* ``cond`` belongs to the field, and a sampler passes the same one to every evaluation of an
  integration, so a field may keep the state of one trajectory there: a self-conditioned
  :class:`~.parameterization.FlowField` keeps its last endpoint estimate in it. One ``cond``
  per trajectory (:meth:`~.parameterization.Conditioning.trajectory` starts another on the
  same cached features).
"""

from medflow.flows.encoding import flow_to_mask, flow_to_probs, mask_to_flow
from medflow.flows.paths import LinearPath, PathSample, sample_time
from medflow.flows.samplers import euler, heun, one_step, refine

__all__ = [
    "LinearPath",
    "PathSample",
    "euler",
    "flow_to_mask",
    "flow_to_probs",
    "heun",
    "mask_to_flow",
    "one_step",
    "refine",
    "sample_time",
]
