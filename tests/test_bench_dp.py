"""Flat per-sample gradients (grad_sample_mode "flat") are exact, and `fedfuse bench dp-overhead` runs."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.data import synthetic
from common.data.schema import DatasetSchema, ModalitySpec
from common.errors import ConfigError
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.grad_samplers import SAMPLERS, FlatGradSample
from common.privacy.training import dp_step, private_training
from fedfuse.cli import build_parser


def per_sample_loop(model, inputs, mask, labels):
    """Reference: one backward pass per sample, every trainable parameter flattened in ``model.parameters()`` order."""
    rows = []
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model({k: v[i : i + 1] for k, v in inputs.items()}, mask[i : i + 1]), labels[i : i + 1])
        loss.backward()
        rows.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in model.parameters()
                    if p.requires_grad
                ]
            )
        )
    return torch.stack(rows)  # (B, P)


def flat_per_sample(model, inputs, mask, labels):
    """The flat wrapper's (B, P) per-sample gradients for one mean-loss backward pass, in ``model.parameters()`` order."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = FlatGradSample(model)
    try:
        F.cross_entropy(flat(inputs, mask), labels).backward()
        rows = flat.flat.grad_sample
        assert rows is not None and rows.shape == (len(labels), flat.flat.numel())
        return torch.cat([rows[:, lo:hi] for lo, hi in (flat._slices[p] for p in trainable)], dim=1)
    finally:
        flat.release()


MODEL_OPTIONS = {
    "default": {},
    "norm-group": {"norm": "group"},
    "norm-layer-width-12": {"norm": "layer", "width": 12},
}


@pytest.mark.parametrize("options", list(MODEL_OPTIONS.values()), ids=list(MODEL_OPTIONS))
def test_flat_per_sample_gradients_equal_a_per_sample_loop_on_the_default_model(options):
    # Prepare: the default model (and its model.norm / model.width options), a batch with absent modalities
    # (zero-filled and masked, as in training)
    torch.manual_seed(0)
    data = synthetic.generate(24, seed=3)
    mask = data.mask.clone()
    mask[::3, 1] = False
    mask[1::4, 0] = False
    mask[2::5, 2] = False
    mask[~mask.any(dim=1), 2] = True
    model = MultimodalModel(data.schema, ModelConfig(**options))
    model.train()
    # Execute
    flat = flat_per_sample(model, data.inputs, mask, data.labels)
    reference = per_sample_loop(model, data.inputs, mask, data.labels)
    # Assert: every parameter of every sample, and the encoder of an absent modality gets exactly zero
    assert flat.shape == reference.shape == (24, sum(p.numel() for p in model.parameters()))
    assert torch.allclose(flat, reference, atol=2e-6, rtol=1e-5)
    lo = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoders.image."))
    hi = lo + sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoders.signal."))
    assert torch.count_nonzero(flat[0, lo:hi]) == 0  # sample 0 lacks the signal


class EveryLayer(nn.Module):
    """Each sampler's layer kind, in the shapes the samplers special-case; one layer used twice, one never."""

    def __init__(self):
        super().__init__()
        self.schema = DatasetSchema(
            (ModalitySpec("img", "image", (2, 7, 6)), ModalitySpec("txt", "text", (5,), "int64", 11)), ("a", "b", "c")
        )
        self.conv2 = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.conv1 = nn.Conv1d(3, 4, 3, stride=2, padding=1)
        self.embed = nn.Embedding(11, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.groups = nn.GroupNorm(3, 3)  # on (B, 3, 4, 6): per sample and channel
        self.tokens = nn.Linear(4, 4)  # on (B, L, 4)
        self.twice = nn.Linear(4, 4, bias=False)
        self.unused = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, inputs, mask):
        h = torch.tanh(self.groups(self.conv2(inputs["img"])))  # (B, 3, 4, 6)
        h = torch.tanh(self.conv1(h.mean(dim=2))).mean(dim=2)  # (B, 4)
        t = self.tokens(self.norm(self.embed(inputs["txt"]))).mean(dim=1)  # (B, 4)
        h = self.twice(torch.tanh(self.twice(h + t)))
        return self.out(h * mask[:, :1])


