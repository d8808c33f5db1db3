"""code_match.hub_wrapped: the modeling function inside the `kernels` package's wrapper.

With `kernels` installed, transformers 5.25 turns `apply_rotary_pos_emb` into an instance of an nn.Module class
`Func` whose forward calls the function (kernels' _create_func_module); the fused rotary and MLA recognise the
function inside. The stand-in here has that shape, so the test runs without `kernels` too.
"""

import torch

from moetune.models.code_match import hub_wrapped


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    return q, k


def _wrapped(func):
    def create():
        import torch as local_torch  # kernels' forward closes over a local torch import as well

        class Func(torch.nn.Module):
            def forward(self, *args, **kwargs):
                if local_torch.compiler.is_compiling():
                    pass
                return func(*args, **kwargs)

        return Func()

    return create()


def test_the_function_inside_a_hub_wrapper_is_found():
    wrapper = _wrapped(apply_rotary_pos_emb)
    assert hub_wrapped(wrapper, "apply_rotary_pos_emb") is apply_rotary_pos_emb
    assert wrapper(1, 2, None, None) == (1, 2)


def test_anything_else_is_left_as_it_is():
    assert hub_wrapped(apply_rotary_pos_emb, "apply_rotary_pos_emb") is apply_rotary_pos_emb
    assert hub_wrapped(None, "apply_rotary_pos_emb") is None
    other = _wrapped(len)  # a wrapper around something else (a builtin, another name)
    assert hub_wrapped(other, "apply_rotary_pos_emb") is other
    module = torch.nn.Linear(2, 2)
    assert hub_wrapped(module, "apply_rotary_pos_emb") is module
