"""The shared prior server: batching, exact per-caller results, restarts, remote inversion."""

from __future__ import annotations

import threading

import pytest
import torch

from rf_core.prior import ModelConfig, PromptConfig, SDSConfig, make_conditioning
from rf_core.progress import quiet

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
    from rf_core.fitting.reconstruct import Reconstructor, ReconstructorConfig
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


def _interleaving_run(interleave: bool, steps: int = 12) -> dict:
    """One server (no Ray), one inversion and SDS requests sent while it runs: when each SDS
    reply and the inversion came back, and the inversion's result."""
    import asyncio

    from rf_core.config import to_dict
    from rf_core.prior import InversionConfig, SDSRequest
    from rf_distributed.prior_server import PriorServerImpl

    server = PriorServerImpl(to_dict(ModelConfig(name="tiny", device="cpu")), max_wait_ms=1,
                             threads=1, invert_interleave=interleave)
    rgb, mask = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), \
        torch.ones(1, 32, 32)
    cfg = InversionConfig(steps=steps, grad_accum=2, initializer="toy", checkpoint_every=0)

    async def main():
        loop = asyncio.get_running_loop()
        inversion = asyncio.ensure_future(server.invert(rgb, mask, cfg))
        finished = []
        inversion.add_done_callback(lambda _: finished.append(loop.time()))
        while not server._model.locked():  # the inversion has the model
            await asyncio.sleep(0.002)
        sds_done = []
        for i in range(3):
            request = SDSRequest(images=torch.rand(1, 3, 32, 32), conditioning=_cond(10.0 * i),
                                 cfg=SDSConfig(), step=i,
                                 generator=torch.Generator().manual_seed(i))
            reply = await server.sds_grad(request)
            assert torch.isfinite(reply.grad).all()
            sds_done.append(loop.time())
        out = await inversion
        return {"sds_done": sds_done, "inversion_done": finished[0], "result": out}

    before = torch.get_num_threads()
    try:
        run = asyncio.run(main())
    finally:
        torch.set_num_threads(before)
    run["stats"] = server.stats()
    run["cfg"], run["rgb"], run["mask"] = cfg, rgb, mask
    return run


def test_sds_is_served_between_inversion_steps_and_the_inversion_is_unchanged():
    """Interleaved, SDS requests sent during an inversion come back before it ends, the
    inversion hands the model over, and its vector is bit-identical to a local run's.
    Not interleaved (the old way), the first SDS reply waits for the whole inversion."""
    from rf_core.prior import StableDiffusionPrior, invert

    run = _interleaving_run(True)
    assert max(run["sds_done"]) < run["inversion_done"]
    assert run["stats"]["inversion_handovers"] >= 1 and run["stats"]["requests"] == 3
    with quiet():
        local = invert(StableDiffusionPrior(ModelConfig(name="tiny", device="cpu")), run["rgb"],
                       run["mask"], run["cfg"])
    assert torch.equal(run["result"]["vector"], local.vector)
    assert run["result"]["losses"] == local.losses
    blocking = _interleaving_run(False, steps=6)
    assert min(blocking["sds_done"]) > blocking["inversion_done"]
    assert blocking["stats"]["inversion_handovers"] == 0


