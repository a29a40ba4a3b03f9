"""Families of training runs, each planted with one cause (or none), and their labels.

A *family* is one kind of training run a user writes (a deep sigmoid MLP, an LSTM language
model...) with parameters; a *variant* is one setting of those parameters (depth, width, lr,
seed...). ``Family.make(params)`` builds the model, optimizer and data and returns a
:class:`Task` (what to train) and a :class:`Label` (what is wrong with it, by construction).

Every pathological family also names its *sibling* (the same run with the cause removed) and
its *rescue* (the targeted intervention: lower lr, warm-up, clipping, He init, normalisation...)
as parameter overrides; :mod:`benchmarks.zoo.outcome` trains both to confirm the label by
outcome. The split (``calibration`` / ``heldout``) is by family, never by seed.

All data is synthetic and seeded; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradscope.rules.engine import FINDING_KINDS

KINDS = FINDING_KINDS  # the finding kinds a run can be planted with, as the rules name them
HEALTHY = "healthy"
DIVERGENCE = ("update_ratio_high", "exploding_gradients", "nonfinite")
ANY_WEIGHT = "*"
RUN = "(run)"


@dataclass(frozen=True)
class Label:
    """What is wrong with a run, by construction.

    ``kind``: the planted cause (or ``healthy``). ``layers``: acceptable layers, exact names or
    prefixes (``net.0`` accepts ``net.0.weight`` and ``net.0#1``); ``*`` accepts any layer but
    ``(run)``. ``onset``: the first step the cause acts (0 for a bad initialisation).
    ``primary``: kinds any of which count as detecting the cause (default: ``kind`` alone; a
    divergence accepts any of :data:`DIVERGENCE`, ``kind`` then names the ideal one).
    ``also_ok``: kinds that follow from the cause and are not false positives.
    """

    kind: str
    layers: tuple[str, ...] = ()
    onset: int = 0
    primary: tuple[str, ...] = ()
    also_ok: tuple[str, ...] = ()
    note: str = ""

    @property
    def detect(self) -> tuple[str, ...]:
        return self.primary or ((self.kind,) if self.kind != HEALTHY else ())

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layers": list(self.layers),
            "onset": self.onset,
            "primary": list(self.detect),
            "also_ok": list(self.also_ok),
            "note": self.note,
        }


@dataclass
class Task:
    """One training run: ``loss(step)`` runs the forward pass on that step's batch."""

    model: nn.Module
    opt: torch.optim.Optimizer
    loss: Callable[[int], torch.Tensor]
    steps: int
    sched: Any = None
    clip: float | None = None  # plain clip_grad_norm_ (an intervention), never gradscope's
    outcome_window: tuple[int, int] | None = None  # default: the last 10% of the steps


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # the planted kind, or "healthy"
    split: str  # "calibration" | "heldout"
    build: Callable[[dict[str, Any]], tuple[Task, Label]]
    grid: dict[str, tuple[Any, ...]]
    base: dict[str, Any] = field(default_factory=dict)
    sibling: dict[str, Any] = field(default_factory=dict)  # the cause removed
    rescue: dict[str, Any] = field(default_factory=dict)  # the targeted intervention
    rescue_name: str = ""
    doc: str = ""

    def variants(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        out = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            p = dict(self.base)
            p.update(zip(keys, combo, strict=True))
            out.append(p)
        return out

    def make(self, params: dict[str, Any]) -> tuple[Task, Label]:
        torch.manual_seed(int(params.get("seed", 0)))
        return self.build(params)


def run_id(family: str, params: dict[str, Any], grid: dict[str, Any]) -> str:
    return family + "-" + "-".join(f"{k}{_short(params[k])}" for k in grid)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# -- data ---------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def teacher_data(seed: int, n: int, d: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs N(0, 1) labelled by a random two-layer teacher: learnable, not trivial."""
    g = _gen(1000 + seed)
    x = torch.randn(n, d, generator=g)
    w1 = torch.randn(d, 32, generator=g) / math.sqrt(d)
    w2 = torch.randn(32, classes, generator=g) / math.sqrt(32)
    y = (torch.tanh(x @ w1 * 2) @ w2).argmax(1)
    return x, y


def regression_data(seed: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(2000 + seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g) / math.sqrt(d)
    y = torch.sin(2 * x @ w) + 0.5 * (x[:, :1] * x[:, 1:2]) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def image_data(seed: int, n: int, size: int = 12, classes: int = 10) -> tuple[torch.Tensor, ...]:
    """Class templates (smooth random patterns) plus noise, 1 channel."""
    g = _gen(3000 + seed)
    t = torch.randn(classes, 1, size // 3, size // 3, generator=g)
    templates = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + 0.7 * torch.randn(n, 1, size, size, generator=g)
    return x, y


def markov_tokens(seed: int, n: int, length: int, vocab: int) -> torch.Tensor:
    """Sequences from a sparse random bigram chain (each token has 3 likely successors)."""
    g = _gen(4000 + seed)
    logits = torch.full((vocab, vocab), -4.0)
    for v in range(vocab):
        nxt = torch.randperm(vocab, generator=g)[:3]
        logits[v, nxt] = torch.tensor([2.0, 1.0, 0.5])
    probs = torch.softmax(logits, 1)
    seq = torch.empty(n, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        seq[:, t] = torch.multinomial(probs[seq[:, t - 1]], 1, generator=g).squeeze(1)
    return seq


def batch_at(step: int, n: int, batch: int) -> slice:
    start = (step * batch) % max(n - batch + 1, 1)
    return slice(start, start + batch)


# -- models -------------------------------------------------------------------------------------
ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def init_linear(m: nn.Module, init: str, gain: float = 1.0, bias: float | None = None) -> None:
    """``default`` (PyTorch's), ``he`` (Kaiming normal, x gain), ``xavier``, ``normal``
    (N(0, (gain / sqrt(fan_in))^2): gain 1 is LeCun, 4-8 saturates tanh)."""
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        return
    fan_in = m.weight[0].numel()
    if init == "he":
        nn.init.normal_(m.weight, 0.0, gain * math.sqrt(2.0 / fan_in))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif init == "xavier":
        nn.init.xavier_normal_(m.weight, gain=gain)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif init == "normal":
        nn.init.normal_(m.weight, 0.0, gain / math.sqrt(fan_in))
    if bias is not None and m.bias is not None:
        nn.init.constant_(m.bias, bias)


class MLP(nn.Module):
    """``net``: Linear [-> norm] -> act, ..., Linear (``depth`` Linear layers)."""

    def __init__(
        self,
        d_in: int,
        width: int,
        depth: int,
        d_out: int,
        act: str = "relu",
        norm: str | None = None,
        init: str = "default",
        gain: float = 1.0,
        out_act: str | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth - 1):
            layers.append(nn.Linear(d, width))
            if norm == "ln":
                layers.append(nn.LayerNorm(width))
            elif norm == "bn":
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTS[act]())
            d = width
        layers.append(nn.Linear(d, d_out))
        if out_act:
            layers.append(ACTS[out_act]())
        self.net = nn.Sequential(*layers)
        for m in self.net:
            init_linear(m, init, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def names_of(model: nn.Module, *types: type) -> tuple[str, ...]:
    return tuple(n for n, m in model.named_modules() if n and isinstance(m, types))


def first_weights(model: nn.Module, k: int = 2) -> tuple[str, ...]:
    """The first ``k`` weight modules with their activations: where vanishing starves."""
    mods = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    out = list(mods[:k])
    if isinstance(model, MLP):
        out += [f"net.{i}" for i in range(2 * k)]
    return tuple(dict.fromkeys(out))


class CNN(nn.Module):
    """conv1-act1-pool-conv2-act2-pool-fc1-act3-fc2 on 1x12x12 images; options: BatchNorm,
    a residual block, the conv biases' initial value."""

    def __init__(
        self,
        c: int = 8,
        act: str = "relu",
        bn: bool = False,
        res: bool = False,
        bias: float | None = None,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.act1 = ACTS[act]()
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * c) if bn else nn.Identity()
        self.act2 = ACTS[act]()
        self.res = res
        if res:
            self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
            self.bn3 = nn.BatchNorm2d(2 * c) if bn else nn.Identity()
            self.act3r = ACTS[act]()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * c * 9, 32)
        self.act3 = ACTS[act]()
        self.fc2 = nn.Linear(32, 10)
        for m in self.modules():
            init_linear(m, init)
        for conv in (self.conv1, self.conv2):
            if bias is not None:
                nn.init.constant_(conv.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        if self.res:
            x = x + self.act3r(self.bn3(self.conv3(x)))
        x = self.pool(x).flatten(1)
        return self.fc2(self.act3(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, pre_ln: bool) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            h = self.ln1(x)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])
        return self.ln2(x + self.mlp(x))


class TinyLM(nn.Module):
    """A decoder-only transformer language model (pre-LN or post-LN)."""

    def __init__(self, vocab: int, d: int, layers: int, length: int, pre_ln: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, 4, pre_ln) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d) if pre_ln else nn.Identity()
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(length, length, dtype=torch.bool), 1))

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        t = tok.shape[1]
        x = self.emb(tok) + self.pos[:t]
        for b in self.blocks:
            x = b(x, self.mask[:t, :t])
        return self.head(self.ln_f(x))


class RNNLM(nn.Module):
    def __init__(self, vocab: int, d: int, hidden: int, cell: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(tok))[0])


