"""The `diis` method (core.diis): DIIS-accelerated pixel-gradient descent, on plain torch."""
import torch

from core import invert
from core.diis import PixelDIIS
from core.evaluation import Evaluation
from core.metrics import PixelError, per_sample_weighted_mse
from tests.test_core_solver import linear_codec, target

ILL = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]])  # ill-conditioned mix


def test_diis_goes_further_than_the_best_adam_setting_in_the_same_steps():
    codec, _ = linear_codec(mix=ILL)
    x, _ = target()
    adam = invert(codec, x, method="gradient", lr=0.03, schedule=False, steps=40, stall_steps=0).samples[0]
    diis = invert(codec, x, method="diis", steps=40, stall_steps=0).samples[0]
    assert diis.psnr_best > adam.psnr_best + 10, (diis, adam)


def test_a_batch_runs_like_separate_runs_up_to_rounding():
    """Per-sample state and solves: the batch's traces are the single runs' until float rounding,
    which the nearly collinear pixel differences of this toy amplify after about 15 steps (the
    batched and single reductions round differently); the end is as good either way."""
    codec, _ = linear_codec(mix=ILL)
    x, _ = target(batch=2, seed=3)
    both = invert(codec, x, method="diis", steps=25, stall_steps=0)
    for i in range(2):
        alone = invert(codec, x[i:i + 1], method="diis", steps=25, stall_steps=0)
        assert torch.allclose(both.trace_psnr[:11, i], alone.trace_psnr[:11, 0], atol=0.05)
        assert abs(both.samples[i].psnr_best - alone.samples[0].psnr_best) < 2.0


def test_a_rise_in_the_pixel_error_leaves_only_the_newest_difference():
    z = torch.zeros(1, 2, 2, 2)
    stepper = PixelDIIS(z, torch.ones(1, 1, 1, 1), lr=0.1, memory=4)
    for k, err in enumerate([4.0, 3.0, 2.0, 5.0]):  # the error falls twice, then rises
        ev = Evaluation(torch.tensor([err]), torch.tensor([float("nan")]),
                        pixel_grad=torch.randn(1, 2, 2, 2), pixel_residual=torch.randn(1, 3, 4, 4))
        stepper.step(z, ev, torch.ones(1, 1, 1, 1))
        kept = int((stepper.d_p.abs().sum(-1) > 0).sum()) if stepper.d_p is not None else 0
        assert kept == [0, 1, 2, 1][k], (k, kept)


def test_a_stopped_sample_does_not_move():
    z = torch.zeros(2, 2, 2, 2)
    stepper = PixelDIIS(z, torch.ones(2, 1, 1, 1), lr=0.1)
    for _ in range(3):
        ev = Evaluation(torch.ones(2), torch.full((2,), float("nan")),
                        pixel_grad=torch.randn(2, 2, 2, 2), pixel_residual=torch.randn(2, 3, 4, 4))
        stepper.step(z, ev, torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
    assert z[1].abs().sum() == 0 and z[0].abs().sum() > 0


def test_the_pixel_residual_is_the_weighted_error_and_falls_back_where_no_weight():
    image, x = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    w = torch.rand(2, 1, 4, 4)
    w[1] = 0  # nothing weighted: the plain error, as PixelError gives
    p = PixelError(x, w, in_place=False).residual(image)
    mse = per_sample_weighted_mse(image, x, w)
    assert torch.allclose(p[0].square().sum() / (3 * w[0].sum()), mse[0])
    assert torch.allclose(p[1].square().mean(), mse[1])


def test_diis_with_a_weight_minimises_the_weighted_error():
    codec, _ = linear_codec(mix=ILL)
    x, _ = target()
    x = x.clone()
    x[..., :4, :] = 1.0  # the top half is off D's range: with weight 0 there it must not matter
    w = torch.ones(1, 1, 8, 8)
    w[..., :4, :] = 0
    r = invert(codec, x, method="diis", weight=w, steps=40, stall_steps=0)
    assert r.samples[0].psnr_best > r.samples[0].psnr_initial + 20
