"""`MLPGate`: standardisation + one tanh hidden layer, trained in torch, evaluated in numpy."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from expertrag.gate.features import FeatureSpec
from expertrag.gate.models.artifacts import arr, vec
from expertrag.gate.models.base import GateModel
from expertrag.gate.models.scoring import check_binary, standardisation
from expertrag.gate.models.torch_nets import make_torch_net, torch_single_thread


class MLPGate(GateModel):
    """Standardisation + one tanh hidden layer, trained in torch (torch.optim.Adam, BCE with class
    weighting), evaluated in numpy from the exported weights."""

    kind = "mlp"

    def __init__(self, spec: FeatureSpec, hidden: int = 32, epochs: int = 300, lr: float = 0.01,
                 weight_decay: float = 1e-4, class_weight: Literal["balanced", "none"] = "balanced", seed: int = 0):
        super().__init__(spec)
        self.hidden, self.epochs, self.lr, self.weight_decay = int(hidden), int(epochs), float(lr), float(weight_decay)
        self.class_weight, self.seed = class_weight, int(seed)
        self.mean, self.std = np.zeros(spec.dim), np.ones(spec.dim)
        self.w1 = np.zeros((self.hidden, spec.dim))
        self.b1 = np.zeros(self.hidden)
        self.w2 = np.zeros((1, self.hidden))
        self.b2 = np.zeros(1)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        h = np.tanh(((X - self.mean) / self.std) @ self.w1.T + self.b1)
        return h @ self.w2[0] + self.b2[0]

    def fit(self, X: Any, y: Any) -> MLPGate:
        import torch

        X = self._check_X(X)
        yy = check_binary(y, X.shape[0])
        self.mean, self.std = standardisation(X)
        net = make_torch_net("mlp", self.spec.dim, self.hidden, self.seed)
        xt = torch.from_numpy((X - self.mean) / self.std)
        yt = torch.from_numpy(yy.astype(np.float64))
        n_pos = float(yy.sum())
        pw = (len(yy) - n_pos) / n_pos if self.class_weight == "balanced" else 1.0
        sp = torch.nn.functional.softplus  # BCE with logits, pos_weight pw: -log sigmoid(z) = softplus(-z)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        with torch_single_thread():
            for _ in range(self.epochs):
                opt.zero_grad()
                z = net(xt).squeeze(1)
                loss = (pw * yt * sp(-z) + (1 - yt) * sp(z)).mean()
                loss.backward()
                opt.step()
        self.load_torch(net)
        self.decision_threshold, self.calibrator = 0.5, None
        return self

    def load_torch(self, net: Any) -> None:
        """Take the weights of a torch Linear-Tanh-Linear net (see gate.models.torch_nets)."""
        sd = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in net.state_dict().items()}
        self.w1, self.b1, self.w2, self.b2 = sd["0.weight"], sd["0.bias"], sd["2.weight"], sd["2.bias"]

    def _params(self):
        return {"hidden": self.hidden, "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "class_weight": self.class_weight, "seed": self.seed}

    def _tensors(self):
        return {"mean": self.mean, "std": self.std, "w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    @classmethod
    def _restore(cls, spec, params, tensors):
        g = cls(spec, int(params["hidden"]), int(params["epochs"]), float(params["lr"]),
                float(params["weight_decay"]), params["class_weight"], int(params["seed"]))
        h, d = g.hidden, spec.dim
        g.mean, g.std = vec(tensors, "mean", d), vec(tensors, "std", d)
        g.w1, g.b1 = arr(tensors, "w1", (h, d)), vec(tensors, "b1", h)
        g.w2, g.b2 = arr(tensors, "w2", (1, h)), vec(tensors, "b2", 1)
        return g