def make_opt(model: nn.Module, p: dict[str, Any]) -> torch.optim.Optimizer:
    params = [q for q in model.parameters() if q.requires_grad]
    name, lr = p.get("opt", "adam"), float(p["lr"])
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr, momentum=float(p.get("momentum", 0.0)))


def warmup_sched(opt: torch.optim.Optimizer, warmup: int) -> Any:
    if not warmup:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> Callable:
    def loss(step: int) -> torch.Tensor:
        sl = batch_at(step, len(x), bs)
        return F.cross_entropy(model(x[sl]), y[sl])

    return loss


def lm_loss(model: nn.Module, seq: torch.Tensor, bs: int, vocab: int) -> Callable:
    def loss(step: int) -> torch.Tensor:
        s = seq[batch_at(step, len(seq), bs)]
        return F.cross_entropy(model(s[:, :-1]).reshape(-1, vocab), s[:, 1:].reshape(-1))

    return loss


# -- vanishing ----------------------------------------------------------------------------------
def b_deep_mlp(p: dict[str, Any]) -> tuple[Task, Label]:
    """A deep MLP of sigmoid/tanh units on a teacher classification task."""
    x, y = teacher_data(p["seed"], 2048, 16, 4)
    model = MLP(16, p["width"], p["depth"], 4, act=p["act"], init=p["init"], gain=p["gain"])
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 64), p["steps"])
    return task, Label(
        "vanishing_gradients",
        first_weights(model, 2),
        0,
        also_ok=("saturation", "update_ratio_low"),
        note="the backward signal dies towards the first layers",
    )


class SeqClassifier(nn.Module):
    """inp (Linear) -> tanh RNN -> head on the last state."""

    def __init__(self, d: int, hidden: int, classes: int, hh_scale: float) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.rnn = nn.RNN(hidden, hidden, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(hh_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.inp(x))[0][:, -1])


