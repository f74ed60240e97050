"""NAYER and CPNet: embeddings, noisy layer, coupled generator, L_xn, inverse-classifier term, tiny CLI runs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import load_model, load_tree, save_tree
from dfkd_common.data import DatasetInfo
from dfkd_common.embeddings import class_embeddings, random_embeddings
from dfkd_common.engine import Engine, details_path
from dfkd_common.errors import DfkdError
from dfkd_common.models import build_model
from dfkd_common.models.conditional import LabelGenerator
from dfkd_common.models.coupled import CoupledGenerator, teacher_stages
from dfkd_common.models.hooks import BNStats, FeatureHooks
from dfkd_common.online import build_online_feed, recording
from dfkd_common.synthesis import build_synthesizer
from dfkd_common.synthesis.coupling import CutMix, InverseClassifier, align_term, coupling_loss, renormalise
from dfkd_common.synthesis.losses import TERMS, Context, onehot_term

DIGITS = tuple(str(i) for i in range(10))
TINY = {"batch_size": 20, "g_steps": 2, "augment": {"crop_pad": 2}, "embedding": {"source": "random", "dim": 32}}


def _info(channels: int, size: int, k: int = 10) -> DatasetInfo:
    return DatasetInfo("toy", channels, size, k, tuple(f"c{i}" for i in range(k)), (0.5,) * channels,
                       (0.25,) * channels)


# ------------------------------------------------------------------------------------------ embeddings
def test_minilm_embeddings_offline_distinct_per_class() -> None:
    emb = class_embeddings(DIGITS, source="minilm")
    assert emb.source == "minilm"
    v = emb.vectors
    assert v.shape == (10, 384) and torch.isfinite(v).all()
    assert torch.allclose(v.norm(dim=1), torch.ones(10), atol=1e-4)
    cos = v @ v.t()
    off = cos[~torch.eye(10, dtype=torch.bool)]
    assert off.max() < 0.999  # every class has its own vector
    # cached: a second call does not reload the model and returns the same numbers
    assert torch.equal(class_embeddings(DIGITS, source="auto").vectors, v)


def test_random_embeddings_are_seeded_and_fallbacks_are_explicit(tmp_path: Path) -> None:
    a = class_embeddings(DIGITS, source="random", dim=16, seed=3)
    assert a.source == "random" and a.vectors.shape == (10, 16)
    assert torch.equal(a.vectors, class_embeddings(DIGITS, source="random", dim=16, seed=3).vectors)
    assert not torch.equal(a.vectors, random_embeddings(DIGITS, 16, seed=4))
    with pytest.raises(DfkdError, match="needs a local model directory"):
        class_embeddings(DIGITS, source="clip")
    with pytest.raises(DfkdError, match="does not exist"):
        class_embeddings(DIGITS, source="clip", path=tmp_path / "missing")
    with pytest.raises(DfkdError, match="unknown embedding source"):
        class_embeddings(DIGITS, source="word2vec")
    with warnings.catch_warnings():  # auto: a broken CLIP directory falls through to MiniLM
        warnings.simplefilter("ignore")
        assert class_embeddings(DIGITS, source="auto", path=tmp_path / "missing").source == "minilm"


def tiny_clip_text_model(path: Path) -> Path:
    """A CLIP text model directory as a user's local copy looks (tokenizer + config + safetensors weights).

    Random weights and a character-level BPE vocabulary built here, saved with ``save_pretrained``: the same
    files and the same ``from_pretrained`` path as a downloaded openai/clip-vit-* text tower, without a hub.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {tok: i for i, tok in enumerate([*chars, *(c + "</w>" for c in chars)])}
    merges = [("a", "n</w>"), ("i", "m")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=24, max_position_embeddings=77,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModelWithProjection(config).save_pretrained(path)
    return path


def test_clip_text_model_directory_is_loaded_and_preferred_by_auto(tmp_path: Path) -> None:
    clip = tiny_clip_text_model(tmp_path / "clip")
    emb = class_embeddings(DIGITS, source="clip", path=clip)
    v = emb.vectors
    assert emb.source == "clip" and v.shape == (10, 24)  # the model's projection_dim
    assert torch.allclose(v.norm(dim=1), torch.ones(10), atol=1e-4)
    assert (v @ v.t())[~torch.eye(10, dtype=torch.bool)].max() < 0.9999  # each prompt its own vector
    assert class_embeddings(DIGITS, source="auto", path=clip).source == "clip"  # NAYER's choice when given
    info = _info(1, 32)
    teacher = build_model("lenet5", 10, 1, info.mean, info.std).eval()
    cfg = {**TINY, "ngf": 8, "embedding": {"source": "auto", "path": str(clip)}}
    synth = build_synthesizer("nayer", teacher, info, cfg, Engine.create("cpu", amp=False), 0)
    assert synth.embedding_used == "clip" and synth.table.shape == (10, 24)
    assert synth.synthesize(0).images.shape == (20, 1, 32, 32)


# ------------------------------------------------------------------------------------- noisy layer
def test_noisy_layer_is_reinitialised_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    info = _info(1, 32)
    teacher = build_model("lenet5", 10, 1, info.mean, info.std).eval()
    synth = build_synthesizer("nayer", teacher, info, {**TINY, "ngf": 8}, Engine.create("cpu", amp=False), 0)
    seen: list[torch.Tensor] = []
    original = LabelGenerator.reinit_noise

    def spy(self: LabelGenerator) -> None:
        original(self)
        seen.append(self.inputs.noisy[0].weight.detach().clone())

    monkeypatch.setattr(LabelGenerator, "reinit_noise", spy)
    body_before = [p.detach().clone() for p in synth.generator.body.parameters()]
    end_weights = []
    for r in range(3):
        synth.synthesize(r)
        end_weights.append(synth.generator.inputs.noisy[0].weight.detach().clone())
    assert len(seen) == 3  # once per batch (round)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[1], end_weights[0])  # a fresh draw, not the previous batch's trained layer
    # the body persists across batches (trained, not rebuilt: g_life is 10 rounds)
    assert any(not torch.equal(a, b) for a, b in zip(body_before, synth.generator.body.parameters(), strict=True))
    # two chunks hold two different noisy layers: the same class gets different generator inputs
    gen = synth.generator.eval()
    y = torch.arange(20) % 10
    z = gen.inputs(y)
    assert not torch.allclose(z[:10], z[10:])


def test_generator_is_rebuilt_after_g_life_epochs_not_rounds(tmp_path: Path) -> None:
    """NAYER's g_life counts the student's epochs: 3 rounds per epoch must not shorten the generator's life."""
    info = _info(1, 32)
    teacher = build_model("lenet5", 10, 1, info.mean, info.std).eval()
    with recording(tmp_path / "b.h5", teacher, info, Engine.create("cpu", amp=False), "nayer",
                   batch_size=20) as ctx:
        feed = build_online_feed("nayer", ctx, {**TINY, "ngf": 8, "g_steps": 1, "g_life": 2, "g_loops": 3})
        student = build_model("lenet5_half", 10, 1, info.mean, info.std)
        first = feed.synth.generator
        feed.before_epoch(0, student)
        feed.before_epoch(1, student)
        assert feed.next_round == 6 and feed.synth.generator is first  # 6 rounds, 2 epochs: still alive
        feed.before_epoch(2, student)
        assert feed.synth.generator is not first and feed.synth.built_at == 2


# ------------------------------------------------------------------------------- coupled generator
ARCHS = [("lenet5", 1, 32), ("lenet5_half", 1, 32), ("resnet18", 3, 16), ("resnet34", 3, 16),
         ("wrn_16_1", 3, 16), ("wrn_16_2", 3, 16), ("wrn_40_1", 3, 16), ("wrn_40_2", 3, 16), ("vgg11_bn", 3, 32)]


@pytest.mark.parametrize(("arch", "channels", "size"), ARCHS)
def test_coupled_generator_mirrors_teacher_stages(arch: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    teacher = build_model(arch, 10, channels, (0.5,) * channels, (0.25,) * channels).eval()
    stages = teacher_stages(teacher, channels, size)
    modules = dict(teacher.named_modules())
    # what every BN sees on a forward pass, in execution order
    order: list[tuple[str, tuple[int, ...]]] = []
    bn_paths = [n for n, m in teacher.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with FeatureHooks(teacher, bn_paths, capture="input") as hooks, torch.no_grad():
        handles = [modules[p].register_forward_pre_hook(lambda m, i, p=p: order.append((p, tuple(i[0].shape))))
                   for p in bn_paths]
        teacher(torch.rand(2, channels, size, size))
        for h in handles:
            h.remove()
        phi = {p: hooks.features[p] for p in bn_paths}
    sizes = [s.height for s in stages]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes) and min(sizes) >= 2
    expected = {}
    for path, shape in order:  # the last BN to run at each resolution ends that stage
        if shape[-1] >= 2:
            expected[shape[-2:]] = (path, shape[1:])
    assert [(s.path, (s.channels, s.height, s.width)) for s in stages] == list(expected.values())
    gen = CoupledGenerator(stages, 24, size, channels).eval()
    x, outs = gen(torch.randn(3, 24), return_stages=True)
    assert x.shape == (3, channels, size, size) and 0 <= float(x.detach().min()) and float(x.detach().max()) <= 1
    teacher_shapes = [tuple(phi[s.path].shape[1:]) for s in reversed(stages)]
    assert [tuple(o.shape[1:]) for o in outs] == teacher_shapes  # deepest first, channel and size matched
    # a wider generator (g_width, not in the paper) still returns exactly the coupled channels of each stage
    wide = CoupledGenerator(stages, 24, size, channels, width=2).eval()
    _, wide_outs = wide(torch.randn(3, 24), return_stages=True)
    assert [tuple(o.shape[1:]) for o in wide_outs] == teacher_shapes
    assert wide.bn0.num_features == 2 * stages[-1].channels
    smooth = CoupledGenerator(stages, 24, size, channels, upsample="bilinear").eval()
    smooth.load_state_dict(gen.state_dict())  # same weights: only the resizing between stages differs
    z = torch.randn(3, 24)
    with torch.no_grad():
        assert smooth(z).shape == gen(z).shape and not torch.allclose(smooth(z), gen(z))


# ------------------------------------------------------------------------------------------ L_xn
def test_xn_is_zero_at_renormalised_teacher_features_and_pulls_toward_them() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 9.0]))
    phi = 3 * torch.randn(8, 4, 5, 5) + 7
    target = renormalise(phi, bn)
    # the target keeps phi's pattern with the BN's running statistics
    assert torch.allclose(target.mean(dim=(0, 2, 3)), bn.running_mean, atol=1e-4)
    assert torch.allclose(target.var(dim=(0, 2, 3), unbiased=False), bn.running_var, rtol=1e-3)
    assert float(coupling_loss([(target.clone(), phi, bn)])) == pytest.approx(0.0, abs=1e-10)
    g = torch.randn(8, 4, 5, 5, requires_grad=True)
    loss = TERMS.get("xn")(Context(x=g, t_logits=torch.zeros(8, 10), coupling=[(g, phi, bn)]))
    assert loss.item() > 0
    loss.backward()
    assert g.grad is not None
    assert float((g.grad * (g - target).detach()).sum()) > 0  # the gradient points away from the target
    with torch.no_grad():
        moved = g - 0.5 * g.grad
    assert float(coupling_loss([(moved, phi, bn)])) < loss.item()
    assert phi.grad is None  # stop-gradient: nothing flows into the teacher side


