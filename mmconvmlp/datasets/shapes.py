"""A small, seeded data set of shapes on cluttered backgrounds, in the COCO and ADE20K layouts.

Every image holds a few filled shapes (circles, triangles, squares, stars, ...) of random
colour, size, aspect and rotation, drawn one over the other so that they overlap, some of them
cut by the image border, on a textured background (gradients, stripes, blotches, noise) with
distracting strokes. The category is the *shape*: colours and fill patterns are drawn
independently of it.

The same rendered image is written twice:

- ``root/coco/``: ``train2017/``, ``val2017/`` and ``annotations/instances_{train,val}2017.json``
  with one annotation per visible shape: the visible region (what the later shapes leave of
  it) as polygons along the pixel edges, its box and its pixel area, ``iscrowd=0``;
  categories numbered from 1 with the given names.
- ``root/ade/ADEChallengeData2016/``: ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``, uint8 labels: 0 "other" (the distracting strokes,
  ignored by mmseg's ``reduce_zero_label=True``), 1 background, 2.. the shape categories in
  the order of ``class_names``.

Only numpy and PIL are used; an image of 96 x 96 takes about 10 ms. Each image is
generated from its own seed ``(seed, split, index)``, so the same seed gives the same files
whatever the split sizes.
"""
import json
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

#: The shapes this generator can draw, in the order they are given to categories by default.
SHAPE_KINDS = ('circle', 'triangle', 'square', 'star', 'cross', 'hexagon')
#: The categories of the demo data set.
DEFAULT_CLASSES = ('circle', 'triangle', 'square', 'star')

# Labels of the ADE20K-style maps.
ADE_OTHER = 0
ADE_BACKGROUND = 1
ADE_FIRST_CLASS = 2

_SPLITS = {'train': (0, 'train2017', 'training', 'train'),
           'val': (1, 'val2017', 'validation', 'val')}


