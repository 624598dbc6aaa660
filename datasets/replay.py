"""The test episodes each named protocol's official script draws, replayed draw for draw.

`sampler: official` (the default of every named protocol) lists, for a seed, exactly the episodes
(classes, support ids in the order they are drawn, query ids) that the lineage's own test script
draws on the same data, so a row scored under `panet`, `hsnet` or `pfenet` differs from a
published one only by the model. Each replay makes the same calls on the same generators as the
official code (Python `random`, numpy's legacy global RNG, torch's DataLoader seeding), over the
same per-class image lists in the same order; tests/test_replay.py checks the first episodes
against fixtures recorded by running the official samplers on generated data.

The lists: the official files when they are there (PANet's class<N>.txt in the data root; HSNet's
fold lists and PFENet's val list, shipped in datasets/lists/), else built the same way from the
dataset (sorted ids: a directory listing is not portable). `Replay.lists` says which.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import numpy as np

from fsbench.core import FsbenchError
from fsbench.datasets.base import Replay  # noqa: F401  (re-exported)

LISTS = Path(__file__).parent / "lists"
# PFENet's configs: data loader workers of its val loader (pascal_split*.yaml, coco_split*.yaml).
PFENET_WORKERS = {"pascal": 8, "coco": 16}
PFENET_PASSES = 20  # validate(): `for e in range(20)`; fsbench goes on past them (see below)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def official_episodes(dataset, protocol, fold, way, shot, n_episodes, seed, queries=1) -> Replay:
    """The episodes `protocol`'s official test script draws for `seed` on `dataset`."""
    lineage, kind = protocol.official_sampler, getattr(dataset, "layout", "")
    if lineage not in getattr(dataset, "replayed_by", ()):
        raise FsbenchError(
            f"dataset {dataset.name!r}: {lineage or protocol.name}'s test script draws no "
            "episodes on it to replay; use sampler: fsbench"
        )
    if lineage != "panet" and (way != 1 or queries != 1):
        raise FsbenchError(
            f"{lineage}'s test script draws 1-way episodes with one query; use sampler: fsbench "
            f"for {way}-way episodes under the {protocol.name} geometry"
        )
    if kind not in ("pascal", "coco"):  # the dataset owns its official draws (e.g. FSS-1000)
        return dataset.official_episodes(protocol, fold, way, shot, n_episodes, seed, queries)
    split = dataset.test_split(protocol)
    if lineage == "panet":
        lists, labels, source = (_panet_pascal if kind == "pascal" else _panet_coco)(
            dataset, split, fold
        )
        episodes = _panet_draws(lists, labels, way, shot, queries, n_episodes, seed)
    elif lineage in ("hsnet", "matcher"):  # Matcher's coco.py is HSNet's
        if kind == "pascal":
            meta, source = _hsnet_pascal_meta(dataset, split, fold)
            lists = {"metadata": meta}
            episodes = _hsnet_pascal_draws(meta, shot, n_episodes, seed)
        else:
            classwise, source = _hsnet_coco_lists(dataset, split, fold)
            lists = {str(c): v for c, v in classwise.items()}
            episodes = _hsnet_coco_draws(classwise, fold, shot, n_episodes, seed)
    elif lineage == "pfenet":
        queries_list, present, per_class, source = _pfenet_lists(
            dataset, kind, split, fold, protocol.min_object_pixels
        )
        lists = {"queries": queries_list, "classes": {str(c): v for c, v in per_class.items()}}
        workers = protocol.replay_workers or PFENET_WORKERS[kind]
        episodes = _pfenet_draws(queries_list, present, per_class, shot, n_episodes, seed, workers)
    else:
        raise FsbenchError(f"protocol {protocol.name!r}: no official sampler {lineage!r}")
    return Replay(tuple(episodes), source, _sha(lists))


# -- PANet (kaixin96/PANet test.py, dataloaders/customized.py, dataloaders/common.py) ---------
def panet_labels(num_classes: int, held_out: list[int]) -> list[int]:
    """The test labels in the order PANet iterates them: util/utils.py's CLASS_LABELS[fold] is
    `all - held_out`, test.py's labels are `all - CLASS_LABELS[fold]`, a set whose iteration order
    (CPython's, made by the same two differences) orders the per-class subsets."""
    everything = set(range(1, num_classes + 1))
    return list(everything - (set(range(1, num_classes + 1)) - set(held_out)))


