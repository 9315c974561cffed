"""Checks that need a CUDA GPU (skipped without one): mixed precision as users run it."""

from __future__ import annotations

import pytest
import torch

import visionpeft as vp
from visionpeft.runconfig import TrainConfig
from visionpeft.train import Trainer

from test_trainer import NetTask, net_host  # noqa: F401  (the autouse fixture registers the host)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_keeps_fp32_trained_tensors(precision, tmp_path):
    train = TrainConfig(max_steps=30, batch_size=8, lr=1e-2, precision=precision, progress=False, log_every=5)
    trainer = Trainer(NetTask(), train, tmp_path)
    result = trainer.fit()
    assert result["step"] == 30 and torch.isfinite(torch.tensor(result["loss"]))
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    # fp16 trains with loss scaling; bf16 needs none.
    assert (trainer.accelerator.scaler is not None) == (precision == "fp16")


def test_vit_methods_run_under_bf16_autocast_on_cuda():
    from tiny_models import tiny_vit

    images = torch.randn(4, 3, 32, 32, device="cuda")
    for method, kwargs in [("vpt", {"num_tokens": 4, "deep": True}), ("adaptformer", {"bottleneck": 8}),
                           ("lora", {})]:
        model = vp.attach(tiny_vit(0).cuda(), method, **kwargs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images).float().square().mean()
        loss.backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
