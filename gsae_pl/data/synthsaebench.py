"""SynthSAEBench activations (Chanin & Garriga-Alonso 2026, arXiv 2602.14687), made on the fly.

A row is x = c @ W + bias: W [n_features, d_in] unit feature directions, c >= 0 the true
feature activations, drawn by the rules SAELens 6.54's `sae_lens.synthetic` defines (read
from its source; docs/method.md sec. 6), so that the statistics match:

- firing probabilities Zipfian: p_i = p_min + (p_max - p_min) (r_i - r_min) / (r_max - r_min),
  r_i = (i + 1)^-exponent, feature 0 the most frequent;
- a forest of `hierarchy_roots` trees, `branching` children per parent, `depth` levels
  below each root, numbered breadth-first; a child fires only while its parent does; the
  children of a mutually exclusive parent (a `mutually_exclusive_portion` share of the
  parents) keep one of those that fired, chosen uniformly; with `scale_children_by_parent`
  a child's activation is multiplied by its parent's over the parent's mean magnitude;
  `compensate_probabilities` divides a child's probability by its parent's and multiplies
  it by 1 + (its ME siblings' summed probability) / the parent's, so that effective rates
  stay near the Zipf ones;
- correlated firing through a Gaussian copula of low rank: g = eps F^T + eta sqrt(d),
  eps ~ N(0, I_rank), eta ~ N(0, I), feature i fires where g_i > Phi^-1(1 - p_i);
- magnitudes ReLU(mean_i + std_i N(0, 1)), mean_i linear from `mean_magnitude_start` to
  `mean_magnitude_end`, std_i folded normal |N(std_magnitude_mean, std_magnitude_std^2)|;
- W: random unit rows, then `orthogonalize_steps` Adam steps on sum_{i != j} (w_i . w_j)^2
  + n_features sum_i (|w_i|^2 - 1)^2, renormalised; the bias random, of norm `bias_norm`.

The model is built as SAELens builds it from the same seed (its seed offsets: magnitudes
+1 and +2, hierarchy +3, correlation +4; the dictionary from `seed`; random draws on the
CPU whatever `device`), or read from a directory SAELens's `SyntheticModel.save` wrote
(`model_dir`: synthetic_model_config.json, synthetic_model.safetensors, hierarchy.json),
so both sample from the same features. Orthogonalising SynthSAEBench-16k's 16384 x 768
dictionary is ~82 TFLOP (100 steps of two 16384 x 16384 x 768 matmuls): one step took
3.2 s on 2 quiet CPU cores, so ~5 min for the 100 (benchmarks/RESULTS.md,
"SynthSAEBench"); seconds on a GPU. So the orthogonalised dictionary is kept in a disk
cache (`orthogonalized`), made once per machine and settings, and read back bit for bit.

As in data/synthetic.py, every global batch comes from its own generator seeded from
(seed, stream, index), so batch k is a pure function of the config and k (the device is
part of that: a CUDA generator draws other numbers than the CPU's); held-out rows come in
fixed chunks, so eval_rows(n) is a prefix of eval_rows(m > n), and `eval_features(n)`
gives their true activations (eval/synthsaebench.py scores an SAE against them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from gsae_pl.cache_root import cache_root
from gsae_pl.data.base import SOURCES
from gsae_pl.errors import UserError
from gsae_pl.io import atomic_write
from gsae_pl.ranges import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL
from gsae_pl.seeds import stream_seed


@dataclass
class SynthSAEBenchConfig:
    """The block `data.synthsaebench` (defaults: SynthSAEBench-16k's rules at a CPU size;
    configs/data/synthsaebench_16k.yaml is the benchmark's model)."""

    seed: int = 42  # builds the model (SAELens's offsets) and seeds the sample streams
    # A SAELens SyntheticModel.save directory: the model (every field from n_features on)
    # is read from it instead; `seed` still seeds the sample streams.
    model_dir: Optional[str] = None
    device: str = "cpu"  # where rows are made (cpu | cuda | cuda:N); handed over on the CPU
    n_features: int = field(default=2048, metadata=POSITIVE)
    d_in: int = field(default=128, metadata=POSITIVE)  # SAELens: hidden_dim
    zipf_exponent: float = field(default=0.5, metadata=POSITIVE)
    p_max: float = field(default=0.4, metadata=UNIT_INTERVAL)
    p_min: float = field(default=5e-4, metadata=UNIT_INTERVAL)
    hierarchy_roots: int = field(default=16, metadata=NON_NEGATIVE)  # 0: no hierarchy
    branching: int = field(default=4, metadata=POSITIVE)  # children per parent, >= 2
    depth: int = field(default=3, metadata=POSITIVE)  # levels below each root
    mutually_exclusive_portion: float = field(default=1.0, metadata=UNIT_INTERVAL)
    compensate_probabilities: bool = True
    scale_children_by_parent: bool = True
    correlation_rank: int = field(default=25, metadata=NON_NEGATIVE)  # 0: independent
    correlation_scale: float = field(default=0.1, metadata=NON_NEGATIVE)
    mean_magnitude_start: float = field(default=5.0, metadata=POSITIVE)  # feature 0
    mean_magnitude_end: float = field(default=4.0, metadata=POSITIVE)  # the last feature
    std_magnitude_mean: float = field(default=0.5, metadata=NON_NEGATIVE)
    std_magnitude_std: float = field(default=0.5, metadata=NON_NEGATIVE)  # 0: constant
    bias_norm: float = field(default=0.5, metadata=NON_NEGATIVE)  # 0: no bias
    orthogonalize_steps: int = field(default=100, metadata=NON_NEGATIVE)  # 0: none
    orthogonalize_lr: float = field(default=3e-4, metadata=POSITIVE)


CONFIG_FILE = "synthetic_model_config.json"  # the names SyntheticModel.save writes
WEIGHTS_FILE = "synthetic_model.safetensors"
HIERARCHY_FILE = "hierarchy.json"
_EVAL_CHUNK = 4096  # held-out rows per generator
_ORTHO_CHUNK = 1024  # rows of the Gram matrix at a time: memory O(chunk x n_features)
_MIN_DIAG = 0.01  # SAELens: rows of the correlation factor capped so 1 - |row|^2 >= this


# (rows, cols, values): the active entries of a block of true activations
Entries = tuple[Tensor, Tensor, Tensor]


# ----- the model's parts, as SAELens defines them -----

def zipf_probabilities(n: int, exponent: float, p_max: float, p_min: float) -> Tensor:
    if not 0 < p_min < p_max <= 1:
        raise UserError(f"data.synthsaebench: p_min={p_min}, p_max={p_max}: need "
                        "0 < p_min < p_max <= 1")
    if n == 1:
        return torch.tensor([p_max])
    r = torch.arange(1, n + 1, dtype=torch.float32) ** -exponent
    return p_min + (p_max - p_min) * (r - r.min()) / (r.max() - r.min())


def hierarchy_tree(n: int, roots: int, branching: int, depth: int, me_portion: float,
                   scale: bool, seed: int) -> list[dict]:
    """The forest SAELens's generate_hierarchy makes, in its hierarchy.json form: roots
    take features 0..roots-1, then each level's children the next ones, breadth-first."""
    if roots and branching < 2:
        raise UserError(f"data.synthsaebench.branching={branching}: a parent needs at least "
                        "2 children")
    counter = iter(range(n))
    top = [_node(i) for _, i in zip(range(roots), counter)]
    parents, level = [(node, 0) for node in top], [(node, 0) for node in top]
    while level:
        below = []
        for node, d in level:
            if d >= depth:
                continue
            node["children"] = [_node(i) for _, i in zip(range(branching), counter)]
            if d + 1 < depth:
                below += [(child, d + 1) for child in node["children"]]
        parents += below
        level = below
    eligible = [node for node, _ in parents if len(node["children"]) >= 2]
    chosen = int(len(eligible) * me_portion)
    if chosen:  # SAELens draws them with Python's random, seeded seed + 3
        for i in random.Random(seed + 3).sample(range(len(eligible)), chosen):
            eligible[i]["mutually_exclusive_children"] = True
    for node, _ in parents:
        node["scale_children_by_parent"] = scale
    return top


def _node(index: int) -> dict:
    return {"feature_index": index, "children": [], "mutually_exclusive_children": False,
            "scale_children_by_parent": False}


def compensated(p: Tensor, roots: list[dict]) -> Tensor:
    """Probabilities raised for the hierarchy's losses (SAELens's correction factors):
    x 1 / p_parent below a parent, x (1 + other ME siblings' p / p_parent) in an ME group;
    clipped at 1."""
    factor = torch.ones_like(p)
    for parent, children in _edges(roots):
        kids = torch.tensor([c["feature_index"] for c in children], dtype=torch.long)
        p_parent = p[parent["feature_index"]].item()
        if p_parent > 0:
            factor[kids] = torch.tensor(1.0 / p_parent, dtype=torch.float64).float()
        if parent["mutually_exclusive_children"] and len(kids) >= 2 and p_parent > 0:
            others = (p[kids].double().sum() - p[kids].double()).clamp(min=0)
            factor[kids] *= (1 + others / p_parent).float()
    return (p * factor).clamp(max=1.0)


def _edges(roots: list[dict]) -> Iterator[tuple[dict, list[dict]]]:
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node["children"]:
            yield node, node["children"]
        stack += node["children"]


def low_rank_correlation(n: int, rank: int, scale: float, seed: int) -> tuple[Tensor, Tensor]:
    """(factor [n, rank], diag [n]) with factor factor^T + diag(diag) of unit diagonal."""
    gen = torch.Generator().manual_seed(seed + 4)
    factor = torch.randn(n, rank, generator=gen) * scale
    squares = (factor ** 2).sum(1)
    capped = 1 - squares < _MIN_DIAG
    factor[capped] *= torch.sqrt((1 - _MIN_DIAG) / squares[capped]).unsqueeze(1)
    return factor, 1 - (factor ** 2).sum(1)


def magnitudes(n: int, spec, seed: int | None) -> Tensor:
    """A SAELens magnitude setting (a number, or a {generator_name: ...} dict) -> [n]."""
    if not isinstance(spec, dict):
        return torch.full((n,), float(spec))
    kind = spec.get("generator_name")
    if kind == "constant":
        return torch.full((n,), float(spec.get("value", 1.0)))
    if kind in ("linear", "exponential"):
        if n == 1:
            return torch.tensor([float(spec["start"])])
        if kind == "linear":
            return torch.linspace(spec["start"], spec["end"], n)
        return spec["start"] * (spec["end"] / spec["start"]) ** torch.linspace(0, 1, n)
    if kind == "folded_normal":
        if seed is None:
            raise UserError("data.synthsaebench.model_dir: the model was saved without a seed, "
                            "so its folded-normal magnitudes cannot be drawn again: save it "
                            "with a seed")
        gen = torch.Generator().manual_seed(seed)
        out = (spec.get("mean", 0.0) + torch.randn(n, generator=gen) * spec["std"]).abs()
        low, high = spec.get("min_value"), spec.get("max_value")
        return out if low is None and high is None else out.clamp(min=low, max=high)
    raise UserError(f"data.synthsaebench.model_dir: magnitude generator {kind!r} is not one "
                    "of constant, linear, exponential, folded_normal")


def dictionary(n: int, d: int, bias_norm: float, seed: int) -> tuple[Tensor, Tensor]:
    """Unit random rows and the bias, both from one generator seeded `seed` (SAELens)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=gen)
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-8)
    if not bias_norm:
        return W, torch.zeros(d)
    b = torch.randn(d, generator=gen)
    return W, b / b.norm().clamp(min=1e-8) * bias_norm


def orthogonalize(W: Tensor, steps: int, lr: float) -> Tensor:
    """Adam on L = sum_{i != j} G_ij^2 + n sum_i (G_ii - 1)^2, G = W W^T, then unit rows.
    The gradient is written out, dL/dw_k = 4 sum_{j != k} G_kj w_j + 4 n (G_kk - 1) w_k,
    one chunk of G's rows at a time (never all of G)."""
    W = torch.nn.Parameter(W / W.norm(dim=1, keepdim=True).clamp(min=1e-8))
    opt = torch.optim.Adam([W], lr=lr)
    n = len(W)
    for _ in range(steps):
        with torch.no_grad():
            grad = torch.empty_like(W)
            for start in range(0, n, _ORTHO_CHUNK):
                block = W[start:start + _ORTHO_CHUNK]
                G = block @ W.T
                k = torch.arange(len(block), device=W.device)
                diag = G[k, start + k].clone()
                G[k, start + k] = 0
                grad[start:start + len(block)] = 4 * (G @ W + n * (diag - 1)[:, None] * block)
        W.grad = grad
        opt.step()
    with torch.no_grad():
        return (W / W.norm(dim=1, keepdim=True).clamp(min=1e-8)).detach().clone()


def orthogonalized(W: Tensor, cfg: SynthSAEBenchConfig, device) -> Tensor:
    """`orthogonalize(W)` through a disk cache: $GSAE_PL_CACHE/synthsaebench/<key>.safetensors,
    the key hashing everything the result depends on (the dictionary's settings and seed,
    the device type, torch's version). The 16k preset's 100 steps take minutes on a CPU;
    a suite builds the same dictionary for every run, so it is made once per machine. The
    file holds one tensor (safetensors: no code), written whole or not at all."""
    from safetensors.torch import load_file, save

    recipe = {"n_features": int(cfg.n_features), "d_in": int(cfg.d_in),
              "bias_norm": float(cfg.bias_norm), "seed": int(cfg.seed),
              "steps": int(cfg.orthogonalize_steps), "lr": float(cfg.orthogonalize_lr),
              "device": torch.device(device).type, "torch": torch.__version__}
    key = hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=8).hexdigest()
    path = cache_root() / "synthsaebench" / f"{key}.safetensors"
    if path.is_file():
        try:
            cached = load_file(str(path))["W"]
            if cached.shape == W.shape:
                return cached.to(device)
            problem = f"W is {tuple(cached.shape)}, not {tuple(W.shape)}"
        except Exception as err:  # any unreadable file: made again below, and replaced
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"warning: {path} is damaged ({problem}): orthogonalising again and replacing "
              "the file", file=sys.stderr)
    W = orthogonalize(W.to(device), cfg.orthogonalize_steps, cfg.orthogonalize_lr)
    atomic_write(path, lambda fh: fh.write(save({"W": W.contiguous().cpu()})))
    return W


