"""Pieces shared by the Triton losses: the deterministic mean reduction and launch helpers.

Both losses are `sum of per-element terms / number of selected elements`. Each program of a
loss kernel writes its own partial sum and partial count (no float atomics, so the result is
bitwise reproducible run to run); `finalize_mean` then reduces the partials in a fixed order in
one tiny program and writes the loss and 1 / count, which the backward kernels read from
device memory (no host synchronisation anywhere in forward or backward).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.backends.compiler import BaseBackend
from triton.runtime.interpreter import InterpretedFunction

FINALIZE_BLOCK = 1024

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                   torch.float64: "fp64", torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32"}


# The partial count changes with the batch size: one binary for all sizes.
@triton.jit(do_not_specialize=["n"])
def finalize_mean_kernel(sum_ptr, count_ptr, n, loss_ptr, inv_count_ptr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        acc += tl.load(sum_ptr + offs, mask=ok, other=0.0)
        cnt += tl.load(count_ptr + offs, mask=ok, other=0).to(tl.int64)
    total = tl.sum(acc, axis=0).to(tl.float64)
    # Nothing selected -> divide by 1: the loss is 0 and every gradient 0, never NaN.
    count = tl.maximum(tl.sum(cnt, axis=0), 1).to(tl.float64)
    tl.store(loss_ptr, (total / count).to(tl.float32))
    tl.store(inv_count_ptr, (1.0 / count).to(tl.float32))


def is_interpreted(kernel) -> bool:
    """True when TRITON_INTERPRET=1 was set as `kernel` was decorated (it runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)


@dataclass(frozen=True)
class Launch:
    """One kernel launch, described before it runs: the ops run it, and the ahead-of-time check
    (kernels/aot.py) compiles exactly the same kernel, arguments and constexprs for sm_80/sm_90
    from meta tensors."""
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4

    def __call__(self) -> None:
        if not all(g > 0 for g in self.grid):
            return
        device = next(a.device for a in self.args if isinstance(a, torch.Tensor))
        if device.type == "cuda":
            # Triton launches on the *current* device: make it the tensors' one (multi-GPU hosts).
            with torch.cuda.device(device):
                self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
        else:
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)

    def ast_source(self):
        """triton.compiler.ASTSource with the signature, constexprs and alignment attributes the
        JIT would derive from these arguments (ints equal to 1 become constexprs, multiples of
        16 and tensors get tt.divisibility=16: torch allocations are 256-byte aligned)."""
        from triton._C.libtriton import native_specialize_impl  # private: keep it out of the import path
        if is_interpreted(self.kernel):
            raise RuntimeError("cannot compile ahead of time: the kernels were defined under TRITON_INTERPRET=1")
        names = self.kernel.arg_names
        if len(self.args) + len(self.constexprs) != len(names):
            raise TypeError(f"{self.kernel.__name__}: {len(self.args)} args + {sorted(self.constexprs)} "
                            f"do not match its parameters {names}")
        signature, constexprs, attrs = {}, dict(self.constexprs), {}
        for i, (name, value) in enumerate(zip(names, self.args)):
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + TORCH_TO_TRITON[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, int) and not isinstance(value, bool):
                param = self.kernel.params[i]
                kind, attr = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                                    not param.do_not_specialize_on_alignment)
                signature[name] = kind
                if kind == "constexpr":
                    constexprs[name] = value
                elif attr:
                    attrs[(i,)] = BaseBackend.parse_attr(attr)
            else:
                raise TypeError(f"{self.kernel.__name__}: unsupported argument {name}={value!r}")
        for name in self.constexprs:
            signature[name] = "constexpr"
        return triton.compiler.ASTSource(fn=self.kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def finalize_launch(partial_sum, partial_count, loss, inv_count) -> Launch:
    return Launch(finalize_mean_kernel, (1,), (partial_sum, partial_count, partial_sum.numel(), loss, inv_count),
                  dict(BLOCK=FINALIZE_BLOCK), num_warps=4)


def finalize_mean(partial_sum: torch.Tensor, partial_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, 1/count) as float32 0-d tensors on the partials' device."""
    loss = torch.empty((), dtype=torch.float32, device=partial_sum.device)
    inv_count = torch.empty_like(loss)
    finalize_launch(partial_sum, partial_count, loss, inv_count)()
    return loss, inv_count


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Triton needs GPU tensors, or CPU tensors under the interpreter: say so plainly otherwise."""
    interpreted = is_interpreted(finalize_mean_kernel)
    for t in tensors:
        if t.device.type == "cpu" and not interpreted:
            raise RuntimeError("impl='triton' got CPU tensors; the Triton kernels need CUDA tensors "
                               "(or TRITON_INTERPRET=1 set before echocare_dist.kernels is imported); "
                               "use impl='torch' or 'auto' on CPU")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
