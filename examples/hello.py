"""The home page's example: a Bayesian ternary network on 8x8 digits."""

import pyro

import pyro_bqn
from pyro_bqn.data import load_digits
from pyro_bqn.diagnostics import calibration_report

pyro.set_rng_seed(0)
data = load_digits()  # scikit-learn's 8x8 digits, standardised
sizes = [data.num_features, 128, data.num_classes]
model = pyro_bqn.QuantizedMLP(sizes)  # ternary weights, sign activations
guide = pyro_bqn.AutoQuantizedGuide(model)  # a categorical posterior each
x, y = data.x_train, data.y_train
pyro_bqn.fit(model, guide, x, y, epochs=20, kl_weight=1e-2, progress=False)

probs = pyro_bqn.predict(model, guide, data.x_test)  # sampling-free, (N, 10)
report = calibration_report(probs, data.y_test)
print({key: round(report[key], 3) for key in ("accuracy", "nll", "ece")})
network = pyro_bqn.export_network(model, guide, x[:8], batch_norm_data=x)
print(f"{network.size_bytes()} bytes, bits: {network.bits_per_weight()}")
