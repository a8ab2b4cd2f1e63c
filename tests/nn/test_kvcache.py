"""Int8 KV cache maths and its transformers Cache: round trip and generation."""
import torch

from diffq.nn.kvcache import cat_kv, dequantize_kv, quantize_kv


def test_kv_round_trip_within_int8_tolerance(gen):
    x = torch.randn(2, 4, 9, 32, generator=gen) * torch.rand(2, 4, 9, 1, generator=gen) * 5
    x[0, 1, 3] = 0  # an all-zero token row must survive
    q = quantize_kv(x)
    assert q.codes.dtype == torch.int8 and q.scale.shape == (2, 4, 9, 1)
    err = (dequantize_kv(q) - x).abs()
    # symmetric rounding: at most half a step, step = max|row| / 127
    assert bool((err <= x.abs().amax(-1, keepdim=True) / 254 + 1e-6).all())
    assert torch.equal(dequantize_kv(q)[0, 1, 3], torch.zeros(32))
    both = cat_kv(quantize_kv(x[:, :, :5]), quantize_kv(x[:, :, 5:]))  # append-only: no requantizing
    assert torch.equal(both.codes, q.codes) and torch.equal(both.scale, q.scale)


def test_int8_cache_generate_matches_float_greedy():
    from diffq.integrations.kvcache import Int8KVCache
    from tests import llm_models as lm

    model = lm.llama(layers=2, seed=1)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 300, (2, 12), generator=g)
    kw = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 16, "min_new_tokens": 16,
          "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(prompt, **kw)[:, 12:]
        cache = Int8KVCache()
        out = model.generate(prompt, cache=cache, **kw)[:, 12:]
        # the same cache type through a plain forward: logits close to the float cache's
        c2 = Int8KVCache()
        a = model(prompt, cache=c2, use_cache=True).logits
        b = model(prompt, use_cache=False).logits
    assert len(cache.layers) == 2 and cache.nbytes > 0
    assert cache.layers[0].qkeys.codes.dtype == torch.int8
    assert cache.get_seq_length() == 12 + 16 - 1  # the last token is never fed back
    # greedy tokens agree for most positions (one early flip would change all later ones)
    assert (out == ref).float().mean() >= 0.75
    assert float((a - b).norm() / b.norm()) < 0.02
