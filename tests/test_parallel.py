"""The "parallel" backward: same gradients, ordered streams, bounded memory (CPU checks).

On CPU the two-stream program runs in its order through the same executor as on CUDA.
What CUDA adds -- concurrency -- is checked here by simulating the device on the
executor's own calls: every value a step reads must be ordered after the step that wrote
it (stream order plus waits) and handed to the reader's stream if it crossed streams.
"""

from __future__ import annotations

import contextlib
import dataclasses

import networkx as nx
import pytest
import torch

import revcompile
import revcompile.runtime.segment as runtime
import revcompile.runtime.tape as runtime_tape
from revcompile.runtime.auto import AutoChoice
from revcompile.passes.schedule import (
    GRAD,
    RECOMPUTE,
    check_program,
    cotangent_value,
    graph_value,
    schedule_backward,
    streams_value,
)
from revcompile.executor import InlineStreams, run_program
from revcompile.measure import saved_for_backward
from revcompile.reference import example_inputs, reference_vit
from tests.conftest import (
    assert_gradients_match,
    gradients,
    perturb_parameters,
    relative_error,
)
from tests.test_runtime import _autocast_gradients, _BiasedAttentionBlocks


def _vit(depth, dtype=torch.float64, **overrides):
    torch.manual_seed(depth)
    options = dict(depth=depth, dim=32, heads=2, drop=0.1, attn_drop=0.1, drop_path=0.2) | overrides
    model = perturb_parameters(reference_vit(**options).to(dtype))
    (x,) = example_inputs(model, batch_size=4, dtype=dtype)
    return model, x


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8])
def test_parallel_gradients_equal_autograd(depth):
    model, x = _vit(depth)
    converted = revcompile.convert(model, x)
    assert_gradients_match(converted, (x,), tol=1e-10, mode="parallel")
    parallel, _ = gradients(converted, (x,), mode="parallel")
    sequential, _ = gradients(converted, (x,), mode="reversible")
    assert all(torch.equal(parallel[name], sequential[name]) for name in sequential)  # same ops, same order per value


def test_parallel_float32_at_odd_depth():
    model, x = _vit(7, torch.float32)
    converted = revcompile.convert(model, x)
    assert_gradients_match(converted, (x,), tol=1e-4, mode="parallel")


