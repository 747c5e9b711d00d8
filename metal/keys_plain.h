// Plain key storage for the score kernel: keys [B, H_kv, N, D] of type T.
#define KEY(row, j) ((float)keys[(row) * D + (j)])
