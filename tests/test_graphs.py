"""CUDA graphs of the Blender's UNet calls (blend/graphs.py), checked on the CPU with their stand-in: a
"graph" there runs the captured function again on its static inputs, so keys, static inputs, capture, check
and replays are exercised as on CUDA. Outputs must be bit for bit the eager ones."""

import pytest
import torch
from benchmarks.speed import MODES, random_banks

from latexblend.blend.blender import apply
from latexblend.blend.graphs import CallGraphs
from latexblend.errors import LatexBlendError


def call(pipe, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a dog and a cat", num_inference_steps=steps, generator=g, output_type="latent").images


@pytest.mark.parametrize("mode, graphs, kinds", [
    ("plain", "all", {"denoising step"}),
    ("guidance", "steering", {"guidance pass"}),
    ("guidance", "all", {"guidance pass", "denoising step"}),
    ("rectify", "steering", {"denoising step"}),
])
def test_graphed_calls_give_the_eager_outputs_call_after_call(tiny_pipe, mode, graphs, kinds):
    banks = random_banks(tiny_pipe, 2)
    settings = {**MODES[mode], "guidance": {**MODES[mode]["guidance"], "window": 0.5}} if "guidance" in MODES[mode] \
        else {**MODES[mode], "rectify": {"start": 0.8, "clusters": 4}} if "rectify" in MODES[mode] else MODES[mode]
    with apply(tiny_pipe, banks, **settings) as blender:
        assert blender.graph_mode == "off" and blender.graphs is None  # auto: off on the CPU
        assert "forward" not in tiny_pipe.unet.__dict__
        eager = [call(tiny_pipe, seed=s) for s in (0, 1, 0)]
        blender.use_graphs(graphs, emulate=True)
        assert tiny_pipe.unet.__dict__["forward"] == blender._forward
        graphed = [call(tiny_pipe, seed=s) for s in (0, 1, 0)]
        steering = blender.steering
        coef = {k: (id(a), a.data_ptr(), id(b)) for k, (a, b) in steering.coef.items()} if steering else {}
        again = call(tiny_pipe, seed=1)
        stats, events = blender.graphs.stats(), blender.graphs.events
        if steering is not None:  # kept buffers: refilled each call, never replaced
            assert coef == {k: (id(a), a.data_ptr(), id(b)) for k, (a, b) in steering.coef.items()}
    assert "forward" not in tiny_pipe.unet.__dict__  # removed with the Blender
    assert all(torch.equal(a, b) for a, b in zip(eager + [eager[1]], graphed + [again], strict=True))
    assert stats["graphs"] >= 1 and stats["replays"] > 0 and stats["refused"] == 0
    assert {e.split(":")[0].removeprefix("cuda graph ") for e in events} == kinds
    checked = [e for e in events if "captured, same outputs as eager" in e]
    assert len(checked) == len(kinds)  # the first graph of each kind is checked against eager
    assert all(e in checked or e.endswith("captured (its kind matched eager)") for e in events)


def test_a_graph_that_fails_stays_eager_with_one_line(tiny_pipe, monkeypatch):
    banks = random_banks(tiny_pipe, 2)
    with apply(tiny_pipe, banks) as blender:
        expected = call(tiny_pipe)
        blender.use_graphs("all", emulate=True)

        def broken(self, entry, inputs):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(CallGraphs, "_replay", broken)
        got = call(tiny_pipe)
        stats, events = blender.graphs.stats(), blender.graphs.events
    assert torch.equal(got, expected)
    assert stats == {"graphs": 0, "refused": 1, "replays": 0}
    assert events == ["cuda graph denoising step: not used, capture failed (RuntimeError: operation not permitted "
                      "when stream is capturing)"]


def test_a_graph_that_differs_from_eager_is_not_used():
    graphs = CallGraphs(torch.device("cpu"), emulate=True)
    calls = []

    def fn(x):
        calls.append(1)
        return (x * (2.0 if len(calls) == 2 else 1.0),)  # the second call (the replay after capture) differs

    x = torch.ones(3)
    outs = [graphs.run("k", fn, [x])[0] for _ in range(3)]
    assert all(torch.equal(o, x) for o in outs)
    assert graphs.stats()["refused"] == 1 and "differs from eager" in graphs.events[0]


def test_graphs_setting_is_checked(tiny_pipe):
    with pytest.raises(LatexBlendError, match="graphs must be one of auto, off, steering, all"):
        apply(tiny_pipe, [], graphs="always")


def test_graphs_are_kept_up_to_a_limit_least_recently_used_first(monkeypatch):
    from latexblend.blend import graphs as graphs_module

    monkeypatch.setattr(graphs_module, "MAX_LIVE", 2)
    graphs = CallGraphs(torch.device("cpu"), emulate=True)
    x = torch.ones(2)
    for key in ("a", "a", "b", "b", "a", "c", "c"):  # capturing c evicts b (a was used since)
        out = graphs.run(("step", key), lambda v: (v * 2,), [x])[0]
        assert torch.equal(out, x * 2)
    live = {k[1] for k, e in graphs.entries.items() if e.graph is not None}
    assert live == {"a", "c"} and graphs.entries[("step", "b")].seen == 1
    assert graphs.run(("step", "b"), lambda v: (v * 2,), [x])[0].equal(x * 2)  # captured again at once
    assert {k[1] for k, e in graphs.entries.items() if e.graph is not None} == {"b", "c"}
