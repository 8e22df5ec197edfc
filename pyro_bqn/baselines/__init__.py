"""Plain-PyTorch baselines for benchmarking the sampling-free Bayesian quantized network.

All are built in the shapes of :mod:`pyro_bqn.architectures` (:class:`Network`; an MLP
or a LeNet-style CNN) and share one training loop (:func:`train`) and one predictive
helper (:func:`predict_proba`):

* :func:`float_mlp` — the full-precision network (Linear / BatchNorm / ReLU);
* :func:`ste_mlp` — a deterministic quantized network trained with the straight-through
  estimator (:func:`train_ste`);
* :func:`binarized_network` — Binarized Neural Networks (Hubara et al. 2016): binary
  weights and activations (:func:`train_binarized`);
* :func:`fit_ensemble` — E-QNN, a bootstrap ensemble of STE networks;
* :class:`BayesBiNN` — the Bayesian learning rule for binary weights
  (:func:`bayesbinn_mlp`, :func:`train_bayesbinn`, :func:`bayesbinn_predict_proba`);
* :class:`GaussianBNN` — a Gaussian mean-field Bayesian network with real weights, written
  in Pyro (:class:`AutoNormalAnalyticKL`, :func:`train_gaussian_bnn`,
  :func:`gaussian_bnn_predict_proba`).
"""

from pyro_bqn.baselines.bayesbinn import (
    AUTHORS_EPS,
    BAYESBINN_ACTIVATIONS,
    GRADIENT_SCALES,
    PREDICTION_MODES,
    BayesBiNN,
    bayesbinn_mlp,
    bayesbinn_network,
    bayesbinn_predict_proba,
    continue_bayesbinn,
    split_binary_parameters,
    train_bayesbinn,
)
from pyro_bqn.baselines.binarized import binarized_mlp, binarized_network, train_binarized
from pyro_bqn.baselines.ensemble import QuantizedEnsemble, fit_ensemble
from pyro_bqn.baselines.float_mlp import float_mlp
from pyro_bqn.baselines.gaussian_bnn import (
    AutoNormalAnalyticKL,
    GaussianBNN,
    gaussian_bnn_predict_proba,
    train_gaussian_bnn,
)
from pyro_bqn.baselines.mlp import MLP, LogitScale, Network, mlp_architecture
from pyro_bqn.baselines.ste import (
    LR_SCHEDULES,
    SignSTE,
    STEConv2d,
    STELinear,
    STEWeight,
    clip_latent_weights_,
    export_quantized_weights,
    glorot_lr_scale,
    quantize_ste,
    sign_ste,
    ste_layers,
    ste_mlp,
    ste_network,
    train_ste,
    train_with_lr_schedule,
)
from pyro_bqn.baselines.training import predict_proba, train

__all__ = [
    "AUTHORS_EPS",
    "BAYESBINN_ACTIVATIONS",
    "GRADIENT_SCALES",
    "LR_SCHEDULES",
    "PREDICTION_MODES",
    "MLP",
    "Network",
    "AutoNormalAnalyticKL",
    "BayesBiNN",
    "GaussianBNN",
    "LogitScale",
    "QuantizedEnsemble",
    "STEConv2d",
    "STELinear",
    "STEWeight",
    "SignSTE",
    "bayesbinn_mlp",
    "bayesbinn_network",
    "binarized_mlp",
    "binarized_network",
    "bayesbinn_predict_proba",
    "clip_latent_weights_",
    "continue_bayesbinn",
    "export_quantized_weights",
    "fit_ensemble",
    "float_mlp",
    "glorot_lr_scale",
    "mlp_architecture",
    "gaussian_bnn_predict_proba",
    "predict_proba",
    "quantize_ste",
    "sign_ste",
    "split_binary_parameters",
    "ste_layers",
    "ste_mlp",
    "ste_network",
    "train",
    "train_bayesbinn",
    "train_binarized",
    "train_gaussian_bnn",
    "train_ste",
    "train_with_lr_schedule",
]
