"""Denoiser wrappers against k-diffusion's CompVis wrappers, and classifier-free guidance."""

from dataclasses import dataclass

import torch

from kdiff_ref import load_external
from underpaint.sampling import schedules as SC
from underpaint.sampling.denoisers import cat_conditioning, cfg_denoiser, eps_denoiser, lcm_denoiser, v_denoiser

EXT = load_external()
AC = SC.sd_alphas_cumprod()
MS = SC.ModelSchedule.from_alphas_cumprod(AC)
_W = torch.linspace(-1, 1, 9).reshape(3, 3)


def toy_net(x_in, t, cond):
    """A toy UNet: nonlinear in the input, the timestep and the conditioning."""
    scale = (t.float().reshape(-1, 1, 1, 1) + 1) / 1000
    return torch.tanh((_W @ x_in.flatten(2)).view_as(x_in)) * scale + cond.reshape(-1, 1, 1, 1) * 0.1


class _FakeCompVis:
    """What k-diffusion's CompVis wrappers expect of a model."""

    alphas_cumprod = AC

    def apply_model(self, x, t, cond):
        return toy_net(x, t, cond)


def _inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 4, 4, generator=g) * 3
    sigma = torch.tensor([14.6, 2.5, 0.03])[:batch]
    cond = torch.arange(batch, dtype=torch.float32)
    return x, sigma, cond


def test_eps_denoiser_matches_compvis_denoiser():
    x, sigma, cond = _inputs()
    expected = EXT.CompVisDenoiser(_FakeCompVis())(x, sigma, cond=cond)
    assert torch.equal(eps_denoiser(toy_net, MS)(x, sigma, cond), expected)


def test_v_denoiser_matches_compvis_v_denoiser():
    x, sigma, cond = _inputs()
    expected = EXT.CompVisVDenoiser(_FakeCompVis())(x, sigma, cond=cond)
    assert torch.equal(v_denoiser(toy_net, MS)(x, sigma, cond), expected)


def test_model_sees_scaled_input_and_fractional_timesteps():
    seen = {}

    def spy(x_in, t, cond):
        seen.update(x_in=x_in, t=t)
        return torch.zeros_like(x_in)

    x, sigma, cond = _inputs()
    out = eps_denoiser(spy, MS)(x, sigma, cond)
    assert torch.equal(out, x)  # ε = 0 → denoised = x
    assert seen["t"].shape == (3,) and seen["t"].dtype == torch.float32
    assert torch.allclose(seen["t"], MS.sigma_to_t(sigma))
    assert torch.allclose(seen["x_in"], x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1))


def test_lcm_denoiser_snaps_to_lcm_timesteps_and_applies_the_boundary_condition():
    x, sigma, cond = _inputs()
    seen = {}

    def spy(x_in, t, c):
        seen["t"] = t
        return toy_net(x_in, t, c)

    out = lcm_denoiser(spy, MS)(x, sigma, cond)
    grid_t = torch.arange(19, 1000, 20)
    nearest = grid_t[(MS.sigmas[grid_t].log()[:, None] - sigma.log()).abs().argmin(0)]
    assert torch.equal(seen["t"], nearest)
    eps = toy_net(x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1), nearest, cond)
    x0 = x - sigma.reshape(-1, 1, 1, 1) * eps
    c = (nearest.double() * 10).reshape(-1, 1, 1, 1)
    expected = c / (c**2 + 0.25).sqrt() * x0 + 0.25 / (c**2 + 0.25) * x
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


def _counting(denoiser):
    calls = []

    def wrapped(x, sigma, cond):
        calls.append(x.shape[0])
        return denoiser(x, sigma, cond)

    return wrapped, calls


def test_cfg_is_one_batched_call_and_combines_like_a1111():
    x, sigma, _ = _inputs(2)
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5])
    base = eps_denoiser(toy_net, MS)
    wrapped, calls = _counting(base)
    out = cfg_denoiser(wrapped, cond, uncond, 7.5)(x, sigma)
    assert calls == [4]
    c, u = base(x, sigma, cond), base(x, sigma, uncond)
    torch.testing.assert_close(out, u + (c - u) * 7.5, rtol=1e-6, atol=1e-6)


def test_cfg_at_scale_one_still_runs_uncond_unless_asked():
    x, sigma, _ = _inputs(2)
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5])
    base = eps_denoiser(toy_net, MS)
    wrapped, calls = _counting(base)
    cfg_denoiser(wrapped, cond, uncond, 1.0)(x, sigma)
    assert calls == [4]
    wrapped, calls = _counting(base)
    out = cfg_denoiser(wrapped, cond, uncond, 1.0, skip_uncond_at_one=True)(x, sigma)
    assert calls == [2] and torch.equal(out, base(x, sigma, cond))


@dataclass(frozen=True)
class _Cond:
    cross_attn: torch.Tensor
    pooled: torch.Tensor | None = None
    name: str = "x"


def test_dataclass_conditioning_batches_and_mismatched_lengths_run_separately():
    a = _Cond(torch.ones(2, 77, 8), torch.ones(2, 4))
    b = _Cond(torch.zeros(2, 77, 8), torch.zeros(2, 4))
    joined = cat_conditioning([a, b])
    assert joined.cross_attn.shape == (4, 77, 8) and joined.pooled.shape == (4, 4) and joined.name == "x"
    assert cat_conditioning([_Cond(torch.ones(1, 2, 3)), _Cond(torch.ones(1, 2, 3))]).pooled is None

    def net(x, sigma, cond):
        return x * cond.cross_attn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    wrapped, calls = _counting(net)
    x, sigma = torch.ones(2, 1, 2, 2), torch.ones(2)
    long = _Cond(torch.full((2, 154, 8), 3.0))
    out = cfg_denoiser(wrapped, long, b, 2.0)(x, sigma)
    assert calls == [2, 2]
    assert torch.equal(out, torch.full_like(x, 6.0))