def test_flat_per_sample_gradients_are_exact_for_every_layer_kind():
    # Prepare
    torch.manual_seed(1)
    model = EveryLayer()
    inputs = {"img": torch.randn(6, 2, 7, 6), "txt": torch.randint(0, 11, (6, 5))}
    mask, labels = torch.ones(6, 2, dtype=torch.bool), torch.tensor([0, 1, 2, 0, 1, 2])
    # Execute
    flat = flat_per_sample(model, inputs, mask, labels)
    reference = per_sample_loop(model, inputs, mask, labels)
    # Assert
    assert {type(m) for m in model.modules()} >= set(SAMPLERS)
    assert torch.allclose(flat, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", list(MODEL_OPTIONS.values()), ids=list(MODEL_OPTIONS))
def test_clipped_update_equals_opacus_hooks_with_noise_off(options):
    # Prepare: one DP-SGD step (lr 1, no momentum, sigma 0) on the same batch through each engine
    data = synthetic.generate(128, seed=4)
    idx = torch.arange(64)
    updates = {}
    for mode in ("flat", "hooks"):
        torch.manual_seed(2)
        model = MultimodalModel(data.schema, ModelConfig(**options))
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        private = private_training(
            model,
            len(data),
            accountant="prv",
            noise_multiplier=0.0,
            max_grad_norm=0.1,
            batch_size=64,
            lr=1.0,
            momentum=0.0,
            grad_sample_mode=mode,
        )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                dp_step(private, data, idx, modality_dropout=0.0, step=0)
        finally:
            private.close()
        updates[mode] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    # Assert: the same clipped, summed, scaled update (every per-sample norm is clipped at C = 0.1)
    assert updates["hooks"].abs().max() > 1e-4
    assert torch.allclose(updates["flat"], updates["hooks"], atol=1e-7, rtol=1e-4)


def test_an_empty_poisson_batch_gives_an_empty_buffer_and_a_noise_only_step():
    # Prepare
    data = synthetic.generate(64, seed=5)
    model = MultimodalModel(data.schema, ModelConfig())
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    private = private_training(
        model,
        len(data),
        accountant="prv",
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_size=64,
        lr=1.0,
        momentum=0.0,
        grad_sample_mode="flat",
    )
    # Execute
    try:
        loss = dp_step(private, data, torch.arange(0), modality_dropout=0.0, step=0)
    finally:
        private.close()
    # Assert: no loss, and every parameter moved by noise of std sigma * C / expected batch
    update = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    assert loss is None
    assert update.std().item() == pytest.approx(1.0 / 64, rel=0.05)


def test_wrapping_shares_the_parameters_and_release_gives_them_back():
    # Prepare
    model = MultimodalModel(synthetic.schema(), ModelConfig())
    weight = model.head.core["classifier"].weight
    flat = FlatGradSample(model)
    # Execute: an in-place change through the flat vector is seen by the model, and vice versa
    with torch.no_grad():
        flat.flat.add_(1.0)
        weight.mul_(0.0)
    lo, hi = flat._slices[weight]
    shared = bool((flat.flat[lo:hi] == 0).all()) and not any(p.requires_grad for p in model.parameters())
    flat.release()
    # Assert: afterwards the parameters are the model's own, trainable, with the values they had
    assert shared
    assert list(flat.parameters()) == [flat.flat]
    assert all(p.requires_grad and p.data_ptr() != flat.flat.data_ptr() for p in model.parameters())
    assert bool((weight == 0).all())
    assert "forward" not in model.head.core["classifier"].__dict__


def test_unsupported_or_shared_layers_are_refused():
    # A layer kind without a flat sampler, and a weight tied between two layers
    gru = nn.Sequential(nn.GRU(3, 4))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="GRU.*hooks"):
        FlatGradSample(gru)
    with pytest.raises(ValueError, match="tied"):
        FlatGradSample(tied)
    # a refused model is left as it was
    assert all(p.requires_grad for p in tied.parameters()) and "forward" not in tied[0].__dict__


def test_a_second_backward_or_a_stale_graph_is_refused():
    # Prepare
    data = synthetic.generate(8, seed=6)
    flat = FlatGradSample(MultimodalModel(data.schema, ModelConfig()))
    first = F.cross_entropy(flat(data.inputs, data.mask), data.labels)
    second = F.cross_entropy(flat(data.inputs, data.mask), data.labels)
    # Execute / Assert: only the latest forward pass may be backpropagated, once
    with pytest.raises(RuntimeError, match="one backward pass per forward pass"):
        first.backward()
    second.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward pass"):
        second.backward()
    flat.release()