# ----- the hierarchy as tensors -----

@dataclass
class Tree:
    """The hierarchy as per-feature tables: what fires on its own, and each parent's
    children, whether they are mutually exclusive and whether it scales them."""

    free: Tensor  # long [m]: features without a parent (roots and features outside trees)
    children: Tensor  # long [n, width]: each feature's children, -1 padded
    exclusive: Tensor  # bool [n]: its children are mutually exclusive
    rescale: Tensor  # bool [n]: its children are scaled by its activation / its mean


def tree_tables(roots: list[dict], n: int, device) -> Tree:
    kids: dict[int, list[int]] = {}
    exclusive, rescale = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    has_parent = torch.zeros(n, dtype=torch.bool)
    stack = list(roots)
    while stack:
        node = stack.pop()
        i = node.get("feature_index")
        if i is None:
            raise UserError("data.synthsaebench.model_dir: hierarchy.json has a node without "
                            "a feature_index, which this source does not support")
        kids[i] = [c["feature_index"] for c in node.get("children", [])]
        has_parent[kids[i]] = True
        exclusive[i] = bool(node.get("mutually_exclusive_children")) and len(kids[i]) >= 2
        rescale[i] = bool(node.get("scale_children_by_parent"))
        stack += node.get("children", [])
    width = max((len(k) for k in kids.values()), default=0)
    children = torch.full((n, width), -1, dtype=torch.long)
    for i, k in kids.items():
        children[i, :len(k)] = torch.tensor(k, dtype=torch.long)
    return Tree(free=(~has_parent).nonzero().flatten().to(device), children=children.to(device),
                exclusive=exclusive.to(device), rescale=rescale.to(device))