def b_rnn_memory(p: dict[str, Any]) -> tuple[Task, Label]:
    """Tell the symbol planted ``lag`` steps before the end of a noisy sequence (default: at
    its start) with a tanh RNN."""
    g = _gen(5000 + p["seed"])
    n, t, k = 1024, p["length"], 4
    y = torch.randint(0, k, (n,), generator=g)
    x = 0.3 * torch.randn(n, t, k, generator=g)
    x[torch.arange(n), t - 1 - p.get("lag", t - 1), y] += 3.0
    model = SeqClassifier(k, p["hidden"], k, p["hh"])
    if p.get("orthogonal"):
        nn.init.orthogonal_(model.rnn.weight_hh_l0)
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 32), p["steps"], clip=p.get("clip"))
    if p["hh"] > 1.5:
        return task, Label(
            "exploding_gradients",
            ("rnn", "inp", "head"),
            0,
            primary=("exploding_gradients",),
            also_ok=("nonfinite", "update_ratio_high", "loss_spike", "saturation"),
            note="recurrent weights x3: gradient spikes through time",
        )
    return task, Label(
        "vanishing_gradients",
        ("inp", "rnn"),
        0,
        also_ok=("update_ratio_low",),
        note="small recurrent weights: the signal from step 0 vanishes through time",
    )


# -- exploding ----------------------------------------------------------------------------------
def b_relu_gain(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = teacher_data(p["seed"], 2048, 16, 4)
    model = MLP(
        16, p["width"], p["depth"], 4, act="relu", init="he", gain=p["gain"], norm=p.get("norm")
    )
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 64), p["steps"])
    return task, Label(
        "exploding_gradients",
        (ANY_WEIGHT,),
        0,
        also_ok=("nonfinite", "update_ratio_high", "loss_spike", "dead_units"),
        note="init gain above He: the backward signal grows with depth",
    )


def b_lstm_lm(p: dict[str, Any]) -> tuple[Task, Label]:
    vocab = 24
    seq = markov_tokens(p["seed"], 512, 33, vocab)
    model = RNNLM(vocab, 16, p["hidden"], p.get("cell", "lstm"))
    opt = make_opt(model, p)
    task = Task(model, opt, lm_loss(model, seq, 16, vocab), p["steps"], clip=p.get("clip"))
    if p.get("healthy"):
        return task, Label(HEALTHY)
    return task, Label(
        "exploding_gradients",
        (ANY_WEIGHT,),
        0,
        primary=DIVERGENCE,
        also_ok=("loss_spike", "saturation", "update_ratio_high", "nonfinite"),
        note="SGD lr far too high without clipping; ideal: exploding_gradients",
    )


# -- nonfinite ----------------------------------------------------------------------------------
class LogCounts(nn.Module):
    """log-transform of count features (a zero count gives -inf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class CountModel(nn.Module):
    def __init__(self, d: int, width: int, eps: float) -> None:
        super().__init__()
        self.logt = LogCounts() if not eps else nn.Identity()
        self.eps = eps
        self.body = nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eps:
            x = torch.log(x + self.eps)
        return self.body(self.logt(x))


def b_log_counts(p: dict[str, Any]) -> tuple[Task, Label]:
    g = _gen(6000 + p["seed"])
    n, d = 2048, 12
    x = torch.poisson(torch.rand(n, d, generator=g) * 20 + 5, generator=g) + 1
    y = (x[:, :4].log().sum(1) > x[:, 4:8].log().sum(1)).long() + (x[:, 8] > 15).long()
    model = CountModel(d, p["width"], p.get("eps", 0.0))
    opt = make_opt(model, p)
    bs, k = 64, p["onset"]

    def loss(step: int) -> torch.Tensor:
        sl = batch_at(step, n, bs)
        xb = x[sl].clone()
        if step == k and p.get("poison", True):
            xb[3, 2] = 0.0  # one zero count in one batch
        return F.cross_entropy(model(xb), y[sl])

    return Task(model, opt, loss, p["steps"]), Label(
        "nonfinite",
        ("logt",),
        k,
        also_ok=("exploding_gradients", "loss_spike"),
        note="log of a zero count",
    )


class Standardize(nn.Module):
    """Per-feature standardisation by the batch's statistics (no epsilon)."""

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / (x.std(0) + self.eps)


def b_std_div(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = teacher_data(p["seed"], 2048, 16, 4)
    x = x * 5 + 3
    bs, k = p["bs"], p["onset"]
    model = nn.Sequential()
    model.add_module("norm", Standardize(p.get("eps", 0.0)))
    model.add_module("fc1", nn.Linear(16, p["width"]))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(p["width"], 4))
    opt = make_opt(model, p)

    def loss(step: int) -> torch.Tensor:
        sl = batch_at(step, len(x), bs)
        xb = x[sl].clone()
        if step == k and p.get("poison", True):
            xb[:, 5] = 1.0  # a feature that is constant over this batch (a sensor stuck)
        return F.cross_entropy(model(xb), y[sl])

    return Task(model, opt, loss, p["steps"]), Label(
        "nonfinite",
        ("norm",),
        k,
        also_ok=("exploding_gradients", "loss_spike"),
        note="division by a batch std of 0",
    )


class MaskedAttentionPool(nn.Module):
    """Attention pooling over a padded token sequence; padding masked with -inf."""

    def __init__(self, d: int, fill: float) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(d) * 0.1)
        self.k = nn.Linear(d, d)
        self.fill = fill

    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        scores = self.k(h) @ self.q / math.sqrt(h.shape[-1])
        w = torch.softmax(scores.masked_fill(pad, self.fill), dim=-1)
        return (w.unsqueeze(-1) * h).sum(1)


