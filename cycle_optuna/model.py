"""The transformer classifier: input stem (patches, convolutions), positions, pre-LN blocks, pooling.

Input is [B, T, F] float, normalised per feature; a time step whose features are all NaN is padding
(or a missing step): it is zeroed, masked out of attention and pooling, and never changes the output.
See docs/model.md for each knob and why its default was chosen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cycle_optuna.config import auto_patch_len  # noqa: F401 (model.auto_patch_len, as it was)
from cycle_optuna.features import summary_features as summary_features_of
from cycle_optuna.features import shape_summary

POS_ENCODINGS = ("sinusoidal", "rotary", "learned", "none")
POOLINGS = ("mean", "cls", "last", "max")
CONV_KERNELS = (5, 3, 3)  # kernel of each conv layer of the stem: conv_stem = how many of them
STEP_KERNEL = 7  # step_conv: steps each output of the convolution over the raw steps reads
INIT_STD = 0.02  # the small-transformer codebases' N(0, 0.02), times init_gain
_EPS = 1e-5


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos positions [n, dim] of per-dimension variance 1/2 (the embedding's scale)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of q or k [B, H, T, D] (pairs of halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

    Dropout acts on the two residual branches, not on the attention weights: on CPU the extra
    [B, H, T, T] mask cost ~15% of a step for no measurable gain on the synthetic task.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.mlp(self.ln2(x))


class TransformerClassifier(nn.Module):
    """Sequence classifier: [B, T, F] float (NaN steps = padding) -> [B, n_classes] logits."""

    def __init__(self, *, n_features: int, n_classes: int, seq_len: int, hidden_dim: int, n_layers: int,
                 n_heads: int, dropout: float, init_gain: float = 1.0, patch_len: int = 1, conv_stem: int = 0,
                 pos_encoding: str = "sinusoidal", pooling: str = "max", instance_norm: bool = False,
                 summary_features: bool = False, step_conv: bool = False, summary_of_shape: bool = False) -> None:
        super().__init__()
        if n_heads < 1 or hidden_dim % n_heads != 0:
            raise ValueError(f"hidden_dim must be divisible by n_heads, but got {hidden_dim=}, {n_heads=}.")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, but got {n_layers=}.")
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, but got {pos_encoding=}.")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, but got {pooling=}.")
        if not 0 <= conv_stem <= len(CONV_KERNELS):
            raise ValueError(f"conv_stem must be in 0..{len(CONV_KERNELS)}, but got {conv_stem=}.")
        if pos_encoding == "rotary" and (hidden_dim // n_heads) % 2:
            raise ValueError(f"rotary positions need an even head size, but got {hidden_dim=}, {n_heads=}.")
        patch_len = patch_len or auto_patch_len(seq_len)
        if not 1 <= patch_len <= seq_len:
            raise ValueError(f"patch_len must be in 1..seq_len={seq_len}, but got {patch_len=}.")
        self.seq_len, self.patch_len, self.n_tokens = seq_len, patch_len, math.ceil(seq_len / patch_len)
        self.pos_encoding, self.pooling, self.instance_norm = pos_encoding, pooling, instance_norm
        self.summary_features = summary_features
        # with instance_norm, the summary branch reads the statistics of each series z-normalised (its
        # shape) and, through weights of their own (summary_level), its level and log-scale
        # (features.shape_summary): a recording's offset or gain no longer dominates every statistic.
        # False: as models saved before it read the series as they are.
        self.summary_of_shape = summary_of_shape and instance_norm
        # Stem: one linear map per patch of patch_len steps (a strided conv's weights, applied as
        # one matrix product: _patches), then conv_stem same-length convolutions over the tokens
        # for local temporal features.
        # step_conv: one convolution over the raw steps (kernel STEP_KERNEL, hidden_dim // 2 channels,
        # GELU) before the patches are cut, so each token is made of nonlinear local shapes rather
        # than a linear map of its steps (a conv's weights, applied as one matrix product over each
        # step's window: _step_windows; on the CPU the convolutions took 2-4x as long).
        c_in = n_features
        self.step_conv = None
        if step_conv:
            self.step_conv = nn.Conv1d(n_features, max(1, hidden_dim // 2), STEP_KERNEL, padding=STEP_KERNEL // 2)
            c_in = self.step_conv.out_channels
        self.embed = nn.Conv1d(c_in, hidden_dim, kernel_size=patch_len, stride=patch_len)
        self.stem = nn.ModuleList(nn.Conv1d(hidden_dim, hidden_dim, k, padding=k // 2) for k in CONV_KERNELS[:conv_stem])
        if instance_norm:
            # RevIN-style: each series is scaled to zero mean, unit std per feature with a learned
            # affine; the removed level and scale are not lost but fed to the head.
            self.norm_weight = nn.Parameter(torch.ones(n_features))
            self.norm_bias = nn.Parameter(torch.zeros(n_features))
            self.stats = nn.Linear(2 * n_features, hidden_dim)
        if summary_features:
            # Per-series statistics of the input (level, spread, extremes, trend, segment means,
            # low frequencies, cross-channel correlations: features.summary_features), through a
            # small MLP into the pooled vector: what a bag of patches sees least directly.
            n_summary = summary_features_of(torch.zeros(1, seq_len, n_features)).shape[1]
            self.summary = nn.Sequential(nn.Linear(n_summary, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
            if self.summary_of_shape:
                # the series' level and log-scale per feature (features.shape_summary), into the
                # branch's hidden layer beside the shape statistics, initialised as that layer is but
                # from a generator of its own: the other weights, dropout and shuffling draw what
                # they drew without it, so on data whose series are z-normalised already (the level
                # and scale the same for all, standardised to 0) the model trains as before
                own = torch.Generator().manual_seed(0)
                self.summary_level = nn.Parameter(
                    torch.randn(hidden_dim, 2 * n_features, generator=own) * (INIT_STD * init_gain))
                n_summary += 2 * n_features
            # each statistic standardised by the training series' mean and std (scale_summary), as the
            # MLP reference standardises them: a small but telling spread (a short burst in a long
            # series moves its std by a few %) then weighs as much as a large one
            self.register_buffer("summary_mu", torch.zeros(n_summary))
            self.register_buffer("summary_sd", torch.ones(n_summary))
        if pos_encoding == "sinusoidal":
            self.register_buffer("pos", sinusoid_table(self.n_tokens, hidden_dim)[None], persistent=False)
        elif pos_encoding == "learned":
            self.pos = nn.Parameter(torch.randn(1, self.n_tokens, hidden_dim) * math.sqrt(0.5))
        elif pos_encoding == "rotary":
            head = hidden_dim // n_heads
            inv = 1.0 / 10000 ** (torch.arange(0, head, 2, dtype=torch.float32) / head)
            angles = torch.arange(self.n_tokens + 1, dtype=torch.float32)[:, None] * inv  # [N + 1, head / 2]
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        if pooling == "cls":
            self.cls = nn.Parameter(torch.randn(1, 1, hidden_dim) * math.sqrt(0.5))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden_dim, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, n_classes)
        self._init(init_gain, n_layers)
        if summary_features:
            # the branch's output layer starts at zero: the model starts as the transformer alone
            # and the statistics come in as training finds them useful (as a residual branch's last
            # layer is often zeroed). Drawn at random, the standardised statistics' many inputs
            # steered the first epochs on a few dozen series: ArrowHead's 20-cycle study fell
            # below 1-NN (docs/benchmarks.md)
            nn.init.zeros_(self.summary[-1].weight)

    def _init(self, gain: float, n_layers: int) -> None:
        """N(0, 0.02 gain) for the transformer's linear layers, residual projections further scaled by
        1/sqrt(2 n_layers) so the residual stream's variance does not grow with depth; the stem keeps
        unit-variance outputs (std gain/sqrt(fan_in)) so tokens start at the positions' scale."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=INIT_STD * gain)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv1d):
                nn.init.normal_(m.weight, std=gain / math.sqrt(m.in_channels * m.kernel_size[0]))
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            for m in (block.proj, block.mlp[2]):
                nn.init.normal_(m.weight, std=INIT_STD * gain / math.sqrt(2 * n_layers))

    def scale_summary(self, feats: torch.Tensor) -> None:
        """Standardise the summary branch's inputs by the statistics `feats` [N, D] of the training series."""
        sd = feats.std(0, unbiased=False) if len(feats) > 1 else torch.ones_like(feats[0])
        self.summary_mu.copy_(feats.mean(0))
        self.summary_sd.copy_(torch.where(sd < 1e-6, torch.ones_like(sd), sd))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a model saved before the summary branch was standardised read its statistics as they are
        if self.summary_features:
            for key, fill in (("summary_mu", 0.0), ("summary_sd", 1.0)):
                state_dict.setdefault(prefix + key, torch.full_like(getattr(self, key), fill))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def summary_of(self, x: torch.Tensor) -> torch.Tensor:
        """The summary branch's input for series ``x`` [B, T, F] (T <= seq_len): their statistics as
        if padded to seq_len, row by row, so a data set's can be computed once and sliced per batch."""
        t = x.shape[1]
        with torch.no_grad():  # statistics of the data: nothing to learn upstream of them
            full = F.pad(x, (0, 0, 0, self.seq_len - t), value=math.nan) if t < self.seq_len else x
            return self._summary_stats(full).to(x.dtype)

    def _summary_stats(self, x: torch.Tensor) -> torch.Tensor:
        return shape_summary(x.double()) if self.summary_of_shape else summary_features_of(x)

    def _summary_branch(self, z: torch.Tensor) -> torch.Tensor:
        """The summary MLP on standardised statistics `z`: with summary_of_shape, its first layer reads
        the shape statistics and summary_level the level and scale (the last 2F columns)."""
        if not self.summary_of_shape:
            return self.summary(z)
        first = self.summary[0]
        h = first(z[:, :first.in_features]) + F.linear(z[:, first.in_features:], self.summary_level)
        return self.summary[2](self.summary[1](h))

    def forward(self, x: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``x``; ``summary`` is ``summary_of(x)`` where the caller has it (training
        computes a data set's once), else the summary branch computes it here."""
        b, t, _ = x.shape
        if t > self.seq_len:
            raise ValueError(f"sequence length must be <= {self.seq_len}, but got {t=}.")
        if self.summary_features and summary is None:
            summary = self.summary_of(x)
        missing = torch.isnan(x)
        valid = ~missing.all(dim=2)  # [B, T]: a step with any value is data
        if self.instance_norm:
            x, stats = self._instance_norm(x, missing)
        x = x.masked_fill(missing, 0.0)
        pad = -t % self.patch_len
        if pad:
            x, valid = F.pad(x, (0, 0, 0, pad)), F.pad(valid, (0, pad))
        n = (t + pad) // self.patch_len
        tok_valid = valid.view(b, n, self.patch_len).any(dim=2)  # [B, N]: a token with any data step
        keep = tok_valid[:, None, :].to(x.dtype)
        h = x  # [B, T', C], steps by channels
        if self.step_conv is not None:  # padded steps are zero before and after it
            h = F.gelu(self._step_windows(h)) * valid[:, :, None].to(x.dtype)
        h = self._patches(h).transpose(1, 2) * keep  # [B, D, N]; padded tokens stay zero through the stem
        for conv in self.stem:
            h = F.gelu(conv(h)) * keep
        h = h.transpose(1, 2)
        if self.pos_encoding in ("sinusoidal", "learned"):
            h = h + self.pos[:, :n]
        rope = None
        if self.pooling == "cls":
            h = torch.cat((self.cls.expand(b, -1, -1), h), dim=1)
            tok_valid = F.pad(tok_valid, (1, 0), value=True)
        if self.pos_encoding == "rotary":
            k = h.shape[1]
            rope = (self.rope_cos[:k], self.rope_sin[:k])
        h = self.drop(h)
        # Always a key mask: checking for padding first would cost a host read per step, and on the
        # CPU the masked attention kernel measured within 5% of the unmasked one.
        # A series with no data at all attends to everything (a fully masked row would give NaN).
        attended = tok_valid | ~tok_valid.any(dim=1, keepdim=True)  # [B, N]: read by attention and max pooling
        mask = attended[:, None, None, :]
        for block in self.blocks:
            h = block(h, mask, rope)
        h = self.ln_f(h)
        pooled = self._pool(h, tok_valid, attended)
        if self.instance_norm:
            pooled = pooled + self.stats(stats)
        if self.summary_features:
            # clamped: a new series far outside the training spread of a statistic stays a strong signal, not a blow-up
            pooled = pooled + self._summary_branch(((summary - self.summary_mu) / self.summary_sd).clamp(-10.0, 10.0))
        return self.head(pooled)

    def _step_windows(self, h: torch.Tensor) -> torch.Tensor:
        """step_conv (a same-length Conv1d) on steps [B, T', F] as one matrix product over each
        step's window of STEP_KERNEL steps x F channels: [B, T', C]. Same weights as the conv."""
        conv = self.step_conv
        k = conv.kernel_size[0]
        win = F.pad(h, (0, 0, k // 2, k // 2)).unfold(1, k, 1)  # [B, T', F, k], a view
        return F.linear(win.reshape(*win.shape[:2], -1), conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def _patches(self, h: torch.Tensor) -> torch.Tensor:
        """The patch map (embed, a Conv1d of kernel = stride = patch_len) on steps [B, T', C] as one
        matrix product over each patch's steps x channels: [B, N, D]. Same weights as the conv."""
        b, t, c = h.shape
        w = self.embed.weight  # [D, C, p]
        return F.linear(h.reshape(b, t // self.patch_len, self.patch_len * c),
                        w.transpose(1, 2).reshape(w.shape[0], -1), self.embed.bias)

    def _pool(self, h: torch.Tensor, tok_valid: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "last":
            # the last token holding data (padding sits at the end of a shorter series)
            idx = (tok_valid * torch.arange(1, h.shape[1] + 1, device=h.device)).argmax(dim=1)
            return h[torch.arange(h.shape[0], device=h.device), idx]
        if self.pooling == "max":
            # each feature's largest value over the tokens that hold data (every token when none does)
            return h.masked_fill(~attended[:, :, None], -math.inf).amax(dim=1)
        w = tok_valid.to(h.dtype)[:, :, None]
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)

    def _instance_norm(self, x: torch.Tensor, missing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-series, per-feature standardisation over present values; returns (x, [mean, log std])."""
        present = (~missing).to(x.dtype)
        count = present.sum(dim=1, keepdim=True).clamp_min(1.0)
        filled = x.masked_fill(missing, 0.0)
        mean = filled.sum(dim=1, keepdim=True) / count
        var = (((filled - mean) * present) ** 2).sum(dim=1, keepdim=True) / count
        std = (var + _EPS).sqrt()
        # from the NaN-free copy: a NaN in the graph would poison the statistics' gradients
        x = ((filled - mean) / std * self.norm_weight + self.norm_bias).masked_fill(missing, math.nan)
        return x, torch.cat((mean, std.log()), dim=2).squeeze(1)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
