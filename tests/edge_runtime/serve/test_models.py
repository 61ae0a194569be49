"""``TensorModelHost`` in process, on real bundles: the queue bound, dynamic batching
(equal to unbatched runs), refusals, and a worker that survives what requests throw."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.manifest import ServingSpec
from edge_runtime.serve.models import BundleRef, TensorModelHost, batching_for, resolve_bundles
from edge_runtime.serve.protocol import BadRequest, NotReady, Overloaded, ServeError, TensorModel


class Batches:
    """A ``HostObserver`` that keeps every batch's rows and requests."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.depths: list[int] = []

    def queue_depth(self, model: str, depth: int) -> None:
        self.depths.append(depth)

    def batch(self, model: str, rows: int, requests: int, seconds: float) -> None:
        self.seen.append((rows, requests))


def host_for(bundle, keypair, **options) -> TensorModelHost:
    (ref,) = resolve_bundles([str(bundle)], keypair[1])
    host = TensorModelHost(ref, keypair[1], **options)
    assert host.load()
    return host


@pytest.fixture
def digits(digits_example):
    with np.load(digits_example.eval) as data:
        return data["image"][:24]


def test_the_host_is_a_tensor_model_and_ready_after_load(cnn_bundle, keypair):
    (ref,) = resolve_bundles([str(cnn_bundle)], keypair[1])
    host = TensorModelHost(ref, keypair[1])

    assert isinstance(host, TensorModel)
    assert not host.ready
    with pytest.raises(NotReady, match="is not ready: loading"):
        host.submit({"image": np.zeros((1, 1, 8, 8), np.float32)})
    assert host.load() and host.ready
    host.close()
    assert not host.ready


