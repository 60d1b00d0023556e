"""Every prior answers the same ``Prior`` protocol, and the Ray client answers it exactly as the
local Stable Diffusion prior does: same gradients, same generator states, same reconstructor
states after a few steps, same inverted token (with a checkpoint on the caller's side)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from rf_core.config import ConfigError, load_config
from rf_core.errors import UserError
from rf_core.files.checkpoint import pack_checkpoint
from rf_core.prior import (
    InversionConfig,
    InversionResult,
    ModelConfig,
    NullPrior,
    Prior,
    PromptConfig,
    SDSConfig,
    SDSRequest,
    make_conditioning,
    make_prior,
    prior_types,
    register_prior,
    sds_grad_each,
    unregister_prior,
)
from rf_core.prior.inversion import checkpoint_step


class StubPrior:
    """The test stub: grad = images - 0.5 + 0.01 noise (noise from the caller's generator)."""

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}

    def register_embedding(self, token, vector):
        self.tokens[token] = vector

    def sds_grad(self, images, conditioning, cfg=None, *, step=0, generator=None):
        noise = torch.randn(images.shape, generator=generator)
        return (images.detach().float() - 0.5) + 0.01 * noise.to(images.device)

    def sds_grad_batch(self, requests):
        return sds_grad_each(self, requests)

    def invert(self, rgb, mask, cfg=None, checkpoint=None):
        cfg = cfg or InversionConfig()
        result = InversionResult(cfg.token, (rgb * mask).mean((1, 2)), [0.0])
        self.register_embedding(result.token, result.vector)
        return result


@pytest.fixture
def stub_registered():
    """``model.type: stub`` while a test runs, and forgotten afterwards."""
    register_prior("stub", lambda cfg: StubPrior())
    yield
    unregister_prior("stub")

RECON = ["steps=3", "input_size=16", "input_rays=64", "sds_size=16", "renderer.num_samples=16",
         "field.grid.n_levels=2", "field.grid.log2_hashmap_size=10", "levels=2"]
INVERT = InversionConfig(steps=5, grad_accum=1, checkpoint_every=2)


def _cond(azimuth: float, n: int = 1):
    return make_conditioning(PromptConfig(), azimuth=torch.tensor([azimuth] * n),
                             elevation=torch.tensor([10.0] * n))


def _close(got, want):  # as test_prior_server.py: the same model on other threads
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _photo():
    gen = torch.Generator().manual_seed(3)
    rgb, mask = torch.rand(3, 32, 32, generator=gen), torch.ones(1, 32, 32)
    mask[:, :4] = 0
    return rgb, mask


@pytest.fixture(scope="module")
def server(ray_local):
    from rf_distributed.prior_server import start_prior_server

    handle = start_prior_server(ModelConfig(name="tiny", device="cpu"),
                                name="rf-prior/conformance", max_batch=8, max_wait_ms=50)
    ray_local.get(handle.ping.remote())
    yield handle
    ray_local.kill(handle, no_restart=True)


@pytest.fixture
def client(server):
    from rf_distributed.prior_server import PriorClient

    return PriorClient(server)