# ----------------------------------------------------------------------------- inverse classifier
def test_inverse_classifier_term_is_minimal_orthogonal_to_the_constant_direction() -> None:
    torch.manual_seed(0)
    k, d, eps = 10, 32, 0.1
    fc = nn.Linear(d, k)
    inv = InverseClassifier(fc, eps=eps, min_singular=0.1)
    assert inv.delta == pytest.approx(math.log((1 - eps) * (k - 1) / eps))
    y = torch.arange(20) % k
    ideal = inv.label_features(y)
    # the label's feature reproduces the smoothed one-hot distribution through the classifier
    p = torch.softmax(fc(ideal), dim=1)
    assert torch.allclose(p[torch.arange(20), y], torch.full((20,), 1 - eps), atol=1e-4)
    # offsets along c (any constant on all logits) are the maximum, |cos| = 1
    along = ideal + torch.randn(20, 1) * inv.c
    assert float(inv.loss(along, y)) == pytest.approx(1.0, abs=1e-5)
    # offsets orthogonal to c are the minimum, 0
    r = torch.randn(20, d)
    ortho = r - (r @ inv.c)[:, None] * inv.c / inv.c.dot(inv.c)
    assert float(inv.loss(ideal + ortho, y)) == pytest.approx(0.0, abs=1e-5)
    # random features lie in between, and the term is off without a student (warm-up)
    mid = float(inv.loss(torch.randn(20, d), y))
    assert 0 < mid < 1
    ctx = Context(x=torch.zeros(20, 1), t_logits=torch.zeros(20, k), y=y, t_feat=torch.randn(20, d),
                  inverse_classifier=inv)
    assert float(align_term(ctx)) == 0.0
    ctx.s_logits = torch.zeros(20, k)
    assert float(align_term(ctx)) == pytest.approx(float(inv.loss(ctx.t_feat, y)))


