"""A sweep of interventions on one set of frames: the unmodified run once, then each intervention from
the first layer it changes (:mod:`vggt.prefix`).

::

    runner = InterventionRunner(model, images, query_points)
    reference = runner.run_unmodified(resume_at=[LayerRef("global", 11)])
    for intervention, predictions, kept_share in runner.sweep(interventions):
        ...

Each intervention's predictions are handed out one at a time, so a sweep holds the unmodified run's
predictions, the recorded prefixes still to be used and one intervention's predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack

import numpy as np
import torch
from torch import Tensor

from vggt.capture import LayerRef
from vggt.device import autocast_context
from vggt.geometry.pose_encoding import pose_encoding_to_extri_intri
from vggt.intervention_metrics import RunGeometry
from vggt.interventions import Intervene, Intervention
from vggt.models.hooks import HookSession
from vggt.models.vggt import VGGT
from vggt.prefix import PrefixCache, resume_aggregator, resume_key


class InterventionRunner:
    """Runs VGGT on fixed frames, unmodified and under interventions.

    Parameters
    ----------
    model : VGGT
        With the heads whose predictions are compared (eval mode).
    images : Tensor
        ``[S, 3, H, W]`` in [0, 1] (one batch entry), on the model's device.
    query_points : Tensor, optional
        ``[Q, 2]`` pixel ``(x, y)`` in frame 0 for the track head.
    autocast_dtype : torch.dtype, optional
        Autocast dtype of every run (``None``: the weights' dtype).
    """

    def __init__(
        self,
        model: VGGT,
        images: Tensor,
        query_points: Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.images = images[None] if images.dim() == 4 else images
        self.query_points = query_points
        self.autocast_dtype = autocast_dtype
        self.cache: PrefixCache | None = None

    @property
    def num_frames(self) -> int:
        return self.images.shape[1]

    def _context(self, stack: ExitStack) -> None:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast_context(self.images.device, self.autocast_dtype))

    def run_unmodified(
        self, resume_at: Iterable[LayerRef] = (), sessions: Sequence[HookSession] = ()
    ) -> dict:
        """The unmodified forward pass; records what resuming at each layer of ``resume_at`` needs.

        ``sessions`` (e.g. a :class:`vggt.interventions.KeyImportanceCapture`) are active during it.
        """
        self.cache = PrefixCache(self.model, resume_at, kept_outputs=self.model.head_layers())
        with ExitStack() as stack:
            for session in sessions:
                stack.enter_context(session)
            stack.enter_context(self.cache)
            self._context(stack)
            return self.model(self.images, self.query_points)

    def run(self, interventions: Sequence[Intervention]) -> tuple[dict, float]:
        """Predictions under ``interventions`` (together) and the share of their layers' attention entries
        kept. Starts from the latest recorded layer not after the first edited one, else from scratch."""
        first = min((edit.first_layer() for edit in interventions), key=resume_key, default=None)
        start = None if first is None or self.cache is None else self.cache.resume_point(first)
        with ExitStack() as stack:
            session = stack.enter_context(Intervene(self.model, interventions, self.num_frames))
            self._context(stack)
            if start is None:
                predictions = self.model(self.images, self.query_points)
            else:
                tokens, patch_start_idx = resume_aggregator(
                    self.model.aggregator, self.images, self.cache, start
                )
                predictions = self.model.run_heads(tokens, self.images, patch_start_idx, self.query_points)
        return predictions, session.kept_share

    def sweep(self, interventions: Iterable[Intervention]) -> Iterator[tuple[Intervention, dict, float]]:
        """Run each intervention alone, in the order the forward pass reaches their first layers; a
        recorded prefix is dropped as soon as no intervention left starts at or after it."""
        ordered = sorted(interventions, key=lambda edit: resume_key(edit.first_layer()))
        for position, intervention in enumerate(ordered):
            predictions, kept = self.run([intervention])
            yield intervention, predictions, kept
            if self.cache is not None:
                upcoming = [edit.first_layer() for edit in ordered[position + 1 :]]
                needed = {self.cache.resume_point(ref) for ref in upcoming}
                for ref in list(self.cache.tokens):
                    if ref not in needed:
                        self.cache.release(ref)


def run_geometry(predictions: dict) -> RunGeometry:
    """The geometry of batch entry 0 of VGGT's predictions, as numpy float64."""
    images = predictions["images"]
    height, width = images.shape[-2:]
    extrinsic, intrinsic = pose_encoding_to_extri_intri(predictions["pose_enc"].float(), (height, width))

    def numpy(name: str) -> np.ndarray | None:
        value = predictions.get(name)
        return None if value is None else value[0].detach().float().cpu().numpy().astype(np.float64)

    depth = numpy("depth")
    return RunGeometry(
        extrinsic=extrinsic[0].cpu().numpy().astype(np.float64),
        intrinsic=intrinsic[0].cpu().numpy().astype(np.float64),
        depth=None if depth is None else depth[..., 0],
        world_points=numpy("world_points"),
        track=numpy("track"),
    )
