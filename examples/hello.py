"""The home page's example: a Bayesian ternary network on 8x8 digits in a dozen lines."""

import pyro_bqn
from pyro_bqn.data import load_digits
from pyro_bqn.diagnostics import calibration_report

data = load_digits()  # scikit-learn's 8x8 digits, split and standardised
model = pyro_bqn.QuantizedMLP([data.num_features, 128, data.num_classes])  # ternary weights
guide = pyro_bqn.AutoQuantizedGuide(model)  # a categorical posterior over each weight's levels
pyro_bqn.fit(model, guide, data.x_train, data.y_train, epochs=20, kl_weight=1e-2, progress=False)

probs = pyro_bqn.predict(model, guide, data.x_test)  # sampling-free predictive, (N, 10)
report = calibration_report(probs, data.y_test)
print({name: round(value, 3) for name, value in report.items()})
network = pyro_bqn.export_network(model, guide, data.x_train[:8], batch_norm_data=data.x_train)
print(f"most probable network: {network.size_bytes()} bytes, bits {network.bits_per_weight()}")
