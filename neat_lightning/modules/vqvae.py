"""VQVAE: the visual codebook of the MVoT path (images <-> grids of discrete tokens).

The unified model loads a trained VQVAE frozen and uses only this interface:

* ``encode(images) -> (B, h, w) int64`` token grids and ``decode(tokens) -> (B, C, H, W)`` images in [0, 1]
  (neither changes any state);
* ``codebook`` (K, D), ``codebook_size`` K, ``codebook_distances()`` (K, K) unsquared Euclidean distances between
  codes (MVoT's token discrepancy loss ``L_D = mean_i sum_j D[t_i, j] softmax(logits_i)_j``);
* ``grid_shape(image_size) -> (h, w)``.

:class:`VQVAETokenizer` wraps a frozen VQ-VAE checkpoint as the :class:`~neat_lightning.protocols.ImageTokenizer` that
:class:`~neat_lightning.data.multimodal.MultimodalDataModule` is given (YAML ``class_path``/``init_args``), and
:func:`check_tokenizer_matches` is the check that the data's image tokens are the model's.
:func:`save_vqvae_checkpoint` writes a loadable checkpoint without a Trainer.

Training: reconstruction MSE plus the quantizer's commitment loss; the codebook itself follows an EMA of the
encodings (no gradient), with dead-code restarts (:mod:`neat_lightning.components.quantizer`). Validation reports
``val/recon_mse``, ``val/psnr`` (dB, mean over images), ``val/codebook_usage`` (distinct codes used over the whole
validation epoch / K), ``val/perplexity`` (of the epoch's code histogram) and ``val/dead_codes`` (codes unused over
the epoch), and logs originals above reconstructions as one image (TensorBoard ``add_image``; a PNG file in the log
directory of CSV-style loggers).
"""

from __future__ import annotations

import copy
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torchmetrics import MeanMetric, Metric

from neat_lightning.codec import VisualVocab
from neat_lightning.choices import check_choice
from neat_lightning.components.quantizer import RestartSampling, VectorQuantizer, perplexity_from_counts, squared_distances
from neat_lightning.components.vqvae import ConvVAEConfig, Decoder, Encoder, Stem
from neat_lightning.modules.base import FORMAT, FORMAT_KEY, ResumableModule, load_frozen
from neat_lightning.modules.optim import default_adamw


CODEBOOK_KEY = "quantizer.embed"


class CodeUsage(Metric):
    """Histogram of code ids over an epoch, summed across ranks: (K,) int64."""

    full_state_update = False

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.reshape(-1), minlength=self.codebook_size)

    def compute(self) -> torch.Tensor:
        return self.counts


