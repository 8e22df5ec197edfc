"""Batch normalisation, for tensors and for means and variances."""

from __future__ import annotations

import torch
from pyro.nn import PyroModule

from pyro_bqn.moments import Moments, split_moments

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _MomentBatchNorm:
    """The moment rule shared by :class:`BatchNorm1d` and :class:`BatchNorm2d`; mixed in
    before the torch class, whose ``forward`` handles tensors."""

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`, with channels in
        dimension 1.
        :returns: the same kind and shape as ``x``."""
        mean, var = split_moments(x)
        if var is None:
            return super().forward(x)
        self._check_input_dim(x)
        return Moments(*self._normalize_moments(mean, var))

    def _update_factor(self) -> float:
        # Mirrors torch's _BatchNorm.forward: count the batch, and momentum=None means a
        # cumulative average.
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _normalize_moments(
        self, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self._update_factor()
        dims = [0, *range(2, mean.dim())]
        channel_shape = (1, -1) + (1,) * (mean.dim() - 2)
        if self.training or self.running_mean is None:
            count = mean.numel() // mean.shape[1]
            if self.training and count <= 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input of "
                    f"shape {tuple(mean.shape)}"
                )
            batch_mean = mean.mean(dims)
            centred = mean - batch_mean.view(channel_shape)
            between = centred.square().mean(dims)
            within = var.mean(dims)
            norm_var = between + within
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    # Bessel's correction belongs to the spread of the means only: the
                    # within-unit variances are exact, not estimated from the batch.
                    unbiased = within + between * (count / (count - 1))
                    self.running_mean.mul_(1.0 - factor).add_(batch_mean, alpha=factor)
                    self.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)
        else:
            centred = mean - self.running_mean.view(channel_shape)
            norm_var = self.running_var
        scale = torch.rsqrt(norm_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        out_mean = centred * scale.view(channel_shape)
        if self.bias is not None:
            out_mean = out_mean + self.bias.view(channel_shape)
        return out_mean, var * scale.square().view(channel_shape)


_DOC = """Batch normalisation over {shape} input, as :class:`torch.nn.{name}`.

    Same arguments, parameters (``weight`` = gamma, ``bias`` = beta; Pyro parameters here)
    and buffers as torch's module, whose documentation applies.

    * **Tensor in**: exactly torch's batch norm (training: batch statistics and a
      running-statistics update; evaluation: running statistics).
    * **Moments in** (``h ~ N(mu, s^2)``, independent entries), in training, per channel
      over the batch{spatial}::

          m = mean(mu),  v = mean((mu - m)^2 + s^2)
          mu' = gamma (mu - m) / sqrt(v + eps) + beta,  s'^2 = gamma^2 s^2 / (v + eps)

      ``m`` and ``v`` are the mean and variance of the batch's mixture of Gaussians (law of
      total variance): the statistics torch's batch norm would see on a batch of infinitely
      many samples from the input moments. The running statistics are updated with ``m``
      and ``mean(s^2) + n / (n - 1) * mean((mu - m)^2)`` (``n`` values per channel: unbiased
      like torch's, and equal to it when ``s^2 = 0``). In evaluation the running
      statistics replace ``m`` and ``v``.

    **Running statistics.** Moment-mode training accumulates statistics of the moment
    network. A sampled or most-probable network has different activation statistics: call
    :meth:`reset_running_stats`, then run that network in training mode over some batches
    under ``torch.no_grad()`` (``momentum=None`` gives their plain average) before
    evaluating.
    """


class BatchNorm1d(_MomentBatchNorm, PyroModule[torch.nn.BatchNorm1d]):
    __doc__ = _DOC.format(
        shape="``(N, C)`` or ``(N, C, L)``", name="BatchNorm1d", spatial=" (and ``L``)"
    )


class BatchNorm2d(_MomentBatchNorm, PyroModule[torch.nn.BatchNorm2d]):
    __doc__ = _DOC.format(
        shape="``(N, C, H, W)``", name="BatchNorm2d", spatial=" and the spatial dimensions"
    )
