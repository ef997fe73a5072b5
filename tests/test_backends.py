"""Backend dispatch: defaults by device, SPARSEFT_BACKEND, explicit requests, no extension."""

import pytest
import torch

import sparseft
from sparseft import _backends, _ext


def test_default_on_cpu_is_the_native_kernel_when_built():
    expected = "cpu" if _ext.cpu_available()[0] else "torch"
    assert _backends.resolve("cpu", _backends.BACKENDS) == expected


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv("SPARSEFT_BACKEND", "torch")
    assert _backends.resolve("cpu", _backends.BACKENDS) == "torch"
    monkeypatch.setenv("SPARSEFT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' was requested but cannot run"):
        _backends.resolve("cpu", _backends.BACKENDS)
    monkeypatch.setenv("SPARSEFT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backends.resolve("cpu", _backends.BACKENDS)


def test_keyword_beats_environment(monkeypatch):
    monkeypatch.setenv("SPARSEFT_BACKEND", "cuda")
    assert _backends.resolve("cpu", _backends.BACKENDS, "torch") == "torch"


def test_op_without_the_backend_refuses_it():
    with pytest.raises(ValueError, match="has no 'cpu' backend"):
        _backends.resolve("cpu", ("torch",), "cpu")


def test_missing_extension_falls_back_quietly_and_explains(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", (None, "sparseft._C is not built (test)"))
    assert _backends.resolve("cpu", _backends.BACKENDS) == "torch"
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    labels = torch.tensor([1, 2, -100, 9])
    loss = sparseft.linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(hidden @ weight.T, labels))
    with pytest.raises(RuntimeError, match="not built"):
        sparseft.linear_cross_entropy(hidden, weight, labels, backend="cpu")


def test_report_covers_every_backend_and_device():
    rows = _backends.report()
    assert {(r[0], r[1]) for r in rows} == {(b, d) for b in _backends.BACKENDS for d in ("cpu", "cuda")}
    assert all(ok or reason for _, _, ok, reason in rows)


def test_triton_whose_kernels_do_not_import_is_reported_unavailable(monkeypatch):
    import sys
    monkeypatch.setattr(_backends, "_triton_status", None)
    monkeypatch.setitem(sys.modules, "sparseft.kernels.sampled_grad", None)  # makes its import fail
    ok, reason = _backends.availability("triton", "cuda")
    assert not ok and "Triton kernels do not import" in reason and "sampled_grad" in reason
    assert _backends.resolve("cuda", _backends.BACKENDS) != "triton"