class BagClassifier(nn.Module):
    def __init__(self, vocab: int, d: int, fill: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = MaskedAttentionPool(d, fill)
        self.head = nn.Linear(d, 2)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        pad = tok == 0
        return self.head(self.attn(self.emb(tok), pad))


def b_masked_softmax(p: dict[str, Any]) -> tuple[Task, Label]:
    g = _gen(7000 + p["seed"])
    n, t, vocab = 2048, p["length"], 20
    tok = torch.randint(1, vocab, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    tok[torch.arange(t)[None, :] >= lengths[:, None]] = 0
    y = ((tok == 3).sum(1) > (tok == 4).sum(1)).long()
    model = BagClassifier(vocab, p["width"], p.get("fill", -math.inf))
    opt = make_opt(model, p)
    bs, k = 32, p["onset"]

    def loss(step: int) -> torch.Tensor:
        sl = batch_at(step, n, bs)
        tb = tok[sl].clone()
        if step == k and p.get("poison", True):
            tb[7] = 0  # an empty sequence: every key masked
        return F.cross_entropy(model(tb), y[sl])

    return Task(model, opt, loss, p["steps"]), Label(
        "nonfinite",
        ("attn",),
        k,
        also_ok=("exploding_gradients", "loss_spike"),
        note="softmax over a row whose keys are all masked with -inf",
    )


class NormFeatures(nn.Module):
    """Appends each row's L2 norm (sqrt of a sum of squares) to the features."""

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.sqrt((x * x).sum(-1, keepdim=True) + self.eps)
        return torch.cat([x, r], -1)


def b_sqrt_zero(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = regression_data(p["seed"], 2048, 8)
    model = nn.Sequential()
    model.add_module("enc", nn.Linear(8, p["width"], bias=False))
    model.add_module("act", nn.Tanh())
    model.add_module("feat", NormFeatures(p.get("eps", 0.0)))
    model.add_module("out", nn.Linear(p["width"] + 1, 1))
    opt = make_opt(model, p)
    bs, k = 32, p["onset"]

    def loss(step: int) -> torch.Tensor:
        sl = batch_at(step, len(x), bs)
        xb = x[sl].clone()
        if step == k and p.get("poison", True):
            xb[0] = 0.0  # an all-zero (padding) example: its encoding is exactly 0
        return F.mse_loss(model(xb), y[sl])

    return Task(model, opt, loss, p["steps"]), Label(
        "nonfinite",
        ("feat",),
        k,
        also_ok=("exploding_gradients", "loss_spike"),
        note="sqrt at exactly 0: an infinite gradient in the backward pass",
    )


# -- dead units ---------------------------------------------------------------------------------
def b_relu_adam_high(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = teacher_data(p["seed"], 2048, 32, 8)
    model = MLP(32, p["width"], p["depth"], 8, act=p["act"])
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 64), p["steps"])
    return task, Label(
        "dead_units",
        names_of(model, nn.ReLU, nn.LeakyReLU),
        0,
        also_ok=("update_ratio_high", "exploding_gradients", "loss_spike"),
        note="Adam at a high lr kills ReLU units",
    )


def b_cnn_label(p: dict[str, Any], kind: str) -> tuple[Task, Label]:
    x, y = image_data(p["seed"], 1024)
    model = CNN(p["c"], bias=p.get("bias"), bn=p.get("bn", False), res=p.get("res", False))
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 32), p["steps"], sched=None)
    task.sched = warmup_sched(opt, p.get("warmup", 0))
    if kind == "dead_units":
        return task, Label(
            "dead_units",
            names_of(model, nn.ReLU),
            0,
            also_ok=("update_ratio_high", "exploding_gradients", "loss_spike", "nonfinite"),
            note="dead ReLUs in a CNN",
        )
    if kind == "update_ratio_low":
        return task, Label(
            "update_ratio_low",
            (ANY_WEIGHT,),
            0,
            also_ok=("vanishing_gradients",),
            note="SGD at a learning rate far too small",
        )
    return task, Label(HEALTHY)


# -- saturation ---------------------------------------------------------------------------------
def b_saturating_mlp(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = teacher_data(p["seed"], 2048, 16, 4)
    x = x * p.get("xscale", 1.0) + 2 * p.get("xscale", 1.0) * (p.get("xscale", 1.0) > 1)
    if p.get("standardize"):
        x = (x - x.mean(0)) / x.std(0)
    model = MLP(
        16,
        p["width"],
        p["depth"],
        4,
        act=p["act"],
        init=p["init"],
        gain=p["gain"],
        norm=p.get("norm"),
    )
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 64), p["steps"])
    hidden = names_of(model, nn.Tanh, nn.Sigmoid)
    return task, Label(
        "saturation",
        hidden,
        0,
        also_ok=("vanishing_gradients", "update_ratio_low"),
        note="pre-activations far beyond the linear range",
    )


# -- update ratios ------------------------------------------------------------------------------
def b_lm(p: dict[str, Any]) -> tuple[Task, Label]:
    vocab, length = 32, 24
    seq = markov_tokens(p["seed"], 512, length + 1, vocab)
    model = TinyLM(vocab, p["d"], p["layers"], length, pre_ln=p["pre_ln"])
    opt = make_opt(model, p)
    task = Task(model, opt, lm_loss(model, seq, 16, vocab), p["steps"], clip=p.get("clip"))
    task.sched = warmup_sched(opt, p.get("warmup", 0))
    k = p.get("poison_step")
    if k is not None:
        g = _gen(99 + p["seed"])
        garbage = torch.randint(0, vocab, (16, length + 1), generator=g)
        base = task.loss

        def loss(step: int) -> torch.Tensor:
            if step == k:
                return F.cross_entropy(
                    model(garbage[:, :-1]).reshape(-1, vocab) * 30.0, garbage[:, 1:].reshape(-1)
                )
            return base(step)

        task.loss = loss
        task.outcome_window = (k + 1, k + 31)
        return task, Label(
            "loss_spike",
            (RUN,),
            k,
            also_ok=("exploding_gradients",),
            note="one batch of random tokens with logits x30 (a bad mixed-precision cast)",
        )
    if p.get("healthy"):
        return task, Label(HEALTHY)
    return task, Label(
        "update_ratio_high",
        (ANY_WEIGHT,),
        0,
        primary=DIVERGENCE,
        also_ok=("loss_spike", "dead_units", "saturation", "vanishing_gradients"),
        note="post-LN at a high Adam lr without warm-up; ideal: update_ratio_high",
    )


