"""The native matrix-vector kernel of decoding, against float64 and its twin F.linear."""

import time

import pytest
import torch
import torch.nn.functional as F

from maskedattn.model import gemv
from maskedattn.model.layers import Linear
from tests.helpers import ERROR_FLOOR, relative_error

native = pytest.mark.skipif(gemv._library() is None, reason=gemv.native_status())


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [
    (1, 1, 1), (1, 97, 113), (3, 257, 17), (16, 5, 768), (2, 2304, 768), (1, 50257, 96),
])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_as_well_as_torch_does(dtype, m, n, k, bias):
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    ours = gemv.native_linear(x, w, b)
    torch_err = relative_error(F.linear(x, w, b), exact)
    assert ours.dtype == dtype and ours.shape == (m, n)
    assert relative_error(ours, exact) <= 2 * torch_err + ERROR_FLOOR[dtype]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_its_batch(dtype):
    x, w, b = torch.randn(7, 113, dtype=dtype), torch.randn(97, 113, dtype=dtype), None
    together = gemv.native_linear(x, w, b)
    alone = torch.cat([gemv.native_linear(x[i : i + 1], w, b) for i in range(7)])
    assert torch.equal(together, alone)


@native
def test_keeps_leading_dimensions_and_reads_strided_inputs():
    x = torch.randn(2, 3, 40)[..., ::2]  # (2, 3, 20), not contiguous
    w = torch.randn(9, 20)
    torch.testing.assert_close(gemv.native_linear(x, w), F.linear(x, w))


def test_linear_falls_back_where_the_kernel_does_not_apply():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(1, 16, requires_grad=True)
    F.linear(x, w).sum().backward()  # autograd: the torch path
    y = gemv.linear(x, w)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    many = torch.randn(gemv.MAX_ROWS + 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(gemv.linear(many, w), F.linear(many, w))
        xd, wd = torch.randn(2, 16, dtype=torch.float64), w.double()
        assert torch.equal(gemv.linear(xd, wd), F.linear(xd, wd))


def test_linear_module_is_an_nn_linear_with_the_same_output():
    layer = Linear(33, 21)
    assert isinstance(layer, torch.nn.Linear)
    reference = torch.nn.Linear(33, 21)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 33)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x))
    assert "gemv" in gemv.native_status() or "unavailable" in gemv.native_status()


@native
def test_threads_and_concurrent_callers_give_identical_results():
    """The pool splits rows between threads; a second caller (ctypes drops the GIL) goes alone."""
    import threading

    x, w, b = torch.randn(3, 768), torch.randn(4099, 768), torch.randn(4099)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = gemv.native_linear(x, w, b)
        torch.set_num_threads(max(2, threads))
        results, errors = [], []

        def call():
            try:
                results.extend(gemv.native_linear(x, w, b) for _ in range(20))
            except Exception as err:  # pragma: no cover - reported below
                errors.append(err)

        workers = [threading.Thread(target=call) for _ in range(3)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        torch.set_num_threads(threads)
    assert not errors and len(results) == 60
    assert all(torch.equal(r, alone) for r in results)


@native
@pytest.mark.parametrize("chain", [0, 1])
def test_warming_weights_that_were_freed_since_is_harmless(chain):
    """Helpers warm the cache with the weights of the calls that followed last time: here those
    were freed and unmapped (over 32 MiB, glibc's largest mmap threshold, so never kept by
    malloc), and reading them with loads would fault. ``chain``: how many smaller calls came
    between, so the freed weights are the second of the chain the helper follows."""
    x, w = torch.randn(1, 768), torch.randn(2304, 768)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        between = [torch.randn(512, 768) for _ in range(chain)]
        gone = torch.randn(12288, 768)  # 36 MiB
        for _ in range(3):  # learn: w, (between), then gone
            for weight in (w, *between, gone):
                gemv.native_linear(x, weight)
        del gone, between, weight  # the loop's variable holds the last weight too
        results = []
        for _ in range(20):  # with gaps, as attention leaves them: time to warm the chain
            results.append(gemv.native_linear(x, w))
            time.sleep(0.01)
    finally:
        torch.set_num_threads(threads)
    assert all(relative_error(r, F.linear(x, w)) < 1e-5 for r in results)


def test_the_operator_passes_opcheck_and_stays_in_a_compiled_decode_step():
    from maskedattn.generate import decode_one_token
    from maskedattn.model import GPT, GPTConfig

    x, w, b = torch.randn(2, 40), torch.randn(30, 40), torch.randn(30)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.maskedattn.gemv_linear,
                              (x.to(dtype), w.to(dtype), b.to(dtype)))
    torch.library.opcheck(torch.ops.maskedattn.gemv_linear, (x, w, None))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context=16, n_layer=1, n_head=2, n_embd=16)).eval()
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        model.hidden_states(torch.tensor([[1, 2, 3]]), cache=cache)
        step = torch.compile(decode_one_token, fullgraph=True, backend=backend)
        logits = step(model, torch.tensor([4]), torch.tensor([3]), cache)
    # qkv, proj, fc, proj and the LM head: every linear of the step
    assert sum("gemv_linear" in op for op in ops) == 5, ops
    with torch.no_grad():
        want = model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1]
    torch.testing.assert_close(logits[0], want, rtol=1e-5, atol=1e-5)
