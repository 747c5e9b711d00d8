"""The memory the prompt's round takes above the held cache, for the library's settings and
the server's (CHAT_DEFAULTS): SmolLM2-135M float32 (bench.speed's test model), an N-token
prompt at budget N / 4, read whole, then the first decode step (the round) with the peak
counter reset just before it. Prints one line per setting: MiB above the active memory
before the step, and the round's time. Run it from a checkout (PYTHONPATH names which
triattn_mlx is measured):

    PYTHONPATH=. python results/cpu/experiments/round-peak.py [N]
"""

import sys

import bench.speed  # first: imports triattn_mlx (the OpenBLAS preload) before mlx
import mlx.core as mx

import triattn_mlx
from bench.prompt_round import SETTINGS, synced_step
from bench.speed import prompt_tokens, test_model, time_to_first_token
from triattn_mlx import make_prompt_cache

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
model, stats = test_model()
print("triattn_mlx from", triattn_mlx.__file__, "N", N, flush=True)
for settings in SETTINGS:
    cache = make_prompt_cache(model, N // 4, stats=stats, **SETTINGS[settings])
    y, _ = time_to_first_token(model, cache, prompt_tokens(N), 2048)
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    y, first = synced_step(model, cache, y)  # the prompt's round runs here
    assert cache[0].prune_rounds == 1
    print(f"{settings}: round peak {(mx.get_peak_memory() - before) / 2**20:.1f} MiB above "
          f"{before / 2**20:.1f} MiB held; first step {first * 1000:.0f} ms", flush=True)
    del cache