class _Clock:
    """A fake monotonic clock: time moves only when the test says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _turns(**kwargs):
    from rf_distributed.inversion_turns import InversionTurns

    clock = _Clock()
    kwargs = {"max_wait_s": 0.005, "yield_batches": 3, **kwargs}
    return InversionTurns(clock=clock, **kwargs), clock


def test_inversion_waits_a_grace_window_after_each_batch_while_requests_keep_arriving():
    """The diagnosed stall: between a reply and the trial's next request no SDS waits, and an
    inversion step started there made that request wait for the whole step. Now the inversion
    steps only once no request came for the grace window after a batch."""
    turns, clock = _turns(grace_s=0.05)
    assert turns.inversion_turn(0) == ("idle", None)  # no SDS traffic yet
    turns.arrived()
    assert turns.inversion_turn(0) == (None, None)  # a request waits: until its batch ends
    turns.batch_done(1)
    clock.now += 0.01  # the gap before the trial's next request: the inversion keeps out
    why, wait = turns.inversion_turn(0)
    assert why is None and wait == pytest.approx(0.04)
    turns.arrived()
    turns.batch_done(1)
    clock.now += 0.049
    assert turns.inversion_turn(turns.batches)[0] is None
    clock.now += 0.002  # no request for the whole window: the trials went quiet
    assert turns.inversion_turn(turns.batches) == ("idle", None)


def test_inversion_gets_a_step_every_yield_batches_under_unbroken_load():
    turns, clock = _turns(grace_s=0.05, yield_batches=3)
    since = turns.batches
    turns_seen = []
    for _ in range(7):  # requests back to back, always inside the window
        turns.arrived()
        turns_seen.append(turns.inversion_turn(since)[0])
        turns.batch_done(1)
        clock.now += 0.001
        why = turns.inversion_turn(since)[0]
        if why is not None:
            assert why == "forced"
            since = turns.batches  # the inversion stepped, and gives the model up again
        turns_seen.append(why)
    assert turns_seen == [None] * 5 + ["forced"] + [None] * 5 + ["forced"] + [None] * 2
    assert turns.inversion_turn(since) == (None, pytest.approx(0.049))


def _measured(turns, clock, gaps) -> None:
    """Batches each followed, ``gap`` seconds later, by requests reaching the idle server."""
    for gap in gaps:
        turns.batch_done(turns.waiting)
        clock.now += gap
        turns.arrived()
        turns.arrived()  # a second request while one waits measures nothing


def test_adaptive_grace_follows_the_measured_gap_within_bounds():
    from rf_distributed.inversion_turns import GRACE_CAP_S, GRACE_GAP_FACTOR

    turns, clock = _turns(max_wait_s=0.005)
    assert turns.grace() == 0.005  # nothing measured yet: the batching window
    _measured(turns, clock, [0.010] * 9 + [0.020])
    assert list(turns.gaps) == pytest.approx([0.010] * 9 + [0.020])
    assert turns.grace() == pytest.approx(GRACE_GAP_FACTOR * 0.020)  # 90th percentile
    quiet, clock = _turns()
    _measured(quiet, clock, [10.0] * 3)  # trials doing long work between requests
    assert quiet.grace() == GRACE_CAP_S
    fast, clock = _turns(max_wait_s=0.02)
    _measured(fast, clock, [0.001] * 5)
    assert fast.grace() == 0.02  # never below the batching window
    fixed, clock = _turns(grace_s=0.3)
    _measured(fixed, clock, [0.001] * 5)
    assert fixed.grace() == 0.3
    with pytest.raises(ValueError, match="invert_yield_batches"):
        _turns(yield_batches=0)


def _server_with_clock(**kwargs):
    from rf_core.config import to_dict
    from rf_distributed.prior_server import PriorServerImpl

    server = PriorServerImpl(to_dict(ModelConfig(name="tiny", device="cpu")), max_wait_ms=1,
                             threads=1, invert_grace_ms=50, **kwargs)
    clock = _Clock()
    server._turns.clock = clock
    return server, clock


def _inversion_during_sds(yield_batches: int, requests: int = 5) -> dict:
    """An inversion, then ``requests`` back-to-back SDS requests while the fake clock stands
    still (so the grace window never ends); then the clock moves on and the inversion ends.
    Returns the inversion's step count at each reply, its result and the server's stats."""
    import asyncio

    from rf_core.prior import InversionConfig, SDSRequest

    server, clock = _server_with_clock(invert_yield_batches=yield_batches)
    rgb = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 32, 32)
    cfg = InversionConfig(steps=8, grad_accum=2, initializer="toy", checkpoint_every=0)

    async def main():
        inversion = asyncio.ensure_future(server.invert(rgb, mask, cfg))
        while server.stats()["inversion_steps"] < 1:
            await asyncio.sleep(0.002)
        steps = []
        for i in range(requests):
            request = SDSRequest(images=torch.rand(1, 3, 32, 32), conditioning=_cond(10.0 * i),
                                 cfg=SDSConfig(), step=i,
                                 generator=torch.Generator().manual_seed(i))
            await server.sds_grad(request)
            steps.append(server.stats()["inversion_steps"])
        clock.now += 1.0  # the trials went quiet: the inversion may run on
        with server._turn:
            server._turn.notify_all()
        return {"steps": steps, "result": await inversion}

    before = torch.get_num_threads()
    try:
        run = asyncio.run(main())
    finally:
        torch.set_num_threads(before)
    run["stats"], run["cfg"], run["rgb"], run["mask"] = server.stats(), cfg, rgb, mask
    return run


def test_no_inversion_step_starts_between_back_to_back_requests():
    """Requests keep arriving inside the grace window: the inversion takes no step from the
    first reply to the last, and finishes once the trials are quiet."""
    run = _inversion_during_sds(yield_batches=100)
    assert len(set(run["steps"])) == 1, run["steps"]
    assert run["stats"]["inversion_forced_steps"] == 0
    assert len(run["result"]["losses"]) == run["cfg"].steps


def test_inversion_still_progresses_under_unbroken_sds_load():
    """The same traffic with ``invert_yield_batches=2``: the inversion takes forced steps
    while the grace window never ends, and its vector is still a local run's, bit for bit."""
    from rf_core.prior import StableDiffusionPrior, invert

    run = _inversion_during_sds(yield_batches=2)
    assert run["steps"][-1] > run["steps"][0]
    assert run["stats"]["inversion_forced_steps"] >= 1
    with quiet():
        local = invert(StableDiffusionPrior(ModelConfig(name="tiny", device="cpu")), run["rgb"],
                       run["mask"], run["cfg"])
    assert torch.equal(run["result"]["vector"], local.vector)
    assert run["result"]["losses"] == local.losses