def shape_kinds_for(class_names: Sequence[str],
                    shapes: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The shape drawn for each class: ``shapes`` if given; the class names themselves when
    they all name shapes; otherwise the first ``len(class_names)`` of :data:`SHAPE_KINDS`."""
    class_names = tuple(class_names)
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f'class_names must be distinct and not empty, got {class_names!r}')
    if shapes is None:
        if all(name in SHAPE_KINDS for name in class_names):
            shapes = class_names
        elif len(class_names) <= len(SHAPE_KINDS):
            shapes = SHAPE_KINDS[:len(class_names)]
        else:
            raise ValueError(f'{len(class_names)} classes but only {len(SHAPE_KINDS)} shapes '
                             f'({", ".join(SHAPE_KINDS)}) can be drawn')
    shapes = tuple(shapes)
    unknown = [s for s in shapes if s not in SHAPE_KINDS]
    if len(shapes) != len(class_names) or unknown or len(set(shapes)) != len(shapes):
        raise ValueError(f'shapes must give one distinct shape of {SHAPE_KINDS} per class, '
                         f'got {shapes!r} for {class_names!r}')
    return shapes


# ----------------------------------------------------------------------------------------
# Geometry

def shape_polygon(kind: str, cx: float, cy: float, size: float, angle: float,
                  aspect: float = 1.0) -> np.ndarray:
    """Vertices (N, 2) of a shape whose unrotated extent is about ``size`` pixels."""
    r = size / 2
    if kind == 'circle':
        n = int(np.clip(size, 16, 64))
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == 'triangle':
        t = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r * 1.1
    elif kind == 'square':
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * r * 0.85
    elif kind == 'star':
        t = np.deg2rad(-90 + 36 * np.arange(10))
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.42) * r * 1.05
        pts = np.stack([np.cos(t), np.sin(t)], 1) * radius[:, None]
    elif kind == 'cross':
        a, b = 1.0, 0.33
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a],
                        [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]], float) * r
    elif kind == 'hexagon':
        t = np.deg2rad(60 * np.arange(6))
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    else:
        raise ValueError(f'unknown shape {kind!r}; known: {SHAPE_KINDS}')
    pts = pts * np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])


def polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def rasterize(pts: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = Image.new('L', (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def mask_to_polygons(mask: np.ndarray) -> Tuple[List[List[float]], int]:
    """Boundaries of a binary mask as closed polygons along the pixel edges.

    Returns ``(outer, holes)``: the outer boundary of each 4-connected part as a flat
    ``[x0, y0, x1, y1, ...]`` list (pixel (r, c) spans x in [c, c+1], y in [r, r+1]), and the
    number of holes (COCO polygons cannot express holes, so callers avoid them).
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return [], 0
    y0, x0 = ys.min(), xs.min()
    m = np.pad(mask[y0:ys.max() + 1, x0:xs.max() + 1], 1)
    # Directed boundary edges, clockwise on screen around the inside.
    inside = m[1:-1, 1:-1]
    r, c = np.nonzero(inside & ~m[:-2, 1:-1])                          # top
    edges = [np.stack([c, r, c + 1, r], 1)]
    r, c = np.nonzero(inside & ~m[1:-1, 2:])                           # right
    edges.append(np.stack([c + 1, r, c + 1, r + 1], 1))
    r, c = np.nonzero(inside & ~m[2:, 1:-1])                           # bottom
    edges.append(np.stack([c + 1, r + 1, c, r + 1], 1))
    r, c = np.nonzero(inside & ~m[1:-1, :-2])                          # left
    edges.append(np.stack([c, r + 1, c, r], 1))
    edges = [tuple(e) for e in np.concatenate(edges).tolist()]
    outgoing: Dict[Tuple[int, int], List[Tuple[int, int, int, int]]] = {}
    for e in edges:
        outgoing.setdefault((e[0], e[1]), []).append(e)

    def following(edge):
        ends = outgoing[(edge[2], edge[3])]
        if len(ends) == 1:
            return ends[0]
        # Two parts touch at this corner: turn right, which keeps them apart.
        right = (edge[1] - edge[3], edge[2] - edge[0])
        return next(e for e in ends if (e[2] - e[0], e[3] - e[1]) == right)

    outer, holes, seen = [], 0, set()
    for first in edges:
        if first in seen:
            continue
        loop, edge = [], first
        while True:
            seen.add(edge)
            loop.append(edge[:2])
            edge = following(edge)
            if edge == first:
                break
        pts = np.array(loop, float)
        # Drop the vertices in the middle of straight runs.
        prev, nxt_ = np.roll(pts, 1, 0), np.roll(pts, -1, 0)
        turn = (pts[:, 0] - prev[:, 0]) * (nxt_[:, 1] - pts[:, 1]) - \
               (pts[:, 1] - prev[:, 1]) * (nxt_[:, 0] - pts[:, 0])
        pts = pts[turn != 0]
        x, y = pts[:, 0], pts[:, 1]
        signed = float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
        if signed > 0:
            pts = pts + np.array([x0, y0])
            outer.append(pts.reshape(-1).tolist())
        else:
            holes += 1
    return outer, holes


# ----------------------------------------------------------------------------------------
# Drawing

def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) float texture: gradient, stripes or blotches between random colours."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = _random_colour(rng), _random_colour(rng)
    kind = rng.integers(3)
    theta = rng.uniform(0, np.pi)
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == 0:       # linear gradient
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == 1:     # stripes, soft or hard
        period = rng.uniform(4, 24)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period)
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    else:               # blotches: upsampled coarse noise
        cells = int(rng.integers(3, 9))
        coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR),
                       np.float32) / 255
    return a + (b - a) * t[..., None]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _pattern(rng, h, w)
    if rng.random() < 0.7:
        alpha = rng.uniform(0.25, 0.6)
        img = (1 - alpha) * img + alpha * _pattern(rng, h, w)
    return img