def b_mlp_opt(p: dict[str, Any]) -> tuple[Task, Label]:
    """A GELU/tanh MLP (no ReLU to die) on a teacher task; the lr is the cause."""
    x, y = teacher_data(p["seed"], 2048, 16, 4)
    model = MLP(16, p["width"], p["depth"], 4, act=p["act"])
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 64), p["steps"])
    start = p.get("bad_from", 0)
    if start:
        lr_bad = p["lr_bad"]

        def factor(s: int) -> float:
            return 1.0 if s < start else lr_bad / p["lr"]

        task.sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    kind = p["kind"]
    if kind == "update_ratio_high":
        return task, Label(
            kind,
            (ANY_WEIGHT,),
            start,
            primary=DIVERGENCE,
            also_ok=("loss_spike", "saturation", "dead_units"),
            note="Adam lr far too high; ideal: update_ratio_high",
        )
    if kind == "update_ratio_low":
        return task, Label(
            kind,
            (ANY_WEIGHT,),
            start,
            also_ok=("vanishing_gradients",),
            note="learning rate far too small",
        )
    return task, Label(HEALTHY)


def b_linear_sgd(p: dict[str, Any]) -> tuple[Task, Label]:
    """Least squares with SGD above the stable learning rate (divergence)."""
    g = _gen(8000 + p["seed"])
    n, d = 1024, p["d"]
    x = torch.randn(n, d, generator=g) * p["xscale"]
    w = torch.randn(d, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    model = nn.Sequential()
    model.add_module("hidden", nn.Linear(d, 16))
    model.add_module("out", nn.Linear(16, 1))
    opt = make_opt(model, p)

    def loss(step: int) -> torch.Tensor:
        sl = batch_at(step, n, 32)
        return F.mse_loss(model(x[sl]), y[sl])

    task = Task(model, opt, loss, p["steps"], clip=p.get("clip"))
    return task, Label(
        "update_ratio_high",
        (ANY_WEIGHT,),
        0,
        primary=DIVERGENCE,
        also_ok=("loss_spike",),
        note="SGD beyond the stable lr; ideal: update_ratio_high",
    )


# -- loss spikes --------------------------------------------------------------------------------
def b_poisoned_mlp(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = regression_data(p["seed"], 2048, 16)
    model = MLP(16, p["width"], 3, 1, act="relu")
    opt = make_opt(model, p)
    k, bs = p["onset"], 64

    def loss(step: int) -> torch.Tensor:
        sl = batch_at(step, len(x), bs)
        xb = x[sl]
        if step == k and p.get("poison", True):
            xb = xb * p["scale"]  # a batch that skipped normalisation
        return F.mse_loss(model(xb), y[sl])

    task = Task(model, opt, loss, p["steps"], clip=p.get("clip"), outcome_window=(k + 1, k + 31))
    return task, Label(
        "loss_spike",
        (RUN,),
        k,
        also_ok=("exploding_gradients", "dead_units", "update_ratio_low"),
        note="one batch with unnormalised inputs",
    )


def b_poisoned_cnn(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = image_data(p["seed"], 1024)
    model = CNN(p["c"])
    opt = make_opt(model, p)
    k, bs = p["onset"], 32

    def loss(step: int) -> torch.Tensor:
        sl = batch_at(step, len(x), bs)
        xb, yb = x[sl], y[sl]
        if step == k and p.get("poison", True):
            # a batch whose labels are off by one (a misaligned label file), images unscaled
            xb, yb = xb * p["scale"], (yb + 1) % 10
        return F.cross_entropy(model(xb), yb)

    task = Task(model, opt, loss, p["steps"], clip=p.get("clip"), outcome_window=(k + 1, k + 31))
    return task, Label(
        "loss_spike",
        (RUN,),
        k,
        also_ok=("exploding_gradients", "dead_units", "update_ratio_high"),
        note="one batch with misaligned labels and unnormalised pixels",
    )


# -- healthy controls ---------------------------------------------------------------------------
def b_autoencoder(p: dict[str, Any]) -> tuple[Task, Label]:
    g = _gen(9000 + p["seed"])
    n, d = 2048, 32
    z = torch.randn(n, 4, generator=g)
    x = torch.sigmoid(z @ torch.randn(4, d, generator=g))
    model = nn.Sequential(
        nn.Linear(d, p["width"]),
        nn.ReLU(),
        nn.Linear(p["width"], 8),
        nn.ReLU(),
        nn.Linear(8, p["width"]),
        nn.ReLU(),
        nn.Linear(p["width"], d),
        nn.Sigmoid(),
    )
    opt = make_opt(model, p)

    def loss(step: int) -> torch.Tensor:
        xb = x[batch_at(step, n, 64)]
        return F.binary_cross_entropy(model(xb), xb)

    return Task(model, opt, loss, p["steps"]), Label(HEALTHY)


def b_online_sgd(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = teacher_data(p["seed"], 4096, 8, 3)
    model = MLP(8, p["width"], 3, 3, act=p["act"], init="he")
    opt = make_opt(model, p)
    return Task(model, opt, classify(model, x, y, 1), p["steps"]), Label(HEALTHY)


def b_finetune(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = teacher_data(p["seed"], 2048, 16, 4)
    model = nn.Sequential()
    body = MLP(16, p["width"], 3, p["width"], act="relu")
    model.add_module("body", body)
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(p["width"], 4))
    for q in body.parameters():
        q.requires_grad_(False)
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 64), p["steps"])
    task.sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p["steps"], eta_min=0.0)
    return task, Label(HEALTHY)


def b_mlp_cosine(p: dict[str, Any]) -> tuple[Task, Label]:
    x, y = teacher_data(p["seed"], 2048, 16, 4)
    model = MLP(16, p["width"], p["depth"], 4, act=p["act"], init="he")
    opt = make_opt(model, p)
    task = Task(model, opt, classify(model, x, y, 64), p["steps"])
    warm = p.get("warmup", 0)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(p["steps"] - warm, 1))))

    task.sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return task, Label(HEALTHY)


# -- the families -------------------------------------------------------------------------------
SEEDS = (0, 1, 2)


def _cnn(kind: str) -> Callable[[dict[str, Any]], tuple[Task, Label]]:
    return lambda p: b_cnn_label(p, kind)


