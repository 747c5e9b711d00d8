"""R-KV's exact redundancy (N x N, with its newest-similar exception) against the O(N D) mean
similarity that observe_redundancy reads (triattn_mlx.baselines.mean_similarity), on the keys
Qwen2.5-Coder-0.5B-Instruct caches for 3000 tokens of Paul Graham essays: their z-scores'
correlation over the evictable tokens (all but the newest 128), the overlap of the 500 least
redundant, and where they differ most.

    PYTHONPATH=. python results/cpu/experiments/redundancy-linear.py > results/cpu/experiments/redundancy-linear.log
"""
import triattn_mlx
import mlx.core as mx, numpy as np, mlx_lm
from mlx_lm.models.cache import KVCache
from support.models import model_dir
from support.tasks import haystack_text
from triattn_mlx.baselines import mean_similarity, redundancy
from triattn_mlx.selection import zscore

model, tok = mlx_lm.load(str(model_dir("qwen2.5-coder-0.5b")))
ids = tok.encode(haystack_text())[:3000]
cache = [KVCache() for _ in model.layers]
for s in range(0, len(ids), 1024):
    mx.eval(model(mx.array(ids[s:s+1024])[None], cache=cache))

def linear(keys):
    k = keys.astype(mx.float32); k = k / (mx.linalg.norm(k, axis=-1, keepdims=True) + 1e-8)
    N = k.shape[2]
    total = (k * k.sum(axis=2, keepdims=True)).sum(-1) - 1.0
    return mx.softmax(total / N, axis=-1)

for li in (0, 3, 8, 12, 16, 20, 23):
    keys = cache[li].keys[..., :len(ids), :]
    a = np.array(zscore(redundancy(keys, 0.5)))[0]; b = np.array(zscore(linear(keys)))[0]; assert np.allclose(np.array(linear(keys)), np.array(mean_similarity(keys)), rtol=1e-5)
    sim = None
    for h in range(a.shape[0]):
        ev = slice(0, len(ids) - 128)  # evictable
        r = np.corrcoef(a[h, ev], b[h, ev])[0, 1]
        k = 500
        ta, tb = set(np.argsort(a[h, ev])[:k]), set(np.argsort(b[h, ev])[:k])
        print(f"layer {li} head {h}: corr {r:.4f}, least-redundant-{k} overlap {len(ta & tb)/k:.3f}, max |diff| {np.abs(a[h,ev]-b[h,ev]).max():.3f}")

print("where the differences are")
for li in (0, 12):
    keys = cache[li].keys[..., :len(ids), :]
    a = np.array(zscore(redundancy(keys, 0.5)))[0]; b = np.array(zscore(linear(keys)))[0]; assert np.allclose(np.array(linear(keys)), np.array(mean_similarity(keys)), rtol=1e-5)
    for h in range(2):
        d = np.abs(a[h] - b[h]); top = np.argsort(-d)[:8]
        print(li, h, [(int(t), round(float(d[t]), 3)) for t in top], "median diff", round(float(np.median(d)), 4))
