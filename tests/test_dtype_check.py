"""model.dtype=bfloat16 on a CPU: checked at start against the CPU's flags, with a clear error."""

import pytest

from visualthinker_ray.errors import InputError
from visualthinker_ray.models import check_cpu_dtype, cpu_has_bf16

NATIVE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
OLD = "processor\t: 0\nflags\t\t: fpu sse2 sse4_2 avx\n"


def test_the_flags_decide_bf16_support():
    assert cpu_has_bf16(NATIVE)
    assert cpu_has_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_bf16(AVX2)
    assert not cpu_has_bf16("model name\t: avx512_bf16 in a name is not a flag\n")


def test_bf16_on_a_cpu_without_it_names_the_key():
    with pytest.raises(InputError, match=r"model\.dtype=bfloat16.*set model\.dtype=float32"):
        check_cpu_dtype("bfloat16", "cpu", OLD)
    assert check_cpu_dtype("bfloat16", "cpu", NATIVE) == "native"
    assert check_cpu_dtype("bfloat16", "auto", AVX2) == "emulated"  # runs, slower
    assert check_cpu_dtype("float32", "cpu", OLD) == ""  # float32 needs nothing
    assert check_cpu_dtype("auto", "cpu", OLD) == ""  # auto is float32 on the CPU
    assert check_cpu_dtype("bfloat16", "cuda", OLD) == ""  # a GPU's bf16 is not the CPU's business