def psnr_per_image(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B,) PSNR in dB, ``10 log10(1 / mse)`` (mse floored at 1e-10, i.e. 100 dB)."""
    mse = ((recon - target) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def comparison_grid(originals: torch.Tensor, recons: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """(N, C, H, W) originals and reconstructions -> (C, 2 (H + pad), N (W + pad)) image: originals on top."""
    both = torch.stack([originals, recons]).detach().clamp(0, 1)  # (2, N, C, H, W)
    both = F.pad(both, (0, pad, 0, pad), value=1.0)
    return rearrange(both, "r n c h w -> c (r h) (n w)")


def write_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """Write a (C, H, W) float image in [0, 1] (C = 1 or 3) as an 8-bit PNG, atomically (write, then rename).
    Needs only ``zlib`` (no Pillow)."""
    c, h, w = image.shape
    if c not in (1, 3):
        raise ValueError(f"write_png: image must have 1 or 3 channels; got shape {tuple(image.shape)}")
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    rows = rearrange(pixels, "c h w -> h (w c)").cpu()
    raw = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rows], 1).numpy().tobytes()  # filter byte 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    colour_type = 2 if c == 3 else 0
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)


class VQVAE(ResumableModule):
    """VQ-VAE with an EMA codebook for RGB grid-world images.

    Args:
        in_channels: image channels.
        channels: width of the encoder/decoder convolutions.
        n_res_blocks: residual blocks in the encoder and in the decoder.
        downsample: spatial factor f (power of two): an H x W image is an H/f x W/f token grid.
        codebook_size: number of codes K.
        embed_dim: code dimension D.
        stem: ``strided`` (stride-2 conv pyramid, the VQ-VAE paper) or ``patch`` (one stride-f conv; cheap on CPU).
        decay: EMA decay of the codebook (VQ-VAE-2: 0.99).
        commitment: commitment weight beta (VQ-VAE: 0.25).
        dead_code_threshold: codes whose EMA assignment count per step falls below this are restarted to
            encodings of the current batch (0 disables). Scale with (tokens per batch) / K.
        restart_sampling: ``error`` (restart to poorly-quantized encodings, k-means++-like) or ``uniform``.
        kmeans_init: initialise the codebook with k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        cosine: l2-normalised encodings and codes.
        quantizer_seed: seed of the codebook initialisation and restarts.
        lookup_dim: factorised codes (ViT-VQGAN / LlamaGen): the nearest-code lookup, EMA and restarts run in a
            ``lookup_dim``-dimensional projection of the encoding; ``codebook`` stays (K, embed_dim), the linear
            map of the low-dimensional codes back to ``embed_dim`` that the decoder reads. ``None``: no projection.
        restart_distinct: restart dead codes to distinct batch encodings (sampled without replacement).
        restart_count: EMA count a restarted code starts at (``None``: ``dead_code_threshold``); the mean count
            (tokens per batch / K) gives restarted codes time to be hit when K exceeds the tokens of a batch.
        learning_rate: peak AdamW learning rate of the default optimizer (unused when the CLI sets ``optimizer:``).
        weight_decay: AdamW weight decay on conv kernels.
        warmup_steps: linear warm-up steps, then cosine decay to ``min_lr_ratio * learning_rate``.
        min_lr_ratio: final learning rate as a fraction of the peak.
        log_images: originals/reconstructions shown in the logged comparison image (0: none).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        n_res_blocks: int = 2,
        downsample: int = 4,
        codebook_size: int = 256,
        embed_dim: int = 64,
        stem: Stem = "strided",
        decay: float = 0.99,
        commitment: float = 0.25,
        dead_code_threshold: float = 1.0,
        restart_sampling: RestartSampling = "error",
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        cosine: bool = False,
        quantizer_seed: int = 0,
        lookup_dim: int | None = None,
        restart_distinct: bool = False,
        restart_count: float | None = None,
        learning_rate: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        log_images: int = 8,
    ) -> None:
        super().__init__()
        if log_images < 0:
            raise ValueError(f"log_images={log_images} must be >= 0")
        self.save_hyperparameters()
        self.config = ConvVAEConfig(in_channels, channels, n_res_blocks, downsample, embed_dim, stem)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantizer = VectorQuantizer(
            codebook_size, embed_dim, decay=decay, commitment=commitment, dead_code_threshold=dead_code_threshold,
            restart_sampling=restart_sampling, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, cosine=cosine,
            seed=quantizer_seed, lookup_dim=lookup_dim, restart_distinct=restart_distinct,
            restart_count=restart_count,
        )
        self.val_usage = CodeUsage(codebook_size)
        self.val_mse = MeanMetric()
        self.val_psnr = MeanMetric()
        self.val_commit = MeanMetric()
        self._val_examples: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- the codebook interface --------------------------------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) the codes (detached; unit vectors when ``cosine``)."""
        return self.quantizer.codebook.detach()

    @torch.no_grad()
    def codebook_distances(self) -> torch.Tensor:
        """(K, K) unsquared Euclidean distances between codes; zero diagonal, symmetric."""
        cb = self.codebook.float()
        d = squared_distances(cb, cb).sqrt_()
        d = (d + d.T) / 2  # exact symmetry despite rounding in |x|^2 - 2 x.y + |y|^2
        return d.fill_diagonal_(0.0)

    def grid_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of an image of ``image_size`` (side, or (H, W)) pixels."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        f = self.config.downsample
        if h % f or w % f or h < f or w < f:
            raise ValueError(f"image size (H, W)=({h}, {w}) must be a positive multiple of downsample={f}")
        return h // f, w // f

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError naming the shape unless images are (B, in_channels, H, W) with H, W multiples of f."""
        c = self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"images must be (B, {c}, H, W) with in_channels={c}; got shape {tuple(images.shape)}")
        f = self.config.downsample
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(
                f"image height and width must be multiples of downsample={f}; got shape {tuple(images.shape)}"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images in [0, 1] -> (B, H/f, W/f) int64 tokens. Never updates the codebook."""
        self.check_images(images)
        z = rearrange(self.encoder(images.to(self.device, torch.float32)), "b d h w -> b h w d")
        return self.quantizer.indices_from_vectors(z)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 tokens -> (B, C, h f, w f) images clamped to [0, 1]."""
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be (B, h, w); got shape {tuple(tokens.shape)}")
        q = rearrange(self.quantizer.vectors_from_indices(tokens.to(self.device)), "b h w d -> b d h w")
        return self.decoder(q).clamp(0, 1)

    # -- training ------------------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor):
        """(B, C, H, W) -> (reconstruction (B, C, H, W), unclamped; :class:`QuantizerOutput` with (B, h, w) ids)."""
        self.check_images(images)
        z = rearrange(self.encoder(images), "b d h w -> b h w d")
        out = self.quantizer(z)
        recon = self.decoder(rearrange(out.quantized, "b h w d -> b d h w"))
        return recon, out

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        recon, out = self(batch)
        mse = F.mse_loss(recon, batch)
        loss = mse + out.commit_loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/recon_mse", mse)
        self.log("train/perplexity", out.perplexity)
        self.log("train/restarted_codes", out.restarted.float())
        return loss

    def _eval_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        recon, out = self(batch)
        recon = recon.clamp(0, 1)
        self.val_mse.update(((recon - batch) ** 2).flatten(1).mean(1))
        self.val_psnr.update(psnr_per_image(recon, batch))
        self.val_commit.update(out.commit_loss, weight=batch.shape[0])
        self.val_usage.update(out.indices)
        if batch_idx == 0 and self.hparams.log_images:
            n = self.hparams.log_images
            self._val_examples = (batch[:n].detach().cpu(), recon[:n].detach().cpu())

    def _eval_epoch_end(self, prefix: str) -> None:
        if self.val_mse.update_count == 0:
            return
        counts = self.val_usage.compute()
        used = int((counts > 0).sum())
        mse = self.val_mse.compute()
        self.log(f"{prefix}/recon_mse", mse, prog_bar=True)
        self.log(f"{prefix}/loss", mse + self.val_commit.compute())
        self.log(f"{prefix}/psnr", self.val_psnr.compute(), prog_bar=True)
        self.log(f"{prefix}/codebook_usage", used / self.codebook_size, prog_bar=True)
        self.log(f"{prefix}/perplexity", perplexity_from_counts(counts))
        self.log(f"{prefix}/dead_codes", float(self.codebook_size - used))
        for m in (self.val_usage, self.val_mse, self.val_psnr, self.val_commit):
            m.reset()
        if self._val_examples is not None and not self.trainer.sanity_checking:
            self.log_comparison(*self._val_examples, tag=f"{prefix}/reconstructions")
        self._val_examples = None

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def log_comparison(self, originals: torch.Tensor, recons: torch.Tensor, tag: str) -> None:
        """Log originals (top row) above reconstructions: TensorBoard ``add_image``; for CSV-style loggers a PNG
        ``<log_dir>/images/<tag>_step<N>.png``. Rank zero only."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        grid = comparison_grid(originals, recons)
        step = self.global_step
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, grid, global_step=step)
            elif isinstance(logger, CSVLogger) or getattr(logger, "log_dir", None):
                name = tag.replace("/", "_")
                write_png(Path(logger.log_dir) / "images" / f"{name}_step{step:07d}.png", grid)

    def configure_optimizers(self):
        hp = self.hparams
        return default_adamw(self, hp.learning_rate, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio)

    # -- checkpoints ---------------------------------------------------------------------------------------------------

    def _check_codebook_shape(self, state_dict: dict[str, Any], source: str) -> None:
        theirs = state_dict.get(CODEBOOK_KEY)
        if theirs is None:
            return
        ours = self.quantizer.embed
        if tuple(theirs.shape) != tuple(ours.shape):
            lookup = self.quantizer.lookup_dim
            what = "(codebook_size, embed_dim)" if lookup is None else "(codebook_size, lookup_dim)"
            extra = "" if lookup is None else f", lookup_dim={lookup}"
            raise ValueError(
                f"{source}: codebook shape mismatch: the checkpoint has {what} = "
                f"{tuple(theirs.shape)}, this model is configured with {tuple(ours.shape)} "
                f"(codebook_size={self.codebook_size}, embed_dim={self.config.embed_dim}{extra})"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_codebook_shape(checkpoint.get("state_dict", {}), "checkpoint")
        super().on_load_checkpoint(checkpoint)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._check_codebook_shape(state_dict, "state_dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ----------------------------------------------------------------------------------------------------------------------
# the VQ-VAE as the data's image tokenizer

TOKENIZER_HINT = "train one with `neat fit --config configs/vqvae_quickstart.yaml`"


class VQVAETokenizer:
    """A frozen VQ-VAE as an :class:`~neat_lightning.protocols.ImageTokenizer`: what
    :class:`~neat_lightning.data.multimodal.MultimodalDataModule` is given to turn images into codes.

    In YAML, under the data's ``init_args``::

        tokenizer:
          class_path: neat_lightning.modules.vqvae.VQVAETokenizer
          init_args:
            ckpt_path: runs/vqvae_quickstart/checkpoints/last.ckpt

    Args:
        ckpt_path: a :class:`VQVAE` checkpoint, loaded frozen on the CPU (``modules.base.load_frozen``).

    Raises:
        FileNotFoundError / IsADirectoryError / ValueError: ``ckpt_path`` is missing, a folder, truncated, or not a
            VQVAE checkpoint (the message names ``ckpt_path`` and its value).
    """

    def __init__(self, ckpt_path: str) -> None:
        self.ckpt_path: str | None = ckpt_path
        self.vqvae = load_frozen(VQVAE, ckpt_path, f"VQVAETokenizer ckpt_path={ckpt_path!r}", TOKENIZER_HINT)

    @classmethod
    def from_vqvae(cls, vqvae: VQVAE) -> VQVAETokenizer:
        """A tokenizer over a frozen CPU copy of ``vqvae`` (scripts and tests: no checkpoint file needed); the
        original is left as it is."""
        tokenizer = cls.__new__(cls)
        tokenizer.ckpt_path = None
        tokenizer.vqvae = copy.deepcopy(vqvae).cpu().eval().requires_grad_(False)
        return tokenizer

    @property
    def codebook_size(self) -> int:
        return self.vqvae.codebook_size

    def grid_shape(self, image_size: int) -> tuple[int, int]:
        """Code grid (h, w) of a square image of ``image_size`` pixels."""
        return self.vqvae.grid_shape(image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images in [0, 1] -> (B, H/f, W/f) int64 codes on the CPU."""
        return self.vqvae.encode(images).cpu()

    def __repr__(self) -> str:
        source = f"ckpt_path={self.ckpt_path!r}" if self.ckpt_path is not None else "from_vqvae"
        return f"{type(self).__name__}({source}, codebook_size={self.codebook_size})"


def check_tokenizer_matches(model_vocab: VisualVocab, data_vocab: VisualVocab) -> None:
    """Raise unless the data's image tokens are the model's: the same codebook size and code grid.

    The model reads image ids with the VQ-VAE of its ``vqvae_ckpt`` at its ``image_size``; the data writes them with
    its ``tokenizer`` at its own ``image_size``. Both must give the same :class:`~neat_lightning.codec.VisualVocab`.
    """
    if model_vocab != data_vocab:
        raise ValueError(
            f"the data's image tokens {data_vocab} do not match the model's {model_vocab}: the data's tokenizer and "
            "image_size must give the codebook size and code grid of the model's vqvae_ckpt and image_size"
        )


def save_vqvae_checkpoint(vqvae: VQVAE, path: str | Path) -> Path:
    """Write ``vqvae`` (weights + hyperparameters) as a checkpoint that ``VQVAE.load_from_checkpoint``,
    :class:`VQVAETokenizer` and ``NeatModel``'s ``vqvae_ckpt`` read, without a Trainer (e.g. an untrained tiny VQ-VAE
    for tests and CI). Written atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": vqvae.state_dict(), "hyper_parameters": dict(vqvae.hparams),
                "pytorch-lightning_version": L.__version__, FORMAT_KEY: FORMAT}, tmp)
    tmp.replace(path)
    return path
