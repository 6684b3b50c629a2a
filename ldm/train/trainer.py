"""Train a latent diffusion model from scratch: the VAE first, then the text-conditioned UNet with a small CLIP.

Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv:2112.10752):
stage 1 (section 3.1) an autoencoder with a light KL penalty; stage 2 (section 3.3, eq. 2) the denoising objective
on its latents, E ||eps - eps_theta(z_t, t, tau(y))||^2, with the DDPM forward process (Ho et al. 2020, eq. 4).
Classifier-free guidance needs the unconditional model too: captions are dropped to "" at random (Ho & Salimans
2022, "Classifier-Free Diffusion Guidance"). Reference training loops: diffusers `examples/text_to_image/
train_text_to_image.py` (noise, add_noise, MSE, EMA) and CompVis `ldm/models/autoencoder.py` (AutoencoderKL loss).

    Trainer(TrainConfig(out_dir=...)).run()          # both stages, resumable: Trainer(cfg, resume=path)
                                                     # TrainConfig: ldm/train/config.py
      stage "vae":  x -> encode -> sample z -> decode -> L1 + edge_weight * Sobel-L1 + kl_weight * KL
      stage "unet": z0 = vae.encode(x).sample() * scaling_factor; t ~ U{0..999}; eps ~ N(0, I)
                    z_t = scheduler.add_noise(z0, eps, t); loss = ||unet(z_t, t, text(ids)) - eps||^2

Everything random comes from one torch.Generator whose state is checkpointed, and the data of step k depends only
on k, so a resumed run equals an uninterrupted one bit for bit (on the same machine and thread count).

Under torchrun (`torchrun --nproc-per-node N -m ldm train ...`, docs/scale.md) the batch sizes of the config are
global and each process trains on its rows of every global batch with DistributedDataParallel, so N processes
compute what one does (ldm/train/ddp.py). Rank 0 alone writes checkpoints, samples, the log (train_log.jsonl) and
the exported model.

Shapes: B batch, H, W image size, h, w latent size (H/f), C latent channels, S text tokens (77), D text width.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm import distributed
from ldm.clip import CLIPTextModel
from ldm.config import SD15
from ldm.fileio import check_writable
from ldm.limits import check_fits, training_estimate
from ldm.schedulers import DDIMScheduler
from ldm.tokenizer import CLIPTokenizer
from ldm.train.checkpoint import load_state, prefixed, save_state, unprefixed
from ldm.train.config import TrainConfig, _check_int
from ldm.train.ddp import check_shardable as _check_shardable  # (tests/test_distributed.py's name)
from ldm.train.ddp import mine, parallelism, share, stage_module
from ldm.train.shapes import ShapesDataset
from ldm.unet import UNet2DConditionModel
from ldm.vae import AutoencoderKL

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.jsonl"  # one JSON line per session start and per checkpoint, written by rank 0
UNET_DATA_OFFSET = 10_000_000  # the UNet stage reads dataset samples from here on: unseen by the VAE stage
# The noise schedule of every SD 1.x / 2.x model (DESIGN.md), with DDIM as the sampler the model ships with.
SCHEDULER = replace(SD15, scheduler_class="DDIMScheduler", scheduler_overrides=()).scheduler


# ------------------------------------------------------------------------------------------------------------------
# Pieces of the loop


class EMA:
    """Exponential moving averages of a module's parameters: shadow = d * shadow + (1 - d) * param.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not dominated by
    the random initialisation (diffusers' EMAModel with use_ema_warmup=False does the same).
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().clone() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in module.named_parameters():
            self.shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)
        self.updates += 1

    def copy_to(self, module: nn.Module) -> nn.Module:
        """A copy of `module` holding the averaged weights (the module itself is left as it is)."""
        averaged = copy.deepcopy(module)
        averaged.load_state_dict({**averaged.state_dict(), **self.shadow}, strict=True)
        return averaged.eval()


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay from `base` to base / 10 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sobel(x: Tensor) -> Tensor:
    """Horizontal and vertical Sobel gradients per channel: (B, C, H, W) -> (B, 2C, H-2, W-2)."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(x.repeat_interleave(2, dim=1), kernels, groups=2 * x.shape[1])


def random_crops(x: Tensor, size: int, generator: torch.Generator, first: int = 0, total: int | None = None) -> Tensor:
    """One random size x size crop per image: (B, C, H, W) -> (B, C, size, size).

    The offsets are drawn for a batch of `total` images (default B) and rows first .. first+B-1 are used: a DDP
    rank's share of the global batch's draws."""
    if size == x.shape[-1] and size == x.shape[-2]:
        return x
    total = x.shape[0] if total is None else total
    rows = slice(first, first + x.shape[0])
    top = torch.randint(0, x.shape[-2] - size + 1, (total,), generator=generator)[rows].tolist()
    left = torch.randint(0, x.shape[-1] - size + 1, (total,), generator=generator)[rows].tolist()
    return torch.stack([img[:, t:t + size, l:l + size] for img, t, l in zip(x, top, left)])


# ------------------------------------------------------------------------------------------------------------------
# The trainer

StepCallback = Callable[[int, float], Any]  # (global step just done, its loss); may raise KeyboardInterrupt


@dataclass
class History:
    """Per-step losses of each stage, kept in the checkpoint (the loss curve is drawn from them)."""

    vae: list[float] = field(default_factory=list)
    unet: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training time so far, over every session of the run


class Trainer:
    """Both stages of a run, one step at a time, checkpointing every `checkpoint_every` steps (and at the end)."""

    def __init__(self, cfg: TrainConfig | None = None, *, resume: str | Path | None = None,
                 callback: StepCallback | None = None, progress: bool = True) -> None:
        if cfg is None and resume is None:
            raise ValueError("Trainer: give a TrainConfig, or resume=<checkpoint> to continue a run")
        if cfg is not None and not isinstance(cfg, TrainConfig):
            raise TypeError(f"Trainer: cfg must be a TrainConfig, got {type(cfg).__name__}")
        state, meta = load_state(resume) if resume is not None else ({}, {})
        if resume is not None:
            try:
                saved = TrainConfig.from_json(meta["config"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"resume: the checkpoint {str(resume)!r} holds a damaged config "
                                 f"({type(e).__name__}: {e})") from None
            # Extending a run: more UNet steps than the checkpoint was written for is allowed. The cosine schedule
            # is then stretched over the new total from the resume point on (a warm restart), so the result is
            # not the model a run configured that long from the start would give.
            extended = cfg is not None and cfg.unet_steps > saved.unet_steps
            if extended and replace(cfg, out_dir=saved.out_dir, unet_steps=saved.unet_steps) == saved:
                saved = replace(saved, unet_steps=cfg.unet_steps)
            if cfg is not None and replace(cfg, out_dir=saved.out_dir) != saved:
                diff = [f.name for f in dataclasses.fields(cfg)
                        if f.name != "out_dir" and getattr(cfg, f.name) != getattr(saved, f.name)]
                raise ValueError(f"resume: the checkpoint {str(resume)!r} was written with another config "
                                 f"(differs in: {', '.join(diff)}); resume with the same settings")
            cfg = cfg or saved
        self.cfg = cfg
        check_fits(training_estimate(cfg), "cpu", f"training with batch_size {cfg.batch_size} and vae_batch_size "
                                                   f"{cfg.vae_batch_size}")
        self.topo = distributed.join("gloo")  # torchrun's process group (gloo: the trainer runs on the CPU)
        _check_shardable(cfg, self.topo.world_size)
        self._stage_forward: dict[str, nn.Module] = {}  # the current stage's trained parts, DDP-wrapped on N ranks
        self.out = _prepare_out_dir(cfg.out_dir)
        self.callback, self.progress = callback, progress
        self.generator = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):  # the initial weights come from the seed, not the global RNG
            torch.manual_seed(cfg.seed)
            self.vae = AutoencoderKL(cfg.vae)
            # sample_size records the latent side trained at (diffusers' meaning): the pipeline's default size
            self.unet = UNet2DConditionModel(replace(cfg.unet, sample_size=cfg.image_size // cfg.vae.downsample_factor))
            self.text_encoder = CLIPTextModel(cfg.text)
        self.tokenizer = CLIPTokenizer.packaged(SD15.pad_token)
        self.scheduler = DDIMScheduler.from_config(SCHEDULER)
        self.data = ShapesDataset(cfg.image_size, cfg.seed, "train", cfg.two_objects)
        self.step = 0
        self.scaling_factor: float | None = None
        self.history = History()
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: dict[str, EMA] = {}
        self._stage_built: str | None = None
        if resume is not None:
            self._restore(state, meta, Path(resume))

    # -- the stages --------------------------------------------------------------------------------------------

    @property
    def stage(self) -> str:
        return "vae" if self.step < self.cfg.vae_steps else "unet"

    def _trained(self, stage: str) -> dict[str, nn.Module]:
        return {"vae": self.vae} if stage == "vae" else {"unet": self.unet, "text_encoder": self.text_encoder}

    def _build_stage(self) -> None:
        """The optimizer and EMA of the current stage; at the switch to the UNet, freeze the VAE (its EMA weights)
        and measure the latent scale."""
        stage = self.stage
        if self._stage_built == stage:
            return
        if stage == "unet":
            if "vae" in self.ema:  # the VAE stage just ended (or was restored from its last checkpoint)
                self.vae.load_state_dict({**self.vae.state_dict(), **self.ema.pop("vae").shadow}, strict=True)
            self.vae.requires_grad_(False).eval()
            if self.scaling_factor is None:
                self.scaling_factor = self._measure_scaling_factor()
        params = [p for m in self._trained(stage).values() for p in m.parameters()]
        base = self.cfg.vae_lr if stage == "vae" else self.cfg.lr
        self.optimizer = torch.optim.AdamW(params, lr=base, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)
        self.ema = {name: EMA(m, self.cfg.ema_decay) for name, m in self._trained(stage).items()}
        for m in self._trained(stage).values():
            m.train()
        self._stage_built = stage

    @torch.no_grad()
    def _measure_scaling_factor(self, n: int = 256) -> float:
        """1 / std of the VAE's latent means over n training images (SD's 0.18215 was found the same way)."""
        x, _ = self.data.batch(0, n)  # (n, 3, H, W)
        z = self.vae.encode(x).mode()  # (n, C, h, w)
        return float(1.0 / z.float().std())

    def _vae_step(self, k: int) -> Tensor:
        """Stage 1 loss at stage step k: reconstruction (L1), edges (Sobel L1) and the KL to N(0, I)."""
        cfg, B = self.cfg, self.cfg.vae_batch_size
        n, first = share(B, self.topo)  # this rank's rows
        x, _ = self.data.batch(k * B + first, n)  # (n, 3, H, W)
        x = random_crops(x, cfg.vae_crop, self.generator, first, B)  # (n, 3, crop, crop)
        latent = cfg.vae_crop // cfg.vae.downsample_factor
        noise = mine(torch.randn((B, cfg.vae.latent_channels, latent, latent), generator=self.generator), self.topo)
        recon, kl = self._forward("vae")(x, noise)  # (n, 3, crop, crop), KL per latent element
        return ((recon - x).abs().mean() + cfg.edge_weight * (sobel(recon) - sobel(x)).abs().mean()
                + cfg.kl_weight * kl)

    def _unet_step(self, k: int) -> Tensor:
        """Stage 2 loss at stage step k: the epsilon-prediction MSE on noised latents, captions dropped at random."""
        cfg, B, g = self.cfg, self.cfg.batch_size, self.generator
        n, first = share(B, self.topo)  # this rank's rows
        x, captions = self.data.batch(UNET_DATA_OFFSET + k * B + first, n)  # (n, 3, H, W)
        with torch.no_grad():
            posterior = self.vae.encode(x)
            eps = mine(torch.randn((B, *posterior.mean.shape[1:]), generator=g), self.topo)
            z0 = (posterior.mean + posterior.std * eps) * self.scaling_factor  # (n, C, h, w), posterior.sample
        drop = (mine(torch.rand(B, generator=g), self.topo) < cfg.caption_dropout).tolist()
        ids = self.tokenizer(["" if d else c for c, d in zip(captions, drop)])  # (n, S)
        t = mine(torch.randint(0, len(self.scheduler), (B,), generator=g), self.topo)  # (n,)
        noise = mine(torch.randn((B, *z0.shape[1:]), generator=g), self.topo)
        zt = self.scheduler.add_noise(z0, noise, t)  # (n, C, h, w)
        return F.mse_loss(self._forward("unet")(zt, t, ids), noise)

    def _train_step(self) -> float:
        self._build_stage()
        cfg, stage = self.cfg, self.stage
        k = self.step if stage == "vae" else self.step - cfg.vae_steps
        total, base = (cfg.vae_steps, cfg.vae_lr) if stage == "vae" else (cfg.unet_steps, cfg.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(k, total, base, cfg.warmup_steps)
        loss = self._vae_step(k) if stage == "vae" else self._unet_step(k)
        reported = distributed.mean(loss)  # the global batch's loss (all ranks agree on it, and on stopping)
        if not torch.isfinite(reported):
            raise FloatingPointError(f"step {self.step}: the {stage} loss is {reported.item()} (lower the "
                                     f"learning rate)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        modules = self._trained(stage)
        torch.nn.utils.clip_grad_norm_([p for m in modules.values() for p in m.parameters()], cfg.grad_clip)
        self.optimizer.step()
        for name, m in modules.items():
            self.ema[name].update(m)
        getattr(self.history, stage).append(reported.item())
        return reported.item()

    def _forward(self, stage: str) -> nn.Module:
        """The trained parts of `stage` as one module, DDP-wrapped on N ranks (ldm/train/ddp.py); built at a
        stage's first step."""
        if stage not in self._stage_forward:  # the previous stage's wrapper goes
            self._stage_forward = {stage: stage_module(stage, self.vae, self.unet, self.text_encoder, self.topo)}
        return self._stage_forward[stage]

    # -- the log -------------------------------------------------------------------------------------------------

    def _log(self, event: str) -> None:
        """Append one line to train_log.jsonl (rank 0): the event, step, stage, last loss and the parallelism."""
        if not self.topo.is_main:
            return
        losses = self.history.vae + self.history.unet
        record = {"event": event, "step": self.step, "stage": self._stage_built or self.stage,
                  "loss": losses[-1] if losses else None, "seconds": round(self.history.seconds, 3),
                  **parallelism(self.cfg, self.topo.world_size), "global_batch": {"vae": self.cfg.vae_batch_size, "unet": self.cfg.batch_size}}
        with open(self.out / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, until: int | None = None, finish: bool = True) -> Path | None:
        """Train up to global step `until` (default: the end; then, with `finish`, sample, draw the loss curve and
        export the model).

        Returns the exported model folder when the run ended and finished, else None. A KeyboardInterrupt (Ctrl-C,
        or one raised by the callback) stops the loop; the last complete checkpoint stays on disk untouched.
        """
        from tqdm import tqdm

        end = self.cfg.total_steps if until is None else until
        _check_int("until", end, 0)
        end = min(end, self.cfg.total_steps)
        bar = tqdm(total=self.cfg.total_steps, initial=self.step, disable=not (self.progress and self.topo.is_main),
                   desc="train", dynamic_ncols=True)
        self._log("start")
        try:
            while self.step < end:
                started, stage = time.perf_counter(), self.stage
                loss = self._train_step()
                self.history.seconds += time.perf_counter() - started
                self.step += 1
                bar.set_postfix(stage=stage, loss=f"{loss:.4f}")
                bar.update(1)
                if self.callback is not None:
                    self.callback(self.step, loss)
                self._after_step()
        finally:
            bar.close()
        if self.step < self.cfg.total_steps or not finish or not self.topo.is_main:
            return None
        return self.finish()

    def _after_step(self) -> None:
        cfg, step = self.cfg, self.step
        if not self.topo.is_main:  # checkpoints, logs, pictures: rank 0's
            return
        stage_end = step in (cfg.vae_steps, cfg.total_steps)
        if stage_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            self.save_checkpoint()
            self._log("checkpoint")
        if step == cfg.vae_steps and cfg.vae_steps > 0:
            from ldm.train.plots import save_reconstructions

            save_reconstructions(self.ema["vae"].copy_to(self.vae), self.data, self.out / "vae_reconstructions.png")
        in_unet = step > cfg.vae_steps
        if in_unet and cfg.sample_every and (step - cfg.vae_steps) % cfg.sample_every == 0 and step < cfg.total_steps:
            self.save_samples()

    def finish(self) -> Path:
        """The end of the run: final samples, the loss curve and the exported model folder (fp16, EMA weights)."""
        from ldm.train.export import export_model
        from ldm.train.plots import plot_losses, save_latent_channels

        self._build_stage()  # a run restored from its final checkpoint has the UNet stage to set up
        self.save_samples()
        plot_losses(self.history, self.out / "loss_curve.png")
        save_latent_channels(self.vae, self.data, self.scaling_factor, self.out / "latent_channels.png")
        return export_model(self.pipeline(), self.out / "model")

    # -- the parts as a pipeline, samples --------------------------------------------------------------------------

    def pipeline(self, ema: bool = True) -> Any:
        """An ldm.StableDiffusionPipeline of the current weights (EMA averages of the UNet and text encoder)."""
        from ldm.pipeline import StableDiffusionPipeline

        if self.scaling_factor is None:
            raise RuntimeError("pipeline: the UNet stage has not started yet (no latent scaling factor)")
        vae = copy.deepcopy(self.vae).eval()
        vae.config = replace(self.cfg.vae, scaling_factor=self.scaling_factor)  # measured at the UNet stage's start
        unet, text = self.unet, self.text_encoder
        if ema and "unet" in self.ema:
            unet, text = self.ema["unet"].copy_to(unet), self.ema["text_encoder"].copy_to(text)
        else:
            unet, text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
        return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=self.tokenizer,
                                       scheduler=DDIMScheduler.from_config(SCHEDULER))  # no family: its own sizes

    def save_samples(self, steps: int = 20, guidance: float = 5.0) -> Path:
        from ldm.train.plots import image_grid

        pipe = self.pipeline()
        images = pipe(list(self.cfg.sample_prompts), num_inference_steps=steps, guidance_scale=guidance, seed=0,
                      output_type="np").images  # (n, H, W, 3) in [0, 1]
        path = self.out / "samples" / f"step-{self.step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        image_grid(images, list(self.cfg.sample_prompts), f"step {self.step}").save(path)
        return path

    # -- checkpoints -----------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self) -> Path:
        tensors = {**prefixed("vae", self.vae.state_dict()), **prefixed("unet", self.unet.state_dict()),
                   **prefixed("text_encoder", self.text_encoder.state_dict()),
                   "rng.torch": self.generator.get_state()}
        for name, ema in self.ema.items():
            tensors.update(prefixed(f"ema.{name}", ema.shadow))
        if self.optimizer is not None:
            names = {id(p): f"{c}.{k}" for c, m in self._trained(self._stage_built).items()
                     for k, p in m.named_parameters()}
            for p, s in self.optimizer.state.items():
                tensors.update({f"optimizer.{names[id(p)]}.{key}": v for key, v in s.items()})
        meta = {"step": self.step, "stage": self._stage_built, "config": self.cfg.to_json(),
                "scaling_factor": self.scaling_factor, "ema_updates": {n: e.updates for n, e in self.ema.items()},
                "losses": dataclasses.asdict(self.history), **parallelism(self.cfg, self.topo.world_size)}
        return save_state(self.checkpoint_path, tensors, meta)

    def _restore(self, state: dict[str, Tensor], meta: dict[str, Any], path: Path) -> None:
        try:
            for name, module in (("vae", self.vae), ("unet", self.unet), ("text_encoder", self.text_encoder)):
                module.load_state_dict(unprefixed(name, state), strict=True)
            self.generator.set_state(state["rng.torch"])
            self.step, self.scaling_factor = int(meta["step"]), meta["scaling_factor"]
            self.history = History(**meta["losses"])
            stage = meta["stage"]
            if stage is not None:
                self._build_stage_as(stage)
                for name, ema in self.ema.items():
                    ema.shadow = unprefixed(f"ema.{name}", state)
                    ema.updates = int(meta["ema_updates"][name])
                    if set(ema.shadow) != {k for k, _ in self._trained(stage)[name].named_parameters()}:
                        raise KeyError(f"ema.{name}: the averaged weights do not match the model")
                for c, m in self._trained(stage).items():
                    for k, p in m.named_parameters():
                        found = unprefixed(f"optimizer.{c}.{k}", state)
                        if found:
                            self.optimizer.state[p] = found
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"resume: the checkpoint {str(path)!r} does not fit this trainer "
                             f"({type(e).__name__}: {e})") from None

    def _build_stage_as(self, stage: str) -> None:
        """Rebuild the optimizer/EMA of the stage a checkpoint was written in (the VAE stage's last checkpoint is
        written after its final step, when self.stage already says "unet")."""
        if stage == "vae":
            params = list(self.vae.parameters())
            self.optimizer = torch.optim.AdamW(params, lr=self.cfg.vae_lr, weight_decay=self.cfg.weight_decay)
            self.ema = {"vae": EMA(self.vae, self.cfg.ema_decay)}
            self.vae.train()
            self._stage_built = "vae"
        else:
            self._build_stage()


def _prepare_out_dir(out_dir: str) -> Path:
    """The run folder, created if need be and checked writable before any training (ValueError if not)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir!r} is a file, not a folder; choose a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir {out_dir!r}: cannot create the folder ({e.strerror or e})") from None
    check_writable(out, "out_dir")
    return out


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None,
          callback: StepCallback | None = None, progress: bool = True) -> Path | None:
    """Run (or continue) a training run to its end; returns the exported model folder."""
    return Trainer(cfg, resume=resume, callback=callback, progress=progress).run()
