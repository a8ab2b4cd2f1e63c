import numpy as np
import torch

from diffq.eval.shapes import (
    BACKGROUNDS,
    COLORS,
    N_TEMPLATES,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    caption,
    make_dataset,
    render,
    sample_scene,
    sample_scenes,
    split_of,
    split_prompts,
)


def test_same_seed_same_data():
    a_img, a_cap, _ = make_dataset("train", 32, seed=3)
    b_img, b_cap, _ = make_dataset("train", 32, seed=3)
    c_img, _, _ = make_dataset("train", 32, seed=4)
    assert torch.equal(a_img, b_img) and a_cap == b_cap
    assert not torch.equal(a_img, c_img)


def test_images_are_64x64_rgb_uint8():
    images, captions, scenes = make_dataset("eval", 8, seed=0)
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8
    assert len(captions) == len(scenes) == 8


def test_splits_are_disjoint():
    captions = {s: set(split_prompts(s, 300, seed=0)) for s in SPLITS}
    for s in SPLITS:
        assert len(captions[s]) == 300
    assert not captions["train"] & captions["calib"]
    assert not captions["train"] & captions["eval"]
    assert not captions["calib"] & captions["eval"]
    # Every phrasing of a scene stays in the scene's split.
    train_scenes = sample_scenes("train", 200, seed=1)
    eval_texts = {caption(s, t) for s in sample_scenes("eval", 2000, seed=2) for t in range(N_TEMPLATES)}
    assert all(caption(s, t) not in eval_texts for s in train_scenes for t in range(N_TEMPLATES))


def test_split_is_a_stable_function_of_the_scene():
    scenes = sample_scenes("calib", 50, seed=5)
    assert all(split_of(s) == "calib" for s in scenes)


def test_edges_are_antialiased():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng)
    pixels = np.asarray(render(scene)).reshape(-1, 3)
    palette = {tuple(c) for c in BACKGROUNDS.values()} | {tuple(c) for c in COLORS.values()}
    intermediate = [p for p in map(tuple, pixels) if p not in palette]
    assert len(intermediate) > 10


def test_captions_name_every_attribute():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng)
        for t in range(N_TEMPLATES):
            text = caption(scene, t)
            assert scene.background in text and "background" in text
            for obj in scene.objects:
                assert obj.shape in SHAPES and obj.shape in text
                assert obj.color in COLORS and obj.color in text
                assert obj.size in SIZES and obj.size in text
                assert obj.position in POSITIONS and obj.position in text
            assert (" and " in text) == (len(scene.objects) == 2)


def test_render_puts_the_object_where_the_caption_says():
    from diffq.eval.shapes import Scene, ShapeObject

    scene = Scene("black", (ShapeObject("square", "red", "large", "top left"),))
    img = np.asarray(render(scene)).astype(int)
    assert tuple(img[17, 17]) == COLORS["red"]
    assert tuple(img[48, 48]) == BACKGROUNDS["black"]
