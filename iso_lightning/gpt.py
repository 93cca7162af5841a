"""A GPT-style character-level language model whose feed-forward widths adapt while it trains.

:class:`CharGPT` is a small decoder-only transformer: token and learned position embeddings, pre-norm
blocks (``x + attention(LayerNorm(x))``, then ``x + FFN(LayerNorm(x))``), a final LayerNorm and a
linear head. Attention is causal, through
:func:`torch.nn.functional.scaled_dot_product_attention`. Every block's feed-forward part is an
:class:`~iso_lightning.IsotropicFFN`, whose hidden space (``"blocks.3.ffn.hidden"``) grows and
shrinks under a :class:`~iso_lightning.DynamicTopologyCallback`: growth leaves the logits unchanged,
removals report their error. Layer norms act on the residual stream, outside the FFN spaces, so they
do not break their symmetry.

Train it with the CLI on the works of Shakespeare (about three minutes on 2 CPU cores)::

    iso-lightning fit --config examples/configs/shakespeare_gpt.yaml
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iso_lightning._validation import check_choice, check_int
from iso_lightning.ffn import IsotropicFFN
from iso_lightning.functional import PROFILES
from iso_lightning.mixin import IsotropicModuleMixin

__all__ = ["ELEMENTWISE_ACTIVATIONS", "ISOTROPIC_ACTIVATIONS", "VOCAB_KEY", "CausalSelfAttention", "CharGPT",
           "GPTBlock"]

#: Checkpoint key of the model's vocabulary (the characters its token ids stand for).
VOCAB_KEY = "char_vocab"

#: Activation names that make elementwise FFN spaces (one neuron per group, growth exact, removals scored).
ELEMENTWISE_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}
#: Activation names that make grouped isotropic FFN spaces: ``"tanh"``, ``"softsign"``, and
#: ``"isotropic_<profile>"`` for every radial profile (``"isotropic_gelu"``, ``"isotropic_swish"``).
ISOTROPIC_ACTIVATIONS = {"tanh": "tanh", "softsign": "softsign",
                         **{f"isotropic_{name}": name for name in sorted(PROFILES)}}


def _ffn_activation(name: str) -> Union[str, nn.Module]:
    check_choice("activation", name, sorted(ISOTROPIC_ACTIVATIONS) + sorted(ELEMENTWISE_ACTIVATIONS))
    if name in ELEMENTWISE_ACTIVATIONS:
        return ELEMENTWISE_ACTIVATIONS[name]()
    return ISOTROPIC_ACTIVATIONS[name]


def _check_number(name: str, value: Any, low: float, low_open: bool, high: float = math.inf) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value <= high \
        and (value > low if low_open else value >= low)
    if not ok:
        raise ValueError(f"Expected argument `{name}` to be a number {'>' if low_open else '>='} {low}"
                         f"{f' and <= {high}' if high < math.inf else ''}, but got {value!r}.")
    return float(value)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``(batch, time, d_model)``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"Expected argument `n_heads` to divide `d_model` ({d_model}), but got {n_heads}.")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    """``x + attn(ln1(x))``, then ``x + ffn(ln2(x))`` (dropout on both residual branches)."""

    def __init__(self, d_model: int, n_heads: int, ffn: IsotropicFFN, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class CharGPT(IsotropicModuleMixin, pl.LightningModule):
    """A character-level GPT whose FFN hidden spaces are neuron spaces.

    Args:
        vocab_size: number of characters (the CLI links it to the datamodule's ``vocab_size``).
        block_size: context length (largest sequence the position embedding covers).
        d_model: width of the residual stream.
        n_layers: number of blocks.
        n_heads: attention heads (``d_model`` must be a multiple).
        d_hidden: starting hidden width of every FFN (a dynamic-topology callback changes it).
        activation: ``"tanh"`` or ``"softsign"`` (isotropic, over groups of ``group_size`` neurons),
            ``"isotropic_<profile>"`` for another radial profile, or ``"gelu"`` / ``"silu"``
            (elementwise ``nn.GELU`` / ``nn.SiLU``: every neuron its own group).
        group_size: neurons per group of an isotropic activation (``None``: one group for the whole
            space, whose pre-activations span at most ``d_model + 1`` directions; ignored for
            elementwise activations).
        length, psi, psi_decay: intrinsic length and linear correction of the isotropic FFNs (see
            :class:`~iso_lightning.IsotropicFFN`).
        dropout: dropout on the attention weights and on both residual branches (not on the FFN
            hidden space, whose symmetry a per-neuron mask would break).
        lr, weight_decay, betas: AdamW; weight decay applies to matrices (not to biases, norms or
            intrinsic lengths).
        growth_scale: standard deviation of the outgoing weights of new FFN neurons.

    The characters the ids stand for are the attribute ``vocab`` (a string): taken from the
    datamodule at ``fit`` (a :class:`~iso_lightning.TextDataModule`) or set by hand, and kept in
    every checkpoint, so that a loaded model can :meth:`generate` text.

    Logged: ``train_loss`` (nats per character, every step), ``val_loss`` and ``val_bpc`` (bits per
    character), and ``test_loss``, ``test_bpc`` in ``test``.

    Example:
        >>> import torch
        >>> model = CharGPT(vocab_size=11, block_size=8, d_model=16, n_layers=1, n_heads=2, d_hidden=24,
        ...                 group_size=8)
        >>> x = torch.randint(0, 11, (2, 8))
        >>> before = model(x).detach()
        >>> _ = model.blocks[0].ffn.grow(4)
        >>> model.topology_summary()["widths"], float((model(x).detach() - before).abs().max()) < 1e-6
        ({'blocks.0.ffn.hidden': 28}, True)
    """

    def __init__(self, vocab_size: int = 84, block_size: int = 64, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4, d_hidden: int = 128, activation: str = "tanh", group_size: Optional[int] = 8,
                 length: str = "none", psi: str = "none", psi_decay: float = 0.1, dropout: float = 0.0,
                 lr: float = 3e-3, weight_decay: float = 0.1, betas: Tuple[float, float] = (0.9, 0.99),
                 growth_scale: float = 0.01) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("d_model", d_model),
                            ("n_layers", n_layers), ("n_heads", n_heads), ("d_hidden", d_hidden)):
            check_int(name, value, 1)
        _check_number("dropout", dropout, 0.0, low_open=False, high=0.999)
        _check_number("lr", lr, 0.0, low_open=True)
        _check_number("weight_decay", weight_decay, 0.0, low_open=False)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"Expected argument `betas` to be two numbers in [0, 1), but got {betas!r}.")
        act = _ffn_activation(activation)
        elementwise = isinstance(act, nn.Module)
        self.save_hyperparameters()
        self.vocab: Optional[str] = None
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        blocks: List[nn.Module] = []
        for _ in range(n_layers):
            ffn = IsotropicFFN(d_model, d_hidden, activation=_ffn_activation(activation) if elementwise else act,
                               group_size=None if elementwise else group_size,
                               length="none" if elementwise else length, psi="none" if elementwise else psi,
                               psi_decay=psi_decay, growth_scale=growth_scale)
            blocks.append(GPTBlock(d_model, n_heads, ffn, dropout))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's initialisation for the attention and embeddings; the FFNs keep their own.
        if isinstance(module, (nn.Linear, nn.Embedding)):  # the FFNs' IsoLinear layers are neither
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- the network ------------------------------------------------------------------------------
    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(batch, time, vocab_size)`` of the next character after each position of ``idx``."""
        if idx.dim() != 2 or idx.shape[1] > self.block_size:
            raise ValueError(f"Expected token ids of shape (batch, time) with time <= block_size "
                             f"({self.block_size}), but got {tuple(idx.shape)}.")
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # type: ignore[no-any-return]

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy in nats per character."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    # -- Lightning --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Take the vocabulary from the datamodule, so that checkpoints can be decoded.
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        vocab = getattr(datamodule, "vocab", None)
        if isinstance(vocab, str):
            if len(vocab) != self.hparams["vocab_size"]:
                raise ValueError(f"The datamodule's vocabulary has {len(vocab)} characters, but the model was built "
                                 f"for vocab_size={self.hparams['vocab_size']}.")
            if self.vocab is not None and self.vocab != vocab:
                raise ValueError("The datamodule's vocabulary differs from the model's `vocab`.")
            self.vocab = vocab

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[VOCAB_KEY] = self.vocab
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        vocab = checkpoint.get(VOCAB_KEY)
        if vocab is not None:
            self.vocab = str(vocab)

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(*batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss + self.psi_regularisation()

    def _evaluate(self, batch: Tuple[Tensor, Tensor], stage: str) -> None:
        loss = self.loss(*batch)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_bpc", loss / math.log(2.0), on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Next-character probabilities ``(batch, time, vocab_size)``; ``batch`` is ids or ``(ids, targets)``."""
        idx = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.softmax(self(idx), dim=-1)

    def configure_optimizers(self) -> Any:
        decay: List[nn.Parameter] = []
        no_decay: List[nn.Parameter] = []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 and not name.endswith("correction") else no_decay).append(p)
        groups: List[Dict[str, Any]] = [{"params": decay, "weight_decay": self.hparams["weight_decay"]},
                                        {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.hparams["lr"], betas=tuple(self.hparams["betas"]))

    # -- sampling ---------------------------------------------------------------------------------
    def _encode(self, text: str) -> Tensor:
        if self.vocab is None:
            raise ValueError("The model has no vocabulary to encode a text prompt with: pass token ids, or set "
                             "`model.vocab` (a fit with a TextDataModule sets it).")
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"The prompt holds characters outside the vocabulary: {''.join(unknown)!r}.")
        return torch.tensor([[index[c] for c in text]], dtype=torch.long, device=self.head.weight.device)

    @torch.no_grad()
    def generate(self, prompt: Union[str, Tensor], n: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Union[str, Tensor]:
        """Sample ``n`` characters after ``prompt``.

        Args:
            prompt: a text (needs the model's ``vocab``; the result is then the text with its
                continuation) or token ids ``(time,)`` or ``(batch, time)`` (the result: ids of
                shape ``(batch, time + n)``).
            n: characters to sample.
            temperature: divides the logits (``> 0``).
            top_k: sample among the ``top_k`` most likely characters only.
            generator: a ``torch.Generator`` (on the model's device) for reproducible samples.
        """
        check_int("n", n, 0)
        _check_number("temperature", temperature, 0.0, low_open=True)
        check_int("top_k", top_k, 1, optional=True)
        if isinstance(prompt, str):
            idx = self._encode(prompt)
        elif isinstance(prompt, Tensor) and prompt.dim() in (1, 2) and not prompt.is_floating_point():
            idx = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
            idx = idx.to(self.head.weight.device, torch.long)
        else:
            raise ValueError(f"Expected argument `prompt` to be a text or a tensor of token ids, but got {prompt!r}.")
        if idx.shape[1] == 0:
            raise ValueError("Expected a prompt of at least one character, but got an empty one.")
        was_training = self.training
        self.eval()
        try:
            for _ in range(n):
                logits = self(idx[:, -self.block_size:])[:, -1, :] / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
                idx = torch.cat([idx, nxt], dim=1)
        finally:
            self.train(was_training)
        if isinstance(prompt, str):
            assert self.vocab is not None
            return "".join(self.vocab[i] for i in idx[0].tolist())
        return idx