# ----- the source -----

@dataclass
class Model:
    """Everything sampling reads, on the source's device."""

    W: Tensor  # [n, d]: unit rows
    bias: Tensor  # [d]
    p: Tensor  # [n]: firing probabilities (compensated)
    mean: Tensor  # [n]
    std: Tensor  # [n]
    factor: Tensor | None  # [n, rank]: the copula's low-rank part
    diag_sqrt: Tensor | None  # [n]
    roots: list[dict]  # the hierarchy, in hierarchy.json's form

    def to(self, device) -> Model:
        parts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Model(**{k: v.to(device) if isinstance(v, Tensor) else v
                        for k, v in parts.items()})


def build_model(cfg: SynthSAEBenchConfig, device) -> Model:
    """The model SAELens's SyntheticModel builds from the same settings and seed."""
    n, seed = int(cfg.n_features), int(cfg.seed)
    roots = (hierarchy_tree(n, cfg.hierarchy_roots, cfg.branching, cfg.depth,
                            cfg.mutually_exclusive_portion, cfg.scale_children_by_parent, seed)
             if cfg.hierarchy_roots else [])
    factor = diag = None
    if cfg.correlation_rank:
        factor, diag = low_rank_correlation(n, cfg.correlation_rank, cfg.correlation_scale,
                                            seed)
    W, bias = dictionary(n, cfg.d_in, cfg.bias_norm, seed)
    if cfg.orthogonalize_steps:
        W = orthogonalized(W, cfg, device)
    p = zipf_probabilities(n, cfg.zipf_exponent, cfg.p_max, cfg.p_min)
    if roots and cfg.compensate_probabilities:
        p = compensated(p, roots)
    std = ({"generator_name": "folded_normal", "mean": cfg.std_magnitude_mean,
            "std": cfg.std_magnitude_std} if cfg.std_magnitude_std else cfg.std_magnitude_mean)
    mean = {"generator_name": "linear", "start": cfg.mean_magnitude_start,
            "end": cfg.mean_magnitude_end}
    return Model(W=W, bias=bias, p=p, mean=magnitudes(n, mean, seed + 2),
                 std=magnitudes(n, std, seed + 1), factor=factor,
                 diag_sqrt=None if diag is None else diag.sqrt(), roots=roots).to(device)