def panet_class_lines(dataset, split: str, class_id: int) -> list[str]:
    """A VOC class<N>.txt built as PANet's util/voc_classwise_filenames.py builds it (images of
    the split whose label has the class, any pixel count), over sorted ids."""
    return list(dataset.class_images(split, class_id, 1))


def _panet_pascal(dataset, split, fold):
    labels = panet_labels(dataset.num_classes, dataset.fold_classes(fold))
    folder = dataset.root / "ImageSets" / "Segmentation" / split
    files = [folder / f"class{c}.txt" for c in labels]
    if folder.is_dir():
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FsbenchError(
                f"{missing[0]}: missing, though {folder} holds PANet's class-wise lists; run "
                "PANet's util/voc_classwise_filenames.py again or remove the folder"
            )
        known = set(dataset.list_ids(split))
        lists = []
        for path in files:
            ids = path.read_text().splitlines()
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise FsbenchError(
                    f"{path}: id {unknown[0]} is not in ImageSets/Segmentation/{split}.txt "
                    "(PANet's VOC subset would fail on it); rebuild the class-wise lists"
                )
            lists.append(ids)
        source = f"official files (ImageSets/Segmentation/{split}/class<N>.txt)"
    else:
        lists = [panet_class_lines(dataset, split, c) for c in labels]
        source = f"built (class<N>.txt of {split} over sorted label files; no {folder.name}/ lists)"
    return lists, labels, source


def _panet_coco(dataset, split, fold):
    """coco_fewshot's lists: `coco.getImgIds(catIds=c)` is `list(set(catToImgs[c]))`, the image
    ids in annotation order put through a set; built from the class index (its per-class order
    is the annotations' when crowds are kept, as PANet keeps them), so planning never parses the
    annotation JSON. Other crowd modes ask pycocotools itself."""
    labels = panet_labels(80, list(range(20 * fold + 1, 20 * fold + 21)))  # PANet: consecutive
    index = dataset.class_index(split)
    cat_ids = index["category_ids"]  # getCatIds(): file order, as coco_fewshot indexes them
    categories = {cat: i for i, cat in enumerate(sorted(cat_ids), start=1)}
    classes = [categories[cat_ids[label - 1]] for label in labels]
    if dataset.crowd == "keep":
        lists = [
            [str(i) for i in set(int(x) for x in index["annotation_order"][c])] for c in classes
        ]
        return lists, classes, f"pycocotools getImgIds order per category ({split})"
    coco = dataset.coco(split)
    lists = [[str(i) for i in coco.getImgIds(catIds=cat_ids[label - 1])] for label in labels]
    return lists, classes, f"pycocotools getImgIds per category ({split})"


def _panet_draws(lists, labels, way, shot, n_queries, n_episodes, seed):
    """test.py's set_seed(seed + run), then voc_fewshot/coco_fewshot and PairedDataset(same=False):
    the query counts per way, then per episode the classes and each class's images."""
    if way > len(lists):
        raise FsbenchError(f"{way}-way episodes need {way} classes; the fold has {len(lists)}")
    rng = random.Random(seed)
    counts = np.bincount(rng.choices(population=range(way), k=n_queries), minlength=way)
    n_elements = [shot + int(c) for c in counts]
    for label, ids in zip(labels, lists):
        if len(ids) < max(n_elements):
            raise FsbenchError(
                f"class {label} has {len(ids)} images in PANet's class list; a {shot}-shot "
                f"episode needs {max(n_elements)} (lower the shot or use more data)"
            )
    episodes = []
    for _ in range(n_episodes):
        chosen = rng.sample(range(len(lists)), k=len(n_elements))
        drawn = [rng.sample(range(len(lists[d])), k=n_elements[i]) for i, d in enumerate(chosen)]
        classes = tuple(labels[d] for d in chosen)
        supports = tuple(tuple(lists[d][j] for j in idx[:shot]) for d, idx in zip(chosen, drawn))
        # fewShot(): queries are each class's last elements, last first.
        query = tuple(
            lists[d][idx[n_elements[i] - 1 - j]]
            for i, (d, idx) in enumerate(zip(chosen, drawn))
            for j in range(int(counts[i]))
        )
        episodes.append((classes, supports, query))
    return episodes


# -- HSNet (juhongm999/hsnet test.py, data/pascal.py, data/coco.py) ---------------------------
def _read_shipped(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1]  # as HSNet reads them