def test_cutmix_mixes_boxes_and_reports_lambda() -> None:
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8).clone()
    mix = CutMix(p=1.0, generator=torch.Generator().manual_seed(1), mode="batch")
    out = mix(x)
    assert mix.last is not None
    perm, lam = mix.last
    own = (out == x).float().mean(dim=(1, 2, 3))
    moved = perm != torch.arange(4)
    assert torch.allclose(own[moved], torch.full((int(moved.sum()),), lam))
    assert CutMix(p=0.0)(x) is x


def test_cutmix_per_sample_draws_its_own_box_and_lambda() -> None:
    """The released CPNet code's CutMix: each sample its own box and lambda (reported per sample), and a sample
    not drawn (probability 1 - p) keeps lambda 1 and its pixels."""
    n = 64
    x = torch.arange(float(n)).view(n, 1, 1, 1).expand(n, 1, 16, 16).clone()
    mix = CutMix(p=0.5, generator=torch.Generator().manual_seed(3), mode="sample")
    out = mix(x)
    assert mix.last is not None
    perm, lam = mix.last
    assert lam.shape == (n,)
    own = (out == x).float().mean(dim=(1, 2, 3))
    moved = perm != torch.arange(n)
    assert torch.allclose(own[moved], lam[moved])  # lambda = the fraction still its own
    assert 10 < int((lam < 1).sum()) < 54  # about half the samples mixed
    assert len(set(lam[lam < 1].tolist())) > 5  # boxes differ between samples
    # the mixed one-hot loss weights each sample by its own lambda
    t = torch.randn(n, 10)
    y = torch.randint(0, 10, (n,))
    ctx = Context(x=out, t_logits=t, y=y, cutmix=(perm, lam))
    want = (lam * F.cross_entropy(t, y, reduction="none")
            + (1 - lam) * F.cross_entropy(t, y[perm], reduction="none")).mean()
    assert float(onehot_term(ctx)) == pytest.approx(float(want), rel=1e-6)