def run_bench(argv, capsys):
    command = ["bench", "dp-overhead", *argv]
    parser, modules = build_parser(command)  # the CLI imports only the benchmark the command names
    args = parser.parse_args(command)
    status = modules["bench"].run(args)
    return status, capsys.readouterr().out.strip().splitlines()


def test_the_benchmark_runs_a_few_steps_and_prints_the_ratio_last(capsys):
    # Execute
    status, lines = run_bench(["--repeats", "3", "--warmup", "1", "--modes", "flat,hooks"], capsys)
    # Assert: machine, command, per-variant medians, then the ratio of the first mode last
    assert status == 0
    assert lines[0].startswith("machine: ") and "torch threads 1" in lines[0]
    assert re.fullmatch(
        r"command: (nice -n \d+ )?fedfuse bench dp-overhead --batch-size 64 --repeats 3 --warmup 1 "
        r"--threads 1 --modes flat,hooks --noise-multiplier 1.0 --max-grad-norm 1.0",
        lines[1],
    )
    assert any(line.startswith("non-private") for line in lines) and any(line.startswith("dp-flat ") for line in lines)
    assert any(line.startswith("dp-hooks ratio") for line in lines)
    assert re.fullmatch(r"dp-overhead ratio \[mode flat, .*\] \(median of 3 pairs\): \d+\.\d\d", lines[-1])


def test_the_benchmark_profile_and_poisson_options_run(capsys):
    argv = ["--repeats", "2", "--warmup", "1", "--poisson", "--profile", "--batch-size", "16", "--norm", "group", "--width", "8"]
    status, lines = run_bench(argv, capsys)
    assert status == 0
    assert lines[1].endswith("--poisson --profile --norm group --width 8")
    assert any(line.startswith("profile dp-flat") and "per-sample GroupNorm" in line for line in lines)
    assert lines[-1].startswith("dp-overhead ratio")


def test_the_benchmark_refuses_an_unknown_mode(capsys):
    with pytest.raises(ConfigError, match="unknown mode"):
        run_bench(["--modes", "fast"], capsys)


def test_the_per_sample_buffer_on_huge_pages_lives_as_long_as_its_views():
    from common.privacy.grad_samplers import _empty_on_huge_pages

    view = _empty_on_huge_pages(64, 40000)[2:5]
    view.fill_(1.5)
    assert view.shape == (3, 40000) and float(view.sum()) == 1.5 * 3 * 40000
    assert _empty_on_huge_pages(2, 3).shape == (2, 3)  # small: plain torch.empty


def test_poisson_batches_are_drawn_per_record_at_the_accounted_rate():
    # Prepare: q = 1/4 over 200 rows
    data = synthetic.generate(200, seed=7)
    private = private_training(
        MultimodalModel(data.schema, ModelConfig()),
        len(data),
        accountant="prv",
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_size=50,
        lr=0.1,
        momentum=0.0,
        grad_sample_mode="flat",
    )
    try:
        # Execute
        batches = [private.batch(step) for step in range(200)]
    finally:
        private.close()
    # Assert: q = 1 / ceil(200 / 50); rows are indices; sizes are Binomial(200, 1/4); every record gets sampled
    sizes = [len(b) for b in batches]
    assert private.sample_rate == 0.25
    assert all(b.dtype == torch.int64 and (b.numel() == 0 or int(b.max()) < 200) for b in batches)
    assert abs(sum(sizes) / len(sizes) - 50) < 3 and len(set(sizes)) > 5
    assert len(torch.cat(batches).unique()) == 200


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (5, 3, 11, 9)),
        (nn.Conv1d(2, 3, 5, stride=3, padding=2, dilation=2), (4, 2, 30)),
    ],
    ids=["conv2d", "conv1d"],
)
def test_conv_patches_are_unfolds_patches(conv, shape):
    from common.privacy.grad_samplers import _conv_patches

    x = torch.randn(*shape)
    if isinstance(conv, nn.Conv1d):
        reference = F.unfold(x.unsqueeze(2), (1, *conv.kernel_size), (1, *conv.dilation), (0, *conv.padding), (1, *conv.stride))
    else:
        reference = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.equal(_conv_patches(conv, x), reference.transpose(1, 2))
