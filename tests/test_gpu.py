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
    assert (trainer.scaler is not None) == (precision == "fp16")


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


def test_prompt_learners_on_cuda_with_openai_style_fp16_weights():
    pytest.importorskip("open_clip")
    from open_clip.model import convert_weights_to_lp

    from tiny_models import tiny_clip

    names = ["dog", "cat", "golden_retriever"]
    images = torch.randn(4, 3, 32, 32, device="cuda")
    for method, kwargs in [("coop", {}), ("cocoop", {}), ("maple", {"prompt_depth": 2})]:
        clip = tiny_clip(0).cuda().eval()
        convert_weights_to_lp(clip, torch.float16)  # what the papers trained with
        model = vp.attach(clip, method, classnames=names, **kwargs)
        logits = model(images)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        logits.logsumexp(-1).sum().backward()
        trained = list(model.prompt_learner.parameters())
        assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


def test_cocoop_batched_equals_the_loop_on_cuda():
    pytest.importorskip("open_clip")
    from tiny_models import tiny_clip

    model = vp.attach(tiny_clip(0).cuda().eval(), "cocoop", classnames=[f"class {i}" for i in range(50)])
    images = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.forward_loop(images), atol=1e-4, rtol=1e-4)