def hsnet_pascal_lines(dataset, split: str, fold: int) -> list[str]:
    """An HSNet-format fold list (`<id>__<class:02d>`) built from the dataset: every (image,
    fold class) pair of the split, ids sorted, classes ascending (how HSNet made its own lists is
    not published)."""
    classes = dataset.fold_classes(fold)
    pairs = sorted((i, c) for c in classes for i in dataset.class_images(split, c, 1))
    return [f"{i}__{c:02d}" for i, c in pairs]


def _shipped_or_built(shipped_ids, exists, what: str) -> bool:
    """True when the dataset holds all of the shipped list's images; False when it lacks most of
    them (generated or other data, whose ids may collide with a few real ones: the list is then
    built); a dataset with most but not all of them is an incomplete copy, an error."""
    present = [exists(i) for i in shipped_ids]
    if all(present):
        return True
    if sum(present) * 2 <= len(present):
        return False
    missing = shipped_ids[present.index(False)]
    raise FsbenchError(
        f"{what}: {present.count(False)} of its {len(shipped_ids)} images are missing from the "
        f"dataset (first: {missing}); complete the dataset or use sampler: fsbench"
    )


def _hsnet_pascal_meta(dataset, split, fold):
    path = LISTS / "hsnet" / "pascal" / "val" / f"fold{fold}.txt"
    lines = _read_shipped(path)
    ids = [line.split("__")[0] for line in lines]
    if _shipped_or_built(ids, lambda i: dataset.mask_path(i).is_file(), f"HSNet's {path.name}"):
        source = f"shipped (HSNet data/splits/pascal/val/fold{fold}.txt)"
    else:
        lines = hsnet_pascal_lines(dataset, split, fold)
        source = f"built (HSNet format over the sorted {split} list; HSNet's images are absent)"
    return [(line.split("__")[0], int(line.split("__")[1]) - 1) for line in lines], source


def _choice(rs: np.random.RandomState, items):
    """`np.random.choice(items, 1, replace=False)[0]` on the legacy generator."""
    if not len(items):
        raise FsbenchError("HSNet's sampler met a class with no images; use sampler: fsbench")
    return items[int(rs.choice(len(items), 1, replace=False)[0])]


def _hsnet_supports(rs, query, candidates, shot):
    """sample_episode(): draw until `shot` supports differ from the query (they may repeat)."""
    if all(c == query for c in candidates):
        raise FsbenchError(
            f"HSNet's sampler would loop forever: query {query} is its class's only image"
        )
    supports = []
    while True:
        name = _choice(rs, candidates)
        if name != query:
            supports.append(name)
        if len(supports) == shot:
            return tuple(supports)


def _hsnet_pascal_draws(meta, shot, n_episodes, seed):
    """test.py: fix_randseed(0); the loader walks the fold list (idx mod its length)."""
    rs = np.random.RandomState(seed)
    classwise: dict[int, list[str]] = {}
    for name, c in meta:
        classwise.setdefault(c, []).append(name)
    episodes = []
    for idx in range(n_episodes):
        query, c = meta[idx % len(meta)]
        supports = _hsnet_supports(rs, query, classwise[c], shot)
        episodes.append(((c + 1,), (supports,), (query,)))
    return episodes


def _hsnet_coco_lists(dataset, split, fold):
    path = LISTS / "hsnet" / "coco" / f"val_fold{fold}.json.gz"
    shipped = json.loads(gzip.decompress(path.read_bytes()))["classes"]
    images = dataset.class_index(split)["images"]
    ids = sorted({str(i) for v in shipped.values() for i in v}, key=int)
    if dataset.year == 2014 and _shipped_or_built(
        ids, images.__contains__, f"HSNet's coco/val/fold{fold}.pkl"
    ):
        classwise = {int(c): [str(i) for i in v] for c, v in shipped.items()}
        return classwise, f"shipped (HSNet data/splits/coco/val/fold{fold}.pkl)"
    classwise = {c - 1: dataset.class_images(split, c, 1) for c in dataset.fold_classes(fold)}
    return classwise, f"built (per class, sorted {split} image ids; HSNet's images are absent)"


