"""moetune.saved_tensors: frozen parameters (and views of them) held on ctx, everything else saved."""

from __future__ import annotations

import torch
from torch import nn

from moetune import saved_tensors

LOADED = []


class _Keep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *others):
        saved_tensors.save(ctx, x, *others)
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        LOADED[:] = saved_tensors.load(ctx)
        return (dy,) + (None,) * (len(LOADED) - 1)


def test_frozen_parameters_ride_on_ctx_the_rest_is_saved_in_order():
    frozen = nn.Parameter(torch.randn(3, 4), requires_grad=False)
    trainable = nn.Parameter(torch.randn(4))
    fresh = torch.randn(4)
    x = torch.randn(4, requires_grad=True)
    args = (frozen, frozen.t(), None, trainable, fresh)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = _Keep.apply(x, *args)
    assert [id(t) for t in packed] == [id(x), id(trainable), id(fresh)]  # not the frozen parameter or its view
    y.sum().backward()
    loaded = LOADED
    assert loaded[1] is frozen and loaded[2]._base is frozen and loaded[3] is None  # held as given
    assert [t.data_ptr() for t in (loaded[0], loaded[4], loaded[5])] == [t.data_ptr() for t in (x, trainable, fresh)]


def test_a_function_that_saves_through_it_compiles_without_a_graph_break():
    """Dynamo cannot trace Tensor._is_view(): under torch.compile everything goes through save_for_backward, so a
    Function saving this way (every LoRA projection's) compiles into the graph instead of breaking it."""
    frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            saved_tensors.save(ctx, x, weight, None)
            return x @ weight

        @staticmethod
        def backward(ctx, dy):
            x, weight, nothing = saved_tensors.load(ctx)
            assert nothing is None
            return dy @ weight.t(), None

    def step(x):
        return Scale.apply(x, frozen.t()).square().sum()

    x = torch.randn(3, 4, requires_grad=True)
    (want,) = torch.autograd.grad(step(x), x)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: any break raises
    (got,) = torch.autograd.grad(compiled(x), x)
    torch.testing.assert_close(got, want)