@pytest.fixture
def one_thread():
    """The server computes each request on one thread; so does the local reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- every prior
@pytest.mark.parametrize("kind", ["stable-diffusion", "stub", "none",
                                  pytest.param("client", marks=pytest.mark.ray)])
def test_each_prior_is_a_prior_and_batches_exactly(kind, request, tiny_prior):
    prior = {"stable-diffusion": lambda: tiny_prior, "stub": StubPrior, "none": NullPrior,
             "client": lambda: request.getfixturevalue("client")}[kind]()
    assert isinstance(prior, Prior)
    images = [torch.rand(1 + i % 2, 3, 16, 16) for i in range(3)]
    cfgs = [SDSConfig(guidance_scale=20.0 + 10 * i, t_max=0.5 + 0.1 * i) for i in range(3)]
    alone, states = [], []
    for i in range(3):
        gen = torch.Generator().manual_seed(10 + i)
        alone.append(prior.sds_grad(images[i], _cond(40.0 * i, len(images[i])), cfgs[i],
                                    step=4, generator=gen))
        states.append(gen.get_state())
    requests = [SDSRequest(images[i], _cond(40.0 * i, len(images[i])), cfgs[i], step=4,
                           generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    batched = prior.sds_grad_batch(requests)
    for i in range(3):
        assert batched[i].shape == images[i].shape and batched[i].dtype == torch.float32
        _close(batched[i], alone[i])
        assert torch.equal(requests[i].generator.get_state(), states[i])


def test_registry_builds_each_type_and_names_the_choices(stub_registered):
    assert {"stable-diffusion", "oracle", "none", "stub"} <= set(prior_types())
    assert ModelConfig().type == "stable-diffusion"
    assert isinstance(make_prior(ModelConfig(type="stub")), StubPrior)
    assert isinstance(make_prior(ModelConfig(type="none")), NullPrior)
    oracle = make_prior(ModelConfig(type="oracle", name="pybullet_data:duck.obj"), radius=0.7)
    assert isinstance(oracle, Prior) and oracle.radius == 0.7
    with pytest.raises(ConfigError, match="unknown prior 'sd'; choose one of .*none.*oracle"):
        make_prior(ModelConfig(type="sd"))


def test_unregistering_forgets_a_prior():
    register_prior("stub-once", lambda cfg: StubPrior())
    unregister_prior("stub-once")
    assert "stub-once" not in prior_types()
    with pytest.raises(ConfigError, match="unknown prior 'stub-once'"):
        make_prior(ModelConfig(type="stub-once"))


def test_null_prior_gives_zero_and_refuses_inversion():
    prior = NullPrior()
    grad = prior.sds_grad(torch.rand(2, 3, 8, 8), _cond(0.0, 2))
    assert torch.equal(grad, torch.zeros(2, 3, 8, 8))
    with pytest.raises(UserError, match="'none' has no text model"):
        prior.invert(*_photo(), InversionConfig())


def test_request_travels_with_its_generator_state():
    gen = torch.Generator().manual_seed(5)
    request = SDSRequest(torch.rand(1, 3, 8, 8), _cond(0.0), SDSConfig(), step=2, generator=gen)
    copy = pickle.loads(pickle.dumps(request))
    assert torch.equal(copy.generator.get_state(), gen.get_state()) and copy.step == 2
    assert torch.equal(copy.images, request.images) and copy.conditioning.prompts == \
        request.conditioning.prompts


def test_stub_prior_drives_a_reconstructor(stub_registered):
    from rf_core.fitting.reconstruct import Reconstructor, ReconstructorConfig

    cfg = load_config(ReconstructorConfig, overrides=RECON)
    recon = Reconstructor(cfg, torch.rand(3, 16, 16), torch.ones(1, 16, 16),
                          make_prior(ModelConfig(type="stub")), device="cpu")
    assert all(recon.step()["loss/sds"] > 0 for _ in range(2))


# ---------------------------------------------------------------------------- local = remote
@pytest.mark.ray
def test_remote_sds_grad_equals_local(client, tiny_prior, one_thread):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 0.02
    client.register_embedding("<e>", vector)
    tiny_prior.register_embedding("<e>", vector)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cfg = SDSConfig(guidance_scale=30.0, t_min=0.2, t_max=0.8)
    local_gen, remote_gen = (torch.Generator().manual_seed(7) for _ in range(2))
    for step in (0, 5):
        want = tiny_prior.sds_grad(images, _cond(20.0, 2), cfg, step=step, generator=local_gen)
        got = client.sds_grad(images, _cond(20.0, 2), cfg, step=step, generator=remote_gen)
        _close(got, want)
        assert torch.equal(remote_gen.get_state(), local_gen.get_state())


@pytest.mark.ray
def test_reconstructor_states_match_local_and_remote(client, tiny_prior, one_thread):
    from rf_core.fitting.reconstruct import Reconstructor, ReconstructorConfig

    vector = torch.randn(32, generator=torch.Generator().manual_seed(4)) * 0.02
    cfg = load_config(ReconstructorConfig, overrides=RECON)
    rgb = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5))
    states = []
    for prior in (tiny_prior, client):
        prior.register_embedding("<e>", vector)
        recon = Reconstructor(cfg, rgb, torch.ones(1, 16, 16), prior, device="cpu")
        for _ in range(3):
            recon.step()
        states.append(recon.state_dict())
    local, remote = states
    assert remote["step"] == local["step"] == 3
    assert torch.equal(remote["gen"], local["gen"])
    for name, tensor in local["field"].items():
        torch.testing.assert_close(remote["field"][name], tensor, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"field.{name}: {m}")


@pytest.mark.ray
def test_remote_inversion_equals_local_with_a_checkpoint_on_the_callers_side(
        client, tiny_prior, tmp_path):
    rgb, mask = _photo()
    local = tiny_prior.invert(rgb, mask, INVERT, checkpoint=tmp_path / "local.ckpt")
    remote_ckpt = tmp_path / "remote" / "e.ckpt"
    first = client.invert(rgb, mask, dataclasses.replace(INVERT, steps=3),
                          checkpoint=remote_ckpt)
    assert first.resumed_from == 0 and len(first.losses) == 3
    assert checkpoint_step(pack_checkpoint(remote_ckpt)) == 3  # written here, by the client
    remote = client.invert(rgb, mask, INVERT, checkpoint=remote_ckpt)
    assert remote.resumed_from == 3 and remote.token == local.token == "<e>"
    assert checkpoint_step(pack_checkpoint(remote_ckpt)) == 5
    torch.testing.assert_close(remote.vector, local.vector, rtol=1e-5, atol=1e-7)
    assert remote.losses == pytest.approx(local.losses, rel=1e-5)
    whole = client.invert(rgb, mask, INVERT)  # no checkpoint: one call
    torch.testing.assert_close(whole.vector, local.vector, rtol=1e-5, atol=1e-7)


@pytest.mark.ray
def test_remote_null_prior_says_what_the_local_one_says(ray_local):
    from rf_distributed.prior_server import PriorClient, start_prior_server

    handle = start_prior_server(ModelConfig(type="none"), name="rf-prior/conformance-none")
    try:
        client = PriorClient(handle)
        assert torch.equal(client.sds_grad(torch.rand(1, 3, 8, 8), _cond(0.0)),
                           torch.zeros(1, 3, 8, 8))
        with pytest.raises(UserError, match="'none' has no text model") as err:
            client.invert(*_photo(), InversionConfig())
        assert "\n" not in str(err.value)
        assert ray_local.get(handle.describe.remote()) == {"prior": "NullPrior"}
    finally:
        ray_local.kill(handle, no_restart=True)