@pytest.mark.parametrize("device,caller,want", [
    ("auto", [], (None, "auto")),
    ("auto", [3], ("3", "auto")),
    ("cpu", [3], (None, "cpu")),
    ("cuda", [2], ("2", "cuda:0")),
    ("cuda", [], ("0", "cuda:0")),
    ("cuda:1", [0], ("1", "cuda:0")),
])
def test_server_gpu_follows_the_caller_whatever_ray_shows_the_actor(device, caller, want):
    from rf_distributed.server_placement import server_gpu

    assert server_gpu(device, caller) == want


@pytest.mark.ray
def test_server_lands_on_its_callers_gpu_with_fake_gpus(tmp_path):
    """A Ray of 2 logical GPUs on this CPU machine: a task on each GPU starts its server; each
    server sees exactly its caller's GPU, also the one Ray would have put elsewhere."""
    import subprocess
    import sys

    script = tmp_path / "placement.py"
    script.write_text("""
import json, ray
from rf_core.prior import ModelConfig
ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
         configure_logging=False)

@ray.remote(num_gpus=0.6, num_cpus=0)
def trial(index):
    import ray
    from rf_distributed.prior_server import start_prior_server
    server = start_prior_server(ModelConfig(type="none"), name=f"rf-prior/fake/{index}",
                                num_gpus=0.01)
    return {"caller": [str(g) for g in ray.get_gpu_ids()],
            "server": ray.get(server.placement.remote())}

print(json.dumps(ray.get([trial.remote(i) for i in range(2)])))
ray.shutdown()
""")
    import json

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=240, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert out.returncode == 0, out.stderr[-2000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(r["caller"][0] for r in runs) == ["0", "1"]
    for r in runs:
        assert r["server"]["gpu"] == r["caller"][0]
        assert r["server"]["cuda_visible_devices"] == r["caller"][0]
        assert len(r["server"]["ray_gpu_ids"]) == 1  # the 0.01 share Ray counts


def test_two_models_on_one_node_get_two_servers():
    """The server name holds the model: a second model never gets the first one's server."""
    from rf_core.prior import ModelConfig
    from rf_distributed.server_placement import server_name

    sd, learned = ModelConfig(name="tiny"), ModelConfig(type="learned", name="builtin")
    assert server_name("node", 0, sd) != server_name("node", 0, learned)
    assert server_name("node", 0, sd) == server_name("node", 0, ModelConfig(name="tiny",
                                                                             device="cpu"))
    assert server_name("node", 0, learned).startswith("rf-prior/node/0/learned-")