def _draw_clutter(rng: np.random.Generator, img: np.ndarray, labels: np.ndarray,
                  max_strokes: int) -> None:
    """Up to ``max_strokes`` thin strokes and arcs: distractors, labelled 'other' (0) in the
    semantic maps."""
    h, w = labels.shape
    layer = Image.new('L', (w, h), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(max_strokes // 3, max_strokes + 1))):
        x0, x1 = rng.uniform(-0.2, 1.2, 2) * w
        y0, y1 = rng.uniform(-0.2, 1.2, 2) * h
        width = int(rng.integers(1, 3))
        if rng.random() < 0.6:
            draw.line([(x0, y0), (x1, y1)], fill=255, width=width)
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 4, max(y0, y1) + 4]
            start = rng.uniform(0, 360)
            draw.arc(box, start, start + rng.uniform(60, 200), fill=255, width=width)
        mask = np.asarray(layer, dtype=bool)
        img[mask] = _random_colour(rng)
        labels[mask] = ADE_OTHER
        draw.rectangle([0, 0, w, h], fill=0)


def render_image(rng: np.random.Generator, image_size: int, num_classes: int,
                 shapes: Sequence[str], min_objects: int = 2, max_objects: int = 5,
                 min_size: float = 0.3, max_size: float = 0.8, min_visible: float = 0.7,
                 max_strokes: int = 3, textured_fill: float = 0.1):
    """Draw one image (:func:`write_shapes_dataset` describes the keyword arguments).

    Returns ``(rgb uint8 (H, W, 3), ade labels uint8 (H, W), objects)`` with one
    ``dict(category=index, polygons=[...], bbox=[x, y, w, h], area=n)`` per shape."""
    h = w = int(image_size)
    img = _background(rng, h, w)
    labels = np.full((h, w), ADE_BACKGROUND, np.uint8)
    _draw_clutter(rng, img, labels, max_strokes)

    ids = np.zeros((h, w), np.int32)       # which shape (1-based) shows at each pixel
    placed = []                            # (category, polygon area, full in-image mask)
    want = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(want):
        for _attempt in range(15):
            category = int(rng.integers(num_classes))
            size = math.exp(rng.uniform(math.log(min_size * h), math.log(max_size * h)))
            cx, cy = rng.uniform(-0.05, 1.05) * w, rng.uniform(-0.05, 1.05) * h
            aspect = math.exp(rng.uniform(-0.3, 0.3)) if shapes[category] in (
                'circle', 'square') else math.exp(rng.uniform(-0.12, 0.12))
            pts = shape_polygon(shapes[category], cx, cy, size, rng.uniform(0, 2 * np.pi),
                                aspect)
            mask = rasterize(pts, h, w)
            trial = ids.copy()
            trial[mask] = len(placed) + 1
            counts = np.bincount(trial.ravel(), minlength=len(placed) + 2)
            candidates = placed + [(category, polygon_area(pts), mask)]
            # Every shape, old and new, keeps at least `min_visible` of itself in view.
            if all(counts[k + 1] >= max(min_visible * area, 30)
                   for k, (_, area, _) in enumerate(candidates)):
                # The new shape must not punch a hole into the visible part of another.
                touched = np.unique(ids[mask])
                if all(mask_to_polygons(trial == k)[1] == 0 for k in touched if k > 0):
                    ids = trial
                    placed.append((category, polygon_area(pts), mask))
                    fill = _random_colour(rng)
                    # Keep some contrast with what lies under the shape.
                    for _ in range(8):
                        if np.abs(fill - img[mask].mean(0)).sum() >= 120:
                            break
                        fill = _random_colour(rng)
                    if rng.random() < textured_fill:
                        texture = _pattern(rng, h, w)
                        img[mask] = 0.5 * texture[mask] + 0.5 * fill
                    else:
                        img[mask] = fill
                    break

    objects = []
    for k, (category, _, _) in enumerate(placed, start=1):
        visible = ids == k
        polygons, holes = mask_to_polygons(visible)
        assert holes == 0
        ys, xs = np.nonzero(visible)
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append(dict(category=category, polygons=polygons,
                            bbox=[x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                            area=int(visible.sum())))
        labels[visible] = ADE_FIRST_CLASS + category
    img = img + rng.normal(0, rng.uniform(3, 12), img.shape)   # sensor noise
    return np.clip(img, 0, 255).round().astype(np.uint8), labels, objects


# ----------------------------------------------------------------------------------------
# Writing

def _write_split(root: str, split: str, num_images: int, image_size: int, seed: int,
                 class_names: Sequence[str], shapes: Sequence[str], **render_kwargs) -> str:
    code, coco_dir, ade_dir, ade_prefix = _SPLITS[split]
    coco_img_dir = osp.join(root, 'coco', coco_dir)
    ade_root = osp.join(root, 'ade', 'ADEChallengeData2016')
    ade_img_dir = osp.join(ade_root, 'images', ade_dir)
    ade_ann_dir = osp.join(ade_root, 'annotations', ade_dir)
    for d in (coco_img_dir, ade_img_dir, ade_ann_dir, osp.join(root, 'coco', 'annotations')):
        os.makedirs(d, exist_ok=True)

    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, code, index])
        rgb, labels, objects = render_image(rng, image_size, len(class_names), shapes,
                                            **render_kwargs)
        image_id = index + 1
        file_name = f'{image_id:012d}.jpg'
        jpeg = Image.fromarray(rgb)
        jpeg.save(osp.join(coco_img_dir, file_name), quality=92)
        ade_name = f'ADE_{ade_prefix}_{image_id:08d}'
        jpeg.save(osp.join(ade_img_dir, ade_name + '.jpg'), quality=92)
        Image.fromarray(labels).save(osp.join(ade_ann_dir, ade_name + '.png'))
        images.append(dict(id=image_id, file_name=file_name, width=rgb.shape[1],
                           height=rgb.shape[0]))
        for obj in objects:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id,
                                    category_id=obj['category'] + 1,
                                    segmentation=obj['polygons'], area=float(obj['area']),
                                    bbox=[float(v) for v in obj['bbox']], iscrowd=0))
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(class_names)]
    coco = dict(info=dict(description=f'mmconvmlp shapes, seed {seed}, {split} split',
                          version='1.0'),
                licenses=[], images=images, annotations=annotations, categories=categories)
    ann_file = osp.join(root, 'coco', 'annotations', f'instances_{coco_dir}.json')
    with open(ann_file, 'w') as f:
        json.dump(coco, f, separators=(',', ':'))
    return ann_file