def _hsnet_coco_draws(classwise, fold, shot, n_episodes, seed):
    """data/coco.py load_frame(): a class uniformly, a query of it, then the supports."""
    rs = np.random.RandomState(seed)
    class_ids = [fold + 4 * v for v in range(20)]  # HSNet's COCO folds are interleaved
    episodes = []
    for _ in range(n_episodes):
        c = _choice(rs, class_ids)
        candidates = classwise.get(c, [])
        query = _choice(rs, candidates)
        episodes.append(((c + 1,), (_hsnet_supports(rs, query, candidates, shot),), (query,)))
    return episodes


# -- PFENet (dvlab-research/PFENet test.py, util/dataset.py) ----------------------------------
def pfenet_val_ids(dataset, split: str) -> list[str]:
    """The ids of PFENet's val list built from the dataset: the split's list, sorted."""
    return list(dataset.list_ids(split))


def _pfenet_lists(dataset, kind, split, fold, min_pixels):
    """make_dataset(): queries with ≥ 1 fold class of ≥ `min_pixels` pixels, in list order, and
    per class the images where it has that many; plus every fold class each query shows."""
    classes = dataset.fold_classes(fold)
    if kind == "pascal":
        path = LISTS / "pfenet" / "pascal" / "val.txt"
        shipped = [Path(line.split()[0]).stem for line in path.read_text().splitlines()]
        if _shipped_or_built(shipped, lambda i: dataset.mask_path(i).is_file(), "PFENet's val"):
            ids, source = shipped, "shipped (PFENet lists/pascal/val.txt)"
        else:
            ids = pfenet_val_ids(dataset, split)
            source = f"built (the sorted {split} list; PFENet's images are absent)"
        known = set(dataset.list_ids(split))
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise FsbenchError(
                f"PFENet's val list names {unknown[0]}, which ImageSets/Segmentation/{split}.txt "
                "lacks; use the full VOC2012 val list"
            )
        index = dataset.class_index(split)
        area = {c: index[c] for c in classes}
    else:
        # PFENet's COCO val_data_list.txt and label PNGs are not in its repository: the sorted
        # val image ids, with class areas from the annotations.
        ids = pfenet_val_ids(dataset, split)
        source = f"built (sorted {split} image ids; PFENet's COCO list is not published)"
        index = dataset.class_index(split)["classes"]
        area = {c: index[c] for c in classes}
    queries, present, per_class = [], {}, {c: [] for c in classes}
    for image_id in ids:
        big = [c for c in classes if area[c].get(image_id, 0) >= min_pixels]
        if big:
            queries.append(image_id)
            present[image_id] = [c for c in classes if area[c].get(image_id, 0) > 0]
            for c in big:
                per_class[c].append(image_id)
    if not queries:
        raise FsbenchError(
            f"no image of {split} has a fold-{fold} class of ≥ {min_pixels} pixels: PFENet's "
            "val list would be empty; use more data or sampler: fsbench"
        )
    return queries, present, per_class, source


def _pfenet_episode(rng: random.Random, query, present, per_class, shot):
    """SemData.__getitem__ in mode 'val' (the worker's `random`)."""
    labels = present[query]
    chosen = labels[rng.randint(1, len(labels)) - 1]
    files = per_class[chosen]
    if len({f for f in files if f != query}) < shot:
        raise FsbenchError(
            f"PFENet's sampler would loop forever: class {chosen} has {len(files)} support "
            f"images for query {query}, a {shot}-shot episode needs {shot} others"
        )
    picked: list[int] = []
    for _ in range(shot):
        index = rng.randint(1, len(files)) - 1
        path = query  # the loop always runs once: its first draw is discarded
        while path == query or index in picked:
            index = rng.randint(1, len(files)) - 1
            path = files[index]
        picked.append(index)
    return ((chosen,), (tuple(files[i] for i in picked),), (query,))


def _pfenet_draws(queries, present, per_class, shot, n_episodes, seed, workers):
    """validate(): torch.manual_seed(seed); each pass over the val loader (batch 1, no shuffle)
    draws a base seed from torch's generator; worker w seeds `random` with base + w and serves
    items w, w + workers, … of the pass in order. The official loop stops after 20 passes; a
    longer manifest goes on by the same rule."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    episodes = []
    while len(episodes) < n_episodes:
        base = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        rngs = [random.Random(base + w) for w in range(workers)]
        for index, query in enumerate(queries):
            if len(episodes) == n_episodes:
                break
            episodes.append(_pfenet_episode(rngs[index % workers], query, present, per_class, shot))
    return episodes