def test_parallel_reaches_side_inputs():
    torch.manual_seed(0)
    model = _BiasedAttentionBlocks(depth=4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    converted = revcompile.convert(model, x)
    assert revcompile.backward_program(converted).depth == 4
    assert_gradients_match(converted, (x,), tol=1e-10, mode="parallel")


def test_parallel_replays_autocast():
    torch.manual_seed(0)
    model = perturb_parameters(reference_vit(depth=4, dim=64, heads=2))
    (x,) = example_inputs(model, batch_size=4)
    converted = revcompile.convert(model, x)
    reference = _autocast_gradients(converted, x, "autograd")
    parallel = _autocast_gradients(converted, x, "parallel")
    assert max(relative_error(a, b) for a, b in zip(parallel, reference)) < 2e-2


def test_auto_runs_the_sequential_program_on_cpu(monkeypatch):
    model, x = _vit(3)
    converted = revcompile.convert(model, x)
    used = []
    real = runtime_tape.ProgramRun
    monkeypatch.setattr(runtime_tape, "ProgramRun", lambda program, *a: used.append(program.stream_count) or real(program, *a))
    assert_gradients_match(converted, (x,), tol=1e-10, mode="auto")
    assert used == [1]
    assert all(not s.auto_choices for v in converted.reversible_variants for s in v.segments)


def test_auto_keeps_parallel_only_when_clearly_faster():
    def decide(reversible_ms, parallel_ms):
        choice = AutoChoice()
        choice.plan = []
        choice.times = {"reversible": [99.0] + reversible_ms, "parallel": [99.0] + parallel_ms}  # first: warm-up
        return choice.next_mode()

    assert decide([10.0, 10.2, 9.9], [8.0, 8.1, 7.9]) == "parallel"
    assert decide([10.0, 10.2, 9.9], [9.95, 10.0, 9.9]) == "reversible"  # within the margin: keep sequential
    assert decide([10.0, 10.2, 9.9], [12.0, 11.0, 13.0]) == "reversible"


# --- simulating the device on the executor's calls ---------------------------------------------------


class RecordingStreams(InlineStreams):
    """Runs inline like the CPU backend and records every stream operation and op, in issue order."""

    def __init__(self, count):
        super().__init__(count)
        self.trace: list[tuple] = [("input", 0)]
        self.current = 0

    @contextlib.contextmanager
    def use(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def record(self, stream):
        self.trace.append(("record", stream))
        return len(self.trace) - 1

    def wait(self, stream, event):
        self.trace.append(("wait", stream, event))

    def handoff(self, tensors, stream):
        self.trace.extend(("handoff", stream, t.untyped_storage().data_ptr()) for t in tensors)

    def end(self):
        self.trace.append(("end", 0))


class _LoggedValues:
    def __init__(self, values, log, stream):
        self.values, self.log, self.stream = values, log, stream

    def _read(self, name, value):
        storages = [t.untyped_storage().data_ptr() for t in _flat(value)]
        self.log.append(("read", self.stream, name, storages))
        return value

    def __getitem__(self, name):
        return self._read(name, self.values[name])

    def get(self, name, default=None):
        return self._read(name, self.values.get(name, default))

    def take(self, name):
        return self._read(name, self.values.take(name))

    def __setitem__(self, name, value):
        self.values[name] = value
        self.log.append(("write", self.stream, name))


def _flat(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    return []


def _logged(ops, backend):
    return {kind: (lambda i, branch, values, scratch, op=op: op(i, branch, _LoggedValues(values, backend.trace, backend.current), scratch)) for kind, op in ops.items()}


def assert_device_order_is_safe(trace):
    """Every read is ordered after its value's writer on the device, and handed over if it crossed streams."""
    order = nx.DiGraph()
    last_on: dict[int, int] = {}
    writer = {}
    for k, item in enumerate(trace):
        stream = item[1]
        if item[0] in ("input", "end"):  # the caller's stream before and after the program
            for other in last_on.values():
                order.add_edge(other, k)
            for s in range(4):
                last_on[s] = k
            continue
        if stream in last_on:
            order.add_edge(last_on[stream], k)
        last_on[stream] = k
        if item[0] == "wait":
            order.add_edge(item[2], k)
    for k, item in enumerate(trace):
        if item[0] == "write":
            writer[item[2]] = k
        elif item[0] == "read":
            _, stream, name, storages = item
            source = writer.get(name, 0)
            assert nx.has_path(order, source, k), f"read of {name} on s{stream} is not ordered after its writer"
            if source != 0 and trace[source][1] != stream or source == 0 and stream != 0:
                handed = {(s, p) for kind, s, *rest in trace[:k] if kind == "handoff" for p in rest}
                for storage in storages:
                    assert (stream, storage) in handed, f"{name} crossed to s{stream} without record_stream"


def _synthetic_ops(depth):
    """Steps that move fresh tensors through the declared values, without any autograd."""

    def recompute(i, branch, values, scratch):
        y = values[streams_value(i)]
        if branch == "g":
            values[graph_value(i)] = {"g": y[0] * 1}
        else:
            values[graph_value(i)]["f"] = y[1] * 1
            values[streams_value(i - 1)] = (y[0] - 1, y[1] - 1)

    def grad(i, branch, values, scratch):
        rebuilt = values[graph_value(i)]
        if branch == "g":
            scratch["dy"] = values[cotangent_value(i)][0] + rebuilt.pop("g")
        else:
            values[cotangent_value(i - 1)] = (scratch.pop("dy"), rebuilt.pop("f"))

    return {RECOMPUTE: recompute, GRAD: grad}


def _inputs(depth):
    return {streams_value(depth - 1): (torch.ones(3), torch.ones(3)), cotangent_value(depth - 1): (torch.ones(3), torch.ones(3))}


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8])
def test_executor_orders_and_hands_over_every_cross_stream_value(depth):
    program = schedule_backward(depth, streams=2)
    backend = RecordingStreams(program.stream_count)
    env = run_program(program, _logged(_synthetic_ops(depth), backend), _inputs(depth), backend)
    assert set(env) == {cotangent_value(-1)}  # everything else was dropped after its last use
    assert_device_order_is_safe(backend.trace)
    waits = sum(item[0] == "wait" for item in backend.trace)
    assert waits == len(program.waits)


def test_simulation_catches_a_program_without_waits():
    """Negative control: the same run with the waits removed races."""
    program = schedule_backward(3, streams=2)
    unsafe = dataclasses.replace(program, waits=())
    backend = RecordingStreams(2)
    run_program(unsafe, _logged(_synthetic_ops(3), backend), _inputs(3), backend)
    with pytest.raises(AssertionError, match="not ordered after its writer"):
        assert_device_order_is_safe(backend.trace)


def test_runtime_steps_are_safe_on_simulated_streams(monkeypatch):
    """The real backward math, run with a recording backend: still exact, and race-free."""
    model, x = _vit(5)
    converted = revcompile.convert(model, x)
    traces = []
    real = runtime_tape.ProgramRun

    def recorded(program, ops, env, streams):
        backend = RecordingStreams(program.stream_count)
        traces.append(backend.trace)
        return real(program, _logged(ops, backend), env, backend)

    monkeypatch.setattr(runtime_tape, "ProgramRun", recorded)
    assert_gradients_match(converted, (x,), tol=1e-10, mode="parallel")
    assert traces
    for trace in traces:
        assert {item[1] for item in trace if item[0] == "read"} == {0, 1}
        assert_device_order_is_safe(trace)


# --- memory: what the parallel program keeps alive ---------------------------------------------------


class LiveSavedBytes:
    """Bytes of distinct storages currently saved for any graph, and their peak (parameters excluded).

    Saved tensors are wrapped on save; a wrapper dies when autograd frees the graph holding
    it, so this follows graphs built and freed inside the backward as well.
    """

    def __init__(self, parameters):
        self.excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self.live: dict[int, list] = {}
        self.now = self.peak = 0

    def pack(self, tensor):
        key = tensor.untyped_storage().data_ptr()
        return tensor if key in self.excluded else _Held(self, key, tensor)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, tracker, key, tensor):
        self.tracker, self.key, self.tensor = tracker, key, tensor
        entry = tracker.live.setdefault(key, [tensor.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            tracker.now += entry[0]
            tracker.peak = max(tracker.peak, tracker.now)
        entry[1] += 1

    def __del__(self):
        entry = self.tracker.live[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            self.tracker.now -= entry[0]
            del self.tracker.live[self.key]


def _peak_saved(converted, x, mode):
    revcompile.set_backward(converted, mode)
    tracker = LiveSavedBytes(converted.parameters())
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        converted(x).sum().backward()
    assert tracker.now == 0 and not tracker.live  # every graph was freed
    return tracker.peak


def test_parallel_keeps_at_most_one_more_block_graph_alive(monkeypatch):
    depth = 6
    torch.manual_seed(0)
    model = reference_vit(depth=depth, dim=64, heads=2, drop=0.0, attn_drop=0.0, drop_path=0.0)
    (x,) = example_inputs(model, batch_size=8)
    converted = revcompile.convert(model, x)
    _, reversible_forward = saved_for_backward(lambda: converted(x), converted)
    revcompile.set_backward(converted, "autograd")
    _, stored = saved_for_backward(lambda: converted(x), converted)
    block_graph = (stored.bytes - reversible_forward.bytes) / depth  # one block's F and G graphs

    sequential = _peak_saved(converted, x, "reversible")
    parallel = _peak_saved(converted, x, "parallel")
    assert sequential < reversible_forward.bytes + block_graph  # one branch graph at a time
    assert parallel - sequential <= block_graph

    # Negative control: a correct program that rebuilds every block before differentiating any.
    program = revcompile.backward_program(converted, mode="reversible")
    order = tuple((RECOMPUTE, i) for i in reversed(range(depth))) + tuple((GRAD, i) for i in reversed(range(depth)))
    greedy = dataclasses.replace(program, order=order, groups=tuple((s,) for s in order), live_graphs=depth)
    check_program(greedy)
    monkeypatch.setattr(runtime.ReversibleSegment, "backward_program", lambda self, mode, coupling=None: greedy)
    assert _peak_saved(converted, x, "reversible") - sequential > 3 * block_graph
