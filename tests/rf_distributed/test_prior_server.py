"""The shared prior server: batching, exact per-caller results, restarts, remote inversion."""

from __future__ import annotations

import threading

import pytest
import torch

from rf_core.prior import ModelConfig, PromptConfig, SDSConfig, make_conditioning

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def server(ray_local):
    from rf_distributed.prior_server import start_prior_server

    handle = start_prior_server(ModelConfig(name="tiny", device="cpu"), name="rf-prior/test",
                                max_batch=8, max_wait_ms=200)
    ray_local.get(handle.ping.remote())
    yield handle
    ray_local.kill(handle, no_restart=True)


def _cond(azimuth: float, n: int = 1):
    return make_conditioning(PromptConfig(), azimuth=torch.tensor([azimuth] * n),
                             elevation=torch.tensor([10.0] * n))


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_gradient(server,
                                                                               tiny_prior):
    from rf_distributed.prior_server import PriorClient

    vectors = [torch.randn(32) * 0.02 for _ in range(4)]
    clients = [PriorClient(server) for _ in range(4)]
    for c, v in zip(clients, vectors):
        c.register_embedding("<e>", v)  # same token name, different vectors per trial
    images = [torch.rand(1 + i % 2, 3, 32, 32) for i in range(4)]
    cfgs = [SDSConfig(guidance_scale=50.0 + 25 * i, t_max=0.5 + 0.1 * i) for i in range(4)]
    before = server.stats.remote()
    results = [None] * 4

    def call(i):
        gen = torch.Generator().manual_seed(100 + i)
        grad = clients[i].sds_grad(images[i], _cond(30.0 * i, len(images[i])), cfgs[i], step=7,
                                   generator=gen)
        results[i] = (grad, gen.get_state())

    import ray

    start = ray.get(before)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = ray.get(server.stats.remote())
    assert stats["requests"] - start["requests"] == 4
    assert stats["batches"] - start["batches"] < 4  # merged
    for i in range(4):
        tiny_prior.register_embedding("<e>", vectors[i])
        gen = torch.Generator().manual_seed(100 + i)
        ref = tiny_prior.sds_grad(images[i], _cond(30.0 * i, len(images[i])), cfgs[i], step=7,
                                  generator=gen)
        grad, state = results[i]
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        assert torch.equal(state, gen.get_state())


def test_cpu_workers_give_each_request_its_unbatched_gradient(tiny_prior):
    """threads=2 on the CPU: the batch's requests run on 2 single-threaded workers (no Ray
    needed); each still gets exactly its own gradient and generator state."""
    import dataclasses
    import pickle

    from rf_core.config import to_dict
    from rf_core.prior import SDSRequest
    from rf_distributed.prior_server import PriorServerImpl

    before = torch.get_num_threads()
    try:
        server = PriorServerImpl(to_dict(ModelConfig(name="tiny", device="cpu")), threads=2)
        assert server._workers is not None
        vectors = [torch.randn(32) * 0.02 for _ in range(3)]
        images = [torch.rand(1 + i % 2, 3, 32, 32) for i in range(3)]
        cfgs = [SDSConfig(guidance_scale=50.0 + 25 * i, t_max=0.5 + 0.1 * i) for i in range(3)]
        requests = []
        for i in range(3):
            cond = _cond(30.0 * i, len(images[i]))
            token = f"<e{i}>"
            cond = dataclasses.replace(cond, prompts=[p.replace("<e>", token)
                                                      for p in cond.prompts])
            request = SDSRequest(images=images[i], conditioning=cond, cfg=cfgs[i], step=7,
                                 generator=torch.Generator().manual_seed(100 + i),
                                 embeddings={token: vectors[i]})
            requests.append(pickle.loads(pickle.dumps(request)))  # as it travels
        replies = server._compute(requests)
        assert server.stats()["batches"] == 1 and server.stats()["compute_s"] > 0
    finally:
        torch.set_num_threads(before)
    for i in range(3):
        tiny_prior.register_embedding("<e>", vectors[i])
        gen = torch.Generator().manual_seed(100 + i)
        ref = tiny_prior.sds_grad(images[i], _cond(30.0 * i, len(images[i])), cfgs[i], step=7,
                                  generator=gen)
        torch.testing.assert_close(replies[i].grad, ref, rtol=1e-4,
                                   atol=1e-4 * ref.abs().max().item())
        assert torch.equal(replies[i].generator_state, gen.get_state())


def test_killed_server_restarts_and_the_call_still_succeeds(server, ray_local):
    from rf_distributed.prior_server import PriorClient

    client = PriorClient(server, backoff_s=0.2)
    client.register_embedding("<e>", torch.randn(32) * 0.02)
    ray_local.kill(server, no_restart=False)
    grad = client.sds_grad(torch.rand(1, 3, 32, 32), _cond(0.0), SDSConfig(),
                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_inversion_runs_on_the_server(server):
    from rf_core.prior import InversionConfig
    from rf_distributed.prior_server import PriorClient

    client = PriorClient(server)
    rgb, mask = torch.rand(3, 32, 32), torch.ones(1, 32, 32)
    mask[:, :4] = 0
    result = client.invert(rgb, mask, InversionConfig(steps=2, grad_accum=1))
    assert result.token == "<e>" and result.vector.shape == (32,) and len(result.losses) == 2
    grad = client.sds_grad(torch.rand(1, 3, 32, 32), _cond(0.0), SDSConfig(),
                           generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(grad).all()


def test_remote_prior_drives_a_reconstructor(server):
    """The Reconstructor cannot tell the client from a local prior."""
    from rf_core.config import load_config
    from rf_core.reconstruct import Reconstructor, ReconstructorConfig
    from rf_distributed.prior_server import PriorClient

    client = PriorClient(server)
    client.register_embedding("<e>", torch.randn(32) * 0.02)
    cfg = load_config(ReconstructorConfig, overrides=[
        "steps=3", "input_size=16", "input_rays=64", "sds_size=16", "renderer.num_samples=16",
        "field.grid.n_levels=2", "field.grid.log2_hashmap_size=10", "levels=2"])
    recon = Reconstructor(cfg, torch.rand(3, 16, 16), torch.ones(1, 16, 16), client,
                          device="cpu")
    metrics = [recon.step() for _ in range(3)]
    assert all(m["loss/sds"] > 0 for m in metrics)