def test_concurrent_requests_are_batched_and_equal_unbatched_runs(cnn_bundle, keypair, digits):
    batches = Batches()
    host = host_for(cnn_bundle, keypair, max_batch_size=8, max_queue_delay_ms=200, observer=batches)
    # Requests of 1, 2 and 3 rows, submitted together: the worker stacks them.
    sizes = [1, 2, 3, 1, 1, 2, 1, 3, 1, 1, 2, 1, 1, 2, 1, 1]
    starts = np.cumsum([0, *sizes[:-1]])
    try:
        futures = [
            host.submit({"image": digits[start : start + size]})
            for start, size in zip(starts, sizes, strict=True)
        ]
        answers = [future.result(timeout=30) for future in futures]
    finally:
        host.close()

    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        expected = [
            runtime.run({"image": digits[start : start + size]})
            for start, size in zip(starts, sizes, strict=True)
        ]
    for answer, reference in zip(answers, expected, strict=True):
        assert answer["logits"].shape == reference["logits"].shape
        np.testing.assert_allclose(answer["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
    assert max(requests for _, requests in batches.seen) > 1, batches.seen
    assert max(rows for rows, _ in batches.seen) <= 8
    assert sum(rows for rows, _ in batches.seen) == sum(sizes)


def test_only_requests_of_one_shape_are_stacked(minilm_bundle, keypair, minilm_example):
    with np.load(minilm_example.eval) as data:
        ids = {name: data[name][:2] for name in data.files}
    short = {name: value[:, :16] for name, value in ids.items()}
    batches = Batches()
    # MiniLM int8-dynamic is never batched: describe it as fp32 (the bundle itself is
    # verified and loaded as it is), to see requests of two shapes kept apart.
    (ref,) = resolve_bundles([str(minilm_bundle)], keypair[1])
    model = ref.manifest.model.model_copy(update={"recipe": "fp32"})
    ref = BundleRef(ref.name, ref.path, ref.manifest.model_copy(update={"model": model}))
    host = TensorModelHost(
        ref, keypair[1], observer=batches, queue_size=8, max_batch_size=8, max_queue_delay_ms=200
    )
    assert host.load()
    try:
        futures = [host.submit(inputs) for inputs in (ids, short, ids, short)]
        answers = [future.result(timeout=60) for future in futures]
    finally:
        host.close()

    assert sorted(batches.seen) == [(4, 2), (4, 2)]
    assert [answer["sentence_embedding"].shape for answer in answers] == [(2, 384)] * 4


def test_a_full_queue_refuses_at_once_with_a_retry_time(cnn_bundle, keypair, digits):
    host = host_for(cnn_bundle, keypair, queue_size=2, max_batch_size=1)
    release = threading.Event()
    try:
        busy = host.call(lambda runtime: release.wait(30))  # the worker is held here
        time.sleep(0.2)
        queued = [host.submit({"image": digits[i : i + 1]}) for i in range(2)]
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="has 2 requests waiting, its limit") as refused:
            host.submit({"image": digits[:1]})
        refusal_s = time.perf_counter() - started
        release.set()
        results = [future.result(timeout=30) for future in queued]
    finally:
        release.set()
        host.close()

    assert refusal_s < 0.05
    assert refused.value.status == 503 and refused.value.retry_after_s > 0
    assert busy.result() is True
    assert [result["logits"].shape for result in results] == [(1, 10), (1, 10)]


def test_bad_inputs_are_refused_before_the_queue_and_the_worker_lives_on(
    cnn_bundle, keypair, digits
):
    host = host_for(cnn_bundle, keypair)
    try:
        with pytest.raises(BadRequest, match="has dtype float64, needs float32"):
            host.submit({"image": digits[:1].astype(np.float64)})
        with pytest.raises(BadRequest, match=r"missing inputs \['image'\]"):
            host.submit({"pixels": digits[:1]})
        with pytest.raises(BadRequest, match="has no output 'probs'; its outputs are logits"):
            host.submit({"image": digits[:1]}, outputs=["probs"])
        failed = host.call(lambda runtime: 1 / 0)
        with pytest.raises(ServeError, match="ZeroDivisionError"):
            failed.result(timeout=10)
        answer = host.infer({"image": digits[:1]}, outputs=["logits"])
        assert host.ready and host.depth == 0
    finally:
        host.close()

    assert list(answer) == ["logits"]


def test_close_finishes_queued_requests_then_refuses(cnn_bundle, keypair, digits):
    host = host_for(cnn_bundle, keypair, queue_size=64, max_batch_size=1)
    futures = [host.submit({"image": digits[i : i + 1]}) for i in range(20)]

    host.close(timeout_s=30)

    assert all(future.result(timeout=0)["logits"].shape == (1, 10) for future in futures)
    with pytest.raises(NotReady, match="shutting down"):
        host.submit({"image": digits[:1]})


def test_batching_comes_from_the_bundle_and_flags_override_it(
    cnn_bundle, tflite_x86_bundle, minilm_bundle, keypair
):
    refs = {
        ref.name: ref
        for ref in resolve_bundles(
            [f"cnn={cnn_bundle}", f"tflite={tflite_x86_bundle}", f"minilm={minilm_bundle}"],
            keypair[1],
        )
    }
    cnn = refs["cnn"].manifest

    # x86-64-avx2 ships batching off (docs/benchmarks.md, bench_serve (b))
    assert cnn.serving == ServingSpec(max_batch_size=1, max_queue_delay_ms=2)
    assert batching_for(cnn, None, None).reason == "max_batch_size is 1"
    assert batching_for(cnn, 8, None).max_batch_size == 8
    assert batching_for(cnn, 4, 10).max_batch_size == 4
    assert batching_for(cnn, 4, 10).max_queue_delay_s == pytest.approx(0.01)
    assert batching_for(cnn, 1, None).reason == "max_batch_size is 1"
    assert (
        "first axes are not one free dimension"
        in batching_for(refs["tflite"].manifest, 8, None).reason
    )
    assert (
        "int8-dynamic-per-channel quantizes activations per run"
        in batching_for(refs["minilm"].manifest, 8, None).reason
    )
    no_section = cnn.model_copy(update={"serving": None})
    assert batching_for(no_section, None, None).max_batch_size == 1
    assert isinstance(refs["cnn"], BundleRef)
