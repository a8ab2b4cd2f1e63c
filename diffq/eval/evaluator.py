"""TinyClip: a small CLIP-like evaluator for the shapes domain.

It plays Inception (features for FID) and CLIP (image-text similarity) on 64x64 shapes
images. Pure torch; weights load from `config.json`, `vocab.json` and `model.safetensors`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z]+|[^\sa-z]")


def split_words(text: str) -> list[str]:
    """Lower-case words and punctuation marks of text."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class TinyClipConfig:
    """Sizes of the image and text towers."""

    vocab_size: int
    max_words: int = 32
    embed_dim: int = 128
    feature_dim: int = 128
    image_size: int = 64
    width: int = 32
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary; id 0 pads, id 1 is unknown."""

    def __init__(self, vocab: list[str], max_words: int):
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.max_words = max_words

    @classmethod
    def build(cls, texts: list[str], max_words: int) -> WordTokenizer:
        """Vocabulary of every word in texts, sorted for reproducibility."""
        words = sorted({w for t in texts for w in split_words(t)})
        return cls([PAD, UNK] + words, max_words)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Token ids [B, max_words], right-padded with 0 and truncated."""
        ids = torch.zeros(len(texts), self.max_words, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [self.index.get(w, 1) for w in split_words(t)][: self.max_words]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids


class ImageTower(nn.Module):
    """Strided CNN to a flat feature map: keeps position, which global pooling would lose."""

    def __init__(self, cfg: TinyClipConfig):
        super().__init__()
        w = cfg.width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())

        self.convs = nn.Sequential(
            block(3, w, 2), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 2),
        )
        side = cfg.image_size // 16
        self.fc = nn.Linear(4 * w * side * side, cfg.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [B, feature_dim] of images [B, 3, H, W] in [0, 1]."""
        x = self.convs(images * 2 - 1)
        return F.gelu(self.fc(x.flatten(1)))


class TextTower(nn.Module):
    """Small pre-norm transformer over word embeddings, mean-pooled over real tokens."""

    def __init__(self, cfg: TinyClipConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.pos = nn.Parameter(torch.zeros(cfg.max_words, cfg.text_width))
        layer = nn.TransformerEncoderLayer(
            cfg.text_width, cfg.text_heads, 2 * cfg.text_width, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Pooled text features [B, text_width] of token ids [B, L]."""
        mask = ids != 0
        x = self.layers(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=~mask)
        x = self.norm(x) * mask.unsqueeze(-1)
        return x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


class TinyClip(nn.Module):
    """Contrastive image/text model; embeddings are L2-normalized."""

    def __init__(self, cfg: TinyClipConfig, vocab: list[str]):
        super().__init__()
        self.config = cfg
        self.tokenizer = WordTokenizer(vocab, cfg.max_words)
        self.image_tower = ImageTower(cfg)
        self.text_tower = TextTower(cfg)
        self.image_proj = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.66))  # log(1 / 0.07), as CLIP

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """FID features [B, feature_dim] of float images [B, 3, H, W] in [0, 1]."""
        # follow the weights' dtype: torchmetrics' FID may run this module in float64
        images = images.to(self.device, self.logit_scale.dtype)
        if images.shape[-1] != self.config.image_size:
            images = F.interpolate(images, size=self.config.image_size, mode="bilinear",
                                   antialias=True, align_corners=False)
        return self.image_tower(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized embeddings [B, D] of float images [B, 3, H, W] in [0, 1]."""
        return F.normalize(self.image_proj(self.features(images)), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalized embeddings [B, D] of captions."""
        ids = self.tokenizer(texts).to(self.device)
        return F.normalize(self.text_proj(self.text_tower(ids)), dim=-1)

    def save_pretrained(self, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Write config.json, vocab.json and model.safetensors (weights cast to dtype)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        (out / "vocab.json").write_text(json.dumps(self.tokenizer.vocab))
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> TinyClip:
        """Load a TinyClip saved by save_pretrained, in float32 and eval mode."""
        path = Path(model_dir)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"no model.safetensors in {path}; train with "
                                    "samples/train_tiny_clip.py --out {path}")
        cfg = TinyClipConfig(**json.loads((path / "config.json").read_text()))
        model = cls(cfg, json.loads((path / "vocab.json").read_text()))
        state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
        model.load_state_dict(state)
        return model.eval()


class FeatureExtractor(nn.Module):
    """Wraps TinyClip.features as the `feature` module torchmetrics' FID expects."""

    def __init__(self, evaluator: TinyClip):
        super().__init__()
        self.evaluator = evaluator
        self.num_features = evaluator.config.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [B, num_features] of float images [B, 3, H, W] in [0, 1]."""
        return self.evaluator.features(images)
