"""CUDA variants of the core checks. Each is skipped without a GPU; the CPU variant of the
same property (tests/test_runtime.py, tests/test_memory.py, tests/test_parallel.py) always runs."""

from __future__ import annotations

import contextlib

import pytest
import torch

import revcompile
import revcompile.executor as runtime_streams
import revcompile.runtime.segment as runtime
import revcompile.runtime.tape as runtime_tape
from revcompile.runtime.auto import AutoChoice
from revcompile.reference import example_inputs, reference_vit
from tests.conftest import (
    assert_gradients_match,
    gradients,
    perturb_parameters,
    relative_error,
    requires_cuda,
)

pytestmark = [requires_cuda, pytest.mark.cuda]


def _cuda_vit(depth, dtype=torch.float32, dim=64):
    torch.manual_seed(depth)
    model = perturb_parameters(reference_vit(depth=depth, dim=dim, heads=2)).to("cuda", dtype)
    (x,) = example_inputs(model, batch_size=4, dtype=dtype, device="cuda")
    return model, x


@pytest.mark.parametrize("depth", [3, 4])
def test_cuda_float32_gradients(depth):
    model, x = _cuda_vit(depth)
    converted = revcompile.convert(model, x)
    assert_gradients_match(converted, (x,), tol=1e-4)


def test_cuda_float64_gradients():
    model, x = _cuda_vit(3, torch.float64)
    converted = revcompile.convert(model, x)
    assert_gradients_match(converted, (x,), tol=1e-10)


def test_cuda_dropout_replay_is_needed(monkeypatch):
    model, x = _cuda_vit(3, torch.float64)
    converted = revcompile.convert(model, x)
    reference, _ = gradients(converted, (x,), mode="autograd")
    monkeypatch.setattr(runtime, "_replayed_rng", lambda state, devices: contextlib.nullcontext())
    broken, _ = gradients(converted, (x,), mode="reversible")
    assert max(relative_error(broken[n], reference[n]) for n in reference if reference[n] is not None) > 1e-3


@pytest.mark.parametrize("mode", ["reversible", "parallel"])
@pytest.mark.parametrize("depth", [3, 4])
def test_cuda_bf16_autocast_gradients(depth, mode):
    model, x = _cuda_vit(depth)
    converted = revcompile.convert(model, x)

    def grads(mode):
        revcompile.set_backward(converted, mode)
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = converted(x.clone().requires_grad_())
        return torch.autograd.grad(out.float().square().sum(), list(converted.parameters()))

    reference, got = grads("autograd"), grads(mode)
    assert max(relative_error(a, b) for a, b in zip(got, reference)) < 2e-2


def test_cuda_peak_memory_drops():
    torch.manual_seed(0)
    model = reference_vit(depth=12, dim=256, heads=4).cuda()
    (x,) = example_inputs(model, batch_size=64, device="cuda")

    def peak(m):
        m(x).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        m(x).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    original = peak(model)
    converted = revcompile.convert(model, x[:2])
    assert peak(converted) * 3 < original


# --- the "parallel" backward on two CUDA streams ---------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 8])
def test_cuda_parallel_float32_gradients(depth):
    model, x = _cuda_vit(depth)
    converted = revcompile.convert(model, x)
    assert revcompile.backward_program(converted).stream_count == (1 if depth == 1 else 2)
    assert_gradients_match(converted, (x,), tol=1e-4, mode="parallel")


def test_cuda_parallel_float64_gradients_with_dropout():
    model, x = _cuda_vit(5, torch.float64)
    converted = revcompile.convert(model, x)
    assert_gradients_match(converted, (x,), tol=1e-10, mode="parallel")


class _RecordingCudaStreams(runtime_streams.CudaStreams):
    """The real CUDA backend, also writing the trace that tests/test_parallel.py simulates."""

    def __init__(self, count, device):
        super().__init__(count, device)
        self.trace = [("input", 0)]
        self.current = 0
        self._events = {}

    @contextlib.contextmanager
    def use(self, stream):
        previous, self.current = self.current, stream
        with super().use(stream):
            assert torch.cuda.current_stream() == self.streams[stream]
            try:
                yield
            finally:
                self.current = previous

    def record(self, stream):
        event = super().record(stream)
        self.trace.append(("record", stream))
        self._events[id(event)] = len(self.trace) - 1
        return event

    def wait(self, stream, event):
        super().wait(stream, event)
        self.trace.append(("wait", stream, self._events[id(event)]))

    def handoff(self, tensors, stream):
        tensors = list(tensors)
        super().handoff(tensors, stream)
        self.trace.extend(("handoff", stream, t.untyped_storage().data_ptr()) for t in tensors)

    def end(self):
        super().end()
        self.trace.append(("end", 0))


def test_cuda_parallel_runs_on_two_streams_in_a_safe_order(monkeypatch):
    from tests.test_parallel import _logged, assert_device_order_is_safe

    model, x = _cuda_vit(5)
    converted = revcompile.convert(model, x)
    traces = []
    real = runtime_tape.ProgramRun

    def recorded(program, ops, env, streams):
        assert isinstance(streams, runtime_streams.CudaStreams)
        backend = _RecordingCudaStreams(program.stream_count, x.device)
        traces.append(backend.trace)
        return real(program, _logged(ops, backend), env, backend)

    monkeypatch.setattr(runtime_tape, "ProgramRun", recorded)
    assert_gradients_match(converted, (x,), tol=1e-4, mode="parallel")
    assert traces
    for trace in traces:
        assert {item[1] for item in trace if item[0] == "read"} == {0, 1}
        assert_device_order_is_safe(trace)


def test_cuda_auto_decides_and_stays_exact():
    model, x = _cuda_vit(4)
    converted = revcompile.convert(model, x)
    revcompile.set_backward(converted, "auto")
    for _ in range(2 * (1 + AutoChoice.TRIALS) + 1):
        converted(x).sum().backward()
    (segment,) = converted.reversible_variants[0].segments
    (choice,) = segment.auto_choices.values()
    assert choice.choice in ("reversible", "parallel")
    assert all(len(times) == 1 + AutoChoice.TRIALS for times in choice.times.values())
    assert_gradients_match(converted, (x,), tol=1e-4, mode="auto")


def test_cuda_parallel_peak_memory_is_bounded():
    from revcompile.measure import saved_for_backward

    torch.manual_seed(0)
    depth = 12
    model = reference_vit(depth=depth, dim=256, heads=4).cuda()
    (x,) = example_inputs(model, batch_size=64, device="cuda")
    converted = revcompile.convert(model, x[:2])
    _, forward = saved_for_backward(lambda: converted(x), converted)
    revcompile.set_backward(converted, "autograd")
    _, stored = saved_for_backward(lambda: converted(x), converted)
    block_graph = (stored.bytes - forward.bytes) / depth

    def peak(mode):
        revcompile.set_backward(converted, mode)
        converted(x).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        converted(x).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    sequential, parallel = peak("reversible"), peak("parallel")
    assert parallel - sequential <= block_graph, (sequential, parallel, block_graph)
