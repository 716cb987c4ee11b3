"""mosaic::GatedKeyScan (version 1), attribute eps: the gated key recurrence (eq. 8) over a chunk.

    k_raw (B, C, H, hs), log_g (B, C, H), log_lam (B, C, H), valid (B, C) bool,
    s_in (B, H, hs), mx_in (B, H)  ->  keys (B, C, H, hs), s_out (B, H, hs), mx_out (B, H)

k_bar_t = g_t * k~_t + lam_t * k_bar_{t-1}, kept in the exact log-space stabilised form
k_bar = exp(mx) * s with mx the running max of the log-weights (mx = -inf before the first token),
so no gate overflows; the keys are k_t = k_bar_t / max(||k_bar_t||, eps). Padding tokens (valid
False, a suffix of each row) leave the state unchanged. All tensors fp32.

Implementations: reference.py (torch: token by token, and a chunked parallel form for training),
onnx.py (the function body), kernel.py (Triton), plugin_op.py (the op through the kernel).
"""

NAME = "GatedKeyScan"
FLOOR = -1e30  # running-max floor: keeps exp(-inf - -inf) out of a fresh state