def write_shapes_dataset(root: str,
                         num_train: int = 1000,
                         num_val: int = 100,
                         image_size: int = 96,
                         seed: int = 0,
                         class_names: Sequence[str] = DEFAULT_CLASSES,
                         shapes: Optional[Sequence[str]] = None,
                         **render_kwargs) -> Dict[str, str]:
    """Write the shapes data set under ``root`` (see the module docs for the layout).

    Args:
        root: output folder; ``coco/`` and ``ade/`` are made inside it.
        num_train, num_val: images in each split.
        image_size: side of the square images, in pixels.
        seed: the same seed writes the same files.
        class_names: category names, in order (COCO ids 1.., ADE labels 2..). Names of
            :data:`SHAPE_KINDS` draw that shape; other names (e.g. COCO's, so that configs
            with COCO's classes find them) draw the shapes of :data:`SHAPE_KINDS` in order.
        shapes: which shape to draw for each class, overriding the rule above.
        render_kwargs: ``min_objects``, ``max_objects`` (shapes per image, 2 and 5),
            ``min_size``, ``max_size`` (shape extent as a fraction of the image, 0.3 and 0.8),
            ``min_visible`` (the least fraction of a shape left visible, 0.7),
            ``max_strokes`` (distracting strokes per image, from a third of it to it, 3),
            ``textured_fill`` (the probability that a shape is filled with a texture, 0.1).

    Returns:
        dict with the paths of ``coco_root``, ``ade_root``, ``train_ann`` and ``val_ann``.
    """
    shapes = shape_kinds_for(class_names, shapes)
    if image_size < 32:
        raise ValueError(f'image_size must be at least 32, got {image_size}')
    paths = dict(coco_root=osp.join(root, 'coco'),
                 ade_root=osp.join(root, 'ade', 'ADEChallengeData2016'))
    for split, num in (('train', num_train), ('val', num_val)):
        paths[f'{split}_ann'] = _write_split(root, split, int(num), int(image_size), int(seed),
                                             tuple(class_names), shapes, **render_kwargs)
    return paths
