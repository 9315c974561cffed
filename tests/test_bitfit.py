"""BitFit: which tensors train, and that the delta parametrization trains exactly like the bias."""

from __future__ import annotations

import torch

import visionpeft as vp
from visionpeft.method import get_state

from toy import toy_inputs, toy_net


def test_every_bias_and_the_head_train():
    model = toy_net()
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith("head"))
    head = sum(p.numel() for p in model.head.parameters())
    adapted = vp.attach(model, "bitfit")
    assert vp.summary(adapted)["trainable"] == biases + head
    keys = set(get_state(adapted).adapters["default"].method.trained_tensors(adapted))
    assert "blocks.0.fc1.bias.delta" in keys and "norm.bias.delta" in keys and "head.weight" in keys


def test_pattern_selects_a_subset():
    adapted = vp.attach(toy_net(), "bitfit", bias_pattern=r"blocks\.\d+\.fc1\.bias", train_head=False)
    keys = set(get_state(adapted).adapters["default"].method.trained_tensors(adapted))
    assert keys == {"blocks.0.fc1.bias.delta", "blocks.1.fc1.bias.delta"}


def test_training_the_delta_equals_training_the_bias():
    x, target = toy_inputs(), torch.randn(4, 3)
    plain = toy_net()
    for n, p in plain.named_parameters():
        p.requires_grad_(n.endswith("bias"))  # without a head copy, the head's bias is a bias like others
    adapted = vp.attach(toy_net(), "bitfit", train_head=False)
    for model in (plain, adapted):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), target).backward()
            opt.step()
    assert torch.allclose(plain(x), adapted(x), atol=1e-6)
    merged = vp.merge(adapted)
    for (n, a), b in zip(plain.named_parameters(), merged.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n


def test_submodules_the_host_never_trains_are_left_alone():
    from visionpeft.hosts import Host, register_host, unregister_host

    class Encoded(torch.nn.Module):
        """A trainable trunk behind a frozen encoder, like Stable Diffusion's UNet behind its VAE."""

        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(8, 8)
            self.trunk = torch.nn.Linear(8, 3)

        def forward(self, x):
            with torch.no_grad():
                x = self.encoder(x)
            return self.trunk(x)

    register_host(Host("test.Encoded", lambda m: isinstance(m, Encoded), untrained=("encoder",)))
    try:
        adapted = vp.attach(Encoded(), "bitfit")
        keys = set(get_state(adapted).adapters["default"].method.trained_tensors(adapted))
        assert keys == {"trunk.bias.delta"}
        adapted(torch.randn(2, 8)).sum().backward()
        assert adapted.trunk.parametrizations.bias[0].deltas["default"].grad is not None
    finally:
        unregister_host("test.Encoded")
