"""The opt-in compiled path (``compile=True``): same results and parameter names as eager,
one graph per input size, and one warning then eager mode where compiling fails."""
import copy
import pickle
import warnings

import pytest
import timm
import torch
from mmengine.registry import MODELS
from torch._dynamo.testing import CompileCounterWithBackend

from mmconvmlp.models import ConvMLP
from mmconvmlp.models.compiled import CompileFallbackWarning, compile_forward

#: Real widths would only lengthen inductor's compile; the code paths are the same.
TINY = dict(blocks=(1, 1, 1), widths=(16, 32, 64), mlp_ratios=(2, 2, 2), stem_width=8,
            conv_blocks=1)


def pair(**kwargs):
    """An eager ConvMLP and a compiled one holding the same weights, in training mode."""
    eager = ConvMLP(arch=TINY, drop_path_rate=0., **kwargs)
    compiled_model = ConvMLP(arch=TINY, drop_path_rate=0., compile=True, **kwargs)
    compiled_model.load_state_dict(eager.state_dict())
    return eager.train(), compiled_model.train()


def train_step(model, x):
    """Outputs and parameter gradients of one forward and backward pass."""
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum((out * out).mean() for out in outs).backward()
    return outs, [p.grad for p in model.parameters() if p.requires_grad]


def assert_close(got, expected, tol=1e-4):
    """Each tensor within ``tol`` of the largest value of its eager counterpart."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= tol * b.abs().max()


def no_fallback_warning():
    """A context that fails the test if a CompileFallbackWarning is issued in it."""
    class NoFallback(warnings.catch_warnings):
        def __enter__(self):
            super().__enter__()
            warnings.simplefilter('error', CompileFallbackWarning)

    return NoFallback()


def inductor_missing_reason():
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as error:  # what torch raises here differs between versions
        return f'torch.compile has no working C++ compiler here: {error}'
    return None


@pytest.fixture
def counter(monkeypatch):
    """Compile with dynamo and AOT autograd but without inductor's code generation (seconds
    instead of minutes), counting the graphs compiled."""
    counter = CompileCounterWithBackend('aot_eager')
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile',
                        lambda fn, **kwargs: real_compile(fn, backend=counter, **kwargs))
    torch._dynamo.reset()
    return counter


def test_inductor_matches_eager_in_training_and_inference():
    reason = inductor_missing_reason()
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    eager, compiled_model = pair(out_indices=(1, 3), frozen_stages=0)
    x = torch.randn(2, 3, 64, 96)
    outs, grads = train_step(compiled_model, x)
    expected_outs, expected_grads = train_step(eager, x)
    assert_close(outs, expected_outs)
    assert_close(grads, expected_grads)
    assert_close(list(compiled_model.buffers()), list(eager.buffers()))
    with torch.no_grad():
        assert_close(compiled_model.eval()(x), eager.eval()(x))
    assert list(compiled_model.state_dict()) == list(eager.state_dict())


def test_one_graph_per_input_size_and_mode(counter):
    eager, compiled_model = pair(norm_eval=True)
    sizes = [(64, 96), (96, 64), (80, 112)]
    for height, width in sizes + sizes[:1]:
        x = torch.randn(2, 3, height, width)
        assert_close(train_step(compiled_model, x)[1], train_step(eager, x)[1])
    assert counter.frame_count == len(sizes)  # no graph breaks, no recompiles for a size seen
    with torch.no_grad():
        assert_close(compiled_model.eval()(x), eager.eval()(x))
    compiled_model.train()
    train_step(compiled_model, x)
    assert counter.frame_count == len(sizes) + 1  # eval() added one, train() found its own
    assert_close(list(compiled_model.buffers()), list(eager.buffers()))  # norm_eval held


def test_with_cp_compiles(counter):
    eager, compiled_model = pair(with_cp=True)
    x = torch.randn(2, 3, 64, 96)
    with no_fallback_warning():
        outs, grads = train_step(compiled_model, x)
    expected_outs, expected_grads = train_step(eager, x)
    assert counter.frame_count == 1
    assert_close(outs, expected_outs)
    assert_close(grads, expected_grads)
    assert_close(list(compiled_model.buffers()), list(eager.buffers()))  # stats updated once


def test_timm_models_compile(counter):
    eager = timm.create_model('convmlp_s', num_classes=10)
    model = timm.create_model('convmlp_s', num_classes=10, compile=True).eval()
    model.load_state_dict(eager.state_dict())
    eager.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close([model(x)], [eager(x)])
        assert_close(model.forward_intermediates(x, intermediates_only=True),
                     eager.forward_intermediates(x, intermediates_only=True))
    assert counter.frame_count == 1  # one graph of the taps served both
    features = timm.create_model('convmlp_s', features_only=True, compile=True)
    assert features.model.compiled_taps is not None


def failing_compile(calls):
    """A stand-in for torch.compile whose compiled function fails as a backend does."""
    def compile_(fn, **kwargs):
        def compiled_fn(*args, **kw):
            calls.append(1)
            raise RuntimeError('InvalidCxxCompiler: No working C++ compiler found in '
                               'torch._inductor.config.cpp.cxx: (None, \'g++\')\nmore lines')
        return compiled_fn
    return compile_


def test_failed_compile_warns_once_then_runs_eager(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, 'compile', failing_compile(calls))
    eager, compiled_model = pair()
    x = torch.randn(2, 3, 32, 48)
    with pytest.warns(CompileFallbackWarning) as record:
        outs, grads = train_step(compiled_model, x)
    assert len(record) == 1
    message = str(record[0].message)
    assert 'ConvMLP(compile=True)' in message and 'No working C++ compiler' in message
    assert 'eager from now on' in message and 'more lines' not in message
    expected_outs, expected_grads = train_step(eager, x)
    assert_close(outs, expected_outs, tol=1e-6)
    assert_close(grads, expected_grads, tol=1e-6)
    with no_fallback_warning():
        train_step(compiled_model, x)
    assert calls == [1]  # not tried again


def test_input_errors_are_eager_errors_and_keep_the_compiled_path(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, 'compile', failing_compile(calls))
    model = ConvMLP(arch=TINY, compile=True)
    with no_fallback_warning(), pytest.raises(RuntimeError) as error:
        model(torch.randn(1, 4, 32, 32))  # 4 channels: eager mode fails too
    assert 'channels' in str(error.value) and 'C++' not in str(error.value)
    assert not model.compiled_taps.failed


def test_state_dict_copies_pickles_and_configs(counter):
    model = MODELS.build(dict(type='ConvMLP', arch=TINY, compile=True))
    assert list(model.state_dict()) == list(ConvMLP(arch=TINY).state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.compiled_taps is not None and clone.compiled_taps._compiled is None
        with torch.no_grad():
            assert_close(clone(x), expected)
    with pytest.raises(ValueError, match="compile='yes' is invalid"):
        ConvMLP(compile='yes')


def test_compile_forward_for_other_backbones(counter):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    expected = module(torch.ones(1, 3, 8, 8))
    compile_forward(module)
    assert_close([module(torch.ones(1, 3, 8, 8))], [expected])
    assert counter.frame_count == 1
    assert list(module.state_dict()) == ['0.weight', '0.bias']