def load_model(model_dir: str, device) -> tuple[Model, dict]:
    """A SyntheticModel.save directory, read without sae_lens: (the model, its config)."""
    from safetensors.torch import load_file

    path = Path(model_dir).expanduser()
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise UserError(f"data.synthsaebench.model_dir={model_dir} lacks {', '.join(missing)}: "
                        "point it at a directory SAELens's SyntheticModel.save wrote")
    config = json.loads((path / CONFIG_FILE).read_text())
    weights = {k: v.float() for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    roots = (json.loads((path / HIERARCHY_FILE).read_text())["roots"]
             if (path / HIERARCHY_FILE).is_file() else [])
    n, seed = int(config["num_features"]), config.get("seed")
    diag = weights.get("correlation_diag")
    model = Model(
        W=weights["feature_vectors"], bias=weights["bias"],
        p=weights["firing_probabilities"],  # saved after compensation, as SAELens uses them
        mean=magnitudes(n, config.get("mean_firing_magnitudes", 1.0),
                        None if seed is None else seed + 2),
        std=magnitudes(n, config.get("std_firing_magnitudes", 0.0),
                       None if seed is None else seed + 1),
        factor=weights.get("correlation_factor"),
        diag_sqrt=None if diag is None else diag.sqrt(), roots=roots)
    return model.to(device), config


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"data.synthsaebench.device={name!r} is not a device ({err}): use "
                        "cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"data.synthsaebench.device={name} but no CUDA device is visible: "
                        "use data.synthsaebench.device=cpu")
    return device


