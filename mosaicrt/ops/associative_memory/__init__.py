"""mosaic::AssociativeMemory (version 1), attributes window, delay: retrieval by kernel regression
with the adaptive bandwidth (eq. 6, 10), over stored pairs and the pairs the chunk completes.

    q (B, C, H, hs) unit keys of the queries, t (B, C) int64 their positions,
    store_k, store_v (stored pairs), store_blocks (the graph's block table, below),
    store_tau (their positions, -1 for an empty slot),
    new_k, new_v (B, C, H, hs) the pairs this chunk completes, new_tau (B, C) (-1: none),
    beta0, beta1, alpha (H,) fp32 bandwidth parameters (already transformed)
    ->  y (B, C, H, hs) fp32

Pair tau is visible to query t when tau >= 0 and delay <= t - tau <= window - 1
(mosaicrt.ops.geometry: the STM has window h and delay 1, the LTM no window and delay m).
beta(n_t), n_t the size of the visible set, scales the query; softmax scale 1 (no 1/sqrt(hs));
one softmax over stored and new pairs together; an empty visible set gives 0. Products and
softmax run in fp32 whatever the stores' type.

Store layouts: the reference takes (B, N, H, hs) with store_tau (B, N). The ONNX function, the
native ONNX Runtime kernel and the plugin take the exported graph's: a pool of blocks of S pairs,
store_k, store_v (P, H, S, hs), and store_blocks (B, NB) int64, row b's i-th block being pool block
store_blocks[b, i], with store_tau (NB, B, S) (an STM ring is a pool of one block per row). The
kernel takes either (a store with a window is a ring of window - 1 slots).

mosaic::AssociativeMemoryInt8 and mosaic::AssociativeMemoryFp8 (version 1) are the same retrieval
over int8 or fp8 (e4m3) stores, both int8 tensors (AssociativeMemoryFp8's hold the bits of e4m3
values: ONNX has no Gather for fp8 types): two more inputs, store_k_scale and store_v_scale (the
pools' shape without hs, fp32), and stored pair s stands for (store_k[s] * store_k_scale[s],
store_v[s] * store_v_scale[s]). The scales multiply the scores and the softmax weights inside the
retrieval; no dequantized copy of a store is made (quantize_pairs: one scale per pair and head,
max|x| / 127 for int8, max|x| / 448 for fp8). Every implementation but the reference takes them:
the function body, the native kernel, and the Triton kernels (the plugin), which scale each tile
of pairs as they load it.

Appending, the native ONNX Runtime kernel's alone (ort_kernel.h, in a session whose options hold
ort_library.APPEND_PAIRS): with fp32/fp16 stores it also writes the chunk's new pairs into the
stores in place, once every query has read them: pair tau of row b into slot tau % S of block
store_blocks[b, tau // S] (a ring: the row's block, slot tau % S, the chunk's newest S pairs). The
runtime binds the stores by address, feeds the block table's columns up to the newest pair's
block, and writes no pairs itself. Every other implementation only reads (ONNX and TensorRT ops
are functional): for those the runtime writes the graph's new.* outputs after the run.

Implementations: reference.py (torch), onnx.py (the function body), kernel.py (Triton, with the
query already scaled), plugin_op.py (beta(n), then the kernel).
"""

NAME = "AssociativeMemory"
NAME_INT8 = "AssociativeMemoryInt8"  # int8 stores with a scale per pair and head
NAME_FP8 = "AssociativeMemoryFp8"  # fp8 e4m3 stores with a scale per pair and head
# Stores that keep a scale per pair and head, by element type: (the op that reads them, the
# largest magnitude their elements take: a pair's scale is max|x| / that).
SCALED_STORES = {"int8": (NAME_INT8, 127.0), "float8_e4m3fn": (NAME_FP8, 448.0)}
