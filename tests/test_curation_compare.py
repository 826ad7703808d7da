"""The curated-vs-ground-truth comparison (paper Sec. 3.2) is fair: only the texts differ."""

import torch

from minigpt4_lite import toyworld as tw
from minigpt4_lite.curate import Draft, write_ccsbu
from minigpt4_lite.data import CCSBUAlignDataset, image_tensor
from minigpt4_lite.evaluate import judge
from minigpt4_lite.pipeline import ground_truth_twin
from minigpt4_lite.train import TrainConfig, uses_augmentation


def test_both_rows_read_the_same_images_the_same_way(tmp_path):
    scenes = tw.make_scenes("train", 4)
    drafts = [Draft(s, "a wrong draft about a red star", 8, fixed="a wrong red star draft",
                    kept=True) for s in scenes]
    curated = write_ccsbu(drafts, tmp_path / "curated")
    truth = ground_truth_twin(curated, tmp_path / "truth", seed=0)
    a, b = CCSBUAlignDataset(curated, seed=0), CCSBUAlignDataset(truth, seed=0)
    assert [i for i, _ in a.items] == [i for i, _ in b.items]
    cfg = TrainConfig(stage=2, steps=10, warmup_steps=2, batch_size=2)
    assert uses_augmentation(a, cfg) == uses_augmentation(b, cfg)  # same crops, same cache rule
    for k, scene in enumerate(scenes):
        sa, sb = a[k], b[k]
        assert sa.prompt == sb.prompt
        assert sa.image.read_bytes() == sb.image.read_bytes()
        g1, g2 = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
        assert torch.equal(image_tensor(sa, 32, train=True, generator=g1),
                           image_tensor(sb, 32, train=True, generator=g2))
        verdict = judge(sb.answer, True, scene, "detailed")  # the twin's text is the truth
        assert verdict["found"] == verdict["objects"] and verdict["hallucinated"] == 0
        assert sa.answer != sb.answer
