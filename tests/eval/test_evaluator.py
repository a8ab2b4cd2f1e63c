import pytest
import torch

from diffq.eval.evaluator import FeatureExtractor, TinyClip
from diffq.eval.metrics import caption_retrieval_top1, clip_score
from diffq.eval.shapes import make_dataset


def test_embeddings_are_normalized(evaluator):
    images, captions, _ = make_dataset("eval", 4, seed=0)
    img = evaluator.encode_image(images.float() / 255)
    txt = evaluator.encode_text(captions)
    assert img.shape == txt.shape == (4, evaluator.config.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    assert evaluator.features(images.float() / 255).shape == (4, evaluator.config.feature_dim)
    assert FeatureExtractor(evaluator).num_features == evaluator.config.feature_dim


def test_retrieves_captions_of_real_eval_images(evaluator):
    images, captions, _ = make_dataset("eval", 32, seed=7, unique=True)
    assert caption_retrieval_top1(evaluator, images, captions) >= 0.8


def test_clip_score_prefers_matching_captions(evaluator):
    images, captions, _ = make_dataset("eval", 32, seed=8, unique=True)
    shuffled = captions[1:] + captions[:1]
    assert clip_score(evaluator, images, captions) > clip_score(evaluator, images, shuffled) + 10
    assert 0 <= clip_score(evaluator, images, captions) <= 100


def test_save_load_roundtrip(evaluator, tmp_path):
    evaluator.save_pretrained(tmp_path)
    loaded = TinyClip.from_pretrained(tmp_path)
    texts = ["a large red circle at the center on a gray background"]
    torch.testing.assert_close(loaded.encode_text(texts), evaluator.encode_text(texts))


def test_missing_weights_raise_actionable_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny_clip"):
        TinyClip.from_pretrained(tmp_path)
