"""Distillation's teacher cache: outputs by input content, one teacher per cache, and training that
comes out bit for bit as without it."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from fxtucker.compress import CompressConfig, compress
from fxtucker.distill import TeacherCache, distillation_loss, teacher_fingerprint
from fxtucker.train import TrainConfig, train

from .toys import Toy, toy_problem


class Counting(nn.Module):
    """A teacher that counts the inputs it has run on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 5))
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.net(x)


def test_a_batch_seen_before_is_a_lookup_with_the_teachers_own_outputs():
    torch.manual_seed(0)
    teacher, cache = Counting().eval(), TeacherCache()
    x = torch.randn(8, 2, 4, 4)
    with torch.no_grad():
        want = teacher.net(x)
        first = cache.outputs(teacher, x)
        again = cache.outputs(teacher, x.clone())  # the same inputs in another tensor
        shuffled = cache.outputs(teacher, x.flip(0))
    assert torch.equal(first, want) and torch.equal(again, want) and torch.equal(shuffled, want.flip(0))
    assert teacher.seen == 8 and cache.stats() == {"hits": 2, "misses": 1, "entries": 8, "bytes": 8 * 5 * 4}
    # one new input: the whole batch runs (the kept ones are not recomputed apart), the new one is kept
    y = torch.cat([x[:3], torch.randn(1, 2, 4, 4)])
    with torch.no_grad():
        assert torch.equal(cache.outputs(teacher, y), teacher.net(y))
    assert teacher.seen == 12 and len(cache) == 9 and cache.misses == 2


def test_the_key_is_the_inputs_content_dtype_and_shape_not_its_position():
    torch.manual_seed(0)
    teacher, cache = Counting().eval(), TeacherCache()
    x = torch.randn(4, 2, 4, 4)
    with torch.no_grad():
        cache.outputs(teacher, x)
        nudged = x.clone()
        nudged[2, 0, 0, 0] = torch.nextafter(nudged[2, 0, 0, 0], torch.tensor(10.0))  # one bit of one input
        out = cache.outputs(teacher, nudged)
        assert torch.equal(out, teacher.net(nudged)) and cache.misses == 2
        cache.outputs(teacher, x.to(memory_format=torch.channels_last))  # the same values in another layout: a hit
        assert cache.hits == 1
        teacher64 = copy.deepcopy(teacher).double()
        other = TeacherCache()
        other.outputs(teacher64, x.double())
        assert other.outputs(teacher64, x.double()).dtype == torch.float32 and other.hits == 1


def test_a_cache_serves_one_teacher_and_its_copies_only():
    torch.manual_seed(0)
    teacher, cache = Counting().eval(), TeacherCache()
    x = torch.randn(4, 2, 4, 4)
    with torch.no_grad():
        cache.outputs(teacher, x)
        cache.outputs(copy.deepcopy(teacher), x)  # another run's deep copy of the same model
        assert cache.hits == 1
        changed = copy.deepcopy(teacher)
        changed.net[0].bias.add_(1e-3)
        with pytest.raises(ValueError, match="another teacher's outputs .* give each teacher a cache of its own"):
            cache.outputs(changed, x)
        with pytest.raises(ValueError, match="another teacher's outputs"):
            cache.outputs(copy.deepcopy(teacher).train(), x)  # train mode: BatchNorm or dropout would differ
    assert teacher_fingerprint(teacher) == teacher_fingerprint(copy.deepcopy(teacher)) != teacher_fingerprint(changed)


def test_past_max_bytes_outputs_are_computed_and_not_kept():
    torch.manual_seed(0)
    teacher = Counting().eval()
    x = torch.randn(6, 2, 4, 4)
    cache = TeacherCache(max_bytes=2 * 5 * 4)  # room for two inputs' outputs
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(cache.outputs(teacher, x), teacher.net(x))
        assert torch.equal(cache.outputs(teacher, x[:2]), teacher.net(x[:2]))
    assert cache.stats() == {"hits": 1, "misses": 2, "entries": 2, "bytes": 40}
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
            TeacherCache(max_bytes=bad)


def test_inputs_as_a_tuple_are_keyed_together_and_other_inputs_pass_through():
    class Two(nn.Module):
        def forward(self, inputs):
            a, b = inputs
            return a.flatten(1) @ torch.ones(4, 3) + b

    cache, a, b = TeacherCache(), torch.randn(5, 4), torch.randn(5, 3)
    first = cache.outputs(Two(), (a, b))
    assert torch.equal(cache.outputs(Two(), (a, b)), first) and cache.hits == 1
    assert cache.outputs(Two(), (a, b + 1)).sub(first).sub(1).abs().max() < 1e-6 and cache.misses == 2
    ragged = (torch.randn(5, 4), torch.randn(4, 3))  # no common batch dimension: computed, never kept

    class Anything(nn.Module):
        def forward(self, inputs):
            return torch.ones(2, 3)

    for odd in (ragged, {"a": a}, torch.tensor(1.0)):
        assert torch.equal(cache.outputs(Anything(), odd), torch.ones(2, 3))
    assert cache.misses == 2 and len(cache) == 10


def test_distilled_training_is_bit_for_bit_the_same_with_the_cache(one_thread):
    model, loader, _, _ = toy_problem()
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        model.conv.weight.mul_(0.5)  # a student that differs from its teacher
    results = []
    for cache in (None, TeacherCache()):
        student = copy.deepcopy(model)
        train(student, loader, TrainConfig(epochs=3, lr=0.05, seed=0), progress=False,
              extra_loss=distillation_loss(teacher, 1.0, 4.0, cache))
        results.append((student, cache))
    (plain, _), (cached, cache) = results
    assert cache.stats()["hits"] == 2 * len(loader) and cache.misses == len(loader) and len(cache) == 2048
    for a, b in zip(plain.state_dict().values(), cached.state_dict().values()):
        assert torch.equal(a, b)


def test_compress_with_cache_teacher_gives_the_same_model_and_shares_a_cache(one_thread):
    model, loader, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=2, target_speedup=1.5, distill=True,
                            distill_reg=True)
    plain = compress(model, loader, x, config=config, progress=False)
    cached = compress(model, loader, x, config=dataclasses.replace(config, cache_teacher=True), progress=False)
    assert "teacher_cache" not in plain.report
    # step 3's one epoch fills the cache; fine-tuning's two epochs are lookups
    assert cached.report["teacher_cache"] == {"hits": 2 * len(loader), "misses": len(loader), "entries": 2048,
                                              "bytes": 2048 * 10 * 4}
    for a, b in zip(plain.model.state_dict().values(), cached.model.state_dict().values()):
        assert torch.equal(a, b)
    shared = TeacherCache()  # one cache for two runs distilled from the same model: the second only looks up
    compress(model, loader, x, config=config, progress=False, teacher_cache=shared)
    again = compress(model, loader, x, config=config, progress=False, teacher_cache=shared)
    assert shared.misses == len(loader) and again.report["teacher_cache"]["hits"] == 5 * len(loader)
    with pytest.raises(ValueError, match="another teacher's outputs"):
        compress(Toy(), loader, x, config=config, progress=False, teacher_cache=shared)
    with pytest.raises(TypeError, match="teacher_cache must be a fxtucker.distill.TeacherCache or None, got dict"):
        compress(model, loader, x, config=config, progress=False, teacher_cache={})
    with pytest.raises(ValueError, match="CompressConfig.cache_teacher must be true or false"):
        CompressConfig(cache_teacher="yes")
