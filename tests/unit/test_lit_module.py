"""Loss, schedules, BLEU helper, runtime config checks and weights-only hyperparameters."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from nmt.config import ConfigError, Params
from nmt.lit_module import LrSchedule, Seq2SeqModule, sequence_loss
from nmt.specials import PAD_ID
from nmt.training import check_runtime


def test_loss_ignores_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 11)
    target = torch.tensor([[5, 6, 7]])
    padded_logits = torch.cat([logits, torch.randn(1, 4, 11) * 100], dim=1)  # garbage after end
    padded_target = torch.cat([target, torch.full((1, 4), PAD_ID)], dim=1)
    for eps in (0.0, 0.1):
        assert torch.allclose(sequence_loss(logits, target, eps),
                              sequence_loss(padded_logits, padded_target, eps))


def test_loss_is_label_smoothed_cross_entropy_summed_over_tokens() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 9), torch.randint(4, 9, (2, 4))
    target[1, 2:] = PAD_ID
    eps = 0.2
    logp = logits.log_softmax(-1)
    keep = target != PAD_ID
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    expected = (((1 - eps) * nll - eps * logp.mean(-1)) * keep).sum()
    assert torch.allclose(sequence_loss(logits, target, eps), expected, atol=1e-5)
    assert torch.allclose(sequence_loss(logits, target) / keep.sum(),
                          F.cross_entropy(logits[keep], target[keep]))


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_gradient_matches_pytorchs_cross_entropy(eps: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 50) * 4).to(dtype)
    target = torch.randint(4, 50, (3, 5))
    target[0, 3:] = PAD_ID
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = sequence_loss(ours, target, eps) * 0.5
        expected = F.cross_entropy(ref.flatten(0, 1).float(), target.flatten(),
                                   ignore_index=PAD_ID, label_smoothing=eps,
                                   reduction="sum") * 0.5
    loss.backward()
    expected.backward()
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert ours.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 keeps 8 bits of mantissa
    assert torch.allclose(ours.grad.float(), ref.grad.float(), atol=tol)
    assert not ours.grad[0, 3:].any()  # padding gets no gradient


def test_warmup_then_inverse_sqrt() -> None:
    sched = LrSchedule("inverse_sqrt", warmup_steps=4, total_steps=100)
    assert [sched(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert sched(4) == 1.0 and sched(16) == pytest.approx(0.5)


def test_cosine_constant_and_plateau() -> None:
    cosine = LrSchedule("cosine", warmup_steps=0, total_steps=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0)
    assert cosine(50) == pytest.approx(0)
    constant = LrSchedule("constant", warmup_steps=2, total_steps=10)
    assert [constant(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    plateau = LrSchedule("plateau", warmup_steps=0, total_steps=10)
    for loss in (3.0, 2.0, 2.5, 2.1, 1.0):
        plateau.observe(loss)
    assert plateau(5) == 0.25  # halved after 2.5 and after 2.1


def test_plateau_state_survives_lambdalr_state_dict() -> None:
    sched = LrSchedule("plateau", warmup_steps=0, total_steps=10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    sched.observe(1.0)
    sched.observe(2.0)
    state = lr_sched.state_dict()
    fresh = LrSchedule("plateau", warmup_steps=0, total_steps=10)
    torch.optim.lr_scheduler.LambdaLR(opt, fresh).load_state_dict(state)
    assert fresh.plateau_scale == 0.5 and fresh.best == 1.0


def test_gpu_without_cuda_is_a_config_error(tiny_params: Params) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ConfigError, match="train.accelerator"):
        check_runtime(replace(tiny_params.train, accelerator="gpu"))
    assert check_runtime(tiny_params.train) == "cpu"


def test_hyperparameters_are_plain_and_load_weights_only(tiny_params: Params) -> None:
    module = Seq2SeqModule(model=asdict(tiny_params.model), train=asdict(tiny_params.train),
                           src_vocab_size=30, trg_vocab_size=40)
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()},
               buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    again = Seq2SeqModule(**loaded["hyper_parameters"])
    again.load_state_dict(loaded["state_dict"])
    assert again.model.trg_vocab_size == 40 and not math.isnan(again.num_parameters)
