"""LLM metrics against direct computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffq.eval.llm import embedding_agreement, mean_pool, perplexity, token_agreement


def _bigram(vocab: int, gen: torch.Generator):
    table = torch.randn(vocab, vocab, generator=gen)
    return lambda ids: table[ids]  # logits [1, T, V]: depend on the current token only


def test_perplexity_matches_full_sequence_nll(gen):
    # with a model that sees one token of history, any window/stride scores every token once
    # exactly as the whole-sequence NLL does
    logits_of = _bigram(50, gen)
    ids = torch.randint(0, 50, (301,), generator=gen)
    full = math.exp(float(F.cross_entropy(logits_of(ids[None])[0, :-1], ids[1:])))
    for context, stride in [(64, 32), (64, 64), (17, 5), (400, 400)]:
        ppl, n = perplexity(logits_of, ids, context, stride)
        assert n == 300
        assert ppl == pytest.approx(full, rel=1e-5)
    with pytest.raises(ValueError):
        perplexity(logits_of, ids, 16, 32)


def test_embedding_agreement_and_pooling(gen):
    fp = torch.randn(20, 16, generator=gen)
    same = embedding_agreement(fp, fp.clone())
    assert same["cosine_min"] == pytest.approx(1.0) and same["nn_agreement"] == 1.0
    noisy = embedding_agreement(fp, fp + 10 * torch.randn(20, 16, generator=gen))
    assert noisy["cosine_mean"] < 0.5 and noisy["nn_agreement"] < 1.0
    h = torch.randn(2, 3, 4, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_pool(h, mask), torch.stack([h[0, :2].mean(0), h[1, 0]]))
    assert token_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