# ----------------------------------------------------------------------------------- state / resume
def test_cpnet_state_roundtrip_continues_identically(tmp_path: Path) -> None:
    info = _info(1, 32)
    teacher = build_model("lenet5", 10, 1, info.mean, info.std).eval()
    engine = Engine.create("cpu", amp=False)
    a = build_synthesizer("cpnet", teacher, info, TINY, engine, 0)
    a.synthesize(0)
    save_tree(tmp_path / "s.safetensors", {"synth": a.state_dict()})
    rng = torch.get_rng_state()
    first = a.synthesize(1)
    b = build_synthesizer("cpnet", teacher, info, {**TINY, "embedding": {"source": "random", "seed": 9}},
                          engine, 5)
    b.load_state_dict(load_tree(tmp_path / "s.safetensors")["synth"])
    assert torch.equal(b.table, a.table)  # the cached embeddings win over the (different) configured ones
    torch.set_rng_state(rng)
    second = b.synthesize(1)
    assert torch.allclose(first.images, second.images, atol=1e-6)


# -------------------------------------------------------------------------------- end to end (CLI)
def _bn_distance(teacher: nn.Module, images: torch.Tensor) -> float:
    stats = BNStats(teacher)  # plain batch statistics (no momentum) vs running ones
    with torch.no_grad():
        teacher(images)
    d = float(stats.loss())
    stats.remove()
    return d


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nayer", "cpnet"])
def test_synthesize_cli_bank_is_recognised_and_matches_bn_statistics(
    method: str, teacher_ckpt: Path, tmp_path: Path, cli: Any
) -> None:
    params: dict[str, Any] = {"seed": 0, "synthesize": {"common": {}, method: {
        "rounds": 4, "batch_size": 40, "g_steps": 40, "ngf": 16, "augment": {"crop_pad": 2},
    }}}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    out = tmp_path / f"{method}.h5"
    res = cli("synthesize", "--method", method, "--teacher", teacher_ckpt, "--out", out, "--params", pfile,
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    bank = load_bank(out)
    assert len(bank) == 160 and sorted(set(np.asarray(bank.rounds).tolist())) == [0, 1, 2, 3]
    assert np.bincount(np.asarray(bank.labels), minlength=10).min() == 16  # class-balanced targets
    teacher, _ = load_model(teacher_ckpt, torch.device("cpu"))
    images = torch.as_tensor(np.asarray(bank.images)).float() / 255
    labels = torch.as_tensor(np.asarray(bank.labels))
    with torch.no_grad():
        agree = (teacher(images).argmax(1) == labels).float()
    late = torch.as_tensor(np.asarray(bank.rounds)) >= 2  # round 0 starts from a fresh generator
    assert agree[late].mean() > 0.8, agree[late].mean()
    # the BN statistics move toward the teacher's running ones: the bank's are much closer than those of the
    # same (untrained) generator's output and of noise images
    cfg = {k: v for k, v in params["synthesize"][method].items() if k != "rounds"}
    synth = build_synthesizer(method, teacher, DatasetInfo.from_dict(bank.dataset), cfg, Engine.create("cpu"))
    with torch.no_grad():
        start = synth.generator.train()(synth.labels(40, 0)).float()
    noise = torch.rand(int(late.sum()), 1, 32, 32, generator=torch.Generator().manual_seed(0))
    d_late, d_start = _bn_distance(teacher, images[late]), _bn_distance(teacher, start)
    assert d_late < 0.6 * d_start and d_late < 0.6 * _bn_distance(teacher, noise), (d_late, d_start)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nayer", "cpnet"])
def test_online_end_to_end_beats_chance(method: str, teacher_ckpt: Path, tmp_path: Path, cli: Any) -> None:
    """``dfkd distill --online`` with NAYER / CPNet: warm-up rounds, then adversarial rounds, KD on the bank."""
    online = {"g_loops": 1, "warmup": 2, "warmup_loops": 3, "batch_size": 40, "g_steps": 10,
              "augment": {"crop_pad": 2, **({"jitter": 0.2} if method == "cpnet" else {})}}
    if method == "nayer":
        online["ngf"] = 16
    params = {"seed": 0, "distill": {"common": {
        "student": "lenet5_half", "terms": {"kd": {"tau": 4.0}}, "epochs": 6, "batch_size": 64,
        "kd_steps": 20, "lr": 0.05, "optimizer": "sgd", "augment": {"crop_pad": 2}, "online": online}}}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    res = cli("distill", "--online", method, "--teacher", teacher_ckpt, "--out", tmp_path / "s.safetensors",
              "--bank-out", tmp_path / "bank.h5", "--params", pfile, "--metrics", tmp_path / "m.json",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    metrics = yaml.safe_load(details_path(tmp_path / "m.json").read_text())
    assert metrics["test_acc"] > 0.6, metrics  # chance is 0.1 on the 1,000 real held-out digits
    rounds = np.asarray(load_bank(tmp_path / "bank.h5").rounds)
    assert np.bincount(rounds).tolist() == [40] * (2 * 3 + 4 * 1)  # 3 rounds per warm-up epoch, then 1
