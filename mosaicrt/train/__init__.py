"""Training a byte-level MMv2 on the CPU: text every machine has, synthetic recall episodes in it,
and the loop (`mosaicrt train`)."""