FAMILIES: tuple[Family, ...] = (
    # ---------------- vanishing
    Family(
        "vanish_sigmoid_mlp",
        "vanishing_gradients",
        "calibration",
        b_deep_mlp,
        grid={"depth": (10, 12), "width": (32, 64), "seed": SEEDS},
        base={
            "act": "sigmoid",
            "init": "default",
            "gain": 1.0,
            "opt": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "steps": 200,
        },
        sibling={"depth": 3},
        rescue={"act": "relu", "init": "he"},
        rescue_name="ReLU + He init",
        doc="deep sigmoid MLP, PyTorch default init, SGD",
    ),
    Family(
        "vanish_tanh_mlp",
        "vanishing_gradients",
        "heldout",
        b_deep_mlp,
        grid={"depth": (10, 12), "width": (32, 64), "seed": SEEDS},
        base={
            "act": "tanh",
            "init": "normal",
            "gain": 0.6,
            "opt": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "steps": 250,
        },
        sibling={"depth": 3},
        rescue={"init": "xavier", "gain": 5 / 3},
        rescue_name="Xavier init with tanh gain",
        doc="10-12-layer tanh MLP with too small an init (0.6/sqrt(fan_in)); learns nothing",
    ),
    Family(
        "vanish_tanh_rnn",
        "vanishing_gradients",
        "heldout",
        b_rnn_memory,
        grid={"length": (20, 25), "hh": (0.2, 0.4), "seed": SEEDS},
        base={"hidden": 24, "opt": "adam", "lr": 3e-3, "steps": 200},
        sibling={"hh": 1.0},
        rescue={"orthogonal": True},
        rescue_name="orthogonal recurrent init",
        doc="tanh RNN remembering its first input over a long sequence, small W_hh",
    ),
    # ---------------- exploding
    Family(
        "explode_relu_gain",
        "exploding_gradients",
        "calibration",
        b_relu_gain,
        grid={"depth": (12, 16), "gain": (1.6, 2.0), "seed": SEEDS},
        base={"width": 32, "opt": "sgd", "lr": 0.01, "momentum": 0.9, "steps": 200},
        sibling={"gain": 1.0},
        rescue={"gain": 1.0},
        rescue_name="He init (gain 1; the cause removed, so rescue = sibling)",
        doc="deep ReLU MLP, init gain 1.6-2x He, no normalisation",
    ),
    Family(
        "explode_rnn_copy",
        "exploding_gradients",
        "heldout",
        b_rnn_memory,
        grid={"length": (60, 100), "hidden": (16, 32), "seed": SEEDS},
        base={"hh": 3.0, "lag": 2, "opt": "sgd", "lr": 0.05, "steps": 120},
        sibling={"hh": 1.0},
        rescue={"orthogonal": True},
        rescue_name="orthogonal recurrent init",
        doc="tanh nn.RNN on a 60-100 step memory task, weight_hh x3",
    ),
    Family(
        "explode_lstm_lm",
        "exploding_gradients",
        "calibration",
        b_lstm_lm,
        grid={"lr": (30.0, 40.0), "hidden": (32, 64), "seed": SEEDS},
        base={"opt": "sgd", "steps": 200, "cell": "lstm"},
        sibling={"lr": 1.0},
        rescue={"clip": 0.25},
        rescue_name="clip_grad_norm_ 0.25",
        doc="LSTM language model, SGD at a high lr without clipping",
    ),
    # ---------------- nonfinite
    Family(
        "nan_log_counts",
        "nonfinite",
        "calibration",
        b_log_counts,
        grid={"onset": (40, 90, 150), "width": (32, 64), "seed": (0, 1)},
        base={"opt": "adam", "lr": 1e-3, "steps": 200},
        sibling={"poison": False},
        rescue={"eps": 1.0},
        rescue_name="log1p (log(x + 1))",
        doc="a LogCounts module: log of count features, one zero count in one batch",
    ),
    Family(
        "nan_masked_softmax",
        "nonfinite",
        "calibration",
        b_masked_softmax,
        grid={"onset": (30, 80, 140), "length": (8, 16), "seed": (0, 1)},
        base={"width": 16, "opt": "adam", "lr": 3e-3, "steps": 200},
        sibling={"poison": False},
        rescue={"fill": -1e9},
        rescue_name="a finite mask value (-1e9)",
        doc="attention pooling with -inf padding; one empty sequence in one batch",
    ),
    Family(
        "nan_std_div",
        "nonfinite",
        "heldout",
        b_std_div,
        grid={"onset": (30, 100, 170), "bs": (32, 64), "seed": (0, 1)},
        base={"width": 32, "opt": "adam", "lr": 1e-3, "steps": 200},
        sibling={"poison": False},
        rescue={"eps": 1e-5},
        rescue_name="epsilon in the denominator",
        doc="per-batch standardisation without epsilon; a constant feature in one batch",
    ),
    Family(
        "inf_sqrt_zero",
        "nonfinite",
        "heldout",
        b_sqrt_zero,
        grid={"onset": (25, 90, 160), "width": (16, 32), "seed": (0, 1)},
        base={"opt": "sgd", "lr": 0.05, "momentum": 0.9, "steps": 200},
        sibling={"poison": False},
        rescue={"eps": 1e-12},
        rescue_name="epsilon inside sqrt",
        doc="sqrt of a sum of squares that is exactly 0 on one example: infinite gradient",
    ),
    # ---------------- dead units
    Family(
        "dead_relu_adam",
        "dead_units",
        "calibration",
        b_relu_adam_high,
        grid={"lr": (0.05, 0.1), "width": (64, 128), "seed": SEEDS},
        base={"depth": 3, "act": "relu", "opt": "adam", "steps": 200},
        sibling={"lr": 1e-3},
        rescue={"lr": 3e-3},
        rescue_name="lr 3e-3",
        doc="ReLU MLP, Adam at lr 0.05-0.1",
    ),
    Family(
        "dead_cnn_negbias",
        "dead_units",
        "heldout",
        _cnn("dead_units"),
        grid={"bias": (-3.0, -6.0), "c": (8, 12), "seed": SEEDS},
        base={"opt": "sgd", "lr": 0.05, "momentum": 0.9, "steps": 150},
        sibling={"bias": None},
        rescue={"bn": True},
        rescue_name="BatchNorm after each conv",
        doc="CNN whose conv biases start at -3/-6: born dead",
    ),
    Family(
        "dead_cnn_sgd_lr",
        "dead_units",
        "heldout",
        _cnn("dead_units"),
        grid={"lr": (1.0, 2.0), "c": (8, 12), "seed": SEEDS},
        base={"opt": "sgd", "momentum": 0.0, "steps": 150},
        sibling={"lr": 0.05},
        rescue={"warmup": 100, "lr": 0.3},
        rescue_name="lr 0.3 with 100 warm-up steps",
        doc="CNN at SGD lr 1-2",
    ),
    # ---------------- saturation
    Family(
        "sat_tanh_init",
        "saturation",
        "calibration",
        b_saturating_mlp,
        grid={"gain": (6.0, 8.0), "width": (32, 64), "seed": SEEDS},
        base={
            "depth": 6,
            "act": "tanh",
            "init": "normal",
            "opt": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "steps": 200,
        },
        sibling={"gain": 1.0},
        rescue={"init": "xavier", "gain": 5 / 3},
        rescue_name="Xavier init with tanh gain",
        doc="tanh MLP, weights at 6-8x the LeCun scale",
    ),
    Family(
        "sat_sigmoid_unnorm",
        "saturation",
        "heldout",
        b_saturating_mlp,
        grid={"xscale": (30.0, 60.0), "width": (32, 64), "seed": SEEDS},
        base={
            "depth": 3,
            "act": "sigmoid",
            "init": "default",
            "gain": 1.0,
            "opt": "adam",
            "lr": 3e-2,
            "steps": 200,
        },
        sibling={"xscale": 1.0},
        rescue={"standardize": True},
        rescue_name="standardised inputs",
        doc="sigmoid MLP on unnormalised inputs (x30-60)",
    ),
    # ---------------- update ratio high
    Family(
        "uhigh_postln_lm",
        "update_ratio_high",
        "heldout",
        b_lm,
        grid={"lr": (0.1, 0.2), "d": (32, 48), "seed": SEEDS},
        base={"layers": 2, "pre_ln": False, "opt": "adam", "steps": 150},
        sibling={"lr": 2e-3},
        rescue={"warmup": 100, "lr": 2e-3},
        rescue_name="lr 2e-3 with 100 warm-up steps",
        doc="post-LN transformer LM, Adam lr 0.1/0.2, no warm-up",
    ),
    Family(
        "uhigh_mlp_adam",
        "update_ratio_high",
        "calibration",
        b_mlp_opt,
        grid={"lr": (0.1, 0.3), "act": ("gelu", "tanh"), "seed": SEEDS},
        base={"width": 64, "depth": 3, "opt": "adam", "steps": 200, "kind": "update_ratio_high"},
        sibling={"lr": 1e-3},
        rescue={"lr": 3e-3},
        rescue_name="lr 3e-3",
        doc="GELU/tanh MLP, Adam at lr 0.1-0.3",
    ),
    Family(
        "uhigh_linear_sgd",
        "update_ratio_high",
        "calibration",
        b_linear_sgd,
        grid={"lr": (0.05, 0.1), "d": (16, 32), "seed": SEEDS},
        base={"xscale": 3.0, "opt": "sgd", "steps": 150},
        sibling={"lr": 0.002},
        rescue={"lr": 0.004},
        rescue_name="lr 0.004",
        doc="least squares on unnormalised features, SGD beyond the stable lr",
    ),
    Family(
        "uhigh_mlp_lr_jump",
        "update_ratio_high",
        "heldout",
        b_mlp_opt,
        grid={"lr_bad": (0.3, 1.0), "bad_from": (80, 120), "seed": SEEDS},
        base={
            "width": 64,
            "depth": 3,
            "act": "gelu",
            "opt": "adam",
            "lr": 1e-3,
            "steps": 250,
            "kind": "update_ratio_high",
        },
        sibling={"bad_from": 0},
        rescue={"lr_bad": 3e-3},
        rescue_name="lr 3e-3 after the jump",
        doc="a schedule bug: the Adam lr jumps from 1e-3 to 0.3-1 at step 80/120",
    ),
    # ---------------- update ratio low
    Family(
        "ulow_adam_tiny_lr",
        "update_ratio_low",
        "calibration",
        b_mlp_opt,
        grid={"lr": (1e-7, 1e-8), "act": ("gelu", "tanh"), "seed": SEEDS},
        base={"width": 64, "depth": 3, "opt": "adam", "steps": 200, "kind": "update_ratio_low"},
        sibling={"lr": 3e-3},
        rescue={"lr": 1e-3},
        rescue_name="lr 1e-3",
        doc="MLP, Adam at lr 1e-7/1e-8 (a typo in the exponent)",
    ),
    Family(
        "ulow_cnn_sgd",
        "update_ratio_low",
        "heldout",
        _cnn("update_ratio_low"),
        grid={"lr": (1e-6, 1e-7), "c": (8, 12), "seed": SEEDS},
        base={"opt": "sgd", "momentum": 0.9, "steps": 150},
        sibling={"lr": 0.05},
        rescue={"lr": 0.02},
        rescue_name="lr 0.02",
        doc="CNN, SGD at lr 1e-6/1e-7",
    ),
    Family(
        "ulow_sched_bug",
        "update_ratio_low",
        "heldout",
        b_mlp_opt,
        grid={"lr_bad": (1e-8, 1e-9), "bad_from": (60, 100), "seed": SEEDS},
        base={
            "width": 64,
            "depth": 3,
            "act": "gelu",
            "opt": "adam",
            "lr": 1e-3,
            "steps": 250,
            "kind": "update_ratio_low",
        },
        sibling={"bad_from": 0},
        rescue={"lr_bad": 3e-4},
        rescue_name="decay to 3e-4, not 1e-8",
        doc="a schedule bug: the lr drops from 1e-3 to 1e-8 at step 60/100",
    ),
    # ---------------- loss spike
    Family(
        "spike_mlp_poison",
        "loss_spike",
        "calibration",
        b_poisoned_mlp,
        grid={"onset": (80, 140), "scale": (1e2, 1e3), "seed": SEEDS},
        base={"width": 64, "opt": "adam", "lr": 1e-3, "steps": 200},
        sibling={"poison": False},
        rescue={"clip": 1.0},
        rescue_name="clip_grad_norm_ 1.0",
        doc="Adam MLP regressor, one batch with inputs x100/x1000",
    ),
    Family(
        "spike_cnn_poison",
        "loss_spike",
        "heldout",
        b_poisoned_cnn,
        grid={"onset": (70, 110), "scale": (1.0, 5.0), "seed": SEEDS},
        base={"c": 8, "opt": "sgd", "lr": 0.02, "momentum": 0.9, "steps": 150},
        sibling={"poison": False},
        rescue={"clip": 1.0},
        rescue_name="clip_grad_norm_ 1.0",
        doc="CNN classifier, one batch with misaligned labels (and pixels x5)",
    ),
    Family(
        "spike_lm_garbage",
        "loss_spike",
        "heldout",
        b_lm,
        grid={"poison_step": (80, 120), "d": (32, 48), "seed": SEEDS},
        base={"layers": 2, "pre_ln": True, "warmup": 20, "opt": "adam", "lr": 2e-3, "steps": 150},
        sibling={"poison_step": None},
        rescue={"clip": 1.0},
        rescue_name="clip_grad_norm_ 1.0",
        doc="pre-LN transformer LM, one garbage batch with logits x30",
    ),
    # ---------------- healthy controls
    Family(
        "ok_cnn_bn_res",
        HEALTHY,
        "calibration",
        _cnn(HEALTHY),
        grid={"c": (8, 12), "lr": (0.02, 0.05), "seed": SEEDS},
        base={"bn": True, "res": True, "opt": "sgd", "momentum": 0.9, "steps": 150},
        doc="CNN with BatchNorm and a residual block, SGD momentum",
    ),
    Family(
        "ok_lstm_lm_clip",
        HEALTHY,
        "calibration",
        b_lstm_lm,
        grid={"hidden": (32, 64), "lr": (0.5, 1.0), "seed": SEEDS},
        base={"opt": "sgd", "steps": 200, "cell": "lstm", "clip": 0.5, "healthy": True},
        doc="LSTM language model, SGD with clipping",
    ),
    Family(
        "ok_autoencoder",
        HEALTHY,
        "calibration",
        b_autoencoder,
        grid={"width": (32, 64), "lr": (1e-3, 3e-3), "seed": SEEDS},
        base={"opt": "adam", "steps": 200},
        doc="autoencoder with a sigmoid output, Adam",
    ),
    Family(
        "ok_finetune_frozen",
        HEALTHY,
        "calibration",
        b_finetune,
        grid={"width": (32, 64), "lr": (1e-2, 3e-2), "seed": SEEDS},
        base={"opt": "adamw", "steps": 200},
        doc="fine-tuning a head on a frozen body (requires_grad False), cosine to 0",
    ),
    Family(
        "ok_preln_lm_warmup",
        HEALTHY,
        "heldout",
        b_lm,
        grid={"d": (32, 48), "lr": (1e-3, 3e-3), "seed": SEEDS},
        base={
            "layers": 2,
            "pre_ln": True,
            "warmup": 30,
            "opt": "adamw",
            "steps": 150,
            "healthy": True,
        },
        doc="pre-LN transformer LM with warm-up, AdamW",
    ),
    Family(
        "ok_gru_lm_clip",
        HEALTHY,
        "heldout",
        b_lstm_lm,
        grid={"hidden": (32, 64), "lr": (2e-3, 5e-3), "seed": SEEDS},
        base={"opt": "adam", "steps": 200, "cell": "gru", "clip": 1.0, "healthy": True},
        doc="GRU language model, Adam with clipping",
    ),
    Family(
        "ok_mlp_adamw_cosine",
        HEALTHY,
        "heldout",
        b_mlp_cosine,
        grid={"act": ("relu", "gelu"), "lr": (1e-3, 3e-3), "seed": SEEDS},
        base={"width": 64, "depth": 4, "opt": "adamw", "warmup": 20, "steps": 250},
        doc="MLP, AdamW, warm-up then cosine down to 0",
    ),
    Family(
        "ok_online_sgd",
        HEALTHY,
        "heldout",
        b_online_sgd,
        grid={"act": ("relu", "tanh"), "lr": (0.01, 0.03), "seed": SEEDS},
        base={"width": 32, "opt": "sgd", "steps": 400},
        doc="batch size 1, online SGD, 400 steps",
    ),
)
FAMILY = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class RunSpec:
    id: str
    family: str
    split: str
    params: dict[str, Any]

    def key(self) -> str:
        """What an outcome depends on: the parameters, the sibling's and the rescue's."""
        fam = FAMILY[self.family]
        text = repr(
            (sorted(self.params.items()), sorted(fam.sibling.items()), sorted(fam.rescue.items()))
        )
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def make(self, which: str = "patho") -> tuple[Task, Label]:
        """``patho`` (the run as labelled), ``sibling`` (the cause removed) or ``rescue``."""
        fam = FAMILY[self.family]
        p = dict(self.params)
        if which == "sibling":
            p.update(fam.sibling)
        elif which == "rescue":
            p.update(fam.rescue)
        return fam.make(p)


def enumerate_runs(split: str = "all", families: list[str] | None = None) -> list[RunSpec]:
    out = []
    for fam in FAMILIES:
        if split != "all" and fam.split != split:
            continue
        if families and fam.name not in families:
            continue
        for p in fam.variants():
            out.append(RunSpec(run_id(fam.name, p, fam.grid), fam.name, fam.split, p))
    return out
