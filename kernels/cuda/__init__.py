"""CUDA batch-1 GEMV for packed 2/3/4-bit group-wise layers (kernels.BACKENDS["cuda"]).

    unpack.cuh            host/device helpers: the bit-plane layout of compress/format.py, code by code
    wq_gemv_kernels.cuh   the kernels and a torch-free launcher (one warp per two output rows)
    wq_gemv.cu            the torch extension: checks the tensors, launches on the current stream
    unpack_host_test.cpp  a g++ driver that runs unpack.cuh on the host for tests/kernels/test_cuda.py
    build.py              load() (JIT build, None when impossible) and nvcc_check(arch) (ptxas figures)
"""