class SynthSAEBenchSource:
    """An ActivationSource (data/base.py) with the true features and, for the held-out
    rows, the true feature activations."""

    lm = None  # no LM behind these rows

    def __init__(self, cfg: SynthSAEBenchConfig):
        names = [f.name for f in dataclasses.fields(SynthSAEBenchConfig)]
        self.settings = {name: getattr(cfg, name) for name in names}
        self.seed, self.device = int(cfg.seed), _device(cfg.device)
        if cfg.model_dir:
            self.model, self.model_config = load_model(cfg.model_dir, self.device)
        else:
            self.model, self.model_config = build_model(cfg, self.device), None
        self.n_features, self.d_in = self.model.W.shape
        self.tree = tree_tables(self.model.roots, self.n_features, self.device)
        # Phi^-1(1 - p), as SAELens: a feature fires where its copula normal exceeds it.
        self.thresholds = math.sqrt(2) * torch.erfinv(1 - 2 * self.model.p)
        self.true_features = (self.model.W / self.model.W.norm(dim=1, keepdim=True)).cpu()
        self._eval_x: list[Tensor] = []
        self._eval_c: list[tuple[Tensor, Tensor, Tensor]] = []

    def generator(self, stream: str, index: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(stream_seed(self.seed, stream, index))
        return gen

    def sample(self, n_rows: int, gen: torch.Generator) -> tuple[Tensor, Entries]:
        """Rows x [n_rows, d_in] and their true activations as sparse entries (rows, cols,
        values > 0), on the device: x = c @ W + bias."""
        c = self._activations(n_rows, gen)
        rows, cols, vals = c
        # Only the active entries reach W: ~L0 rows of W per row, not all n_features.
        x = self.model.bias.expand(n_rows, -1).clone()
        x.index_add_(0, rows, vals[:, None] * self.model.W[cols])
        return x, c

    def _activations(self, n_rows: int, gen: torch.Generator) -> Entries:
        """Top-down: the features without a parent fire (densely), then each level's
        children are drawn only under the active parents. A child that SAELens would draw
        and then zero (its parent inactive) is not drawn at all: its own copula normal is
        independent given eps, so the distribution is the same at O(active) cost."""
        m = self.model
        eps = (None if m.factor is None else
               torch.randn(n_rows, m.factor.shape[1], generator=gen, device=self.device))
        free = self.tree.free
        self._rows = n_rows  # what _n_rows answers when there is no eps to count
        fired = self._fires(free, eps, None, gen)
        rows, slot = fired.nonzero(as_tuple=True)
        found = [self._magnitudes(rows, free[slot], None, gen)]
        while len(found[-1][0]) and self.tree.children.shape[1]:
            found.append(self._children(*found[-1], eps, gen))
        rows, cols, vals = (torch.cat(parts) for parts in zip(*found))
        order = (rows * self.n_features + cols).argsort()  # row-major, as nonzero gives
        return rows[order], cols[order], vals[order]

    def _fires(self, feats: Tensor, eps: Tensor | None, rows: Tensor | None,
               gen: torch.Generator) -> Tensor:
        """Whether features fire: feats [w] on every row of eps (rows None), or feats [k, w]
        on rows [k]: Bernoulli(p), or, with the copula, eps . F_i + eta sqrt(d_i) >
        Phi^-1(1 - p_i)."""
        m = self.model
        shape = feats.shape if rows is not None else (self._n_rows(eps), len(feats))
        if eps is None:
            return torch.rand(shape, generator=gen, device=self.device) < m.p[feats]
        g = torch.randn(shape, generator=gen, device=self.device) * m.diag_sqrt[feats]
        if rows is None:
            g += eps @ m.factor[feats].T
        else:
            g += torch.einsum("kr,kwr->kw", eps[rows], m.factor[feats])
        return g > self.thresholds[feats]

    def _n_rows(self, eps: Tensor | None) -> int:
        return self._rows if eps is None else len(eps)

    def _magnitudes(self, rows: Tensor, cols: Tensor, scale: Tensor | None,
                    gen: torch.Generator) -> Entries:
        """ReLU(mean + std N(0, 1)), times the parent's scale; zeros dropped (inactive)."""
        m = self.model
        noise = torch.randn(len(cols), generator=gen, device=self.device)
        vals = (m.mean[cols] + noise * m.std[cols]).relu()
        if scale is not None:
            vals = vals * scale
        keep = vals > 0
        return rows[keep], cols[keep], vals[keep]

    def _children(self, rows: Tensor, cols: Tensor, vals: Tensor, eps: Tensor | None,
                  gen: torch.Generator) -> Entries:
        """The children of active entries (rows, cols, vals) that fire; in an ME group one
        of those, chosen uniformly, stays."""
        t = self.tree
        parent = (t.children[cols] >= 0).any(1)
        rows, cols, vals = rows[parent], cols[parent], vals[parent]
        kids = t.children[cols]  # [k, width]
        live = (kids >= 0) & self._fires(kids.clamp(min=0), eps, rows, gen)
        score = torch.rand(live.shape, generator=gen, device=self.device)
        winner = torch.where(live, score, -1.0).argmax(1, keepdim=True)
        alone = torch.zeros_like(live).scatter_(1, winner, True) & live
        live = torch.where(t.exclusive[cols, None], alone, live)
        which, slot = live.nonzero(as_tuple=True)
        scale = torch.where(t.rescale[cols], vals / self.model.mean[cols], 1.0)[which]
        return self._magnitudes(rows[which], kids[which, slot], scale, gen)

    def global_batches(self, batch_size: int, start_step: int) -> Iterator[Tensor]:
        step = int(start_step)
        while True:
            yield self.sample(batch_size, self.generator("train", step))[0].cpu()
            step += 1

    def _fill_eval(self, n_rows: int) -> None:
        while len(self._eval_x) * _EVAL_CHUNK < n_rows:
            x, entries = self.sample(_EVAL_CHUNK, self.generator("eval", len(self._eval_x)))
            self._eval_x.append(x.cpu())
            self._eval_c.append(tuple(t.cpu() for t in entries))

    def eval_rows(self, n_rows: int) -> Tensor:
        """The first n_rows of the held-out stream; a copy, so callers may edit it."""
        self._fill_eval(n_rows)
        return torch.cat(self._eval_x)[:n_rows].clone()

    def eval_features(self, n_rows: int) -> Tensor:
        """The true activations of eval_rows(n_rows): sparse COO [n_rows, n_features]."""
        self._fill_eval(n_rows)
        rows, cols, vals = [], [], []
        for k, (r, c, v) in enumerate(self._eval_c):
            keep = r + k * _EVAL_CHUNK < n_rows
            rows.append(r[keep] + k * _EVAL_CHUNK)
            cols.append(c[keep])
            vals.append(v[keep])
        index = torch.stack([torch.cat(rows), torch.cat(cols)])
        return torch.sparse_coo_tensor(index, torch.cat(vals), (n_rows, self.n_features),
                                       is_coalesced=True, check_invariants=False)

    def describe(self) -> dict:
        out = {"source": "synthsaebench", **self.settings}
        if self.model_config is not None:
            out["model_config"] = self.model_config  # what model_dir held
        return out


@SOURCES.register("synthsaebench")
def build(cfg) -> SynthSAEBenchSource:
    return SynthSAEBenchSource(cfg.data.synthsaebench)


build.Settings = SynthSAEBenchConfig  # its block of the config: data.synthsaebench
